//! Relay benchmark: how much faster does a cold image arrive when it is
//! striped over the registry links of relaying peers (`breakfs node
//! --relay`)?
//!
//! A real docker-registry holds one refactored (eStargz) corpus image.
//! Three `breakfs node` daemons (A, B, C; fresh caches each run, each the
//! others' peer) reach it each through a link of its own, shaped alike
//! (`breakfs shape`, default 20 ms RTT and 20 Mbit/s each way, given with
//! `--registry-endpoint`). Node A mounts the image (`--no-hydrate
//! --no-dependency-prefetch`) and eight readers read every file at once;
//! every file is compared with `umoci unpack`. Timed from the mount request
//! to the last byte read, once per mode in each run, the modes interleaved:
//!
//! * alone: no node has `--relay`: all bytes come over A's link;
//! * relayed: every node has `--relay HOST`: A stripes its range requests
//!   over its own link and B's and C's.
//!
//! Every node gets `--deadline 120` in both modes (eight 4 MiB requests on
//! one slow link take longer than the default attempt timeout).
//!
//! `cargo bench --bench relay -- [--runs N] [--image FAMILY] [--mbit M]
//! [--rtt-ms MS]` (defaults: 3 runs, redis, 20, 20); writes the table to
//! stdout and to target/bench-relay.md. Needs root, FUSE, skopeo, umoci and
//! docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use harness::{Env, NodeMount, Shaper, direct_env, median, publish, reserve_port, umoci_rootfs};
use registry::TestRegistry;

/// Readers at once on node A's mount.
const READERS: usize = 8;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Alone,
    Relayed,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Alone => "alone (no --relay)",
            Mode::Relayed => "relayed (--relay on A, B, C)",
        }
    }
}

/// One timed cold read.
struct Sample {
    secs: f64,
    /// Of which the mount (the image resolved, every layer's TOC read).
    mount_secs: f64,
    /// Bytes A fetched over its own link and through relays.
    own: f64,
    relayed: f64,
    /// Bytes B and C relayed.
    by_b: f64,
    by_c: f64,
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut family = "redis".to_string();
    let mut mbit = 20u64;
    let mut rtt_ms = 20u64;
    let mut args = std::env::args().skip(1);
    let number = harness::positive;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => runs = number(args.next(), "--runs")? as usize,
            "--mbit" => mbit = number(args.next(), "--mbit")?,
            "--rtt-ms" => rtt_ms = number(args.next(), "--rtt-ms")?,
            "--image" => {
                family = args
                    .next()
                    .ok_or_else(|| anyhow!("--image wants a corpus family"))?;
            }
            other => bail!(
                "unknown argument {other:?}: use --runs N, --image FAMILY, --mbit M, --rtt-ms MS"
            ),
        }
    }
    ensure!(
        std::fs::metadata("/proc/self")?.uid() == 0,
        "the relay benchmark needs root (FUSE mounts through the node daemon)"
    );
    let fam = corpus::family(&family)?.name;
    let image = corpus::build_families(&[fam])?
        .into_iter()
        .find(|i| i.tag == "v1")
        .ok_or_else(|| anyhow!("the corpus has no {fam}:v1"))?;

    let reg = TestRegistry::start();
    // Declared after the registry: removed before it, after every guard below.
    let (tmpdir, env) = direct_env("breakfs-bench-relay", &reg)?;
    let published = publish(&env, &reg, &image)?;
    let rootfs = umoci_rootfs(&env, &image)?;
    let host = reg.host();
    let links: Vec<Shaper> = (0..3)
        .map(|_| Shaper::start(&host, rtt_ms, mbit))
        .collect::<Result<_>>()?;
    eprintln!(
        "relay bench: {} ({:.1} MB in {} layers) from registry {host}, each node over its own \
         link of {rtt_ms} ms RTT and {mbit} Mbit/s; {runs} runs",
        published.title,
        published.size as f64 / 1e6,
        published.layers
    );

    let mut samples: Vec<(Mode, Sample)> = Vec::new();
    for run in 0..runs {
        // The modes interleaved, so that a drift of the machine hits both.
        for mode in [Mode::Alone, Mode::Relayed] {
            let s = measure(&env, mode, &published.remote, &host, &links, &rootfs)
                .with_context(|| format!("run {}, {}", run + 1, mode.label()))?;
            eprintln!(
                "relay bench: run {} {}: {:.2} s, mount {:.2} s ({:.1} MB over A's link, {:.1} MB \
                 through relays)",
                run + 1,
                mode.label(),
                s.secs,
                s.mount_secs,
                s.own / 1e6,
                s.relayed / 1e6
            );
            samples.push((mode, s));
        }
    }

    let command = format!(
        "cargo bench --bench relay -- --runs {runs} --image {family} --mbit {mbit} --rtt-ms {rtt_ms}"
    );
    let md = markdown(&published, &samples, mbit, rtt_ms, &command);
    harness::write_report("relay", &md)?;
    drop(links);
    drop(tmpdir);
    Ok(())
}

