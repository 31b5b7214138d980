//! Node benchmark: does prefetch slow down on-demand reads?
//!
//! A real docker-registry holds refactored (eStargz) corpus images and is
//! reached only through `breakfs shape` (50 ms RTT, 50 Mbit/s each way,
//! shared by all connections). Each run starts a fresh `breakfs node`
//! (fresh cache), mounts one image through it (`--no-hydrate
//! --no-dependency-prefetch`: only prefetch competes with the reads) and
//! reads a set of its files that no prefetched image shares (the 5 biggest
//! and a mid-size one), each fully and timed on its own, one after another,
//! each after a pause (`--gap`, 3 s: the node holds prefetch back for 1 s
//! after on-demand work, so that each read meets prefetch at full speed):
//!
//! * baseline: nothing else runs on the node;
//! * with prefetch: `POST /prefetch` of other images first, the reads start
//!   once prefetch is under way (≥ 2 s and ≥ 1 MB from the cloud), and
//!   prefetch must still be running when they end (else the run is void).
//!
//! Both for the node's defaults and for `--prefetch-rate 2MiB`. The target
//! (acceptance point): with prefetch, a read takes ≤ 1.5× its baseline time.
//! The node logs every range request (`BREAKFS_LOG=breakfs_fetch=debug`);
//! the report counts the on-demand and background ones around each read.
//!
//! `cargo bench --bench node -- [--runs N] [--image FAMILY] [--prefetch
//! FAMILY[:TAG],...] [--gap SECS]` (defaults: 3 runs, redis,
//! nginx,python,httpd,node, 3 s; tags v1 unless given); writes the tables
//! to stdout and to target/bench-node.md. Needs root, FUSE, skopeo and
//! docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use corpus::CorpusImage;
use harness::{
    Env, Machine, Node, NodeMount, Published, Shaper, blob_path, layout_layers, mb, median, publish,
};
use registry::TestRegistry;

const RTT_MS: u64 = 50;
const MBIT: u64 = 50;
const TARGET: f64 = 1.5;
/// How many of the image's biggest eligible files are read.
const BIG_FILES: usize = 5;
/// The mid-size file read as well: the eligible file nearest this size.
const MID_SIZE: u64 = 1 << 20;
/// Prefetch runs at least this long before the mount.
const PREFETCH_HEAD_START: Duration = Duration::from_secs(2);
/// ... and has fetched at least this much from the cloud.
const PREFETCH_HEAD_BYTES: f64 = 1e6;
/// Background requests logged this long before a read count as in flight
/// when it starts (a 512 KiB range takes ~0.1 s alone on the link).
const IN_FLIGHT_WINDOW: f64 = 1.0;
/// The node's largest merged background range (FetchOptions::background_range).
const BACKGROUND_RANGE: u64 = 512 << 10;
const NODE_LOG: &str = "warn,breakfs_fetch=debug";

/// A node setting the benchmark compares.
#[derive(Clone, Copy, PartialEq)]
enum Setting {
    Default,
    Rate2MiB,
}

impl Setting {
    const ALL: [Setting; 2] = [Setting::Default, Setting::Rate2MiB];

