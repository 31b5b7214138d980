//! How sources fare: the order they are tried in, retries with jittered
//! backoff, transfer counters, and peers resting after a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakfs_index::{Causes, Digest};

use super::{Inner, PEER_REST};
use crate::{Error, Result, Source};

/// The pauses between a source's attempts: 100 ms doubling to 3.2 s, each
/// jittered up to twice that (so within the unjittered 200 ms << attempt,
/// at most 6.4 s), so that nodes retrying one registry are not in lockstep.
pub(super) fn retry_delays() -> backon::ExponentialBackoff {
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(3200))
        .without_max_times()
        .with_jitter();
    backon::BackoffBuilder::build(policy)
}

/// Wait the next of `delays`.
pub(super) async fn backoff(delays: &mut backon::ExponentialBackoff) {
    if let Some(d) = delays.next() {
        tokio::time::sleep(d).await;
    }
}

/// The sources to try for `blob`, in order (peers expanded, best first).
pub(super) fn concrete_sources(inner: &Inner, blob: &Digest) -> Vec<Arc<dyn Source>> {
    let mut out = Vec::new();
    for s in &inner.sources {
        match s.expand(blob) {
            Some(list) => out.extend(list),
            None => out.push(s.clone()),
        }
    }
    out
}

/// Count a transfer of `bytes` from `src` that took `took`, and tell `src`.
pub(super) fn record_success(inner: &Inner, src: &dyn Source, bytes: u64, took: Duration) {
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

/// Count a failed request to `src`.
pub(super) fn record_failure(inner: &Inner, src: &dyn Source) {
    inner
        .stats
        .lock()
        .sources
        .entry(src.name())
        .or_default()
        .failures += 1;
}

/// Whether `src` is a peer (or relay) resting after a failure.
pub(super) fn resting(inner: &Inner, src: &dyn Source) -> bool {
    if !src.class().other_node() {
        return false;
    }
    let mut r = inner.resting.lock();
    let name = src.name();
    match r.get(&name) {
        Some(until) if *until > Instant::now() => true,
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
pub(super) fn rest(inner: &Inner, src: &dyn Source, e: &Error) -> bool {
    if !src.class().other_node() {
        return false;
    }
    tracing::warn!(
        source = %src.name(),
        "{e}; {} is not asked again for {PEER_REST:?}",
        src.name(),
        e = Causes(e)
    );
    inner
        .resting
        .lock()
        .insert(src.name(), Instant::now() + PEER_REST);
    true
}

/// Whether a source's answer `e` sends the request on to the next source
/// at once, without retrying or resting this one: it does not have the
/// bytes, or it is busy now.
pub(super) fn passed_on(e: &Error) -> bool {
    matches!(e, Error::NotFound { .. } | Error::Busy { .. })
}

/// One attempt at `len` bytes at `start` of `blob` from `src`, cut off
/// after the attempt timeout; a short answer is an error too. A success is
/// counted ([`record_success`]); a failure is left to the caller.
pub(super) async fn read_once(
    inner: &Inner,
    src: &dyn Source,
    blob: &Digest,
    start: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let began = Instant::now();
    let what = || format!("bytes {start}+{len} of {blob} from {}", src.name());
    let timeout = inner.opts.attempt_timeout;
    match tokio::time::timeout(timeout, src.read_range(blob, start, len)).await {
        Ok(Ok(b)) if b.len() as u64 == len => {
            record_success(inner, src, len, began.elapsed());
            Ok(b)
        }
        Ok(Ok(b)) => Err(Error::Unavailable {
            what: what(),
            reason: format!("got {} bytes", b.len()),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Unavailable {
            what: what(),
            reason: format!("no answer within {timeout:?}"),
        }),
    }
}
