#![allow(clippy::unwrap_used)]
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use breakfs_index::Digest;

use super::health::retry_delays;
use super::{ChunkLoc, FetchOptions, Fetcher, Priority};
use crate::{ContentStore, Result, Source, SourceClass};

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
