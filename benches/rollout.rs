//! Rollout benchmark: the nodes of one cluster start the same new image at
//! once. Does the cloud link carry it about once, and is each node ready
//! about as soon as one node alone?
//!
//! A real docker-registry holds one refactored (eStargz) corpus image,
//! behind a counting proxy (every byte the registry sends) and one
//! `breakfs shape` link that all nodes share (default 50 ms RTT and
//! 50 Mbit/s: the cluster's cloud link). The nodes are real `breakfs node`
//! processes, fresh caches each phase, each the others' peer through one
//! shaped cluster link (1 ms RTT, 1 Gbit/s, a route to each node, as the
//! testbed shapes a cluster). A node is *ready* when the image is mounted
//! through it (`breakfs mount --node`, `--no-hydrate`: what the command
//! reads is fetched) and the image's command has run to completion in a
//! chroot of the mount (`python3 -c 'import json, ssl, sqlite3'` for
//! python), timed from the common start.
//!
//! Each run has two phases, on the same registry and link: one node alone,
//! then N nodes (default 8) starting at once. Reported: each node's time
//! to ready and bytes from the cloud and from peers, the registry's bytes
//! per phase (the counting proxy), and the ratios the acceptance asks for
//! (cloud bytes ≤ 1.2×, median time to ready ≤ 1.5× one node alone).
//!
//! `cargo bench --bench rollout -- [--runs N] [--image FAMILY] [--nodes N]
//! [--mbit M] [--rtt-ms MS] [--peer-mbit M]` (defaults: 1 run, python, 8,
//! 50, 50, 1000); writes the report to stdout, target/bench-rollout.md and
//! docs/results/rollout.md. Needs root, FUSE, skopeo, umoci and
//! docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/proxy.rs"]
#[allow(dead_code)]
mod proxy;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::sync::Barrier;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use harness::{Env, NodeMount, Shaper, direct_env, median, publish, reserve_port};
use proxy::CountingProxy;
use registry::TestRegistry;

/// Where a node's fetched chunks came from, by its rollout decisions.
const FROMS: [&str; 5] = ["holder", "fetching", "claimed", "deciding", "here"];

/// Where a node's config and TOCs came from, by its rollout decisions.
const META_FROMS: [&str; 5] = ["holder", "fetching", "deciding", "here", "failed"];

struct Settings {
    runs: usize,
    family: String,
    nodes: usize,
    mbit: u64,
    rtt_ms: u64,
    peer_mbit: u64,
}

/// One node of a phase.
struct NodeSample {
    /// From the common start to the command done.
    ready: f64,
    /// Of which the mount.
    mount: f64,
    /// Bytes it fetched from the cloud and from peers, by its metrics.
    cloud: f64,
    peer: f64,
    /// Chunks per [`FROMS`], and chunks it took on for peers.
    froms: [f64; 5],
    claims: f64,
    /// Configs and TOCs per [`META_FROMS`].
    metas: [f64; 5],
    /// CPU time its daemon spent from the common start until every node
    /// was ready (user + system).
    cpu: f64,
}

/// One phase: one node alone, or the cluster at once.
struct Phase {
    nodes: Vec<NodeSample>,
    /// Bytes the registry sent during the phase (the counting proxy).
    registry: u64,
    /// CPU seconds the shaped links (`breakfs shape`: cloud and cluster)
    /// used meanwhile.
    links: f64,
}

impl Phase {
    fn median_ready(&self) -> f64 {
        median(&self.nodes.iter().map(|n| n.ready).collect::<Vec<_>>())
    }

    fn max_ready(&self) -> f64 {
        self.nodes.iter().map(|n| n.ready).fold(0.0, f64::max)
    }
}

