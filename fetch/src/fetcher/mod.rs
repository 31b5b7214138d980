//! The fetch scheduler: gets chunks and blobs into the content store.
//!
//! Callers ask for a chunk with [`Fetcher::ensure`] at a [`Priority`]. The
//! scheduler keeps one job per chunk digest (concurrent requests for a chunk
//! wait on the same job), runs on-demand jobs before background ones (only a
//! few workers may run background work at once, so a reader never queues
//! behind all of hydration), and merges queued chunks that sit next to each
//! other in a layer blob into one Range request of bounded size. A range is
//! tried on each source in turn with a per-attempt timeout and retries with
//! backoff; every chunk is decompressed and checked against its digest
//! before it enters the store, and a waiter gives up after its deadline.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use breakfs_index::{Descriptor, Digest};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::metrics::Histogram;
use crate::{ContentStore, Error, Result, Source, SourceClass};

/// Where one chunk's bytes sit inside an eStargz layer blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// The layer blob.
    pub layer: Digest,
    /// Offset of the chunk's gzip member in the blob.
    pub offset: u64,
    /// End of the compressed range to fetch (the next member's offset).
    pub compressed_end: u64,
    /// Offset of the chunk inside the decompressed member.
    pub inner_offset: u64,
    /// Uncompressed size.
    pub size: u64,
    /// sha256 of the uncompressed bytes: the chunk's key in the store.
    pub digest: Digest,
}

/// How urgent a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is waiting.
    OnDemand = 0,
    /// Hydration or prefetch.
    Background = 1,
}

/// Tuning of the fetch scheduler.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Range requests in flight at most.
    pub workers: usize,
    /// Of those, how many may serve background work at once.
    pub background_workers: usize,
    /// Largest merged Range request, in compressed bytes.
    pub max_range: u64,
    /// Largest merged Range request of background work: smaller, so that
    /// a reader's request does not share the link with big transfers for long.
    pub background_range: u64,
    /// A reader's request also takes queued background chunks next to it
    /// while the whole range stays within this many bytes.
    pub neighbor_window: u64,
    /// Background work starts only after this long without on-demand
    /// requests, so hydration and prefetch yield the link to readers.
    pub quiet: Duration,
    /// Timeout of one attempt on one source.
    pub attempt_timeout: Duration,
    /// Attempts per source.
    pub attempts: u32,
    /// How long an on-demand request waits before it fails.
    pub deadline: Duration,
    /// Keep every verified compressed range (for peers) and assemble
    /// complete layers into whole blobs: what a node daemon does.
    pub keep_ranges: bool,
    /// Background work (hydration, prefetch) moves at most this many
    /// bytes per second, whatever its source; `None`: no limit.
    pub background_rate: Option<u64>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            workers: 8,
            background_workers: 2,
            max_range: 4 << 20,
            background_range: 512 << 10,
            neighbor_window: 256 << 10,
            quiet: Duration::from_millis(1000),
            attempt_timeout: Duration::from_secs(10),
            attempts: 3,
            deadline: Duration::from_secs(30),
            keep_ranges: false,
            background_rate: None,
        }
    }
}

/// Transfer counters of one source.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceStats {
    /// Compressed bytes received.
    pub bytes: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed (timeouts, errors, bad bytes).
    pub failures: u64,
}

/// What the fetcher has done so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchStats {
    /// Per source name.
    pub sources: BTreeMap<String, SourceStats>,
    /// Chunks verified and stored.
    pub chunks_stored: u64,
    /// Uncompressed bytes of those chunks.
    pub chunk_bytes_stored: u64,
    /// Chunks that failed their digest check.
    pub digest_failures: u64,
    /// Jobs queued now.
    pub queued: usize,
    /// Chunk requests the store answered at once.
    pub hits: u64,
    /// Chunk requests that needed a fetch.
    pub misses: u64,
    /// Duration of range and blob requests, by source class.
    pub latency: BTreeMap<String, Histogram>,
    /// Layers assembled into whole, verified blobs.
    pub layers_completed: u64,
}

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

struct Job {
    loc: ChunkLoc,
    prio: Priority,
    seq: u64,
    waiters: Vec<Waiter>,
    running: bool,
}

#[derive(Default)]
struct State {
    jobs: HashMap<Digest, Job>,
    /// Queued jobs by priority, in arrival order.
    order: [BTreeSet<(u64, Digest)>; 2],
    /// Queued jobs by position in their layer.
    by_layer: HashMap<Digest, BTreeMap<u64, Vec<Digest>>>,
    background_running: usize,
    /// When an on-demand request last arrived or started.
    last_on_demand: Option<std::time::Instant>,
}

