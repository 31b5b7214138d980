//! Load generators shared by the load tests (`tests/load.rs`) and `cargo
//! bench --bench load`: readers doing random `pread`s over a mount, every
//! read compared with the same bytes of the original file; many extender
//! calls at once; a fleet of stand-in node daemons for the scheduler to
//! poll. A hang is an error that names what hung, never a hung test.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use breakfs_index::Digest;
use breakfs_index::{CacheIndex, HeldBlob};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// Readers.

/// How many readers read how much.
#[derive(Clone, Debug)]
pub struct ReadLoad {
    /// Reader threads, all reading at once.
    pub threads: usize,
    /// Reads each thread makes.
    pub reads_per_thread: usize,
    /// Seeds the files, offsets and lengths.
    pub seed: u64,
    /// A read that has not returned after this long counts as hung: the run
    /// stops with an error naming the file and offset.
    pub stall: Duration,
}

/// Read sizes, as programs ask for them (clipped at the end of the file).
const READ_SIZES: [u64; 5] = [512, 4 << 10, 16 << 10, 64 << 10, 128 << 10];

/// What the readers saw.
#[derive(Clone, Debug, Default)]
pub struct ReadReport {
    /// Reads made (each one `pread`).
    pub reads: u64,
    /// Bytes they returned.
    pub bytes: u64,
    /// Reads that failed.
    pub errors: u64,
    /// Reads whose bytes differ from the original's.
    pub mismatches: u64,
    /// The first errors and mismatches, each naming the file and offset.
    pub samples: Vec<String>,
    /// Latency of each read through the mount, sorted.
    pub latencies: Vec<Duration>,
    /// Wall time of the whole run.
    pub secs: f64,
    /// Distinct files read.
    pub files_touched: usize,
}

impl ReadReport {
    /// The latency at quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// An error unless every read returned the original bytes.
    pub fn ensure_clean(&self, what: &str) -> Result<()> {
        ensure!(
            self.errors == 0 && self.mismatches == 0,
            "{what}: {} of {} reads failed and {} returned wrong bytes; first: {}",
            self.errors,
            self.reads,
            self.mismatches,
            self.samples.join("; ")
        );
        Ok(())
    }
}

