//! Load benchmark (issue 7, item 4): does anything hang, fail or grow
//! without bound when much happens at once? Three parts, each on its own
//! (`--part`), all against a real docker-registry on loopback (no shaping:
//! the load is on breakfs, not on the link):
//!
//! * **reads**: a corpus image refactored into the registry, mounted
//!   through a fresh `breakfs node` (`--no-hydrate
//!   --no-dependency-prefetch`); 64 reader threads make random `pread`s
//!   (a file picked uniformly or by size, 512 B-128 KiB at a random
//!   offset), each compared with the same bytes of `umoci unpack` of the
//!   original image. Cold (an empty store), then warm (the image
//!   prefetched whole, a new mount: the page cache is empty again).
//! * **pull**: one node holds the image whole; 8 fresh nodes with it as
//!   their only peer are told to prefetch the image at the same moment;
//!   every blob they end with is hashed, their cloud bytes read from their
//!   metrics.
//! * **prioritize**: `breakfs sched` watching 1,000 stand-in node daemons
//!   (one HTTP server, 500 cached layers each of a pool of 5,000, and some
//!   of the pod's image), 1,000 `POST /prioritize` calls at once (all
//!   nodes by name), twice: the image not yet resolved, then cached.
//!
//! Figures: reads, errors, wrong bytes, latency, throughput, peak RSS
//! (`VmHWM`) of the daemons. A read or call that does not return within
//! the watchdog's limit stops the run with an error naming it.
//!
//! `cargo bench --bench load -- [--part reads|pull|prioritize]... [--family
//! F] [--reads N] [--calls N]` (defaults: all parts, python, 200 reads per
//! reader per phase, 1,000 calls); writes target/bench-load.md. Needs root,
//! FUSE, skopeo, umoci and docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/load.rs"]
mod load;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use breakfs_index::Digest;
use harness::{Env, Node, NodeMount, Published, layout_layers, publish};
use load::{FakeNodes, ReadLoad, ReadReport, StormReport};
use registry::TestRegistry;

const READERS: usize = 64;
const PULLERS: usize = 8;
const NODES: usize = 1000;
/// A read or an extender call unanswered this long counts as hung.
const STALL: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    let mut parts: Vec<String> = Vec::new();
    let mut family = "python".to_string();
    let mut reads = 200usize;
    let mut calls = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| anyhow!("{a} wants {what}"));
        match a.as_str() {
            "--bench" => {}
            "--part" => parts.push(value("reads, pull or prioritize")?),
            "--family" => family = value("a corpus family")?,
            "--reads" => reads = value("a number")?.parse()?,
            "--calls" => calls = value("a number")?.parse()?,
            other => bail!(
                "unknown argument {other:?}: use --part reads|pull|prioritize, --family F, --reads N, --calls N"
            ),
        }
    }
    if parts.is_empty() {
        parts = ["reads", "pull", "prioritize"].map(String::from).to_vec();
    }
    if let Some(p) = parts
        .iter()
        .find(|p| !["reads", "pull", "prioritize"].contains(&p.as_str()))
    {
        bail!("--part {p:?}: give reads, pull or prioritize");
    }
    ensure!(
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))? == 0,
        "the load benchmark needs root (FUSE mounts through the node daemon)"
    );
    let image = corpus::build_family(&family)?
        .into_iter()
        .find(|i| i.tag == "v1")
        .ok_or_else(|| anyhow!("corpus family {family} has no v1"))?;
    let reg = TestRegistry::start();
    let (tmpdir, env) = harness::direct_env("breakfs-bench-load", &reg)?;
    let published = publish(&env, &reg, &image)?;

    let mut command = "cargo bench --bench load --".to_string();
    for p in &parts {
        write!(command, " --part {p}")?;
    }
    write!(
        command,
        " --family {family} --reads {reads} --calls {calls}"
    )?;
    let mut md = format!(
        "### Load\n\nCommand: `{command}` (2 cores, shared with other work). Image: {} \
         refactored ({:.1} MB in {} layers), from a docker-registry on loopback.\n\n",
        published.title,
        published.size as f64 / 1e6,
        published.layers
    );
    if parts.iter().any(|p| p == "reads") {
        md.push_str(&bench_reads(&env, &image, &published, reads)?);
    }
    if parts.iter().any(|p| p == "pull") {
        md.push_str(&bench_pull(&env, &published)?);
    }
    if parts.iter().any(|p| p == "prioritize") {
        md.push_str(&bench_prioritize(&env, &published, calls)?);
    }
    harness::write_report("load", &md)?;
    drop(reg);
    drop(tmpdir);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pid(node: &Node) -> Result<u32> {
    node.child
        .as_ref()
        .map(|c| c.id())
        .ok_or_else(|| anyhow!("the node daemon is not running"))
}