struct Inner {
    store: Arc<ContentStore>,
    sources: Vec<Arc<dyn Source>>,
    opts: FetchOptions,
    state: Mutex<State>,
    wake: Notify,
    seq: AtomicU64,
    stats: Mutex<FetchStats>,
    blob_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    closed: std::sync::atomic::AtomicBool,
    /// (source name, chunk digest) pairs that delivered wrong bytes.
    bad: Mutex<HashSet<(String, Digest)>>,
    /// When the background rate limit lets the next transfer start.
    next_background: Mutex<Option<std::time::Instant>>,
    /// Peers that failed a request (no answer in time, a broken or short
    /// body, a refused redirect), by source name, and until when they are
    /// not asked.
    resting: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a peer that failed a request is not asked: the next source
/// (the cloud at the end) serves meanwhile.
pub const PEER_REST: Duration = Duration::from_secs(30);

/// The fetch scheduler; cheap to clone, one per store.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
    _alive: Arc<Alive>,
}

/// Dropped with the last clone of a [`Fetcher`]: stops its workers.
struct Alive(Arc<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        self.0.wake.notify_waiters();
    }
}

/// A batch of queued jobs that one Range request serves.
struct Batch {
    layer: Digest,
    start: u64,
    end: u64,
    jobs: Vec<ChunkLoc>,
    background: bool,
}

impl Fetcher {
    /// A scheduler over `store` fetching from `sources` in order; starts its
    /// workers on the current tokio runtime.
    pub fn new(
        store: Arc<ContentStore>,
        sources: Vec<Arc<dyn Source>>,
        opts: FetchOptions,
    ) -> Fetcher {
        let workers = opts.workers.max(1);
        let inner = Arc::new(Inner {
            store,
            sources,
            opts,
            // Background work waits for a quiet spell from the start: the
            // first reads of a new mount come right after it.
            state: Mutex::new(State {
                last_on_demand: Some(std::time::Instant::now()),
                ..State::default()
            }),
            wake: Notify::new(),
            seq: AtomicU64::new(0),
            stats: Mutex::new(FetchStats::default()),
            blob_locks: Mutex::new(HashMap::new()),
            closed: false.into(),
            bad: Mutex::new(HashSet::new()),
            next_background: Mutex::new(None),
            resting: Mutex::new(HashMap::new()),
        });
        for _ in 0..workers {
            let inner = inner.clone();
            tokio::spawn(async move { worker(inner).await });
        }
        Fetcher {
            _alive: Arc::new(Alive(inner.clone())),
            inner,
        }
    }

    /// The store the fetcher fills.
    pub fn store(&self) -> &Arc<ContentStore> {
        &self.inner.store
    }

    /// The options it runs with.
    pub fn options(&self) -> &FetchOptions {
        &self.inner.opts
    }

    /// Counters so far.
    pub fn stats(&self) -> FetchStats {
        let mut s = self.inner.stats.lock().clone();
        s.queued = self.inner.state.lock().jobs.len();
        s
    }

    /// Count a transfer made outside the scheduler (manifests, configs,
    /// TOCs) in the stats of source `source`.
    pub fn record_transfer(&self, source: &str, bytes: u64) {
        let mut s = self.inner.stats.lock();
        let e = s.sources.entry(source.to_string()).or_default();
        e.bytes += bytes;
        e.requests += 1;
    }

    /// The name of the first source (the one metadata comes from).
    pub fn first_source_name(&self) -> Option<String> {
        self.inner.sources.first().map(|s| s.name())
    }

