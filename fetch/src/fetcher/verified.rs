//! The verified fetch: a range tried on each source in turn, every chunk
//! in it decompressed and checked against its digest before it is stored,
//! and a source that delivered wrong bytes for a chunk never asked for it
//! again.

use std::sync::Arc;

use breakfs_index::{Causes, Digest};

use super::health::{backoff, concrete_sources, passed_on, read_once, record_failure};
use super::health::{rest, resting, retry_delays};
use super::{ChunkLoc, Inner, Outcome};
use crate::{ContentStore, Error, SourceClass};

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
pub(super) async fn fetch_verified(
    inner: &Arc<Inner>,
    layer: &Digest,
    jobs: Vec<ChunkLoc>,
    start: u64,
    end: u64,
) -> Vec<(Digest, Outcome)> {
    let mut done: Vec<(Digest, Outcome)> = Vec::new();
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
            let err = match read_once(inner, &*src, layer, start, len).await {
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
            last_error = Causes(&err).to_string();
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
                tracing::warn!("keeping a verified range failed: {e}", e = Causes(&e));
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
        other => Refused::Store(format!("{}: {}", what(), Causes(&other))),
    })
}