/// Start A, B and C (each over its own link in `links`), mount `remote` on
/// A, read every file with [`READERS`] readers, compare with `rootfs`.
fn measure(
    env: &Env,
    mode: Mode,
    remote: &str,
    host: &str,
    links: &[Shaper],
    rootfs: &Path,
) -> Result<Sample> {
    let ports: Vec<u16> = (0..3).map(|_| reserve_port()).collect();
    let reach: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let extra = |i: usize| {
        let mut args = vec![
            "--registry-endpoint".to_string(),
            format!("{host}={}", links[i].addr),
            "--deadline".to_string(),
            "120".to_string(),
        ];
        if mode == Mode::Relayed {
            args.extend(["--relay".to_string(), host.to_string()]);
        }
        args
    };
    let nodes = harness::start_peers(env, "node-", &ports, &reach, extra)?;
    let point = env.fresh("mnt")?.join("a");
    let began = Instant::now();
    let m = NodeMount::mount(env, &nodes[0], remote, &point)?;
    let mount_secs = began.elapsed().as_secs_f64();
    let files = files_of(&m.point)?;
    read_and_compare(&m.point, rootfs, &files)?;
    let secs = began.elapsed().as_secs_f64();
    let served = "breakfs_relay_served_bytes_total";
    let s = Sample {
        secs,
        mount_secs,
        own: nodes[0].cloud_bytes()?,
        relayed: nodes[0].source_bytes("relay")?,
        by_b: nodes[1].metric(served)?,
        by_c: nodes[2].metric(served)?,
    };
    drop(m);
    for n in &nodes {
        n.ask_to_stop();
    }
    drop(nodes);
    Ok(s)
}

/// The regular files under `root`, relative.
fn files_of(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(root.join(&d))? {
            let e = e?;
            let rel = d.join(e.file_name());
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(rel);
            } else if t.is_file() {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read every file of `files` under `mount` with [`READERS`] threads at
/// once; each must equal the same file under `rootfs`.
fn read_and_compare(mount: &Path, rootfs: &Path, files: &[PathBuf]) -> Result<()> {
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    for f in files.iter().skip(t).step_by(READERS) {
                        let got = std::fs::read(mount.join(f))
                            .with_context(|| format!("reading /{} on the mount", f.display()))?;
                        let want = std::fs::read(rootfs.join(f))
                            .with_context(|| format!("reading /{} of umoci unpack", f.display()))?;
                        ensure!(got == want, "/{} differs from umoci unpack", f.display());
                    }
                    Ok(())
                })
            })
            .collect();
        readers
            .into_iter()
            .try_for_each(|r| r.join().map_err(|_| anyhow!("a reader panicked"))?)
    })
}

fn markdown(
    p: &harness::Published,
    samples: &[(Mode, Sample)],
    mbit: u64,
    rtt_ms: u64,
    command: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Relay: a cold read of {} ({:.1} MB, {} layers) on node A\n\n\
         Each node reaches the registry over its own link of {rtt_ms} ms RTT and {mbit} Mbit/s; \
         {READERS} readers read every file of A's mount (checked against umoci unpack), timed \
         from the mount request. `{command}`\n",
        p.title,
        p.size as f64 / 1e6,
        p.layers
    );
    let _ = writeln!(
        md,
        "| run | mode | seconds | of which the mount | MB over A's link | MB through relays | \
         MB relayed by B / C |\n\
         |---|---|---|---|---|---|---|"
    );
    for (i, (mode, s)) in samples.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} / {:.1} |",
            i / 2 + 1,
            mode.label(),
            s.secs,
            s.mount_secs,
            s.own / 1e6,
            s.relayed / 1e6,
            s.by_b / 1e6,
            s.by_c / 1e6
        );
    }
    let of = |m: Mode| -> Vec<f64> {
        samples
            .iter()
            .filter(|(k, _)| *k == m)
            .map(|(_, s)| s.secs)
            .collect()
    };
    let (alone, relayed) = (median(&of(Mode::Alone)), median(&of(Mode::Relayed)));
    let ratios: Vec<f64> = of(Mode::Relayed)
        .iter()
        .zip(of(Mode::Alone))
        .map(|(r, a)| r / a)
        .collect();
    let _ = writeln!(
        md,
        "\nMedian: {alone:.2} s alone, {relayed:.2} s relayed: **{:.2}x** the time \
         (per run: {}); three equal links bound it at 0.33x.",
        relayed / alone,
        ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    md
}