    /// Make sure the chunk at `loc` is in the store, fetching it if needed.
    /// `deadline` bounds the wait (`None`: wait for the outcome).
    pub async fn ensure(
        &self,
        loc: &ChunkLoc,
        prio: Priority,
        deadline: Option<Duration>,
    ) -> Result<()> {
        if self.inner.store.has_chunk(&loc.digest) {
            self.inner.stats.lock().hits += 1;
            return Ok(());
        }
        self.inner.stats.lock().misses += 1;
        let rx = self.enqueue(loc, prio);
        let what = || {
            format!(
                "chunk {} ({} bytes at offset {} of layer {})",
                loc.digest.short(),
                loc.size,
                loc.offset,
                loc.layer.short()
            )
        };
        let outcome = match deadline {
            Some(d) => match tokio::time::timeout(d, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::Unavailable {
                        what: what(),
                        reason: format!("no source delivered it within the {d:?} deadline"),
                    });
                }
            },
            None => rx.await,
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(Error::Unavailable {
                what: what(),
                reason,
            }),
            Err(_) => Err(Error::Unavailable {
                what: what(),
                reason: "the fetcher stopped".into(),
            }),
        }
    }

    fn enqueue(
        &self,
        loc: &ChunkLoc,
        prio: Priority,
    ) -> oneshot::Receiver<std::result::Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        if prio == Priority::OnDemand {
            st.last_on_demand = Some(std::time::Instant::now());
        }
        match st.jobs.get_mut(&loc.digest) {
            Some(job) => {
                job.waiters.push(tx);
                if prio < job.prio && !job.running {
                    st.order[job.prio as usize].remove(&(job.seq, loc.digest.clone()));
                    job.prio = prio;
                    job.seq = seq;
                    st.order[prio as usize].insert((seq, loc.digest.clone()));
                }
            }
            None => {
                st.order[prio as usize].insert((seq, loc.digest.clone()));
                st.by_layer
                    .entry(loc.layer.clone())
                    .or_default()
                    .entry(loc.offset)
                    .or_default()
                    .push(loc.digest.clone());
                st.jobs.insert(
                    loc.digest.clone(),
                    Job {
                        loc: loc.clone(),
                        prio,
                        seq,
                        waiters: vec![tx],
                        running: false,
                    },
                );
            }
        }
        self.inner.wake.notify_one();
        rx
    }

    /// Make sure the whole blob `desc` is in the store (verified), fetching
    /// it from the first source that has it; returns its path. Concurrent
    /// calls for one blob share one download.
    pub async fn ensure_blob(&self, desc: &Descriptor) -> Result<PathBuf> {
        let inner = &self.inner;
        let dest = inner.store.blob_path(&desc.digest);
        if dest.is_file() {
            return Ok(dest);
        }
        let gate = inner
            .blob_locks
            .lock()
            .entry(desc.digest.clone())
            .or_default()
            .clone();
        let _held = gate.lock().await;
        if dest.is_file() {
            return Ok(dest);
        }
        let mut last: Option<Error> = None;
        for src in concrete_sources(inner, &desc.digest) {
            // Relays move ranges only.
            if matches!(src.class(), SourceClass::Local | SourceClass::Relay)
                || resting(inner, &*src)
            {
                continue;
            }
            let mut delays = retry_delays();
            for _ in 0..inner.opts.attempts.max(1) {
                let temp = inner.store.temp_path();
                let began = std::time::Instant::now();
                let r = src.blob_to_file(desc, &temp).await;
                let r = r.and_then(|()| inner.store.commit_temp(&temp, &dest));
                match r {
                    Ok(()) => {
                        record_success(inner, &*src, desc.size, began.elapsed());
                        return Ok(dest);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&temp);
                        inner
                            .stats
                            .lock()
                            .sources
                            .entry(src.name())
                            .or_default()
                            .failures += 1;
                        tracing::warn!(source = %src.name(), blob = %desc.digest, "fetching a blob failed: {e}");
                        let fatal = passed_on(&e);
                        let rests = !fatal && rest(inner, &*src, &e);
                        last = Some(e);
                        if fatal || rests {
                            break;
                        }
                        backoff(&mut delays).await;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable {
            what: format!("blob {}", desc.digest),
            reason: "no source is configured".into(),
        }))
    }
}

/// The pauses between a source's attempts: 100 ms doubling to 3.2 s, each
/// jittered up to twice that (so within the unjittered 200 ms << attempt,
/// at most 6.4 s), so that nodes retrying one registry are not in lockstep.
fn retry_delays() -> backon::ExponentialBackoff {
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(3200))
        .without_max_times()
        .with_jitter();
    backon::BackoffBuilder::build(policy)
}

/// Wait the next of `delays`.
async fn backoff(delays: &mut backon::ExponentialBackoff) {
    if let Some(d) = delays.next() {
        tokio::time::sleep(d).await;
    }
}

async fn worker(inner: Arc<Inner>) {
    while !inner.closed.load(Ordering::Relaxed) {
        let batch = take_batch(&inner);
        match batch {
            Some(b) => {
                let background = b.background;
                run_batch(&inner, b).await;
                if background {
                    inner.state.lock().background_running -= 1;
                    inner.wake.notify_one();
                }
            }
            None => {
                let notified = inner.wake.notified();
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(inner.opts.quiet.max(Duration::from_millis(50))) => {}
                }
            }
        }
    }
}

