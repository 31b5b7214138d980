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

/// A source that answers only once the test lets it: with the bytes of
/// `blob`, or with an error.
struct Gate {
    blob: Vec<u8>,
    open: tokio::sync::Semaphore,
    fail: bool,
}

impl Source for Gate {
    fn name(&self) -> String {
        "cloud".into()
    }
    fn read_range<'a>(
        &'a self,
        _blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let _pass = self.open.acquire().await.unwrap();
            if self.fail {
                return Err(crate::Error::NotFound {
                    what: "the range at the gate".into(),
                });
            }
            Ok(self.blob[start as usize..(start + len) as usize].to_vec())
        })
    }
}

/// A fetcher (keeping ranges, as a node does) whose only source is a gate,
/// and a one-chunk layer in it.
fn gated(fail: bool) -> (Fetcher, Arc<Gate>, ChunkLoc, tempfile::TempDir) {
    let content = b"in flight".repeat(200);
    let member = gzip(&content);
    let loc = ChunkLoc {
        layer: Digest::of(b"layer in flight"),
        offset: 0,
        compressed_end: member.len() as u64,
        inner_offset: 0,
        size: content.len() as u64,
        digest: Digest::of(&content),
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ContentStore::open(dir.path()).unwrap());
    let gate = Arc::new(Gate {
        blob: member,
        open: tokio::sync::Semaphore::new(0),
        fail,
    });
    let opts = FetchOptions {
        keep_ranges: true,
        attempts: 1,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store, vec![gate.clone()], opts);
    (f, gate, loc, dir)
}

/// Start fetching `loc` and wait until a worker runs it.
async fn start_fetch(f: &Fetcher, loc: &ChunkLoc) -> tokio::task::JoinHandle<crate::Result<()>> {
    let (f2, l2) = (f.clone(), loc.clone());
    let reader = tokio::spawn(async move { f2.ensure(&l2, Priority::OnDemand, None).await });
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !f.in_flight(&loc.layer, loc.offset, &loc.digest) {
        assert!(std::time::Instant::now() < until, "the fetch never started");
        tokio::task::yield_now().await;
    }
    reader
}

#[tokio::test]
async fn a_range_in_flight_is_waited_on_and_then_held() {
    let (f, gate, loc, _dir) = gated(false);
    // Nothing in flight, nothing held: nothing to wait on.
    assert!(
        f.range_flight(&loc.layer, 0, loc.compressed_end)
            .await
            .is_none()
    );
    let reader = start_fetch(&f, &loc).await;
    let flight = f
        .range_flight(&loc.layer, 0, loc.compressed_end)
        .await
        .expect("the running fetch covers the range");
    // A range reaching past what is in flight is not waited on.
    assert!(
        f.range_flight(&loc.layer, 0, loc.compressed_end + 1)
            .await
            .is_none()
    );
    let waiter = tokio::spawn(flight.wait(Duration::from_secs(30)));
    gate.open.add_permits(1);
    assert!(
        waiter.await.unwrap(),
        "the range was not held after the fetch"
    );
    reader.await.unwrap().unwrap();
    let held = f
        .store()
        .read_held(&loc.layer, 0, loc.compressed_end)
        .unwrap();
    assert_eq!(held.as_deref(), Some(&gate.blob[..]));
    // Held now: answered from the store, nothing to wait on.
    assert!(
        f.range_flight(&loc.layer, 0, loc.compressed_end)
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_failed_fetch_answers_a_waiter_at_once_and_a_stalled_one_within_its_bound() {
    let (f, gate, loc, _dir) = gated(true);
    let reader = start_fetch(&f, &loc).await;
    let flight = f
        .range_flight(&loc.layer, 0, loc.compressed_end)
        .await
        .unwrap();
    let began = std::time::Instant::now();
    let waiter = tokio::spawn(flight.wait(Duration::from_secs(60)));
    gate.open.add_permits(1);
    assert!(!waiter.await.unwrap());
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "a failed fetch kept its waiter {:?}",
        began.elapsed()
    );
    assert!(reader.await.unwrap().is_err());

    // A fetch that never ends: the waiter gives up at its bound.
    let (f, _gate, loc, _dir) = gated(false);
    let _reader = start_fetch(&f, &loc).await;
    let flight = f
        .range_flight(&loc.layer, 0, loc.compressed_end)
        .await
        .unwrap();
    let began = std::time::Instant::now();
    assert!(!flight.wait(Duration::from_millis(300)).await);
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_queued_together_go_in_one_range_request() {
    // 40 neighbouring members of one blob: with workers waiting on other
    // threads, queued one by one they could be taken apart.
    let contents: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 3000]).collect();
    let mut blob = Vec::new();
    let mut locs = Vec::new();
    for c in &contents {
        let m = gzip(c);
        locs.push(ChunkLoc {
            layer: Digest::of(b"layer"),
            offset: blob.len() as u64,
            compressed_end: (blob.len() + m.len()) as u64,
            inner_offset: 0,
            size: c.len() as u64,
            digest: Digest::of(c),
        });
        blob.extend(m);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ContentStore::open(dir.path()).unwrap());
    let cloud = Arc::new(Fake {
        name: "cloud",
        blob,
        lie: false,
        calls: AtomicUsize::new(0),
    });
    let f = Fetcher::new(store.clone(), vec![cloud.clone()], FetchOptions::default());
    // One already held: answered at once, the rest still one request.
    f.ensure(&locs[0], Priority::OnDemand, None).await.unwrap();
    let out = f.ensure_all(&locs, Priority::OnDemand, None).await;
    assert_eq!(out.len(), locs.len());
    assert!(out.iter().all(|r| r.is_ok()));
    assert_eq!(cloud.calls.load(Ordering::Relaxed), 2);
    for (l, c) in locs.iter().zip(&contents) {
        assert_eq!(&std::fs::read(store.chunk_path(&l.digest)).unwrap(), c);
    }
}