/// The value at quantile `q` of sorted durations (zero when empty).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The non-empty regular files under `root` with their sizes, paths
/// relative to it, sorted.
pub fn regular_files(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = e?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() && meta.len() > 0 {
                out.push((path.strip_prefix(root)?.to_path_buf(), meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// What one reader is doing: (file, offset, length, since when).
type Doing = Mutex<Option<(usize, u64, u64, Instant)>>;

/// One reader's tally.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    bytes: u64,
    errors: u64,
    mismatches: u64,
    samples: Vec<String>,
    touched: HashSet<usize>,
}

/// `load.threads` readers at once, each making `load.reads_per_thread`
/// random `pread`s of `files` under `mount` (a file picked uniformly or by
/// size, an offset in it, 512 B to 128 KiB), each compared with the same
/// `pread` of the file under `original`. Only the read through the mount
/// is timed. A read that hangs past `load.stall` ends the run with an error
/// naming it (the reader threads are then left behind, blocked).
pub fn random_reads(
    mount: &Path,
    original: &Path,
    files: &[(PathBuf, u64)],
    load: &ReadLoad,
) -> Result<ReadReport> {
    ensure!(!files.is_empty(), "no files to read");
    let files: Arc<Vec<(PathBuf, u64)>> = Arc::new(files.to_vec());
    let cumulative: Arc<Vec<u64>> = Arc::new(
        files
            .iter()
            .scan(0u64, |sum, (_, size)| {
                *sum += size;
                Some(*sum)
            })
            .collect(),
    );
    let doing: Arc<Vec<Doing>> = Arc::new((0..load.threads).map(|_| Mutex::new(None)).collect());
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Tally>();
    let started = Instant::now();
    for t in 0..load.threads {
        let (files, cumulative, doing, done, tx) = (
            files.clone(),
            cumulative.clone(),
            doing.clone(),
            done.clone(),
            tx.clone(),
        );
        let (mount, original) = (mount.to_path_buf(), original.to_path_buf());
        let (reads, seed) = (load.reads_per_thread, load.seed);
        std::thread::Builder::new()
            .name(format!("reader-{t}"))
            .spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(t as u64));
                let total = cumulative.last().copied().unwrap_or(1).max(1);
                let mut tally = Tally::default();
                for _ in 0..reads {
                    let i = if rng.random() {
                        rng.random_range(..files.len())
                    } else {
                        let b = rng.random_range(..total);
                        cumulative.partition_point(|&c| c <= b)
                    };
                    let (path, size) = &files[i];
                    let offset = rng.random_range(..*size);
                    let len = READ_SIZES[rng.random_range(..READ_SIZES.len())].min(size - offset);
                    *lock(&doing[t]) = Some((i, offset, len, Instant::now()));
                    let mut got = vec![0u8; len as usize];
                    let began = Instant::now();
                    let r = std::fs::File::open(mount.join(path))
                        .and_then(|f| pread_full(&f, &mut got, offset));
                    let took = began.elapsed();
                    *lock(&doing[t]) = None;
                    done.fetch_add(1, Ordering::Relaxed);
                    tally.touched.insert(i);
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => {
                            tally.errors += 1;
                            if tally.samples.len() < 3 {
                                tally.samples.push(format!(
                                    "pread of /{} at {offset} (+{len}): {e}",
                                    path.display()
                                ));
                            }
                            continue;
                        }
                    };
                    tally.latencies.push(took);
                    tally.bytes += n as u64;
                    let mut want = vec![0u8; len as usize];
                    let same = std::fs::File::open(original.join(path))
                        .and_then(|f| pread_full(&f, &mut want, offset))
                        .is_ok_and(|m| m == n && want[..m] == got[..n]);
                    if !same {
                        tally.mismatches += 1;
                        if tally.samples.len() < 3 {
                            tally.samples.push(format!(
                                "/{} at {offset} (+{len}): {n} bytes read differ from the original",
                                path.display()
                            ));
                        }
                    }
                }
                let _ = tx.send(tally);
            })
            .context("starting a reader thread")?;
    }
    drop(tx);
    let total = (load.threads * load.reads_per_thread) as u64;
    let mut report = ReadReport::default();
    let mut touched = HashSet::new();
    let mut finished = 0;
    while finished < load.threads {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(t) => {
                finished += 1;
                report.latencies.extend(t.latencies);
                report.bytes += t.bytes;
                report.errors += t.errors;
                report.mismatches += t.mismatches;
                report.samples.extend(t.samples);
                touched.extend(t.touched);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("a reader thread died (panicked) after {finished} finished")
            }
        }
        let hung: Vec<String> = doing
            .iter()
            .enumerate()
            .filter_map(|(t, d)| {
                let (i, offset, len, since) = (*lock(d))?;
                (since.elapsed() > load.stall).then(|| {
                    format!(
                        "reader {t}: pread of /{} at {offset} (+{len}) for {:.0} s",
                        files[i].0.display(),
                        since.elapsed().as_secs_f64()
                    )
                })
            })
            .collect();
        if !hung.is_empty() {
            bail!(
                "{} of {} readers hung (no answer within {:.0} s), {} of {total} reads done: {}",
                hung.len(),
                load.threads,
                load.stall.as_secs_f64(),
                done.load(Ordering::Relaxed),
                hung.join("; ")
            );
        }
    }
    report.secs = started.elapsed().as_secs_f64();
    report.reads = total;
    report.latencies.sort();
    report.samples.truncate(10);
    report.files_touched = touched.len();
    Ok(report)
}

