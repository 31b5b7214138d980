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
//!
//! The parts: `queue` (jobs, batches, workers, pacing), `verified`
//! (a range tried on each source, every chunk checked before it is stored),
//! `health` (retries, counters, resting peers), `yielding` (background
//! requests held to a delay-based window per source, so that they yield
//! the link to readers, this node's and others'), `assemble` (kept
//! ranges into a whole layer blob) and `landmark` (an eStargz layer's
//! prefetch region, fetched at mount).

mod assemble;
mod delta;
mod health;
mod landmark;
mod queue;
mod verified;
mod yielding;

#[cfg(test)]
mod tests;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakfs_index::{Causes, Descriptor, Digest};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::metrics::Histogram;
use crate::{ContentStore, Error, Result, Source, SourceClass};
use health::{backoff, concrete_sources, passed_on, read_once, record_failure, record_success};
use health::{rest, resting, retry_delays};
pub use landmark::{REGION_PIECE, RegionFetch, landmarked_chunks};
use queue::State;
pub use yielding::YieldStats;
use yielding::Yielder;

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
    /// Background requests to a source keep its queuing delay under this
    /// (a delay-based window per source, see `yielding`); `None`: they
    /// are not windowed.
    pub background_target: Option<Duration>,
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
            background_target: Some(yielding::TARGET),
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
    /// The background window of each source measured so far.
    #[serde(default)]
    pub background: BTreeMap<String, YieldStats>,
    /// Chunks made from a delta against a file this node held.
    #[serde(default)]
    pub delta_chunks: u64,
    /// Delta bytes fetched for them.
    #[serde(default)]
    pub delta_bytes: u64,
    /// Deltas that did not make their chunk (fetched whole instead).
    #[serde(default)]
    pub delta_failures: u64,
}

/// What a waiter on a chunk learns: stored, or why not.
type Outcome = std::result::Result<(), String>;

/// The scheduler's state, shared by the [`Fetcher`] handles and the workers.
struct Inner {
    store: Arc<ContentStore>,
    sources: Vec<Arc<dyn Source>>,
    opts: FetchOptions,
    state: Mutex<State>,
    wake: Notify,
    seq: AtomicU64,
    stats: Mutex<FetchStats>,
    blob_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    closed: AtomicBool,
    /// (source name, chunk digest) pairs that delivered wrong bytes.
    bad: Mutex<HashSet<(String, Digest)>>,
    /// When the background rate limit lets the next transfer start.
    next_background: Mutex<Option<Instant>>,
    /// Peers that failed a request (no answer in time, a broken or short
    /// body, a refused redirect), by source name, and until when they are
    /// not asked.
    resting: Mutex<HashMap<String, Instant>>,
    /// The background windows, one per source.
    yielder: Yielder,
    /// Told when a reader comes to wait on a chunk that background work
    /// already took: a held request carrying it goes at once.
    promoted: Notify,
    /// The deltas known (see `crate::delta`).
    deltas: crate::delta::Deltas,
}

impl Inner {
    /// The lock that one download or assembly of blob `digest` holds.
    fn blob_gate(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        self.blob_locks
            .lock()
            .entry(digest.clone())
            .or_default()
            .clone()
    }
}

/// Running fetches of a range of a layer, to wait on
/// ([`Fetcher::range_flight`]).
pub struct RangeFlight {
    store: Arc<ContentStore>,
    layer: Digest,
    start: u64,
    end: u64,
    waiters: Vec<tokio::sync::oneshot::Receiver<Outcome>>,
}

impl RangeFlight {
    /// Wait, at most `wait`, for the fetches; whether the range is now
    /// held. A fetch that fails answers `false` at once, without waiting
    /// for the others.
    pub async fn wait(self, wait: Duration) -> bool {
        let all_stored = async {
            let mut pending = self.waiters;
            while !pending.is_empty() {
                let (outcome, _, rest) = futures::future::select_all(pending).await;
                if !matches!(outcome, Ok(Ok(()))) {
                    return false;
                }
                pending = rest;
            }
            true
        };
        if !matches!(tokio::time::timeout(wait, all_stored).await, Ok(true)) {
            return false;
        }
        let held = held_ranges(&self.store, &self.layer).await;
        covered(&held, self.start, self.end)
    }
}