#[tokio::test]
async fn a_landmarked_region_comes_in_one_request_and_serves_those_waiting_on_it() {
    // Twenty members; the region is the first twelve.
    let contents: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 3000]).collect();
    let mut blob = Vec::new();
    let mut locs = Vec::new();
    for c in &contents {
        let member = gzip(c);
        locs.push(ChunkLoc {
            layer: Digest::of(b"layer"),
            offset: blob.len() as u64,
            compressed_end: (blob.len() + member.len()) as u64,
            inner_offset: 0,
            size: c.len() as u64,
            digest: Digest::of(c),
        });
        blob.extend_from_slice(&member);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ContentStore::open(dir.path()).unwrap());
    let cloud = Arc::new(Fake {
        name: "cloud",
        blob,
        lie: false,
        calls: AtomicUsize::new(0),
    });
    let opts = FetchOptions {
        quiet: Duration::from_secs(600),
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), vec![cloud.clone()], opts);
    // Hydration has queued every chunk (it waits for a quiet spell).
    let waiting: Vec<_> = locs
        .iter()
        .map(|l| {
            let (f, l) = (f.clone(), l.clone());
            tokio::spawn(async move { f.ensure(&l, Priority::Background, None).await })
        })
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while f.stats().queued < locs.len() {
        assert!(
            std::time::Instant::now() < until,
            "the jobs were not queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = f.fetch_region(&locs[0].layer, &locs[..12]).await;
    assert_eq!((r.requests, r.chunks, r.failed), (1, 12, 0));
    assert_eq!(cloud.calls.load(Ordering::Relaxed), 1);
    for (i, w) in waiting.into_iter().enumerate().take(12) {
        w.await.unwrap().unwrap();
        assert_eq!(
            std::fs::read(store.chunk_path(&locs[i].digest)).unwrap(),
            contents[i]
        );
    }
    // The rest stay queued behind the quiet spell; the region again asks nothing.
    assert!(!store.has_chunk(&locs[12].digest));
    assert_eq!(f.stats().queued, 8);
    let again = f.fetch_region(&locs[0].layer, &locs[..12]).await;
    assert_eq!(again.requests, 0);
    assert_eq!(cloud.calls.load(Ordering::Relaxed), 1);
}

/// `n` bytes no compressor shrinks.
fn noise(n: usize) -> Vec<u8> {
    let hex: String = (0u32..)
        .map(|i| Digest::of(&i.to_le_bytes()).hex().to_string())
        .take(n / 32 + 1)
        .collect();
    (0..n)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A node's fetch of a chunk larger than half the store's budget: the
/// chunk and its kept range together do not fit, so the range (the second
/// copy) is not kept, and the chunk, pinned by its reader, stays; the
/// store keeps within the budget.
#[tokio::test]
async fn a_chunk_over_half_the_budget_stays_and_its_range_gives_way() {
    let content = noise(6000);
    let member = gzip(&content);
    assert!(member.len() > 5000, "{} bytes", member.len());
    let loc = ChunkLoc {
        layer: Digest::of(b"a big layer"),
        offset: 0,
        compressed_end: member.len() as u64,
        inner_offset: 0,
        size: content.len() as u64,
        digest: Digest::of(&content),
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ContentStore::open(dir.path()).unwrap());
    let budget = Arc::new(crate::budget::Budget::new(10_000, &store));
    store.set_budget(budget.clone());
    let cloud = Arc::new(Fake {
        name: "cloud",
        blob: member,
        lie: false,
        calls: AtomicUsize::new(0),
    });
    let opts = FetchOptions {
        keep_ranges: true,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), vec![cloud.clone()], opts);
    let pin = store.pin_chunks([loc.digest.clone()]);
    f.ensure(&loc, Priority::OnDemand, None).await.unwrap();
    assert_eq!(
        std::fs::read(store.chunk_path(&loc.digest)).unwrap(),
        content,
        "the chunk a reader waits for was evicted"
    );
    assert!(store.held_ranges(&loc.layer).is_empty());
    assert!(store.usage() <= 10_000, "{} bytes", store.usage());
    assert_eq!(budget.used(), store.usage());
    drop(pin);
    assert_eq!(cloud.calls.load(Ordering::Relaxed), 1);
}

/// A cloud whose every request takes 5 ms plus, while `congested`, the
/// queue of a full link.
struct Congested {
    blob: Vec<u8>,
    congested: std::sync::atomic::AtomicBool,
    queue: Duration,
}

impl Source for Congested {
    fn name(&self) -> String {
        "cloud".into()
    }
    fn read_range<'a>(
        &'a self,
        _blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> futures::future::BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let mut took = Duration::from_millis(5);
            if self.congested.load(Ordering::Relaxed) {
                took += self.queue;
            }
            tokio::time::sleep(took).await;
            Ok(self.blob[start as usize..(start + len) as usize].to_vec())
        })
    }
}