/// `pread` until `buf` is full or the file ends; the bytes read.
fn pread_full(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Processes and stores.

/// Peak resident memory of a live process (`VmHWM`), MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Check that the store at `cache` holds each of `blobs` (`sha256:HEX`,
/// size) whole, with the bytes its digest names; the bytes checked.
pub fn check_blobs(cache: &Path, blobs: &[(String, u64)]) -> Result<u64> {
    let mut checked = 0;
    for (digest, size) in blobs {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| anyhow!("{digest} is not a sha256 digest"))?;
        let path = cache.join("blobs/sha256").join(hex);
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("{digest} is not held whole in {}", cache.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = std::io::Read::read(&mut f, &mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        ensure!(
            n == *size,
            "{} has {n} bytes, the manifest says {size}",
            path.display()
        );
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        ensure!(got == *digest, "{} hashes to {got}", path.display());
        checked += n;
    }
    Ok(checked)
}

/// The value of sample `key` (`name{labels}`) on a Prometheus text page
/// (0 when absent).
pub fn metric(page: &str, key: &str) -> f64 {
    page.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The scheduler under load.

/// What a storm of extender calls got.
#[derive(Clone, Debug, Default)]
pub struct StormReport {
    /// Calls made, all at once.
    pub calls: usize,
    /// Calls answered 200.
    pub ok: usize,
    /// Calls that failed (no connection, another status, a broken body).
    pub errors: usize,
    /// Calls without an answer within the limit.
    pub hung: usize,
    /// The first errors.
    pub samples: Vec<String>,
    /// Answers by the sha256 of their body: equal answers, equal keys.
    pub answers: BTreeMap<String, usize>,
    /// Latency of each answered call, sorted.
    pub latencies: Vec<Duration>,
    /// Wall time from the first call to the last answer.
    pub secs: f64,
}

impl StormReport {
    /// The latency at quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// Answers other than `expected` (a body's sha256, see
    /// [`body_key`]).
    pub fn wrong(&self, expected: &str) -> usize {
        self.answers
            .iter()
            .filter(|(k, _)| *k != expected)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The key [`StormReport::answers`] files a body under.
pub fn body_key(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// `calls` POSTs of `body` to `url`, all started at once (one connection
/// each, as that many scheduler threads would), each given `limit` to
/// answer.
pub fn storm(url: &str, body: &str, calls: usize, limit: Duration) -> Result<StormReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(calls)
            .build()?;
        let (go, ready) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::with_capacity(calls);
        for _ in 0..calls {
            let (client, url, body, mut ready) = (
                client.clone(),
                url.to_string(),
                body.to_string(),
                ready.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _ = ready.wait_for(|go| *go).await;
                let began = Instant::now();
                let call = async {
                    let resp = client
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    let status = resp.status();
                    let bytes = resp.bytes().await.map_err(|e| format!("{e:#}"))?;
                    if !status.is_success() {
                        return Err(format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                        ));
                    }
                    Ok(bytes)
                };
                match tokio::time::timeout(limit, call).await {
                    Ok(Ok(b)) => Ok(Ok((began.elapsed(), body_key(&b)))),
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(_) => Err(()),
                }
            }));
        }
        drop(ready);
        let started = Instant::now();
        go.send(true)?;
        let mut report = StormReport {
            calls,
            ..StormReport::default()
        };
        for t in tasks {
            match t.await? {
                Ok(Ok((took, key))) => {
                    report.ok += 1;
                    report.latencies.push(took);
                    *report.answers.entry(key).or_default() += 1;
                }
                Ok(Err(e)) => {
                    report.errors += 1;
                    if report.samples.len() < 5 {
                        report.samples.push(e);
                    }
                }
                Err(()) => report.hung += 1,
            }
        }
        report.secs = started.elapsed().as_secs_f64();
        report.latencies.sort();
        ensure!(
            report.hung == 0,
            "{} of {calls} calls to {url} had no answer within {:.0} s: the scheduler hung",
            report.hung,
            limit.as_secs_f64()
        );
        Ok(report)
    })
}

/// One stand-in node daemon of a [`FakeNodes`] fleet.
#[derive(Clone, Debug)]
pub struct FleetNode {
    /// The Kubernetes node name.
    pub name: String,
    /// Its edge cluster.
    pub cluster: String,
    /// Layers it holds whole.
    pub layers: Vec<(Digest, u64)>,
}

