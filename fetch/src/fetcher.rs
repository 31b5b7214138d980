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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakfs_index::{Descriptor, Digest};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::{ContentStore, Error, Result, Source};

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
}

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
        let mut s = lock(&self.inner.stats).clone();
        s.queued = lock(&self.inner.state).jobs.len();
        s
    }

    /// Count a transfer made outside the scheduler (manifests, configs,
    /// TOCs) in the stats of source `source`.
    pub fn record_transfer(&self, source: &str, bytes: u64) {
        let mut s = lock(&self.inner.stats);
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
            return Ok(());
        }
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
        let mut st = lock(&self.inner.state);
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
        let gate = lock(&inner.blob_locks)
            .entry(desc.digest.clone())
            .or_default()
            .clone();
        let _held = gate.lock().await;
        if dest.is_file() {
            return Ok(dest);
        }
        let mut last: Option<Error> = None;
        for src in &inner.sources {
            for attempt in 0..inner.opts.attempts.max(1) {
                let temp = inner.store.temp_path();
                let r = src.blob_to_file(desc, &temp).await;
                let r = r.and_then(|()| inner.store.commit_temp(&temp, &dest));
                match r {
                    Ok(()) => {
                        let mut s = lock(&inner.stats);
                        let e = s.sources.entry(src.name()).or_default();
                        e.bytes += desc.size;
                        e.requests += 1;
                        return Ok(dest);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&temp);
                        lock(&inner.stats)
                            .sources
                            .entry(src.name())
                            .or_default()
                            .failures += 1;
                        tracing::warn!(source = %src.name(), blob = %desc.digest, "fetching a blob failed: {e}");
                        let fatal = matches!(e, Error::NotFound { .. });
                        last = Some(e);
                        if fatal {
                            break;
                        }
                        backoff(attempt).await;
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
}

async fn worker(inner: Arc<Inner>) {
    while !inner.closed.load(Ordering::Relaxed) {
        let batch = take_batch(&inner);
        match batch {
            Some(b) => {
                let background = b.background;
                run_batch(&inner, b).await;
                if background {
                    lock(&inner.state).background_running -= 1;
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
    let mut st = lock(&inner.state);
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
    // Chunks another path stored meanwhile need no fetch.
    let (held, pending): (Vec<ChunkLoc>, Vec<ChunkLoc>) = batch
        .jobs
        .iter()
        .cloned()
        .partition(|j| inner.store.has_chunk(&j.digest));
    let mut results: Vec<(Digest, std::result::Result<(), String>)> =
        held.into_iter().map(|j| (j.digest, Ok(()))).collect();
    if !pending.is_empty() {
        match fetch_range(inner, &batch.layer, batch.start, batch.end - batch.start).await {
            Ok(bytes) => {
                let store = inner.store.clone();
                let start = batch.start;
                let stored = tokio::task::spawn_blocking(move || {
                    pending
                        .into_iter()
                        .map(|j| {
                            let r = store_chunk(&store, &j, &bytes, start);
                            (j, r)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
                match stored {
                    Ok(list) => {
                        let mut s = lock(&inner.stats);
                        for (j, r) in list {
                            match &r {
                                Ok(()) => {
                                    s.chunks_stored += 1;
                                    s.chunk_bytes_stored += j.size;
                                }
                                Err(e) => {
                                    if e.contains("digest") {
                                        s.digest_failures += 1;
                                    }
                                    tracing::error!(chunk = %j.digest, layer = %j.layer, "{e}");
                                }
                            }
                            results.push((j.digest, r));
                        }
                    }
                    Err(e) => {
                        for j in &batch.jobs {
                            results.push((j.digest.clone(), Err(format!("worker failed: {e}"))));
                        }
                    }
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for j in pending {
                    results.push((j.digest, Err(reason.clone())));
                }
            }
        }
    }
    let mut st = lock(&inner.state);
    for (d, r) in results {
        if let Some(job) = st.jobs.remove(&d) {
            for w in job.waiters {
                let _ = w.send(r.clone());
            }
        }
    }
}

/// Decompress one chunk out of the fetched range, check it, store it.
fn store_chunk(
    store: &ContentStore,
    j: &ChunkLoc,
    bytes: &[u8],
    start: u64,
) -> std::result::Result<(), String> {
    let what = || {
        format!(
            "chunk {} of layer {} (member at {})",
            j.digest, j.layer, j.offset
        )
    };
    let lo = (j.offset - start) as usize;
    let hi = ((j.compressed_end - start) as usize).min(bytes.len());
    if lo >= hi {
        return Err(format!("{}: the fetched range is short", what()));
    }
    let mut dec = flate2::read::GzDecoder::new(&bytes[lo..hi]);
    std::io::copy(&mut (&mut dec).take(j.inner_offset), &mut std::io::sink())
        .map_err(|e| format!("{}: not a gzip member: {e}", what()))?;
    let mut out = Vec::with_capacity(j.size as usize);
    (&mut dec)
        .take(j.size)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: not a gzip member: {e}", what()))?;
    if out.len() as u64 != j.size {
        return Err(format!(
            "{}: the member holds {} bytes, the TOC says {}",
            what(),
            out.len(),
            j.size
        ));
    }
    store.put_chunk(&j.digest, &out).map_err(|e| match e {
        Error::DigestMismatch { actual, .. } => format!(
            "{}: digest mismatch: got {actual}; the layer is corrupt or the source is lying, \
             the bytes were not used",
            what()
        ),
        other => format!("{}: {other}", what()),
    })
}

/// Fetch a byte range of a blob from the first source that delivers it.
async fn fetch_range(inner: &Inner, blob: &Digest, start: u64, len: u64) -> Result<Vec<u8>> {
    let mut last: Option<Error> = None;
    for src in &inner.sources {
        for attempt in 0..inner.opts.attempts.max(1) {
            let r =
                tokio::time::timeout(inner.opts.attempt_timeout, src.read_range(blob, start, len))
                    .await;
            let err = match r {
                Ok(Ok(b)) if b.len() as u64 == len => {
                    let mut s = lock(&inner.stats);
                    let e = s.sources.entry(src.name()).or_default();
                    e.bytes += len;
                    e.requests += 1;
                    return Ok(b);
                }
                Ok(Ok(b)) => Error::Unavailable {
                    what: format!("bytes {start}+{len} of {blob} from {}", src.name()),
                    reason: format!("got {} bytes", b.len()),
                },
                Ok(Err(e)) => e,
                Err(_) => Error::Unavailable {
                    what: format!("bytes {start}+{len} of {blob} from {}", src.name()),
                    reason: format!("no answer within {:?}", inner.opts.attempt_timeout),
                },
            };
            lock(&inner.stats)
                .sources
                .entry(src.name())
                .or_default()
                .failures += 1;
            tracing::warn!(source = %src.name(), attempt, "range request failed: {err}");
            let fatal = matches!(err, Error::NotFound { .. });
            last = Some(err);
            if fatal {
                break;
            }
            if attempt + 1 < inner.opts.attempts {
                backoff(attempt).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Unavailable {
        what: format!("blob {blob}"),
        reason: "no source is configured".into(),
    }))
}