/// A layer of `n` incompressible members of `size` bytes each.
fn layer_of_members(n: usize, size: usize) -> (Vec<u8>, Vec<ChunkLoc>) {
    let mut blob = Vec::new();
    let mut locs = Vec::new();
    let layer = Digest::of(b"a layer of members");
    for i in 0..n {
        let content: Vec<u8> = (0..size)
            .map(|k| ((k * 7919 + i * 104_729) % 251) as u8 ^ (k >> 3) as u8)
            .collect();
        let member = gzip(&content);
        locs.push(ChunkLoc {
            layer: layer.clone(),
            offset: blob.len() as u64,
            compressed_end: (blob.len() + member.len()) as u64,
            inner_offset: 0,
            size: content.len() as u64,
            digest: Digest::of(&content),
        });
        blob.extend(member);
    }
    (blob, locs)
}

#[tokio::test]
async fn background_windows_shrink_on_a_queued_link_and_readers_pass_held_requests() {
    let (blob, locs) = layer_of_members(24, 64 << 10);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ContentStore::open(dir.path()).unwrap());
    let cloud = Arc::new(Congested {
        blob,
        congested: false.into(),
        queue: Duration::from_millis(600),
    });
    let opts = FetchOptions {
        quiet: Duration::ZERO,
        background_workers: 1,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store, vec![cloud.clone()], opts);
    // Uncongested first: the base round trip is measured.
    let first = f.ensure_all(&locs[..4], Priority::OnDemand, None).await;
    assert!(first.iter().all(|r| r.is_ok()));
    let window = |f: &Fetcher| f.stats().background.get("cloud").cloned().unwrap();
    assert_eq!(window(&f).over_target, 0, "{:?}", window(&f));
    // Then the link queues (another node's reads): hydration's window
    // shrinks, and its requests bigger than the window are paced.
    cloud.congested.store(true, Ordering::Relaxed);
    let hydration = {
        let (f, rest) = (f.clone(), locs[4..].to_vec());
        tokio::spawn(async move { f.ensure_all(&rest, Priority::Background, None).await })
    };
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let floor = super::yielding::MIN_WINDOW;
    while window(&f).window > floor {
        assert!(std::time::Instant::now() < until, "{:?}", window(&f));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let w = window(&f);
    assert!(w.over_target >= 1, "{w:?}");
    assert!(w.queuing > super::yielding::TARGET.as_secs_f64(), "{w:?}");
    // At the floor a member (64 KiB) goes alone and the next waits about
    // three times as long as it took (seconds): wait for one to be held.
    let held = w.held;
    while window(&f).held == held {
        assert!(std::time::Instant::now() < until, "{:?}", window(&f));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A reader now wants every chunk: the one held in the window goes at
    // once instead of after its pacing (seconds), the queued ones ahead of
    // hydration.
    cloud.congested.store(false, Ordering::Relaxed);
    let reads = f
        .ensure_all(&locs, Priority::OnDemand, Some(Duration::from_secs(10)))
        .await;
    assert!(reads.iter().all(|r| r.is_ok()), "{reads:?}");
    assert!(window(&f).promoted >= 1, "{:?}", window(&f));
    assert!(hydration.await.unwrap().iter().all(|r| r.is_ok()));
}
