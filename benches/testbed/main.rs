//! The edge testbed: deployments replayed on K clusters × N nodes, each
//! strategy measured from the deployment decision until a real command of
//! the image has run to completion in its rootfs.
//!
//! * the cloud: a real `docker-registry` holding the corpus images in
//!   original and refactored form (refactored jointly, as BREAK refactors
//!   the set of images a registry serves), reached by every cluster through
//!   its own `breakfs shape` link (default 50 ms RTT, 100 Mbit/s, shared by
//!   the cluster's nodes);
//! * node to node: one shaped link per pair of clusters (and one inside
//!   each), default 1 ms / 1 Gbit/s inside a cluster and 20 ms / 200 Mbit/s
//!   across;
//! * the workload: the IBM trace sample's deployments (a client's run of
//!   blob requests for a repository), repositories mapped onto corpus
//!   families by popularity, the version advancing with trace time (v1,
//!   then the point release, then v2: version updates), clients onto
//!   clusters, arrivals at the trace's times scaled into `--replay-secs`
//!   (deployments overlap, as they do);
//! * strategies, each from empty caches on the same deployments:
//!   **docker-like** (layers downloaded one by one through the link, each
//!   extracted in turn into its own directory, the rootfs an overlay of
//!   them, as overlay2 does; per-node layer store; least-loaded node),
//!   **containerd** (the real one, one per node: `ctr image pull
//!   --plain-http` through the link and `ctr run`; least-loaded node),
//!   **eStargz** (each original converted per layer by `ctr-remote image
//!   convert --estargz --oci`, mounted lazily from the cloud only by
//!   `breakfs mount --standalone --no-hydrate`, per-node cache;
//!   least-loaded node: what stargz-snapshotter users run, through
//!   breakfs' lazy reader), **eStargz optimized** (the same, converted by
//!   `ctr-remote image optimize`, which records the image's command and
//!   lays the files it reads first; the mount fetches that landmarked
//!   region at once), **breakfs** (a
//!   `breakfs node` per node with every other node as a peer over the
//!   shaped links, the refactored images, `breakfs sched` placing each pod
//!   and planning prefetch), and the ablations.
//!
//! Each deployment's rootfs is checked against the original image (content
//! hashes of sampled files, from `umoci unpack`); the run fails on any
//! difference. Set-up work is cached outside the repository (refactored
//! layouts keyed by the sources of the refactor and index crates, eStargz
//! conversions and reference hashes by image digest).
//! `cargo bench --bench testbed -- --help` lists the settings; writes
//! target/bench-testbed.md and target/bench-testbed.svg.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/support/containerd.rs"]
#[allow(dead_code)]
mod containerd;
#[path = "../../tests/support/corpus.rs"]
mod corpus;
#[path = "../support/harness.rs"]
mod harness;
#[path = "../../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

mod breakfs;
mod cache;
mod estargz;
mod interrupt;
mod opts;
mod reference;
mod replay;
mod report;
mod strategies;
mod workload;
mod world;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use harness::{Env, Machine, Shaper, detach_under, median};
use registry::TestRegistry;

use breakfs::run_breakfs;
use estargz::Conversion;
pub use interrupt::catch_interrupts;
use interrupt::{INTERRUPTED, check_interrupt, parallel};
pub use opts::{Opts, Strategy};
use opts::{USAGE, parse_opts};
use reference::reference;
pub use report::Report;
use report::{keep_logs, report, svg_plot};
use strategies::{run_containerd, run_docker_like, run_estargz};
use workload::workload;
use world::{Outcome, World, fill_registry};