/// The ranges of `layer` the store keeps, merged.
async fn held_ranges(store: &Arc<ContentStore>, layer: &Digest) -> Vec<(u64, u64)> {
    let (store, layer) = (store.clone(), layer.clone());
    tokio::task::spawn_blocking(move || crate::cas::merge_ranges(&store.held_ranges(&layer)))
        .await
        .unwrap_or_default()
}

/// Whether `spans` (in any order, may overlap) cover `[start, end)`.
fn covered(spans: &[(u64, u64)], start: u64, end: u64) -> bool {
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let mut pos = start;
    for (s, e) in spans {
        if s > pos {
            break;
        }
        pos = pos.max(e);
    }
    pos >= end
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

impl Fetcher {
    /// A scheduler over `store` fetching from `sources` in order; starts its
    /// workers on the current tokio runtime.
    pub fn new(
        store: Arc<ContentStore>,
        sources: Vec<Arc<dyn Source>>,
        opts: FetchOptions,
    ) -> Fetcher {
        let workers = opts.workers.max(1);
        let opts_target = opts.background_target.unwrap_or(yielding::TARGET);
        let inner = Arc::new(Inner {
            store,
            sources,
            opts,
            state: Mutex::new(State::new()),
            wake: Notify::new(),
            seq: AtomicU64::new(0),
            stats: Mutex::new(FetchStats::default()),
            blob_locks: Mutex::new(HashMap::new()),
            closed: false.into(),
            bad: Mutex::new(HashSet::new()),
            next_background: Mutex::new(None),
            resting: Mutex::new(HashMap::new()),
            yielder: Yielder::new(opts_target),
            promoted: Notify::new(),
            deltas: Default::default(),
        });
        for _ in 0..workers {
            let inner = inner.clone();
            tokio::spawn(async move { queue::worker(inner).await });
        }
        Fetcher {
            _alive: Arc::new(Alive(inner.clone())),
            inner,
        }
    }

    /// Know the deltas of `index` (see [`crate::delta`]): a chunk that has
    /// one, whose base this node holds, is made from it; how many were new.
    pub fn add_deltas(&self, index: &crate::DeltaIndex) -> usize {
        self.inner.deltas.add(index)
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
        s.background = self.inner.yielder.stats();
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

    /// The sources, in the order they are tried.
    pub(crate) fn sources(&self) -> &[Arc<dyn Source>] {
        &self.inner.sources
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
        let rx = queue::enqueue(&self.inner, loc, prio);
        self.outcome(loc, rx, deadline).await
    }

    /// What a waiter on the job of `loc` learns, within `deadline`.
    async fn outcome(
        &self,
        loc: &ChunkLoc,
        rx: tokio::sync::oneshot::Receiver<Outcome>,
        deadline: Option<Duration>,
    ) -> Result<()> {
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

    /// [`Fetcher::ensure`] for all of `locs` at once: they are queued
    /// together, so that neighbours in a layer go in one Range request.
    /// One outcome per chunk, in order.
    pub async fn ensure_all(
        &self,
        locs: &[ChunkLoc],
        prio: Priority,
        deadline: Option<Duration>,
    ) -> Vec<Result<()>> {
        let here: Vec<bool> = locs
            .iter()
            .map(|l| self.inner.store.has_chunk(&l.digest))
            .collect();
        let missing: Vec<ChunkLoc> = locs
            .iter()
            .zip(&here)
            .filter(|(_, h)| !**h)
            .map(|(l, _)| l.clone())
            .collect();
        {
            let mut s = self.inner.stats.lock();
            s.hits += (locs.len() - missing.len()) as u64;
            s.misses += missing.len() as u64;
        }
        let rxs = queue::enqueue_all(&self.inner, &missing, prio);
        let mut out: Vec<Result<()>> = locs.iter().map(|_| Ok(())).collect();
        let waiting = locs.iter().enumerate().filter(|(i, _)| !here[*i]);
        let waits = waiting
            .zip(rxs)
            .map(|((i, loc), rx)| async move { (i, self.outcome(loc, rx, deadline).await) });
        for (i, r) in futures::future::join_all(waits).await {
            out[i] = r;
        }
        out
    }

    /// Queue the chunk at `loc` at `prio` now, unless it is stored, and
    /// return its outcome to come (whether it is stored): for a chunk taken
    /// on for a peer, whose request for it may arrive before the returned
    /// future is first polled.
    pub fn queue(
        &self,
        loc: &ChunkLoc,
        prio: Priority,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let rx = (!self.inner.store.has_chunk(&loc.digest))
            .then(|| queue::enqueue(&self.inner, loc, prio));
        async move {
            match rx {
                None => true,
                Some(rx) => matches!(rx.await, Ok(Ok(()))),
            }
        }
    }

    /// Whether a worker is fetching chunk `chunk` at `offset` of `layer`
    /// right now.
    pub fn in_flight(&self, layer: &Digest, offset: u64, chunk: &Digest) -> bool {
        queue::running(&self.inner, layer, offset, chunk)
    }

    /// The queued and running fetches that will make bytes `[start, end)`
    /// of layer `layer` held as verified ranges: `None` when they are held
    /// already, or when those fetches do not cover what is not (nothing to
    /// wait for). A peer asking for a range this node is fetching, or took
    /// on for it, waits on it.
    pub async fn range_flight(&self, layer: &Digest, start: u64, end: u64) -> Option<RangeFlight> {
        // Waiters first, then what is held: a fetch that ends in between
        // has kept its range before it tells its waiters.
        let (spans, waiters) = queue::watch(&self.inner, layer, start, end);
        if waiters.is_empty() {
            return None;
        }
        let held = held_ranges(&self.inner.store, layer).await;
        if covered(&held, start, end) {
            return None;
        }
        let mut all = held;
        all.extend(spans);
        covered(&all, start, end).then(|| RangeFlight {
            store: self.inner.store.clone(),
            layer: layer.clone(),
            start,
            end,
            waiters,
        })
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
        let gate = inner.blob_gate(&desc.digest);
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
                let began = Instant::now();
                let r = src.blob_to_file(desc, &temp).await;
                let r = r.and_then(|()| inner.store.commit_temp(&temp, &dest));
                match r {
                    Ok(()) => {
                        record_success(inner, &*src, desc.size, began.elapsed());
                        return Ok(dest);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&temp);
                        record_failure(inner, &*src);
                        tracing::warn!(source = %src.name(), blob = %desc.digest, "fetching a blob failed: {e}", e = Causes(&e));
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
            let began = Instant::now();
            let r = read_once(inner, &*src, blob, start, len).await;
            tracing::trace!(source = %src.name(), blob = %blob.short(), start, len, ok = r.is_ok(), secs = began.elapsed().as_secs_f64(), "unverified read");
            match r {
                Ok(b) => return Ok(b),
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
        let gate = inner.blob_gate(&desc.digest);
        let _held = gate.lock().await;
        if inner.store.has_blob(&desc.digest) {
            return Ok(true);
        }
        let held = crate::cas::merge_ranges(&inner.store.held_ranges(&desc.digest));
        let gaps = assemble::fill_spans(&held, desc.size, 64 << 10);
        for trusted_only in [false, true] {
            let mut fetched = Vec::new();
            for &(s, e) in &gaps {
                let b = self.read_any(&desc.digest, s, e - s, trusted_only).await?;
                fetched.push((s, b));
            }
            let store = inner.store.clone();
            let d = desc.clone();
            let assembled =
                tokio::task::spawn_blocking(move || assemble::assemble(&store, &d, &fetched))
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