/// Wait until `node` holds every layer of `p` whole.
fn wait_whole(node: &Node, p: &Published, limit: Duration) -> Result<()> {
    let layers = layout_layers(&p.layout, &p.tag)?;
    let until = Instant::now() + limit;
    loop {
        let index: serde_json::Value = serde_json::from_str(&node.get("/cache/index")?)?;
        let held: Vec<&str> = index["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["digest"].as_str())
            .collect();
        let missing = layers
            .iter()
            .filter(|(d, _)| !held.contains(&d.as_str()))
            .count();
        if missing == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "node {} hung: {missing} of {} layers still missing after {:.0} s; prefetch tasks: {:?}",
            node.url,
            layers.len(),
            limit.as_secs_f64(),
            node.prefetch_tasks()?
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_row(what: &str, r: &ReadReport) -> String {
    format!(
        "| {what} | {} | {} | {} | {} | {:.1} | {:.2} / {:.2} / {:.1} | {:.0} reads/s, {:.1} MB/s |\n",
        r.reads,
        r.files_touched,
        r.errors,
        r.mismatches,
        r.bytes as f64 / 1e6,
        ms(r.quantile(0.5)),
        ms(r.quantile(0.99)),
        ms(r.quantile(1.0)),
        r.reads as f64 / r.secs,
        r.bytes as f64 / 1e6 / r.secs,
    )
}

fn bench_reads(
    env: &Env,
    image: &corpus::CorpusImage,
    published: &Published,
    reads: usize,
) -> Result<String> {
    let original = harness::umoci_rootfs(env, image)?;
    let files = load::regular_files(&original)?;
    let node = Node::start(env, &env.fresh("reads-node")?, &[], "warn")?;
    let load = |seed| ReadLoad {
        threads: READERS,
        reads_per_thread: reads,
        seed,
        stall: STALL,
    };
    eprintln!(
        "load bench: {READERS} readers x {reads} reads over {} files, cold",
        files.len()
    );
    let cold = {
        let m = NodeMount::mount(env, &node, &published.remote, &env.tmp.join("mnt-cold"))?;
        load::random_reads(&m.point, &original, &files, &load(1))?
    };
    let cold_rss = load::peak_rss_mib(pid(&node)?)?;
    let cloud = node.cloud_bytes()?;
    node.post(
        "/prefetch",
        &serde_json::json!({ "images": [published.remote] }).to_string(),
    )?;
    wait_whole(&node, published, Duration::from_secs(600))?;
    eprintln!("load bench: warm");
    let warm = {
        let m = NodeMount::mount(env, &node, &published.remote, &env.tmp.join("mnt-warm"))?;
        load::random_reads(&m.point, &original, &files, &load(2))?
    };
    let rss = load::peak_rss_mib(pid(&node)?)?;
    cold.ensure_clean("cold reads")?;
    warm.ensure_clean("warm reads")?;
    let mut md = format!(
        "#### {READERS} readers over one mount\n\n\
         {READERS} threads × {reads} random `pread`s per phase over the {} regular files of the \
         image, each compared with the same bytes of `umoci unpack`. The mount is served by the node \
         daemon (4 FUSE threads).\n\n\
         | phase | reads | files read | errors | wrong bytes | MB read | latency ms p50 / p99 / max | throughput |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        files.len()
    );
    md.push_str(&read_row("cold (empty store)", &cold));
    md.push_str(&read_row("warm (image in the store, new mount)", &warm));
    writeln!(
        md,
        "\nNode daemon peak RSS (VmHWM): {cold_rss:.0} MiB after the cold phase, {rss:.0} MiB at the \
         end. Fetched from the registry during the cold phase: {:.1} MB.\n",
        cloud / 1e6
    )?;
    Ok(md)
}

fn bench_pull(env: &Env, published: &Published) -> Result<String> {
    let layers = layout_layers(&published.layout, &published.tag)?;
    let holder = Node::start(env, &env.fresh("holder")?, &[], "warn")?;
    let body = serde_json::json!({ "images": [published.remote] }).to_string();
    holder.post("/prefetch", &body)?;
    wait_whole(&holder, published, Duration::from_secs(600))?;
    let pullers: Vec<Node> = (0..PULLERS)
        .map(|i| {
            Node::start(
                env,
                &env.fresh(&format!("puller{i}"))?,
                &["--peer", &holder.url],
                "warn",
            )
        })
        .collect::<Result<_>>()?;
    // Each has read the holder's index (its first poll timed the link).
    let until = Instant::now() + Duration::from_secs(30);
    for p in &pullers {
        loop {
            let m: serde_json::Value = serde_json::from_str(&p.get("/measurements")?)?;
            if !m["links"][&holder.url]["rtt_ms"].is_null() {
                break;
            }
            ensure!(Instant::now() < until, "{} never polled the holder", p.url);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "load bench: {PULLERS} nodes pulling {} from one peer",
        published.title
    );
    let began = Instant::now();
    std::thread::scope(|s| {
        let asks: Vec<_> = pullers
            .iter()
            .map(|p| s.spawn(|| p.post("/prefetch", &body)))
            .collect();
        asks.into_iter()
            .map(|a| {
                a.join()
                    .map_err(|_| anyhow!("a prefetch request panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut done = Vec::new();
    for p in &pullers {
        wait_whole(p, published, STALL)?;
        done.push(began.elapsed().as_secs_f64());
    }
    let secs = began.elapsed().as_secs_f64();
    let (mut checked, mut cloud, mut peer) = (0u64, 0.0, 0.0);
    for p in &pullers {
        checked += load::check_blobs(&p.dir.join("cache"), &layers)
            .with_context(|| format!("the store of {}", p.url))?;
        cloud += p.cloud_bytes()?;
        peer += p.source_bytes("peer")?;
    }
    let holder_rss = load::peak_rss_mib(pid(&holder)?)?;
    let puller_rss = pullers
        .iter()
        .map(|p| load::peak_rss_mib(pid(p)?))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(0.0, f64::max);
    // What every puller reads from the registry whatever peers hold.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(published.layout.join("index.json"))?)?;
    let manifest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == published.tag.as_str())
        .and_then(|m| m["size"].as_u64())
        .ok_or_else(|| anyhow!("no manifest of {} in its layout", published.title))?;
    let served: f64 = load::metric(
        &holder.get("/metrics")?,
        "breakfs_served_bytes_total{kind=\"blob\"}",
    );
    Ok(format!(
        "#### {PULLERS} nodes pulling one image from one peer at once\n\n\
         One node holds {} whole; {PULLERS} fresh nodes with it as their only peer get `POST /prefetch` \
         of the image at the same moment (eStargz chunks by Range requests at background priority, \
         then each layer assembled and checked).\n\n\
         | figure | value |\n|---|---|\n\
         | all {PULLERS} hold the image whole after | {secs:.1} s (each: {}) |\n\
         | bytes hashed against their digests | {:.1} MB ({PULLERS} × {:.1} MB), all equal |\n\
         | bytes from the peer (pullers' metrics) | {:.1} MB |\n\
         | bytes from the cloud (pullers' metrics) | {:.0} B, the image's manifest ({} B) {PULLERS} times = {} B |\n\
         | peer's served-bytes counter | {:.1} MB |\n\
         | peak RSS (VmHWM) of the peer / of the largest puller | {holder_rss:.0} / {puller_rss:.0} MiB |\n\n",
        published.title,
        done.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        checked as f64 / 1e6,
        published.size as f64 / 1e6,
        peer / 1e6,
        cloud,
        manifest,
        manifest * PULLERS as u64,
        served / 1e6,
    ))
}

/// `breakfs sched` with `config`; killed when dropped.
struct Sched(std::process::Child, String);

impl Sched {
    fn start(env: &Env, config: &Path) -> Result<Sched> {
        let mut child = env
            .breakfs()
            .args(["sched", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting breakfs sched")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("BREAKFS-SCHED-READY ")
            .ok_or_else(|| anyhow!("breakfs sched did not start: {line:?}"))?
            .to_string();
        Ok(Sched(child, url))
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn storm_row(what: &str, r: &StormReport, expected: &str) -> String {
    format!(
        "| {what} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.1} s |\n",
        r.calls,
        r.ok,
        r.errors + r.hung,
        r.wrong(expected),
        ms(r.quantile(0.5)),
        ms(r.quantile(0.99)),
        ms(r.quantile(1.0)),
        r.secs
    )
}

fn bench_prioritize(env: &Env, published: &Published, calls: usize) -> Result<String> {
    let layers: Vec<(Digest, u64)> = layout_layers(&published.layout, &published.tag)?
        .into_iter()
        .map(|(d, s)| Ok((Digest::parse(&d)?, s)))
        .collect::<Result<_>>()?;
    let nodes = load::fleet(NODES, 4, 500, 5000, &layers, 7);
    let fake = FakeNodes::start(&nodes, Duration::from_millis(5))?;
    let config = env.tmp.join("sched.yaml");
    std::fs::write(&config, fake.sched_config(&nodes, 2.0))?;
    let sched = Sched::start(env, &config)?;
    // Polled a few times (every 2 s), so that memory has settled.
    std::thread::sleep(Duration::from_secs(10));
    let idle = load::peak_rss_mib(sched.0.id())?;
    let image = published.remote.trim_start_matches("docker://");
    let body = load::prioritize_body(image, &nodes);
    let url = format!("{}/prioritize", sched.1);
    eprintln!("load bench: {calls} /prioritize calls at once, twice");
    let first = load::storm(&url, &body, calls, STALL)?;
    let second = load::storm(&url, &body, calls, STALL)?;
    let settled = load::storm(&url, &body, 1, STALL)?;
    let expected = settled
        .answers
        .keys()
        .next()
        .ok_or_else(|| anyhow!("the last call got no answer: {:?}", settled.samples))?
        .clone();
    let peak = load::peak_rss_mib(sched.0.id())?;
    let mut md = format!(
        "#### {calls} `/prioritize` calls at once\n\n\
         `breakfs sched` watching {NODES} stand-in node daemons in 4 clusters (polled every 2 s; \
         each answers after 5 ms with 500 cached layers of a pool of 5,000, and 0-{} layers of the \
         pod's image), {calls} `POST /prioritize` calls started at once, each on its own \
         connection, all {NODES} nodes by name. Wrong: an answer other than the one a single call \
         gets after the storms.\n\n\
         | storm | calls | answered 200 | failed or hung | wrong | latency ms p50 / p99 / max | all answered after |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        layers.len()
    );
    md.push_str(&storm_row("the image not yet resolved", &first, &expected));
    md.push_str(&storm_row("the image cached", &second, &expected));
    writeln!(
        md,
        "\nPeak RSS (VmHWM) of breakfs sched: {idle:.0} MiB after 10 s of polling, {peak:.0} MiB \
         after the storms; node polls open at once at most {}.\n",
        fake.most_open()
    )?;
    Ok(md)
}