/// `nodes` nodes in `clusters` clusters, each holding `per_node` layers
/// of a pool of `pool` made-up layers (picked by `seed`), and node `i` the
/// first `i % (image.len() + 1)` layers of `image` too, so that nodes
/// differ in how much of the image they hold.
pub fn fleet(
    nodes: usize,
    clusters: usize,
    per_node: usize,
    pool: usize,
    image: &[(Digest, u64)],
    seed: u64,
) -> Vec<FleetNode> {
    let pool: Vec<(Digest, u64)> = (0..pool)
        .map(|i| {
            (
                Digest::of(format!("layer-{i}").as_bytes()),
                1_000_000 + (i as u64 * 7919) % 50_000_000,
            )
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..nodes)
        .map(|i| {
            let mut layers: Vec<(Digest, u64)> = (0..per_node)
                .map(|_| pool[rng.random_range(..pool.len())].clone())
                .collect();
            layers.extend(image.iter().take(i % (image.len() + 1)).cloned());
            FleetNode {
                name: format!("edge-{i}"),
                cluster: format!("c{}", i % clusters.max(1)),
                layers,
            }
        })
        .collect()
}

/// Stand-ins for the node daemons of a fleet: one HTTP server answering
/// `GET /NAME/cache/index` and `GET /NAME/measurements` for each node
/// (its URL is `BASE/NAME`) after `delay` (a node's answer time), counting
/// the polls and how many are open at once. Stopped when dropped.
pub struct FakeNodes {
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    counts: Arc<PollCounts>,
}

#[derive(Default)]
struct PollCounts {
    served: AtomicU64,
    open: AtomicU64,
    most_open: AtomicU64,
}

/// Counts a poll open while alive.
struct Open(Arc<PollCounts>);

impl Open {
    fn new(c: &Arc<PollCounts>) -> Open {
        let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
        c.most_open.fetch_max(now, Ordering::SeqCst);
        Open(c.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.served.fetch_add(1, Ordering::SeqCst);
    }
}

impl FakeNodes {
    /// Serve `nodes` on a free loopback port; each node's measurements say
    /// 20–100 ms and 50–250 Mbit/s to the registry and 1 ms, 1 Gbit/s to
    /// up to 16 nodes of its cluster.
    pub fn start(nodes: &[FleetNode], delay: Duration) -> Result<FakeNodes> {
        use axum::extract::{Path as UrlPath, State};
        use axum::response::IntoResponse;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let base = format!("http://{}", listener.local_addr()?);
        let mut rng = SmallRng::seed_from_u64(0x2545_F491_4F6C_DD1D);
        let mut pages: BTreeMap<String, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        for n in nodes {
            let url = format!("{base}/{}", n.name);
            let index = CacheIndex {
                node: url.clone(),
                blobs: n
                    .layers
                    .iter()
                    .map(|(digest, size)| HeldBlob {
                        digest: digest.clone(),
                        size: *size,
                    })
                    .collect(),
                used: n.layers.iter().map(|l| l.1).sum(),
                budget: Some(20 << 30),
                ..CacheIndex::default()
            };
            let mut links = serde_json::Map::new();
            links.insert(
                "cloud".into(),
                serde_json::json!({"rtt_ms": rng.random_range(20..100u64),
                                   "bandwidth_mbps": rng.random_range(50..250u64), "samples": 10}),
            );
            for o in nodes
                .iter()
                .filter(|o| o.cluster == n.cluster && o.name != n.name)
                .take(16)
            {
                links.insert(
                    format!("{base}/{}", o.name),
                    serde_json::json!({"rtt_ms": 1.0, "bandwidth_mbps": 1000.0, "samples": 10}),
                );
            }
            let measurements = serde_json::json!({"node": url, "links": links});
            pages.insert(
                n.name.clone(),
                (
                    serde_json::to_vec(&index)?,
                    serde_json::to_vec(&measurements)?,
                ),
            );
        }
        type Shared = (
            Arc<BTreeMap<String, (Vec<u8>, Vec<u8>)>>,
            Arc<PollCounts>,
            Duration,
        );
        async fn page(
            State((pages, counts, delay)): State<Shared>,
            UrlPath((node, what)): UrlPath<(String, String)>,
        ) -> axum::response::Response {
            let _open = Open::new(&counts);
            tokio::time::sleep(delay).await;
            let body = match (pages.get(&node), what.as_str()) {
                (Some(p), "index") => p.0.clone(),
                (Some(p), "measurements") => p.1.clone(),
                _ => return axum::http::StatusCode::NOT_FOUND.into_response(),
            };
            ([("content-type", "application/json")], body).into_response()
        }
        async fn index(
            s: State<Shared>,
            UrlPath(node): UrlPath<String>,
        ) -> axum::response::Response {
            page(s, UrlPath((node, "index".into()))).await
        }
        let counts = Arc::new(PollCounts::default());
        let app = axum::Router::new()
            .route("/{node}/cache/index", axum::routing::get(index))
            .route("/{node}/{what}", axum::routing::get(page))
            .with_state((Arc::new(pages), counts.clone(), delay));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(FakeNodes {
            rt: Some(rt),
            stop: Some(stop),
            base,
            counts,
        })
    }

    /// The URL of node `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.counts.served.load(Ordering::SeqCst)
    }

    /// The most requests open at once so far.
    pub fn most_open(&self) -> u64 {
        self.counts.most_open.load(Ordering::SeqCst)
    }

    /// Wait until `n` more requests than `from` were answered.
    pub fn wait_served(&self, from: u64, n: u64, limit: Duration) -> Result<()> {
        let until = Instant::now() + limit;
        while self.served() < from + n {
            ensure!(
                Instant::now() < until,
                "the scheduler polled {} of {n} node pages within {:.0} s",
                self.served() - from,
                limit.as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The scheduler config (YAML) that watches these nodes, polling every
    /// `poll_secs`, plain HTTP to registries.
    pub fn sched_config(&self, nodes: &[FleetNode], poll_secs: f64) -> String {
        let mut yaml = format!("plainHttp: true\npollSecs: {poll_secs}\nstaleSecs: 3600\nnodes:\n");
        for n in nodes {
            yaml.push_str(&format!(
                "  - name: {}\n    url: {}\n    cluster: {}\n",
                n.name,
                self.url(&n.name),
                n.cluster
            ));
        }
        yaml
    }
}

impl Drop for FakeNodes {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A `POST /prioritize` body as kube-scheduler sends it: a pod of `image`
/// (requests 500m CPU, 256 MiB) and every node by name.
pub fn prioritize_body(image: &str, nodes: &[FleetNode]) -> String {
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    serde_json::json!({
        "Pod": {"metadata": {"name": "load", "namespace": "default"},
                "spec": {"containers": [{"name": "app", "image": image,
                         "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]}},
        "NodeNames": names,
    })
    .to_string()
}
