//! The verified fetch: a range tried on each source in turn, every chunk
//! in it decompressed and checked against its digest before it is stored,
//! and a source that delivered wrong bytes for a chunk never asked for it
//! again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakfs_index::{Causes, Digest};

use super::health::{backoff, passed_on, read_once, record_failure};
use super::health::{rest, resting, retry_delays};
use super::queue::promoted;
use super::{ChunkLoc, Inner, Outcome, Priority};
use crate::{ContentStore, Error, Source, SourceClass};

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
/// `[start, end)`). The planning sources (the peers, asked directly) say
/// first which chunks to take from whom; those runs are asked of their
/// planned source once, while the rest goes down the chain at the same
/// time; what a planned source did not deliver goes down the chain after.
/// Every chunk is checked against its digest, and a chunk a source got
/// wrong is asked of the next source and never again of that one.
/// Verified ranges are kept for peers when the options say so.
pub(super) async fn fetch_verified(
    inner: &Arc<Inner>,
    layer: &Digest,
    jobs: Vec<ChunkLoc>,
    start: u64,
    end: u64,
    prio: Priority,
) -> Vec<(Digest, Outcome)> {
    let (made, jobs) = super::delta::by_delta(inner, jobs).await;
    if jobs.is_empty() {
        return made;
    }
    let (start, end) = if made.is_empty() {
        (start, end)
    } else {
        span(&jobs)
    };
    let mut done = fetch_planned(inner, layer, jobs, (start, end), prio).await;
    done.extend(made);
    done
}

/// [`fetch_verified`] of what no delta made.
async fn fetch_planned(
    inner: &Arc<Inner>,
    layer: &Digest,
    jobs: Vec<ChunkLoc>,
    (start, end): (u64, u64),
    prio: Priority,
) -> Vec<(Digest, Outcome)> {
    let (chain, planned, rest) = plan(inner, layer, jobs, prio).await;
    if planned.is_empty() {
        return down_the_chain(inner, layer, &chain, rest, (start, end), prio).await;
    }
    let asked = planned.into_iter().map(|(src, run)| {
        let (s, e) = span(&run);
        try_source(inner, layer, src, run, (s, e), 1, prio)
    });
    let chained = runs(rest).into_iter().map(|run| {
        let span = span(&run);
        down_the_chain(inner, layer, &chain, run, span, prio)
    });
    let (asked, chained) = futures::future::join(
        futures::future::join_all(asked),
        futures::future::join_all(chained),
    )
    .await;
    let mut done: Vec<(Digest, Outcome)> = chained.into_iter().flatten().collect();
    let mut failed = Vec::new();
    for t in asked {
        done.extend(t.done);
        failed.extend(t.failed);
    }
    let again = runs(failed).into_iter().map(|run| {
        let span = span(&run);
        down_the_chain(inner, layer, &chain, run, span, prio)
    });
    done.extend(futures::future::join_all(again).await.into_iter().flatten());
    done
}

/// The chain of sources for `layer` (planning sources left out: they had
/// their say), and what those planning sources propose for `jobs`: runs of
/// neighbouring chunks, each with the source to ask first, and the chunks
/// planned for no one.
async fn plan(
    inner: &Inner,
    layer: &Digest,
    mut jobs: Vec<ChunkLoc>,
    prio: Priority,
) -> (
    Vec<Arc<dyn Source>>,
    Vec<(Arc<dyn Source>, Vec<ChunkLoc>)>,
    Vec<ChunkLoc>,
) {
    jobs.sort_by_key(|j| j.offset);
    let mut chain = Vec::new();
    let mut first: Vec<Option<Arc<dyn Source>>> = vec![None; jobs.len()];
    for s in &inner.sources {
        if let Some(proposed) = s.plan(layer, &jobs, prio) {
            for (slot, p) in first.iter_mut().zip(proposed.await) {
                if slot.is_none() {
                    *slot = p;
                }
            }
            continue;
        }
        match s.expand(layer) {
            Some(list) => chain.extend(list),
            None => chain.push(s.clone()),
        }
    }
    let mut planned: Vec<(Arc<dyn Source>, Vec<ChunkLoc>)> = Vec::new();
    let mut rest = Vec::new();
    for (j, src) in jobs.into_iter().zip(first) {
        let Some(src) = src else {
            rest.push(j);
            continue;
        };
        match planned.last_mut() {
            Some((s, run))
                if Arc::ptr_eq(s, &src)
                    && run.last().is_some_and(|l| l.compressed_end == j.offset) =>
            {
                run.push(j)
            }
            _ => planned.push((src, vec![j])),
        }
    }
    (chain, planned, rest)
}