/// Take the most urgent queued job and its queued neighbours in the blob.
fn take_batch(inner: &Inner) -> Option<Batch> {
    let mut st = inner.state.lock();
    let st = &mut *st;
    let background;
    let quiet = st
        .last_on_demand
        .is_none_or(|t| t.elapsed() >= inner.opts.quiet);
    let first = if let Some((_, d)) = st.order[0].first().cloned() {
        background = false;
        st.last_on_demand = Some(std::time::Instant::now());
        d
    } else if quiet && st.background_running < inner.opts.background_workers.max(1) {
        let (_, d) = st.order[1].first().cloned()?;
        background = true;
        d
    } else {
        return None;
    };
    let loc = st.jobs.get(&first)?.loc.clone();
    let positions = st.by_layer.get(&loc.layer)?;
    let max_range = if background {
        inner.opts.background_range
    } else {
        inner.opts.max_range
    };
    let (mut start, mut end) = (loc.offset, loc.compressed_end);
    let mut offsets = vec![loc.offset];
    // A reader's request takes along other readers' chunks, and queued
    // hydration next to it only within a small window (files stored next to
    // each other are often read together; more would make the reader wait).
    let window = inner.opts.neighbor_window;
    let joins = |ds: &Vec<Digest>, lo: u64, hi: u64| -> Option<u64> {
        let j = ds.first().and_then(|d| st.jobs.get(d))?;
        let e = j.loc.compressed_end;
        let span = hi.max(e) - lo.min(j.loc.offset);
        (background || j.prio == Priority::OnDemand || span <= window).then_some(e)
    };
    // Forward: members that start where the range ends.
    for (&off, ds) in positions.range(end..) {
        let Some(e) = joins(ds, start, end) else {
            break;
        };
        if off != end || e - start > max_range {
            break;
        }
        offsets.push(off);
        end = e;
    }
    // Backward: members that end where the range starts.
    for (&off, ds) in positions.range(..start).rev() {
        let Some(e) = joins(ds, start, end) else {
            break;
        };
        if e != start || end - off > max_range {
            break;
        }
        offsets.push(off);
        start = off;
    }
    let layer_positions = st.by_layer.get_mut(&loc.layer)?;
    let mut jobs = Vec::new();
    for off in offsets {
        for d in layer_positions.remove(&off).unwrap_or_default() {
            if let Some(job) = st.jobs.get_mut(&d) {
                job.running = true;
                st.order[job.prio as usize].remove(&(job.seq, d.clone()));
                jobs.push(job.loc.clone());
            }
        }
    }
    if layer_positions.is_empty() {
        st.by_layer.remove(&loc.layer);
    }
    if background {
        st.background_running += 1;
    }
    Some(Batch {
        layer: loc.layer,
        start,
        end,
        jobs,
        background,
    })
}

async fn run_batch(inner: &Arc<Inner>, batch: Batch) {
    tracing::debug!(
        layer = %batch.layer.short(),
        start = batch.start,
        bytes = batch.end - batch.start,
        chunks = batch.jobs.len(),
        background = batch.background,
        "range request"
    );
    // All background work is paced, from peers too: unpaced prefetch from
    // peers took the CPU and links that deployments needed (testbed).
    if batch.background {
        pace_background(inner, batch.end - batch.start).await;
    }
    let mut results: Vec<(Digest, std::result::Result<(), String>)> = Vec::new();
    // Chunks another path stored meanwhile need no fetch; the range is
    // still fetched whole (and all of it checked) when any chunk is missing,
    // so that it can be kept as verified bytes for peers.
    if batch.jobs.iter().all(|j| inner.store.has_chunk(&j.digest)) {
        results.extend(batch.jobs.iter().map(|j| (j.digest.clone(), Ok(()))));
    } else {
        let outcome = fetch_verified(
            inner,
            &batch.layer,
            batch.jobs.clone(),
            batch.start,
            batch.end,
        )
        .await;
        results.extend(outcome);
    }
    let mut st = inner.state.lock();
    for (d, r) in results {
        if let Some(job) = st.jobs.remove(&d) {
            for w in job.waiters {
                let _ = w.send(r.clone());
            }
        }
    }
}

