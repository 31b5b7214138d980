//! The delta step: before a range goes down the chain, each of its chunks
//! that has a known delta (`crate::delta`) whose base file this node holds
//! (every chunk of it in the store) is made from that base and the delta's
//! range of the pack, fetched from the cloud, and stored only if it checks
//! out against the chunk's digest. What the step does not make goes on
//! down the chain as before.

use std::sync::Arc;

use breakfs_index::{Causes, Digest};

use super::health::read_once;
use super::{ChunkLoc, Inner, Outcome};
use crate::delta::{ChunkDelta, apply_delta};
use crate::{ContentStore, SourceClass};

/// Make what of `jobs` the known deltas can make; the chunks made, and the
/// rest (still to fetch).
pub(super) async fn by_delta(
    inner: &Arc<Inner>,
    jobs: Vec<ChunkLoc>,
) -> (Vec<(Digest, Outcome)>, Vec<ChunkLoc>) {
    let mut rest = Vec::new();
    let mut tries = Vec::new();
    for j in jobs {
        match inner.deltas.get(&j.digest) {
            Some((pack, d))
                if d.size == j.size && d.base.iter().all(|b| inner.store.has_chunk(b)) =>
            {
                tries.push(async move {
                    let made = make(inner, &pack, &d).await;
                    (j, made)
                })
            }
            _ => rest.push(j),
        }
    }
    let mut done = Vec::new();
    for (j, made) in futures::future::join_all(tries).await {
        match made {
            Ok(len) => {
                let mut s = inner.stats.lock();
                s.chunks_stored += 1;
                s.chunk_bytes_stored += j.size;
                s.delta_chunks += 1;
                s.delta_bytes += len;
                done.push((j.digest, Ok(())));
            }
            Err(e) => {
                tracing::warn!(chunk = %j.digest, layer = %j.layer, "a delta did not make the chunk, fetching it whole: {e}");
                inner.stats.lock().delta_failures += 1;
                rest.push(j);
            }
        }
    }
    (done, rest)
}

/// Fetch delta `d` from pack `pack` (from the cloud sources, in order),
/// apply it to its base from the store and store the result, checked; the
/// delta's length.
async fn make(inner: &Arc<Inner>, pack: &Digest, d: &ChunkDelta) -> Result<u64, String> {
    let mut bytes = None;
    let mut last = String::from("no cloud source");
    for src in inner
        .sources
        .iter()
        .filter(|s| s.class() == SourceClass::Cloud)
    {
        match read_once(inner, &**src, pack, d.offset, d.len).await {
            Ok(b) => {
                bytes = Some(b);
                break;
            }
            Err(e) => last = Causes(&e).to_string(),
        }
    }
    let delta = bytes.ok_or(last)?;
    let (store, d) = (inner.store.clone(), d.clone());
    tokio::task::spawn_blocking(move || apply(&store, &d, &delta))
        .await
        .map_err(|e| format!("a worker thread failed: {e}"))?
}

