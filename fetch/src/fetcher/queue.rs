//! The queue: one job per chunk digest, on-demand before background,
//! queued neighbours in a layer merged into one Range request, and the
//! workers that run those requests (background ones paced).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use breakfs_index::Digest;
use tokio::sync::oneshot;

use super::verified::fetch_verified;
use super::{ChunkLoc, Inner, Outcome, Priority};

type Waiter = oneshot::Sender<Outcome>;

/// Requests for one chunk: its waiters, and where it stands in the queue.
pub(super) struct Job {
    loc: ChunkLoc,
    prio: Priority,
    seq: u64,
    waiters: Vec<Waiter>,
    running: bool,
}

/// The queue.
#[derive(Default)]
pub(super) struct State {
    /// Queued and running jobs.
    pub(super) jobs: HashMap<Digest, Job>,
    /// Queued jobs by priority, in arrival order.
    order: [BTreeSet<(u64, Digest)>; 2],
    /// Queued jobs by position in their layer.
    by_layer: HashMap<Digest, BTreeMap<u64, Vec<Digest>>>,
    background_running: usize,
    /// Requests of the callers' own at on-demand priority running now
    /// (a profile's runs, a landmarked region's pieces): background work
    /// waits for them as for a reader's.
    pub(super) own_running: usize,
    /// When an on-demand request last arrived or started.
    last_on_demand: Option<Instant>,
}

impl State {
    /// Background work waits for a quiet spell from `t` on (unless an
    /// on-demand request came later).
    pub(super) fn quiet_from(&mut self, t: Instant) {
        if self.last_on_demand.is_none_or(|l| l < t) {
            self.last_on_demand = Some(t);
        }
    }

    /// An empty queue. Background work waits for a quiet spell from the
    /// start: the first reads of a new mount come right after it.
    pub(super) fn new() -> State {
        State {
            last_on_demand: Some(Instant::now()),
            ..State::default()
        }
    }
}

/// A batch of queued jobs that one Range request serves.
pub(super) struct Batch {
    pub(super) layer: Digest,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) jobs: Vec<ChunkLoc>,
    pub(super) background: bool,
}

/// Queue a job for the chunk at `loc` (or join the one queued or running,
/// raising its priority while it waits); the receiver learns the outcome.
pub(super) fn enqueue(inner: &Inner, loc: &ChunkLoc, prio: Priority) -> oneshot::Receiver<Outcome> {
    let rx = insert(inner, &mut inner.state.lock(), loc, prio);
    inner.wake.notify_one();
    rx
}

/// [`enqueue`] each of `locs` under one lock, so that a worker sees them
/// all at once and merges neighbours into one Range request.
pub(super) fn enqueue_all(
    inner: &Inner,
    locs: &[ChunkLoc],
    prio: Priority,
) -> Vec<oneshot::Receiver<Outcome>> {
    let rxs = {
        let mut st = inner.state.lock();
        locs.iter()
            .map(|l| insert(inner, &mut st, l, prio))
            .collect()
    };
    // Several runs of neighbours may have come: wake a worker for each.
    for _ in 0..locs.len().min(inner.opts.workers.max(1)) {
        inner.wake.notify_one();
    }
    rxs
}