/// `jobs` (sorted by offset) cut where one member does not end where the
/// next starts.
fn runs(mut jobs: Vec<ChunkLoc>) -> Vec<Vec<ChunkLoc>> {
    jobs.sort_by_key(|j| j.offset);
    let mut out: Vec<Vec<ChunkLoc>> = Vec::new();
    for j in jobs {
        match out.last_mut() {
            Some(run) if run.last().is_some_and(|l| l.compressed_end == j.offset) => run.push(j),
            _ => out.push(vec![j]),
        }
    }
    out
}

/// The range the members of `jobs` span.
fn span(jobs: &[ChunkLoc]) -> (u64, u64) {
    let s = jobs.iter().map(|j| j.offset).min().unwrap_or(0);
    let e = jobs.iter().map(|j| j.compressed_end).max().unwrap_or(s);
    (s, e)
}

/// The chunks `jobs` (first as the range `[start, end)`) from each source
/// of `chain` in turn, until none is left.
async fn down_the_chain(
    inner: &Arc<Inner>,
    layer: &Digest,
    chain: &[Arc<dyn Source>],
    jobs: Vec<ChunkLoc>,
    (start, end): (u64, u64),
    prio: Priority,
) -> Vec<(Digest, Outcome)> {
    let mut done: Vec<(Digest, Outcome)> = Vec::new();
    let mut pending = jobs;
    let (mut start, mut end) = (start, end);
    let mut last_error = String::from("no source is configured");
    for src in chain {
        if pending.is_empty() {
            break;
        }
        let attempts = inner.opts.attempts.max(1);
        let t = try_source(
            inner,
            layer,
            src.clone(),
            pending,
            (start, end),
            attempts,
            prio,
        )
        .await;
        done.extend(t.done);
        if let Some(e) = t.error {
            last_error = e;
        }
        pending = t.failed;
        (start, end) = span(&pending);
    }
    done.extend(
        pending
            .into_iter()
            .map(|j| (j.digest, Err(last_error.clone()))),
    );
    done
}

/// What one source did for a range.
struct Tried {
    /// Chunks verified and stored.
    done: Vec<(Digest, Outcome)>,
    /// Chunks it did not deliver (or delivered wrong).
    failed: Vec<ChunkLoc>,
    /// The last error, if there was one.
    error: Option<String>,
}