/// The whole benchmark with `o`, in a temp dir of its own (removed after).
pub fn run_testbed(o: &Opts) -> Result<Report> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the testbed needs root (FUSE mounts, overlayfs, chroot)"
    );
    let started = Instant::now();
    let families: Vec<&str> = o.families.iter().map(String::as_str).collect();
    let order = |t: &str| ["v1", "point", "v2"].iter().position(|x| *x == t);
    let mut images = corpus::build_families(&families)?;
    images.sort_by(|a, b| (a.family, order(&a.tag)).cmp(&(b.family, order(&b.tag))));
    let deps = workload(o, &images)?;
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-testbed")
        .tempdir()?;
    eprintln!("testbed: working in {}", tmpdir.path().display());
    let result = (|| {
        let mut reg = TestRegistry::start();
        let env = Env {
            tmp: tmpdir.path().to_path_buf(),
            run_dir: tmpdir.path().join("run"),
            link: reg.host(),
        };
        std::fs::create_dir_all(&env.run_dir)?;
        check_interrupt()?;
        // Converted only for a strategy that mounts them (the conversions
        // take minutes on a fresh machine); else pushed only if cached.
        let estargz = if o
            .strategies
            .iter()
            .any(|s| matches!(s, Strategy::Estargz | Strategy::EstargzOptimized))
        {
            Some(estargz::converted(&env.tmp, &images, o.estargz_level)?)
        } else {
            estargz::cached(&images, o.estargz_level)
        };
        check_interrupt()?;
        let refactored = fill_registry(&env, &mut reg, &images, estargz.as_deref())?;
        let refs = parallel(&images, 2, |im| reference(&env, im, 40))?;
        check_interrupt()?;
        let links: Vec<Shaper> = (0..o.clusters)
            .map(|_| Shaper::start(&reg.host(), o.cloud_rtt, o.cloud_mbit))
            .collect::<Result<_>>()?;
        let setup_secs = started.elapsed().as_secs_f64();
        eprintln!(
            "testbed: {} deployments of {} images on {} × {} nodes, set up in {setup_secs:.0} s",
            deps.len(),
            images.len(),
            o.clusters,
            o.nodes,
        );
        let w = World {
            o,
            env: &env,
            reg: &reg,
            links: &links,
            images: &images,
            refs: &refs,
            refactored: &refactored,
        };
        let work = strategies_dir(&env.tmp)?;
        let mut results: Vec<(Strategy, Outcome)> = Vec::new();
        for s in &o.strategies {
            check_interrupt()?;
            let dir = work.join(s.flag());
            std::fs::create_dir_all(&dir)?;
            for l in &links {
                l.put_back();
            }
            let t = Instant::now();
            let r = match s {
                Strategy::DockerLike => run_docker_like(&w, &deps, &dir),
                Strategy::Containerd => run_containerd(&w, &deps, &dir),
                Strategy::Estargz => run_estargz(&w, &deps, &dir, Conversion::Convert),
                Strategy::EstargzOptimized => run_estargz(&w, &deps, &dir, Conversion::Optimize),
                v => run_breakfs(&w, &deps, &dir, *v),
            };
            detach_under(&dir);
            if r.is_err() {
                keep_logs(&dir, s.flag());
            }
            let _ = std::fs::remove_dir_all(&dir);
            let r = r.with_context(|| format!("strategy {}", s.name()))?;
            eprintln!(
                "testbed: strategy {} done in {:.0} s: median time to ready {:.2} s, {:.0} MB from the cloud, {:.0} MB from peers, caches {:.0} MB",
                s.name(),
                t.elapsed().as_secs_f64(),
                median(&r.secs),
                r.cloud as f64 / 1e6,
                r.peer as f64 / 1e6,
                r.cache as f64 / 1e6,
            );
            results.push((*s, r));
        }
        let markdown = report(
            o,
            &deps,
            &images,
            &refactored,
            &results,
            setup_secs,
            started,
        );
        let svg = svg_plot(&results);
        Ok(Report {
            results,
            markdown,
            svg,
            deployments: deps.len(),
        })
    })();
    detach_under(tmpdir.path());
    drop(tmpdir);
    // Interrupted, whatever failed first failed for that reason.
    result.map_err(|e: anyhow::Error| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            e.context("interrupted: stopped and cleaned up")
        } else {
            e
        }
    })
}

/// Where each strategy keeps its nodes' layers, caches and containers: a
/// tmpfs of half the memory at `tmp/s` (unmounted with the rest at the
/// end), else `tmp/s` on disk. Removing the gigabytes a strategy leaves
/// takes minutes on a file system mounted with `discard` (each unlink
/// waits for the disk to discard its blocks), and the next strategy would
/// wait for it. Writing to memory rather than disk, if anything, favours
/// the strategies that write the most (docker-like and containerd
/// extract every layer).
fn strategies_dir(tmp: &Path) -> Result<PathBuf> {
    let dir = tmp.join("s");
    std::fs::create_dir_all(&dir)?;
    let mem_kb = Machine::this().mem_kib;
    let mounted = mem_kb > 0
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}k,mode=0700", mem_kb / 2))
            .arg("breakfs-testbed")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
    if mounted {
        eprintln!(
            "testbed: strategies work in a tmpfs of {} GB at {}",
            mem_kb / 2 / 1_000_000,
            dir.display()
        );
    } else {
        eprintln!(
            "testbed: warning: no tmpfs at {}: strategies work on disk, and removing what each leaves may take minutes",
            dir.display()
        );
    }
    Ok(dir)
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let Some(o) = parse_opts()? else {
        println!("{USAGE}");
        return Ok(());
    };
    catch_interrupts();
    let r = run_testbed(&o)?;
    println!("{}", r.markdown);
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-testbed.md", &r.markdown)?;
    std::fs::write("target/bench-testbed.svg", &r.svg)?;
    eprintln!("testbed: wrote target/bench-testbed.md and target/bench-testbed.svg");
    Ok(())
}