fn main() -> Result<()> {
    let s = settings()?;
    ensure!(
        std::fs::metadata("/proc/self")?.uid() == 0,
        "the rollout benchmark needs root (FUSE mounts through the node daemons, chroot)"
    );
    let fam = corpus::family(&s.family)?.name;
    let image = corpus::build_families(&[fam])?
        .into_iter()
        .find(|i| i.tag == "v1")
        .ok_or_else(|| anyhow!("the corpus has no {fam}:v1"))?;

    let reg = TestRegistry::start();
    // Declared after the registry: removed before it, after every guard below.
    let (tmpdir, env) = direct_env("breakfs-bench-rollout", &reg)?;
    let published = publish(&env, &reg, &image)?;
    let proxy = CountingProxy::start(&reg.host());
    let cloud = Shaper::start(&proxy.host(), s.rtt_ms, s.mbit)?;
    let load_before = uptime();
    eprintln!(
        "rollout bench: {} ({:.1} MB in {} layers), command {:?}; cloud link {} ms RTT, {} Mbit/s \
         shared; {} nodes on a {} Mbit/s cluster link; {} runs; {load_before}",
        published.title,
        published.size as f64 / 1e6,
        published.layers,
        image.command,
        s.rtt_ms,
        s.mbit,
        s.nodes,
        s.peer_mbit,
        s.runs
    );

    let mut runs = Vec::new();
    for run in 0..s.runs {
        let mut phases = Vec::new();
        for n in [1, s.nodes] {
            let p = phase(
                &env,
                &s,
                n,
                &published.remote,
                &reg.host(),
                &cloud,
                &proxy,
                &image,
            )
            .with_context(|| format!("run {}, {n} node(s)", run + 1))?;
            eprintln!(
                "rollout bench: run {} with {n} node(s): median ready {:.2} s (max {:.2} s), \
                 {:.1} MB from the registry",
                run + 1,
                p.median_ready(),
                p.max_ready(),
                p.registry as f64 / 1e6
            );
            phases.push(p);
        }
        let cluster = phases.pop().unwrap();
        let alone = phases.pop().unwrap();
        runs.push((alone, cluster));
    }
    let load_after = uptime();

    let md = markdown(
        &s,
        &published,
        &image.command,
        &runs,
        &[load_before, load_after],
    );
    harness::write_report("rollout", &md)?;
    drop(cloud);
    drop(proxy);
    drop(tmpdir);
    Ok(())
}

fn settings() -> Result<Settings> {
    let mut s = Settings {
        runs: 1,
        family: "python".into(),
        nodes: 8,
        mbit: 50,
        rtt_ms: 50,
        peer_mbit: 1000,
    };
    let mut args = std::env::args().skip(1);
    let number = harness::positive;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => s.runs = number(args.next(), "--runs")? as usize,
            "--nodes" => s.nodes = number(args.next(), "--nodes")?.max(2) as usize,
            "--mbit" => s.mbit = number(args.next(), "--mbit")?,
            "--rtt-ms" => s.rtt_ms = number(args.next(), "--rtt-ms")?,
            "--peer-mbit" => s.peer_mbit = number(args.next(), "--peer-mbit")?,
            "--image" => {
                s.family = args
                    .next()
                    .ok_or_else(|| anyhow!("--image wants a corpus family"))?;
            }
            other => bail!(
                "unknown argument {other:?}: use --runs N, --image FAMILY, --nodes N, --mbit M, \
                 --rtt-ms MS, --peer-mbit M"
            ),
        }
    }
    Ok(s)
}