/// The chunks `pending` as the range `[start, end)` of `layer` from `src`,
/// in up to `attempts` attempts: each chunk checked and stored, the range
/// kept when all of it checked out. Every attempt on another node or the
/// cloud is measured for the source's background window; a background one
/// waits for room in it first.
async fn try_source(
    inner: &Arc<Inner>,
    layer: &Digest,
    src: Arc<dyn Source>,
    pending: Vec<ChunkLoc>,
    (start, end): (u64, u64),
    attempts: u32,
    prio: Priority,
) -> Tried {
    let name = src.name();
    let mut tried = Tried {
        done: Vec::new(),
        failed: Vec::new(),
        error: None,
    };
    let skip = resting(inner, &*src) || {
        let bad = inner.bad.lock();
        pending
            .iter()
            .any(|j| bad.contains(&(name.clone(), j.digest.clone())))
    };
    if skip {
        tried.failed = pending;
        return tried;
    }
    let len = end - start;
    let mut got = None;
    let mut delays = retry_delays();
    let measured = src.class() != SourceClass::Local;
    for attempt in 0..attempts {
        let windowed = measured
            && prio == Priority::Background
            && inner.opts.background_target.is_some()
            && hold(inner, &name, &pending, len).await;
        let began = Instant::now();
        let r = read_once(inner, &*src, layer, start, len).await;
        if measured {
            let y = &inner.yielder;
            match &r {
                Ok(_) => y.finish(&name, len, began.elapsed(), windowed, true),
                // Not here, or busy: a quick answer that measures nothing.
                Err(e) if passed_on(e) => y.release(&name, len, windowed),
                Err(_) => y.finish(&name, len, began.elapsed(), windowed, false),
            }
        }
        let err = match r {
            Ok(b) => {
                got = Some(b);
                break;
            }
            Err(e) => e,
        };
        record_failure(inner, &*src);
        let fatal = passed_on(&err);
        if !fatal || src.class() == SourceClass::Cloud {
            tracing::warn!(source = %name, attempt, "range request failed: {err}", err = Causes(&err));
        }
        let rests = !fatal && rest(inner, &*src, &err);
        tried.error = Some(Causes(&err).to_string());
        if fatal || rests {
            break;
        }
        if attempt + 1 < attempts {
            backoff(&mut delays).await;
        }
    }
    let Some(bytes) = got else {
        tried.failed = pending;
        return tried;
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
        tried.error = Some("a worker thread failed".into());
        tried.failed = pending;
        return tried;
    };
    {
        let mut s = inner.stats.lock();
        for (j, r) in checked {
            match r {
                Ok(()) => {
                    s.chunks_stored += 1;
                    s.chunk_bytes_stored += j.size;
                    tried.done.push((j.digest, Ok(())));
                }
                Err(Refused::Wrong(e)) => {
                    s.digest_failures += 1;
                    tracing::error!(chunk = %j.digest, layer = %j.layer, source = %name, "{e}; the bytes were not used");
                    inner.bad.lock().insert((name.clone(), j.digest.clone()));
                    src.wrong_bytes();
                    tried.error = Some(e);
                    tried.failed.push(j);
                }
                Err(Refused::Store(e)) => {
                    tracing::error!(chunk = %j.digest, layer = %j.layer, "{e}");
                    tried.error = Some(e);
                    tried.failed.push(j);
                }
            }
        }
    }
    if tried.failed.is_empty()
        && exact
        && inner.opts.keep_ranges
        && src.class() != SourceClass::Local
    {
        let store = inner.store.clone();
        let layer = layer.clone();
        let kept =
            tokio::task::spawn_blocking(move || store.put_range(&layer, start, &bytes)).await;
        if let Ok(Err(e)) = kept {
            tracing::warn!("keeping a verified range failed: {e}", e = Causes(&e));
        }
    }
    tried
}

/// Wait until `source`'s background window has room for `len` bytes, or a
/// reader comes to wait on one of `jobs` (then the request goes at once, as
/// the reader's). Returns whether the request took room in the window.
async fn hold(inner: &Inner, source: &str, jobs: &[ChunkLoc], len: u64) -> bool {
    let y = &inner.yielder;
    let mut held = false;
    loop {
        let (changed, told) = (y.changed.notified(), inner.promoted.notified());
        tokio::pin!(changed, told);
        changed.as_mut().enable();
        told.as_mut().enable();
        if promoted(inner, jobs) {
            if held {
                y.count(source, false, true);
            }
            return false;
        }
        let until = match y.try_start(source, len) {
            Ok(()) => return true,
            Err(until) => until,
        };
        if inner.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        if !held {
            y.count(source, true, false);
            held = true;
        }
        // Room comes when a request in flight ends (`changed`); pacing ends
        // at its time; a second at most between looks either way.
        let pause = until
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = changed => {}
            _ = told => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
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
        other => Refused::Store(format!("{}: {}", what(), Causes(&other))),
    })
}