fn insert(
    inner: &Inner,
    st: &mut State,
    loc: &ChunkLoc,
    prio: Priority,
) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
    if prio == Priority::OnDemand {
        st.last_on_demand = Some(Instant::now());
    }
    match st.jobs.get_mut(&loc.digest) {
        Some(job) => {
            job.waiters.push(tx);
            if prio < job.prio && job.running {
                // A reader now waits on a batch that may be held at its
                // background window: let it go.
                job.prio = prio;
                inner.promoted.notify_waiters();
            } else if prio < job.prio {
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
    rx
}

/// Take the jobs of `locs` for a request of the caller's own (the
/// landmarked region): a chunk neither stored nor queued gets a running
/// job that readers can join, a queued one is taken off the queue with its
/// waiters, a running one (and a stored one) is left alone. Returns the
/// chunks taken, to be run as a [`Batch`] by [`run_batch`].
pub(super) fn claim(inner: &Inner, locs: &[ChunkLoc]) -> Vec<ChunkLoc> {
    let mut st = inner.state.lock();
    let st = &mut *st;
    let mut taken = Vec::new();
    for loc in locs {
        if inner.store.has_chunk(&loc.digest) {
            continue;
        }
        match st.jobs.get_mut(&loc.digest) {
            Some(job) if job.running => {}
            Some(job) => {
                job.running = true;
                st.order[job.prio as usize].remove(&(job.seq, loc.digest.clone()));
                let queued = &job.loc;
                if let Some(at) = st.by_layer.get_mut(&queued.layer) {
                    if let Some(ds) = at.get_mut(&queued.offset) {
                        ds.retain(|d| d != &loc.digest);
                        if ds.is_empty() {
                            at.remove(&queued.offset);
                        }
                    }
                    if at.is_empty() {
                        st.by_layer.remove(&queued.layer);
                    }
                }
                // Fetched where the caller asked (the same content).
                job.loc = loc.clone();
                taken.push(loc.clone());
            }
            None => {
                let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
                st.jobs.insert(
                    loc.digest.clone(),
                    Job {
                        loc: loc.clone(),
                        prio: Priority::OnDemand,
                        seq,
                        waiters: Vec::new(),
                        running: true,
                    },
                );
                taken.push(loc.clone());
            }
        }
    }
    if !taken.is_empty() {
        st.last_on_demand = Some(Instant::now());
    }
    taken
}

/// Waiters on the queued and running jobs of layer `layer` whose members
/// overlap `[start, end)`, with the spans of those members. (A scan of all
/// jobs: peers ask rarely, and the queue holds thousands of jobs at most.)
pub(super) fn watch(
    inner: &Inner,
    layer: &Digest,
    start: u64,
    end: u64,
) -> (Vec<(u64, u64)>, Vec<oneshot::Receiver<Outcome>>) {
    let mut st = inner.state.lock();
    let mut spans = Vec::new();
    let mut waiters = Vec::new();
    for job in st.jobs.values_mut() {
        let l = &job.loc;
        if l.layer == *layer && l.offset < end && l.compressed_end > start {
            spans.push((l.offset, l.compressed_end));
            let (tx, rx) = oneshot::channel();
            job.waiters.push(tx);
            waiters.push(rx);
        }
    }
    (spans, waiters)
}

/// Whether a worker runs the job of chunk `chunk` at `offset` of `layer`.
pub(super) fn running(inner: &Inner, layer: &Digest, offset: u64, chunk: &Digest) -> bool {
    inner
        .state
        .lock()
        .jobs
        .get(chunk)
        .is_some_and(|j| j.running && j.loc.layer == *layer && j.loc.offset == offset)
}

/// One worker: takes the next batch and runs it, until the fetcher is dropped.
pub(super) async fn worker(inner: Arc<Inner>) {
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
    let quiet = st.own_running == 0
        && st
            .last_on_demand
            .is_none_or(|t| t.elapsed() >= inner.opts.quiet);
    let first = if let Some((_, d)) = st.order[0].first().cloned() {
        background = false;
        st.last_on_demand = Some(Instant::now());
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
        inner.opts.background_range.min(inner.yielder.range_cap())
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

/// Fetch (or find stored) the chunks of `batch`, and tell their waiters;
/// returns how many failed.
pub(super) async fn run_batch(inner: &Arc<Inner>, batch: Batch) -> usize {
    let began = Instant::now();
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
        unless_promoted(
            inner,
            &batch.jobs,
            pace_background(inner, batch.end - batch.start),
        )
        .await;
    }
    let mut results: Vec<(Digest, Outcome)> = Vec::new();
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
            if batch.background {
                Priority::Background
            } else {
                Priority::OnDemand
            },
        )
        .await;
        results.extend(outcome);
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    tracing::debug!(
        layer = %batch.layer.short(),
        start = batch.start,
        bytes = batch.end - batch.start,
        failed,
        secs = began.elapsed().as_secs_f64(),
        "range request done"
    );
    let mut st = inner.state.lock();
    for (d, r) in results {
        if let Some(job) = st.jobs.remove(&d) {
            for w in job.waiters {
                let _ = w.send(r.clone());
            }
        }
    }
    failed
}

/// Whether a reader waits on any of `jobs` (taken as background work).
pub(super) fn promoted(inner: &Inner, jobs: &[ChunkLoc]) -> bool {
    let st = inner.state.lock();
    jobs.iter().any(|j| {
        st.jobs
            .get(&j.digest)
            .is_some_and(|job| job.prio == Priority::OnDemand)
    })
}

/// Run `wait` (a background batch's pause) unless or until a reader comes
/// to wait on one of `jobs`; returns whether one did.
pub(super) async fn unless_promoted(
    inner: &Inner,
    jobs: &[ChunkLoc],
    wait: impl std::future::Future<Output = ()>,
) -> bool {
    tokio::pin!(wait);
    loop {
        let told = inner.promoted.notified();
        tokio::pin!(told);
        told.as_mut().enable();
        if promoted(inner, jobs) {
            return true;
        }
        tokio::select! {
            _ = &mut wait => return false,
            _ = told => {}
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
        let now = Instant::now();
        let start = next.filter(|t| *t > now).unwrap_or(now);
        *next = Some(start + cost);
        start - now
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}