/// Wait until the background rate limit lets `bytes` go.
async fn pace_background(inner: &Inner, bytes: u64) {
    let Some(rate) = inner.opts.background_rate.filter(|r| *r > 0) else {
        return;
    };
    let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
    let wait = {
        let mut next = inner.next_background.lock();
        let now = std::time::Instant::now();
        let start = next.filter(|t| *t > now).unwrap_or(now);
        *next = Some(start + cost);
        start - now
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// The sources to try for `blob`, in order (peers expanded, best first).
fn concrete_sources(inner: &Inner, blob: &Digest) -> Vec<Arc<dyn Source>> {
    let mut out = Vec::new();
    for s in &inner.sources {
        match s.expand(blob) {
            Some(list) => out.extend(list),
            None => out.push(s.clone()),
        }
    }
    out
}

fn record_success(inner: &Inner, src: &dyn Source, bytes: u64, took: Duration) {
    src.observe(bytes, took.as_secs_f64());
    let mut s = inner.stats.lock();
    let e = s.sources.entry(src.name()).or_default();
    e.bytes += bytes;
    e.requests += 1;
    s.latency
        .entry(src.class().as_str().to_string())
        .or_default()
        .observe(took.as_secs_f64());
}

fn record_failure(inner: &Inner, src: &dyn Source) {
    inner
        .stats
        .lock()
        .sources
        .entry(src.name())
        .or_default()
        .failures += 1;
}

/// Whether `src` is a peer (or relay) resting after a failure.
fn resting(inner: &Inner, src: &dyn Source) -> bool {
    if !src.class().other_node() {
        return false;
    }
    let mut r = inner.resting.lock();
    let name = src.name();
    match r.get(&name) {
        Some(until) if *until > std::time::Instant::now() => true,
        Some(_) => {
            r.remove(&name);
            false
        }
        None => false,
    }
}

/// After `src` failed with `e`: a peer (or relay) rests for [`PEER_REST`] (its
/// failures cost a reader the attempt timeout each; the next source
/// serves meanwhile). Returns whether it rests.
fn rest(inner: &Inner, src: &dyn Source, e: &Error) -> bool {
    if !src.class().other_node() {
        return false;
    }
    tracing::warn!(
        source = %src.name(),
        "{e}; {} is not asked again for {PEER_REST:?}",
        src.name()
    );
    inner
        .resting
        .lock()
        .insert(src.name(), std::time::Instant::now() + PEER_REST);
    true
}

/// Whether a source's answer `e` sends the request on to the next source
/// at once, without retrying or resting this one: it does not have the
/// bytes, or it is busy now.
fn passed_on(e: &Error) -> bool {
    matches!(e, Error::NotFound { .. } | Error::Busy { .. })
}

/// Whether the members of `jobs` cover `[start, end)` without a hole.
fn covers(jobs: &[ChunkLoc], start: u64, end: u64) -> bool {
    let mut spans: Vec<(u64, u64)> = jobs.iter().map(|j| (j.offset, j.compressed_end)).collect();
    spans.sort_unstable();
    let mut pos = start;
    for (s, e) in spans {
        if s > pos {
            return false;
        }
        pos = pos.max(e);
    }
    pos >= end
}

/// Fetch the chunks `jobs` of layer `layer` (first as the range
/// `[start, end)`), trying each source in turn: every chunk is checked
/// against its digest, and a chunk a source got wrong is asked of the next
/// source and never again of that one. Verified ranges are kept for peers
/// when the options say so.
async fn fetch_verified(
    inner: &Arc<Inner>,
    layer: &Digest,
    jobs: Vec<ChunkLoc>,
    start: u64,
    end: u64,
) -> Vec<(Digest, std::result::Result<(), String>)> {
    let mut done: Vec<(Digest, std::result::Result<(), String>)> = Vec::new();
    let mut pending = jobs;
    let (mut start, mut end) = (start, end);
    let mut last_error = String::from("no source is configured");
    for src in concrete_sources(inner, layer) {
        if pending.is_empty() {
            break;
        }
        let name = src.name();
        if resting(inner, &*src) {
            continue;
        }
        {
            let bad = inner.bad.lock();
            if pending
                .iter()
                .any(|j| bad.contains(&(name.clone(), j.digest.clone())))
            {
                continue;
            }
        }
        let len = end - start;
        let mut got = None;
        let mut delays = retry_delays();
        for attempt in 0..inner.opts.attempts.max(1) {
            let began = std::time::Instant::now();
            let r = tokio::time::timeout(
                inner.opts.attempt_timeout,
                src.read_range(layer, start, len),
            )
            .await;
            let err = match r {
                Ok(Ok(b)) if b.len() as u64 == len => {
                    record_success(inner, &*src, len, began.elapsed());
                    got = Some(b);
                    break;
                }
                Ok(Ok(b)) => Error::Unavailable {
                    what: format!("bytes {start}+{len} of {layer} from {name}"),
                    reason: format!("got {} bytes", b.len()),
                },
                Ok(Err(e)) => e,
                Err(_) => Error::Unavailable {
                    what: format!("bytes {start}+{len} of {layer} from {name}"),
                    reason: format!("no answer within {:?}", inner.opts.attempt_timeout),
                },
            };
            record_failure(inner, &*src);
            let fatal = passed_on(&err);
            if !fatal || src.class() == SourceClass::Cloud {
                tracing::warn!(source = %name, attempt, "range request failed: {err}");
            }
            let rests = !fatal && rest(inner, &*src, &err);
            last_error = err.to_string();
            if fatal || rests {
                break;
            }
            if attempt + 1 < inner.opts.attempts {
                backoff(&mut delays).await;
            }
        }
        let Some(bytes) = got else {
            continue;
        };
        let exact = covers(&pending, start, end);
        let store = inner.store.clone();
        let list = pending.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let out: Vec<_> = list
                .into_iter()
                .map(|j| {
                    let r = store_chunk(&store, &j, &bytes, start);
                    (j, r)
                })
                .collect();
            (out, bytes)
        })
        .await;
        let Ok((checked, bytes)) = checked else {
            last_error = "a worker thread failed".into();
            continue;
        };
        let mut failed = Vec::new();
        {
            let mut s = inner.stats.lock();
            for (j, r) in checked {
                match r {
                    Ok(()) => {
                        s.chunks_stored += 1;
                        s.chunk_bytes_stored += j.size;
                        done.push((j.digest, Ok(())));
                    }
                    Err(Refused::Wrong(e)) => {
                        s.digest_failures += 1;
                        tracing::error!(chunk = %j.digest, layer = %j.layer, source = %name, "{e}; the bytes were not used");
                        inner.bad.lock().insert((name.clone(), j.digest.clone()));
                        src.wrong_bytes();
                        last_error = e;
                        failed.push(j);
                    }
                    Err(Refused::Store(e)) => {
                        tracing::error!(chunk = %j.digest, layer = %j.layer, "{e}");
                        last_error = e;
                        failed.push(j);
                    }
                }
            }
        }
        if failed.is_empty() && exact && inner.opts.keep_ranges && src.class() != SourceClass::Local
        {
            let store = inner.store.clone();
            let layer = layer.clone();
            let kept =
                tokio::task::spawn_blocking(move || store.put_range(&layer, start, &bytes)).await;
            if let Ok(Err(e)) = kept {
                tracing::warn!(
                    "keeping a verified range failed: {e}",
                    e = breakfs_index::Causes(&e)
                );
            }
        }
        pending = failed;
        if let (Some(lo), Some(hi)) = (
            pending.iter().map(|j| j.offset).min(),
            pending.iter().map(|j| j.compressed_end).max(),
        ) {
            start = lo;
            end = hi;
        }
    }
    done.extend(
        pending
            .into_iter()
            .map(|j| (j.digest, Err(last_error.clone()))),
    );
    done
}