/// The base of `d` read from `store`, `delta` applied, the result stored
/// (the store checks its digest).
fn apply(store: &ContentStore, d: &ChunkDelta, delta: &[u8]) -> Result<u64, String> {
    let mut base = Vec::with_capacity(d.base_size as usize);
    for b in &d.base {
        let path = store.chunk_path(b);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("reading base chunk {}: {e}", b.short()))?;
        base.extend_from_slice(&bytes);
    }
    if base.len() as u64 != d.base_size {
        return Err(format!(
            "its base is {} bytes, not {}",
            base.len(),
            d.base_size
        ));
    }
    let out = apply_delta(&base, delta, d.size).map_err(|e| format!("applying it: {e}"))?;
    store
        .put_chunk(&d.chunk, &out)
        .map_err(|e| format!("storing it: {}", Causes(&e)))?;
    Ok(delta.len() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::delta::{DeltaIndex, make_delta};
    use crate::{FetchOptions, Fetcher, Priority, Result, Source};

    /// The cloud: blobs by digest, counting the bytes it sends.
    struct Cloud {
        blobs: HashMap<Digest, Vec<u8>>,
        sent: AtomicU64,
    }

    impl Source for Cloud {
        fn name(&self) -> String {
            "cloud".into()
        }
        fn read_range<'a>(
            &'a self,
            blob: &'a Digest,
            start: u64,
            len: u64,
        ) -> futures::future::BoxFuture<'a, Result<Vec<u8>>> {
            let b = self.blobs[blob][start as usize..(start + len) as usize].to_vec();
            self.sent.fetch_add(len, Ordering::Relaxed);
            Box::pin(async move { Ok(b) })
        }
    }

    fn content(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A v2 chunk in a one-member layer, its v1 base, and a pack holding
    /// `delta` for it; the fetcher knows the delta, and the store holds
    /// the base when `held`.
    struct Setup {
        f: Fetcher,
        cloud: Arc<Cloud>,
        loc: ChunkLoc,
        new: Vec<u8>,
        member_len: u64,
        _dir: tempfile::TempDir,
    }

    fn setup(lie: bool, held: bool) -> Setup {
        let old = content(1, 300_000);
        let mut new = old.clone();
        new[100..140].copy_from_slice(&[7u8; 40]);
        let member = gzip(&new);
        let mut delta = make_delta(&old, &new, 9).unwrap();
        if lie {
            delta = make_delta(&old, &content(5, new.len()), 9).unwrap();
        }
        let (layer, pack) = (Digest::of(&member), Digest::of(&delta));
        let loc = ChunkLoc {
            layer: layer.clone(),
            offset: 0,
            compressed_end: member.len() as u64,
            inner_offset: 0,
            size: new.len() as u64,
            digest: Digest::of(&new),
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::open(dir.path()).unwrap());
        if held {
            store.put_chunk(&Digest::of(&old), &old).unwrap();
        }
        let cloud = Arc::new(Cloud {
            blobs: HashMap::from([(layer, member.clone()), (pack.clone(), delta.clone())]),
            sent: AtomicU64::new(0),
        });
        let f = Fetcher::new(store, vec![cloud.clone()], FetchOptions::default());
        f.add_deltas(&DeltaIndex {
            pack,
            pack_size: delta.len() as u64,
            deltas: vec![ChunkDelta {
                chunk: loc.digest.clone(),
                size: new.len() as u64,
                base: vec![Digest::of(&old)],
                base_size: old.len() as u64,
                offset: 0,
                len: delta.len() as u64,
            }],
        });
        Setup {
            f,
            cloud,
            loc,
            new,
            member_len: member.len() as u64,
            _dir: dir,
        }
    }

    async fn read(s: &Setup) -> Vec<u8> {
        s.f.ensure(&s.loc, Priority::OnDemand, None).await.unwrap();
        std::fs::read(s.f.store().chunk_path(&s.loc.digest)).unwrap()
    }

    #[tokio::test]
    async fn a_held_base_makes_the_chunk_from_the_delta_with_fewer_bytes() {
        let s = setup(false, true);
        assert_eq!(read(&s).await, s.new);
        let sent = s.cloud.sent.load(Ordering::Relaxed);
        assert!(sent * 10 < s.member_len, "{sent} of {}", s.member_len);
        assert_eq!(s.f.stats().delta_chunks, 1);
    }

    #[tokio::test]
    async fn a_lying_delta_costs_a_normal_fetch() {
        let s = setup(true, true);
        assert_eq!(read(&s).await, s.new);
        assert_eq!(s.f.stats().delta_failures, 1);
        assert_eq!(s.f.stats().delta_chunks, 0);
        assert!(s.cloud.sent.load(Ordering::Relaxed) >= s.member_len);
    }

    #[tokio::test]
    async fn a_missing_base_costs_a_normal_fetch() {
        let s = setup(false, false);
        assert_eq!(read(&s).await, s.new);
        assert_eq!(s.f.stats().delta_chunks, 0);
        assert_eq!(s.cloud.sent.load(Ordering::Relaxed), s.member_len);
    }
}