/// Start `n` fresh nodes (each the others' peer through one shaped
/// cluster link, all reaching the registry through `cloud`), then on all
/// at once mount `remote` and run the image's command; each node's time
/// to ready and bytes.
#[allow(clippy::too_many_arguments)]
fn phase(
    env: &Env,
    s: &Settings,
    n: usize,
    remote: &str,
    registry_host: &str,
    cloud: &Shaper,
    proxy: &CountingProxy,
    image: &corpus::CorpusImage,
) -> Result<Phase> {
    let ports: Vec<u16> = (0..n).map(|_| reserve_port()).collect();
    let cluster_link = if n > 1 {
        let upstreams: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Some(Shaper::routes(&upstreams, 1, s.peer_mbit)?)
    } else {
        None
    };
    // Peers only through the shaped cluster link: no learned addresses
    // (they would bypass the shaping).
    let reach = match &cluster_link {
        Some(l) => l.addrs.clone(),
        None => ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
    };
    let extra = |_| {
        vec![
            "--no-learn-peers".to_string(),
            "--registry-endpoint".to_string(),
            format!("{registry_host}={}", cloud.addr),
        ]
    };
    let nodes = harness::start_peers(env, &format!("n{n}-node"), &ports, &reach, extra)?;
    let points: Vec<_> = (0..n)
        .map(|i| env.fresh(&format!("n{n}-mnt{i}")).map(|d| d.join("image")))
        .collect::<Result<_>>()?;
    let before = proxy.bytes_down();
    let cpu_before: Vec<f64> = nodes.iter().map(daemon_cpu).collect();
    let links_cpu =
        || cpu_of(cloud.child.id()) + cluster_link.as_ref().map_or(0.0, |l| cpu_of(l.child.id()));
    let links_before = links_cpu();
    let barrier = Barrier::new(n);
    let start = std::sync::OnceLock::new();
    let timed: Vec<(f64, f64)> = std::thread::scope(|sc| {
        let workers: Vec<_> = nodes
            .iter()
            .zip(&points)
            .map(|(node, point)| {
                let (barrier, start) = (&barrier, &start);
                sc.spawn(move || -> Result<(f64, f64, NodeMount<'_>)> {
                    barrier.wait();
                    let t0 = *start.get_or_init(Instant::now);
                    let args = vec![
                        "--no-hydrate".to_string(),
                        "--node".to_string(),
                        format!("unix:{}", node.socket.display()),
                    ];
                    let m = NodeMount::with_args(env, &args, remote, point)?;
                    let mounted = t0.elapsed().as_secs_f64();
                    harness::run_chroot(&m.point, &image.command)?;
                    Ok((t0.elapsed().as_secs_f64(), mounted, m))
                })
            })
            .collect();
        // Every mount stays until all are ready: a finished node keeps
        // serving what it fetched.
        let done: Vec<Result<(f64, f64, NodeMount<'_>)>> = workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow!("a node's starter panicked"))?)
            .collect();
        done.into_iter()
            .map(|r| r.map(|(ready, mount, _m)| (ready, mount)))
            .collect::<Result<Vec<_>>>()
    })?;
    let registry = proxy.bytes_down() - before;
    let links = links_cpu() - links_before;
    let mut samples = Vec::new();
    for ((node, (ready, mount)), cpu_before) in nodes.iter().zip(timed).zip(cpu_before) {
        let page = node.get("/metrics")?;
        let metric = |key: &str| harness::metric_of(&page, key);
        samples.push(NodeSample {
            ready,
            mount,
            cloud: metric("breakfs_fetch_bytes_total{source=\"cloud\"}"),
            peer: metric("breakfs_fetch_bytes_total{source=\"peer\"}"),
            froms: FROMS.map(|f| metric(&format!("breakfs_rollout_chunks_total{{from=\"{f}\"}}"))),
            claims: metric("breakfs_rollout_claims_total"),
            metas: META_FROMS
                .map(|f| metric(&format!("breakfs_rollout_meta_total{{from=\"{f}\"}}"))),
            cpu: daemon_cpu(node) - cpu_before,
        });
    }
    for node in &nodes {
        node.ask_to_stop();
    }
    drop(nodes);
    drop(cluster_link);
    Ok(Phase {
        nodes: samples,
        registry,
        links,
    })
}

/// CPU seconds (user + system) the daemon of `node` has used so far.
fn daemon_cpu(node: &harness::Node) -> f64 {
    node.child.as_ref().map_or(0.0, |c| cpu_of(c.id()))
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc
/// (0 when it cannot be read).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3,
    // utime and stime fields 14 and 15, in clock ticks (USER_HZ, 100).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    ticks(14)
        .zip(ticks(15))
        .map_or(0.0, |(u, s)| (u + s) / 100.0)
}

/// `uptime`'s line (the load on the shared machine), or why not.
fn uptime() -> String {
    harness::run(&mut std::process::Command::new("uptime"), "uptime")
        .map(|s| format!("uptime: {}", s.trim()))
        .unwrap_or_else(|e| format!("uptime failed: {e}"))
}

fn markdown(
    s: &Settings,
    p: &harness::Published,
    command: &[String],
    runs: &[(Phase, Phase)],
    loads: &[String],
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Rollout: {} nodes of one cluster start {} ({:.1} MB, {} layers) at once\n\n\
         One cloud link of {} ms RTT and {} Mbit/s shared by all nodes (`breakfs shape` in front \
         of a real docker-registry, every byte it sent counted by a proxy); the nodes each \
         other's peers over one cluster link of 1 ms RTT and {} Mbit/s. A node is ready when \
         `breakfs mount --no-hydrate --node` returned and `{}` ran to completion in a chroot of \
         the mount, timed from the common start. Each run: one node alone, then the {} nodes at \
         once, fresh caches each.\n\nLoad on the machine (shared, 2 cores): before `{}`; after \
         `{}`.\n",
        s.nodes,
        p.title,
        p.size as f64 / 1e6,
        p.layers,
        s.rtt_ms,
        s.mbit,
        s.peer_mbit,
        command.join(" "),
        s.nodes,
        loads[0],
        loads.get(1).map_or("", String::as_str)
    );
    for (r, (alone, cluster)) in runs.iter().enumerate() {
        let _ = writeln!(
            md,
            "### Run {}\n\n| node | ready (s) | of which the mount (s) | cloud MB | peer MB | \
             chunks from holder / fetching / claimed / deciding / here | chunks taken on | \
             config and TOCs from holder / fetching / deciding / here / here after a failed \
             wait | daemon CPU (s) |\n\
             |---|---|---|---|---|---|---|---|---|",
            r + 1
        );
        let rows = std::iter::once(("alone".to_string(), &alone.nodes[0])).chain(
            cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("{} of {}", i + 1, s.nodes), n)),
        );
        for (name, n) in rows {
            let _ = writeln!(
                md,
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {} | {:.2} |",
                n.ready,
                n.mount,
                n.cloud / 1e6,
                n.peer / 1e6,
                counts(&n.froms),
                n.claims,
                counts(&n.metas),
                n.cpu
            );
        }
        let bytes = cluster.registry as f64 / alone.registry as f64;
        let time = cluster.median_ready() / alone.median_ready();
        let verdict = |ok: bool| if ok { "met" } else { "missed" };
        let _ = writeln!(
            md,
            "\nThe registry sent {:.2} MB for one node alone and {:.2} MB for the {} nodes: \
             **{bytes:.2}×** (target ≤ 1.2×: {}). Time to ready: {:.2} s alone; the {} nodes' \
             median {:.2} s, slowest {:.2} s: median **{time:.2}×** (target ≤ 1.5×: {}).\n",
            alone.registry as f64 / 1e6,
            cluster.registry as f64 / 1e6,
            s.nodes,
            verdict(bytes <= 1.2),
            alone.median_ready(),
            s.nodes,
            cluster.median_ready(),
            cluster.max_ready(),
            verdict(time <= 1.5),
        );
        let cpus: Vec<f64> = cluster.nodes.iter().map(|n| n.cpu).collect();
        let _ = writeln!(
            md,
            "Daemon CPU (user + system, until every node was ready): {:.2} s alone; {:.2} s for the \
             {} nodes together, median {:.2} s each. The links' emulation (`breakfs shape`) \
             meanwhile: {:.2} s alone, {:.2} s with the {} nodes.\n",
            alone.nodes[0].cpu,
            cpus.iter().sum::<f64>(),
            s.nodes,
            median(&cpus),
            alone.links,
            cluster.links,
            s.nodes,
        );
    }
    md
}

/// `a / b / c` of whole counts.
fn counts(v: &[f64]) -> String {
    v.iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