/// Why a fetched chunk was not stored.
enum Refused {
    /// The source's bytes are wrong: short, not gzip, the wrong size or
    /// digest (the source is not asked for that chunk again).
    Wrong(String),
    /// The store could not keep them.
    Store(String),
}

/// Decompress one chunk out of the fetched range, check it, store it.
fn store_chunk(
    store: &ContentStore,
    j: &ChunkLoc,
    bytes: &[u8],
    start: u64,
) -> std::result::Result<(), Refused> {
    let what = || {
        format!(
            "chunk {} of layer {} (member at {})",
            j.digest, j.layer, j.offset
        )
    };
    let out = crate::cas::inflate_chunk(j, bytes, start).map_err(Refused::Wrong)?;
    store.put_chunk(&j.digest, &out).map_err(|e| match e {
        Error::DigestMismatch { actual, .. } => Refused::Wrong(format!(
            "{}: digest mismatch: got {actual}; the layer is corrupt or the source is lying",
            what()
        )),
        other => Refused::Store(format!("{}: {other}", what())),
    })
}

impl Fetcher {
    /// `len` bytes at `start` of blob `blob` from the first source that has
    /// them, unverified: for data the caller checks itself (a TOC against
    /// its digest). With `trusted_only`, peers are not asked.
    pub async fn read_any(
        &self,
        blob: &Digest,
        start: u64,
        len: u64,
        trusted_only: bool,
    ) -> Result<Vec<u8>> {
        let inner = &self.inner;
        let mut last: Option<Error> = None;
        for src in concrete_sources(inner, blob) {
            if (trusted_only && src.class().other_node()) || resting(inner, &*src) {
                continue;
            }
            let began = std::time::Instant::now();
            let r =
                tokio::time::timeout(inner.opts.attempt_timeout, src.read_range(blob, start, len))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Unavailable {
                            what: format!("bytes {start}+{len} of {blob} from {}", src.name()),
                            reason: format!("no answer within {:?}", inner.opts.attempt_timeout),
                        })
                    });
            match r {
                Ok(b) if b.len() as u64 == len => {
                    record_success(inner, &*src, len, began.elapsed());
                    return Ok(b);
                }
                Ok(b) => {
                    record_failure(inner, &*src);
                    let e = Error::Unavailable {
                        what: format!("bytes {start}+{len} of {blob} from {}", src.name()),
                        reason: format!("got {} bytes", b.len()),
                    };
                    rest(inner, &*src, &e);
                    last = Some(e);
                }
                Err(e) => {
                    if !passed_on(&e) {
                        record_failure(inner, &*src);
                        rest(inner, &*src, &e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable {
            what: format!("blob {blob}"),
            reason: "no source is configured".into(),
        }))
    }

    /// Turn the kept ranges of layer `desc` into its whole blob: fetch what
    /// no chunk covered (headers, the TOC), assemble, check the layer
    /// digest, and keep the blob instead of the ranges. Returns whether the
    /// blob is now held.
    pub async fn complete_layer(&self, desc: &Descriptor) -> Result<bool> {
        let inner = &self.inner;
        if inner.store.has_blob(&desc.digest) {
            return Ok(true);
        }
        let gate = inner
            .blob_locks
            .lock()
            .entry(desc.digest.clone())
            .or_default()
            .clone();
        let _held = gate.lock().await;
        if inner.store.has_blob(&desc.digest) {
            return Ok(true);
        }
        let held = crate::cas::merge_ranges(&inner.store.held_ranges(&desc.digest));
        let gaps = fill_spans(&held, desc.size, 64 << 10);
        for trusted_only in [false, true] {
            let mut fetched = Vec::new();
            for &(s, e) in &gaps {
                let b = self.read_any(&desc.digest, s, e - s, trusted_only).await?;
                fetched.push((s, b));
            }
            let store = inner.store.clone();
            let d = desc.clone();
            let assembled = tokio::task::spawn_blocking(move || assemble(&store, &d, &fetched))
                .await
                .map_err(|e| Error::Unavailable {
                    what: format!("assembling layer {}", desc.digest),
                    reason: e.to_string(),
                })?;
            match assembled {
                Ok(()) => {
                    inner.store.remove_ranges(&desc.digest);
                    inner.stats.lock().layers_completed += 1;
                    return Ok(true);
                }
                Err(Error::DigestMismatch { .. }) if !trusted_only && !gaps.is_empty() => {
                    tracing::warn!(layer = %desc.digest, "an assembled layer did not match its digest; fetching its gaps from the cloud");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

/// The spans of `[0, size)` that `held` (sorted, merged) leaves out, joined
/// when they are less than `join` apart (fewer requests, a little overlap).
fn fill_spans(held: &[(u64, u64)], size: u64, join: u64) -> Vec<(u64, u64)> {
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    for &(s, e) in held {
        if s > pos {
            gaps.push((pos, s.min(size)));
        }
        pos = pos.max(e);
    }
    if pos < size {
        gaps.push((pos, size));
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in gaps {
        match out.last_mut() {
            Some(last) if s - last.1 < join => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// Write layer `desc` from `fetched` spans and kept ranges into a temp
/// file, check its digest and size, and move it into place.
fn assemble(store: &ContentStore, desc: &Descriptor, fetched: &[(u64, Vec<u8>)]) -> Result<()> {
    use std::io::Write;
    let temp = store.temp_path();
    let what = format!("layer {} assembled from kept ranges", desc.digest);
    let result = (|| -> Result<Digest> {
        let f = std::fs::File::create(&temp)
            .map_err(|e| Error::io(format!("creating {}", temp.display()), e))?;
        let mut hw =
            breakfs_index::HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
        let held = crate::cas::merge_ranges(&store.held_ranges(&desc.digest));
        let mut pos = 0u64;
        while pos < desc.size {
            if let Some((s, b)) = fetched
                .iter()
                .find(|(s, b)| *s <= pos && pos < s + b.len() as u64)
            {
                let from = (pos - s) as usize;
                hw.write_all(&b[from..])
                    .map_err(|e| Error::io(what.clone(), e))?;
                pos = s + b.len() as u64;
                continue;
            }
            let Some(&(_, e)) = held.iter().find(|(s, e)| *s <= pos && pos < *e) else {
                return Err(Error::Unavailable {
                    what: what.clone(),
                    reason: format!("nothing covers offset {pos}"),
                });
            };
            let e = e.min(desc.size);
            // Through the kept ranges in pieces of at most 4 MiB.
            let mut at = pos;
            while at < e {
                let n = (e - at).min(4 << 20);
                let bytes =
                    store
                        .read_held(&desc.digest, at, n)?
                        .ok_or_else(|| Error::Unavailable {
                            what: what.clone(),
                            reason: format!("a kept range at {at} went away"),
                        })?;
                hw.write_all(&bytes)
                    .map_err(|e| Error::io(what.clone(), e))?;
                at += n;
            }
            pos = e;
        }
        let (out, digest, size) = hw.finish();
        out.into_inner()
            .map_err(|e| Error::io(what.clone(), e.into_error()))?;
        if size != desc.size {
            return Err(Error::SizeMismatch {
                what: what.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        Ok(digest)
    })();
    let outcome = match result {
        Ok(d) if d == desc.digest => store.commit_temp(&temp, &store.blob_path(&desc.digest)),
        Ok(actual) => Err(Error::DigestMismatch {
            what,
            expected: desc.digest.clone(),
            actual,
        }),
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    outcome
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn retry_delays_stay_within_the_old_bounds_and_differ_between_nodes() {
        let run = || retry_delays().take(8).collect::<Vec<_>>();
        for (attempt, d) in run().into_iter().enumerate() {
            let base = Duration::from_millis(100 << attempt.min(5));
            assert!(d >= base && d <= 2 * base, "attempt {attempt}: {d:?}");
        }
        // Jittered: two nodes' schedules are not the same.
        assert!((0..5).any(|_| run() != run()));
    }

    /// A source serving `blob` (or garbage of the same length), counting calls.
    struct Fake {
        name: &'static str,
        blob: Vec<u8>,
        lie: bool,
        calls: AtomicUsize,
    }

    impl Source for Fake {
        fn name(&self) -> String {
            self.name.into()
        }
        fn class(&self) -> SourceClass {
            SourceClass::Peer
        }
        fn read_range<'a>(
            &'a self,
            _blob: &'a Digest,
            start: u64,
            len: u64,
        ) -> futures::future::BoxFuture<'a, Result<Vec<u8>>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut b = self.blob[start as usize..(start + len) as usize].to_vec();
            if self.lie {
                // Same length, valid gzip of the right size, wrong content.
                b = gzip(&vec![b'x'; 1200]);
                assert!(b.len() as u64 <= len);
                b.resize(len as usize, 0);
            }
            Box::pin(async move { Ok(b) })
        }
        fn blob_to_file<'a>(
            &'a self,
            desc: &'a Descriptor,
            _path: &'a std::path::Path,
        ) -> futures::future::BoxFuture<'a, Result<()>> {
            Box::pin(async move {
                Err(Error::NotFound {
                    what: desc.digest.to_string(),
                })
            })
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn a_lying_source_is_skipped_for_that_chunk_and_never_asked_again() {
        let content = b"hello, chunk".repeat(100);
        let member = gzip(&content);
        let loc = ChunkLoc {
            layer: Digest::of(b"layer"),
            offset: 0,
            compressed_end: member.len() as u64,
            inner_offset: 0,
            size: content.len() as u64,
            digest: Digest::of(&content),
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::open(dir.path()).unwrap());
        let liar = Arc::new(Fake {
            name: "peer liar",
            blob: member.clone(),
            lie: true,
            calls: AtomicUsize::new(0),
        });
        let honest = Arc::new(Fake {
            name: "cloud",
            blob: member,
            lie: false,
            calls: AtomicUsize::new(0),
        });
        let f = Fetcher::new(
            store.clone(),
            vec![liar.clone(), honest.clone()],
            FetchOptions::default(),
        );
        f.ensure(&loc, Priority::OnDemand, None).await.unwrap();
        assert_eq!(
            std::fs::read(store.chunk_path(&loc.digest)).unwrap(),
            content
        );
        assert_eq!(liar.calls.load(Ordering::Relaxed), 1);
        assert_eq!(honest.calls.load(Ordering::Relaxed), 1);
        assert_eq!(f.stats().digest_failures, 1);
        // Gone from the store (evicted): fetched again, not from the liar.
        assert!(store.remove_chunk(&loc.digest));
        f.ensure(&loc, Priority::OnDemand, None).await.unwrap();
        assert_eq!(liar.calls.load(Ordering::Relaxed), 1);
        assert_eq!(honest.calls.load(Ordering::Relaxed), 2);
    }
}