    fn args(self) -> &'static [&'static str] {
        match self {
            Setting::Default => &[],
            Setting::Rate2MiB => &["--prefetch-rate", "2MiB"],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Setting::Default => "default (no --prefetch-rate)",
            Setting::Rate2MiB => "--prefetch-rate 2MiB",
        }
    }
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut image_family = "redis".to_string();
    let mut prefetch_spec = "nginx,python,httpd,node".to_string();
    let mut gap = Duration::from_secs(3);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow!("--runs wants a positive number"))?;
            }
            "--image" => {
                image_family = args
                    .next()
                    .ok_or_else(|| anyhow!("--image wants a corpus family"))?;
            }
            "--gap" => {
                gap = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| anyhow!("--gap wants seconds"))?;
            }
            "--prefetch" => {
                prefetch_spec = args
                    .next()
                    .ok_or_else(|| anyhow!("--prefetch wants FAMILY[:TAG],..."))?;
            }
            other => bail!(
                "unknown argument {other:?}: use --runs N, --image FAMILY, --prefetch FAMILY[:TAG],..., --gap SECS"
            ),
        }
    }
    let mut wanted: Vec<(&str, String)> = vec![(corpus::family(&image_family)?.name, "v1".into())];
    for p in prefetch_spec.split(',').filter(|p| !p.is_empty()) {
        let (fam, tag) = p.split_once(':').unwrap_or((p, "v1"));
        wanted.push((corpus::family(fam)?.name, tag.to_string()));
    }
    ensure!(
        wanted[1..].iter().all(|w| *w != wanted[0]),
        "the prefetched images must differ from the read image"
    );
    ensure!(
        std::fs::metadata("/proc/self")?.uid() == 0,
        "the node benchmark needs root (FUSE mounts through the node daemon)"
    );
    let mut families: Vec<&str> = wanted.iter().map(|w| w.0).collect();
    families.dedup();
    let built = corpus::build_families(&families)?;
    let images: Vec<CorpusImage> = wanted
        .iter()
        .map(|(fam, tag)| {
            built
                .iter()
                .find(|i| i.family == *fam && i.tag == *tag)
                .cloned()
                .ok_or_else(|| anyhow!("the corpus has no {fam}:{tag} (tags: v1, point, v2)"))
        })
        .collect::<Result<_>>()?;

    // Declared first so that it is removed last, after every guard below.
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-bench-node")
        .tempdir()?;
    let reg = TestRegistry::start();
    let shaper = Shaper::start(&reg.host(), RTT_MS, MBIT)?;
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        link: shaper.addr.clone(),
    };
    std::fs::create_dir_all(&env.run_dir)?;
    eprintln!(
        "node bench: registry {} behind breakfs shape {} ({RTT_MS} ms RTT, {MBIT} Mbit/s); {runs} runs",
        reg.host(),
        env.link
    );

    let mut published = Vec::new();
    for image in &images {
        published.push(publish(&env, &reg, image)?);
    }
    let (target, others) = published
        .split_first()
        .ok_or_else(|| anyhow!("no image to read"))?;
    let files = choose_files(target, others)?;
    eprintln!(
        "node bench: reading {} files of {}: {}",
        files.len(),
        target.remote,
        files
            .iter()
            .map(|f| format!("/{} ({:.2} MB)", f.path, mb(f.size)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let prefetch_refs: Vec<String> = others.iter().map(|p| p.remote.clone()).collect();

    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-node-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let started = Instant::now();
    let mut results: BTreeMap<usize, (Vec<Sample>, Vec<Sample>)> = BTreeMap::new();
    for run in 0..runs {
        // The settings interleaved, so that a drift of the machine hits both.
        for (si, setting) in Setting::ALL.into_iter().enumerate() {
            let log = |case: &str| {
                logs.join(format!(
                    "run{}-{}-{case}.log",
                    run + 1,
                    if setting == Setting::Default {
                        "default"
                    } else {
                        "rate2MiB"
                    }
                ))
            };
            let base = measure(
                &env,
                setting,
                &target.remote,
                &files,
                gap,
                None,
                Some(&log("alone")),
            )
            .with_context(|| format!("run {run}, {}: baseline", setting.label()))?;
            let with = measure(
                &env,
                setting,
                &target.remote,
                &files,
                gap,
                Some(&prefetch_refs),
                Some(&log("prefetch")),
            )
            .with_context(|| format!("run {run}, {}: with prefetch", setting.label()))?;
            eprintln!(
                "node bench: run {} {}: reads {:.2} s alone, {:.2} s with prefetch{} ({:.0}s so far)",
                run + 1,
                setting.label(),
                base.total(),
                with.total(),
                if with.void() {
                    " (VOID: prefetch had finished)"
                } else {
                    ""
                },
                started.elapsed().as_secs_f64()
            );
            let e = results.entry(si).or_default();
            e.0.push(base);
            e.1.push(with);
        }
    }

    let command = format!(
        "cargo bench --bench node -- --runs {runs} --image {image_family} --prefetch {prefetch_spec} --gap {}",
        gap.as_secs_f64()
    );
    let md = markdown(target, others, &files, &results, runs, gap, &command)?;
    harness::write_report("node", &md)?;
    drop(shaper);
    drop(reg);
    drop(tmpdir);
    Ok(())
}

// ---------------------------------------------------------------------------
// The setting: paths, the link.

// ---------------------------------------------------------------------------
// The images.

/// The eStargz TOC of a layer blob in a layout.
fn layer_toc(layout: &Path, digest: &str, size: u64) -> Result<breakfs_index::Toc> {
    let mut f = std::fs::File::open(blob_path(layout, digest)?)?;
    let mut want = (64 * 1024).min(size);
    loop {
        let mut tail = vec![0u8; want as usize];
        f.seek(SeekFrom::Start(size - want))?;
        f.read_exact(&mut tail)?;
        match breakfs_index::Toc::read_from_blob_tail(&tail, size)
            .with_context(|| format!("reading the TOC of {digest}"))?
        {
            breakfs_index::TailRead::Toc(t) => return Ok(t.toc),
            breakfs_index::TailRead::NeedTail(n) if n > want && n <= size => want = n,
            breakfs_index::TailRead::NeedTail(n) => {
                bail!("layer {digest} asks for a {n}-byte tail of {size} bytes")
            }
        }
    }
}

/// A regular file of the merged view.
#[derive(Clone)]
struct File {
    path: String,
    size: u64,
    digest: String,
    chunks: Vec<String>,
}

fn normalise(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// The regular files of the merged view of a published image.
fn merged_files(p: &Published) -> Result<BTreeMap<String, File>> {
    use breakfs_index::TocEntryType as T;
    let mut files: BTreeMap<String, File> = BTreeMap::new();
    for (digest, size) in layout_layers(&p.layout, &p.tag)? {
        let toc = layer_toc(&p.layout, &digest, size)?;
        let mut last: Option<String> = None;
        for e in &toc.entries {
            let path = normalise(&e.name);
            let (dir, base) = path.rsplit_once('/').unwrap_or(("", &path));
            if base == ".wh..wh..opq" {
                let prefix = format!("{dir}/");
                files.retain(|k, _| !k.starts_with(&prefix));
                continue;
            }
            if let Some(gone) = base.strip_prefix(".wh.") {
                let gone = if dir.is_empty() {
                    gone.to_string()
                } else {
                    format!("{dir}/{gone}")
                };
                let prefix = format!("{gone}/");
                files.retain(|k, _| *k != gone && !k.starts_with(&prefix));
                continue;
            }
            match e.kind {
                T::Reg => {
                    let mut chunks = Vec::new();
                    if !e.chunk_digest.is_empty() {
                        chunks.push(e.chunk_digest.clone());
                    }
                    files.insert(
                        path.clone(),
                        File {
                            path: path.clone(),
                            size: e.size,
                            digest: e.digest.clone(),
                            chunks,
                        },
                    );
                    last = Some(path);
                }
                T::Chunk => {
                    if let Some(f) = last.as_ref().and_then(|l| files.get_mut(l))
                        && !e.chunk_digest.is_empty()
                    {
                        f.chunks.push(e.chunk_digest.clone());
                    }
                }
                _ => {
                    // Anything else replaces a lower file of that path.
                    files.remove(&path);
                    last = None;
                }
            }
        }
    }
    Ok(files)
}

/// The files to read: the `BIG_FILES` biggest of `target` and the one
/// nearest `MID_SIZE`, among those whose content (file or any chunk) no
/// image of `others` holds, so that prefetch never caches them.
fn choose_files(target: &Published, others: &[Published]) -> Result<Vec<File>> {
    let mut held: HashSet<String> = HashSet::new();
    for o in others {
        for f in merged_files(o)?.into_values() {
            held.insert(f.digest);
            held.extend(f.chunks);
        }
    }
    let all = merged_files(target)?;
    let mut eligible: Vec<File> = all
        .into_values()
        .filter(|f| f.size > 0 && !held.contains(&f.digest))
        .filter(|f| f.chunks.iter().all(|c| !held.contains(c)))
        .collect();
    eligible.sort_by(|a, b| b.size.cmp(&a.size).then(a.path.cmp(&b.path)));
    ensure!(
        eligible.len() > BIG_FILES,
        "{} has only {} files that the prefetched images do not share",
        target.title,
        eligible.len()
    );
    // A file whose content another chosen file has would be read from the
    // store: keep one of each.
    let mut seen: HashSet<String> = HashSet::new();
    let mut distinct = Vec::new();
    for f in eligible {
        if !seen.contains(&f.digest) && f.chunks.iter().all(|c| !seen.contains(c)) {
            seen.insert(f.digest.clone());
            seen.extend(f.chunks.iter().cloned());
            distinct.push(f);
        }
    }
    ensure!(
        distinct.len() > BIG_FILES,
        "{} has only {} distinct files that the prefetched images do not share",
        target.title,
        distinct.len()
    );
    let mut chosen: Vec<File> = distinct[..BIG_FILES].to_vec();
    let mid = distinct[BIG_FILES..]
        .iter()
        .min_by_key(|f| f.size.abs_diff(MID_SIZE))
        .cloned()
        .ok_or_else(|| anyhow!("no mid-size file"))?;
    chosen.push(mid);
    Ok(chosen)
}

// ---------------------------------------------------------------------------
// The node daemon and its mounts.

// ---------------------------------------------------------------------------
// One measurement.

/// Range requests the node started: how many, and their bytes.
#[derive(Clone, Copy, Default)]
struct Requests {
    count: u64,
    bytes: u64,
}

impl Requests {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

/// One timed read of one file.
struct ReadSample {
    secs: f64,
    /// On-demand range requests started during the read.
    on_demand: Requests,
    /// Background range requests started during the read.
    background: Requests,
    /// Background range requests started in the `IN_FLIGHT_WINDOW` before
    /// the read: likely still on the link when it began.
    background_before: Requests,
    /// Seconds from the read's start to the node's first range request for it.
    first_request: Option<f64>,
}

/// Prefetch as seen around the reads.
struct PrefetchSeen {
    /// Cloud bytes when the mount was asked for, and when the reads ended.
    cloud_at_mount: f64,
    cloud_at_end: f64,
    /// Seconds from `POST /prefetch` to the first read.
    head_start: f64,
    tasks: usize,
    unfinished: usize,
    layers: u64,
    layers_done: u64,
    errors: Vec<String>,
    /// Background range requests started while the reads ran.
    background_during_reads: Requests,
    /// Bytes of every background range request of the run.
    background_sizes: Vec<u64>,
}

struct Sample {
    reads: Vec<ReadSample>,
    prefetch: Option<PrefetchSeen>,
}

impl Sample {
    fn total(&self) -> f64 {
        self.reads.iter().map(|r| r.secs).sum()
    }

    /// Prefetch was asked for but had finished when the reads ended.
    fn void(&self) -> bool {
        self.prefetch.as_ref().is_some_and(|p| p.unfinished == 0)
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A fresh node (with `setting`), `reference` mounted through it, `files`
/// read one after another; with `prefetch`, those images are prefetched
/// from before the mount.
fn measure(
    env: &Env,
    setting: Setting,
    reference: &str,
    files: &[File],
    gap: Duration,
    prefetch: Option<&[String]>,
    keep_log: Option<&Path>,
) -> Result<Sample> {
    let dir = env.fresh("node")?;
    let node = Node::start(env, &dir, setting.args(), NODE_LOG)?;
    let mut seen = None;
    let mut posted = Instant::now();
    if let Some(images) = prefetch {
        let body = serde_json::json!({ "images": images }).to_string();
        posted = Instant::now();
        let answer: serde_json::Value = serde_json::from_str(&node.post("/prefetch", &body)?)?;
        ensure!(
            answer["tasks"].as_array().map(|t| t.len()) == Some(images.len()),
            "POST /prefetch answered {answer}"
        );
        let until = posted + Duration::from_secs(60);
        loop {
            let bytes = node.cloud_bytes()?;
            if posted.elapsed() >= PREFETCH_HEAD_START && bytes >= PREFETCH_HEAD_BYTES {
                break;
            }
            ensure!(
                Instant::now() < until,
                "prefetch fetched only {bytes} bytes in 60 s; tasks: {:?}; node log:\n{}",
                node.prefetch_tasks()?,
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        seen = Some(node.cloud_bytes()?);
    }
    let mount = NodeMount::mount(env, &node, reference, &dir.join("mnt"))?;
    let head_start = posted.elapsed().as_secs_f64();
    let mut windows = Vec::new();
    for f in files {
        // Prefetch steps aside for a while after on-demand work (the mount's
        // own, the last read): let it get going again.
        std::thread::sleep(gap);
        let p = mount.point.join(&f.path);
        let from = unix_now();
        let t = Instant::now();
        let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let to = unix_now();
        ensure!(
            data.len() as u64 == f.size,
            "{} has {} bytes, its TOC says {}",
            p.display(),
            data.len(),
            f.size
        );
        windows.push((from, to, secs));
    }
    let prefetch_seen = match (prefetch, seen) {
        (Some(_), Some(cloud_at_mount)) => {
            let tasks = node.prefetch_tasks()?;
            Some(PrefetchSeen {
                cloud_at_mount,
                cloud_at_end: node.cloud_bytes()?,
                head_start,
                tasks: tasks.len(),
                unfinished: tasks.iter().filter(|t| t["finished"] != true).count(),
                layers: tasks.iter().filter_map(|t| t["layers"].as_u64()).sum(),
                layers_done: tasks.iter().filter_map(|t| t["done"].as_u64()).sum(),
                errors: tasks
                    .iter()
                    .filter_map(|t| t["error"].as_str().map(String::from))
                    .collect(),
                background_during_reads: Requests::default(),
                background_sizes: Vec::new(),
            })
        }
        _ => None,
    };
    drop(mount);
    drop(node);

    // The node's range requests, by when they started.
    let events = range_requests(&std::fs::read_to_string(dir.join("node.log"))?);
    let mut reads = Vec::new();
    for &(from, to, secs) in &windows {
        let mut r = ReadSample {
            secs,
            on_demand: Requests::default(),
            background: Requests::default(),
            background_before: Requests::default(),
            first_request: None,
        };
        for e in &events {
            if e.at >= from && e.at <= to {
                if e.background {
                    r.background.add(e.bytes);
                } else {
                    r.on_demand.add(e.bytes);
                    r.first_request.get_or_insert(e.at - from);
                }
            } else if e.background && e.at < from && e.at >= from - IN_FLIGHT_WINDOW {
                r.background_before.add(e.bytes);
            }
        }
        reads.push(r);
    }
    let mut prefetch_seen = prefetch_seen;
    if let (Some(p), Some(first), Some(last)) =
        (&mut prefetch_seen, windows.first(), windows.last())
    {
        for e in events
            .iter()
            .filter(|e| e.background && e.at >= first.0 && e.at <= last.1)
        {
            p.background_during_reads.add(e.bytes);
        }
        p.background_sizes = events
            .iter()
            .filter(|e| e.background)
            .map(|e| e.bytes)
            .collect();
    }
    if let Some(keep) = keep_log {
        std::fs::copy(dir.join("node.log"), keep)
            .with_context(|| format!("keeping the node log as {}", keep.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        reads,
        prefetch: prefetch_seen,
    })
}

/// A "range request" line of the node's log.
struct RangeRequest {
    /// Unix time, seconds.
    at: f64,
    bytes: u64,
    background: bool,
}

fn range_requests(log: &str) -> Vec<RangeRequest> {
    log.lines()
        .filter(|l| l.contains("range request") && l.contains("background="))
        .filter_map(|l| {
            let at = parse_timestamp(l.split_whitespace().next()?)?;
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            };
            Some(RangeRequest {
                at,
                bytes: field("bytes")?.parse().ok()?,
                background: field("background")? == "true",
            })
        })
        .collect()
}

/// `2025-11-29T20:41:03.123456Z` as Unix seconds.
fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

// ---------------------------------------------------------------------------
// The report.

fn check(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

fn sum_requests(it: impl Iterator<Item = Requests>) -> Requests {
    it.fold(Requests::default(), |a, r| Requests {
        count: a.count + r.count,
        bytes: a.bytes + r.bytes,
    })
}

fn markdown(
    target: &Published,
    others: &[Published],
    files: &[File],
    results: &BTreeMap<usize, (Vec<Sample>, Vec<Sample>)>,
    runs: usize,
    gap: Duration,
    command: &str,
) -> Result<String> {
    let mut md = String::new();
    let Machine {
        cores, cpu, kernel, ..
    } = Machine::this();
    writeln!(md, "### Node: on-demand reads during prefetch\n")?;
    writeln!(md, "Command: `{command}`\n")?;
    writeln!(
        md,
        "Machine: {} cores ({cpu}), Linux {}. Link: docker-registry on loopback reached only \
         through `breakfs shape` ({RTT_MS} ms RTT, {MBIT} Mbit/s each way, shared by all \
         connections). Each run: a fresh `breakfs node` (fresh cache, default --parallel 8), \
         `breakfs mount --node --no-hydrate --no-dependency-prefetch` of {} ({:.1} MB in {} \
         eStargz layers), then each file read whole (std::fs::read), one after another, each \
         after a pause of {:.1} s (the node holds prefetch back for 1 s after on-demand work: the \
         pause lets it run at full speed again when each read starts). With prefetch: `POST \
         /prefetch` of {} ({:.1} MB) first; the mount once prefetch has run ≥ {} s and fetched \
         ≥ {:.0} MB. Medians of {runs} runs; the settings and the two cases interleaved.\n",
        cores,
        kernel,
        target.title,
        mb(target.size),
        target.layers,
        gap.as_secs_f64(),
        others
            .iter()
            .map(|o| o.title.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
        mb(others.iter().map(|o| o.size).sum()),
        PREFETCH_HEAD_START.as_secs(),
        PREFETCH_HEAD_BYTES / 1e6,
    )?;
    writeln!(
        md,
        "Files: the {BIG_FILES} biggest regular files of {} whose content (whole or any chunk) no \
         prefetched image holds, and the one nearest {:.1} MB.\n",
        target.title,
        mb(MID_SIZE)
    )?;

    for (si, (base, with)) in results {
        let setting = Setting::ALL[*si];
        writeln!(md, "#### {}\n", setting.label())?;
        writeln!(
            md,
            "| file | MB | alone (s) | with prefetch (s) | ratio | target | on-demand MB fetched (alone / with) | first on-demand request after (ms, alone / with) | background requests started in the {IN_FLIGHT_WINDOW:.0} s before / during the read (with, per run) | runs with prefetch (s) |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for (i, f) in files.iter().enumerate() {
            let b = median(&base.iter().map(|s| s.reads[i].secs).collect::<Vec<_>>());
            let w = median(&with.iter().map(|s| s.reads[i].secs).collect::<Vec<_>>());
            let od = |ss: &[Sample]| {
                median(
                    &ss.iter()
                        .map(|s| mb(s.reads[i].on_demand.bytes))
                        .collect::<Vec<_>>(),
                )
            };
            let first = |ss: &[Sample]| {
                median(
                    &ss.iter()
                        .filter_map(|s| s.reads[i].first_request)
                        .map(|t| t * 1e3)
                        .collect::<Vec<_>>(),
                )
            };
            let before = sum_requests(with.iter().map(|s| s.reads[i].background_before));
            let during = sum_requests(with.iter().map(|s| s.reads[i].background));
            writeln!(
                md,
                "| /{} | {:.2} | {b:.3} | {w:.3} | {:.2} | ≤ {TARGET} {} | {:.2} / {:.2} | {:.0} / {:.0} | {:.1} / {:.1} | {} |",
                f.path,
                mb(f.size),
                w / b,
                check(w / b <= TARGET),
                od(base),
                od(with),
                first(base),
                first(with),
                before.count as f64 / with.len() as f64,
                during.count as f64 / with.len() as f64,
                with.iter()
                    .map(|s| format!("{:.3}", s.reads[i].secs))
                    .collect::<Vec<_>>()
                    .join(", "),
            )?;
        }
        let b = median(&base.iter().map(Sample::total).collect::<Vec<_>>());
        let w = median(&with.iter().map(Sample::total).collect::<Vec<_>>());
        writeln!(
            md,
            "| **all (sum of the reads)** | {:.2} | **{b:.3}** | **{w:.3}** | **{:.2}** | ≤ {TARGET} {} | | | | |",
            mb(files.iter().map(|f| f.size).sum()),
            w / b,
            check(w / b <= TARGET)
        )?;
        writeln!(md)?;
        let totals = |ss: &[Sample]| {
            ss.iter()
                .map(|s| format!("{:.2}", s.total()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            md,
            "Runs (sum of the reads, s): alone {}; with prefetch {}.\n",
            totals(base),
            totals(with)
        )?;
        let mut sizes: Vec<u64> = with
            .iter()
            .filter_map(|s| s.prefetch.as_ref())
            .flat_map(|p| p.background_sizes.iter().copied())
            .collect();
        sizes.sort_unstable();
        if let Some(&max) = sizes.last() {
            let over: Vec<u64> = sizes
                .iter()
                .copied()
                .filter(|&b| b > BACKGROUND_RANGE)
                .collect();
            writeln!(
                md,
                "Background range requests of the runs with prefetch: {}, median {:.2} MB, largest {:.2} MB; \
                 {} of them ({:.0}% of their bytes) larger than the {} KiB background range (single chunks larger than it).\n",
                sizes.len(),
                mb(sizes[sizes.len() / 2]),
                mb(max),
                over.len(),
                100.0 * over.iter().sum::<u64>() as f64 / sizes.iter().sum::<u64>().max(1) as f64,
                BACKGROUND_RANGE >> 10
            )?;
        }
        for (r, s) in with.iter().enumerate() {
            if let Some(p) = &s.prefetch {
                writeln!(
                    md,
                    "- run {}: reads began {:.1} s after `POST /prefetch`; cloud bytes {:.1} MB at the mount, {:.1} MB when the reads ended; \
                     {} of {} layers prefetched, {} of {} tasks unfinished{}{}; {} background range requests ({:.1} MB) started during the reads.",
                    r + 1,
                    p.head_start,
                    p.cloud_at_mount / 1e6,
                    p.cloud_at_end / 1e6,
                    p.layers_done,
                    p.layers,
                    p.unfinished,
                    p.tasks,
                    if p.unfinished == 0 {
                        " — **VOID: prefetch had finished before the reads ended**"
                    } else {
                        ""
                    },
                    if p.errors.is_empty() {
                        String::new()
                    } else {
                        format!("; errors: {}", p.errors.join("; "))
                    },
                    p.background_during_reads.count,
                    mb(p.background_during_reads.bytes),
                )?;
            }
        }
        writeln!(md)?;
    }
    writeln!(
        md,
        "Target (acceptance point): with prefetch running through the shaped link, an on-demand read of an uncached file takes ≤ {TARGET}× its time without prefetch. \
         Request counts come from the node's debug log (\"range request\", logged when a request starts; background = prefetch); \
         Background requests started shortly before a read may still be on the link when it starts; the link is shared fairly \
         between connections, so each such request takes a share of it from the read. The node logs are kept in target/bench-node-logs/."
    )?;
    Ok(md)
}
