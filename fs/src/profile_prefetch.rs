//! A profile's prefetch for an image being opened ([`ProfilePrefetch`]):
//! the TOC positions it gives the TOC reads, and the profile's chunks
//! fetched layer by layer as the TOCs come in (docs/profiles.md, "Using").

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use breakfs_fetch::{ChunkLoc, Fetcher, Image};
use breakfs_index::Digest;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{
    JOIN_GAP, LayerChunks, MAX_PREFETCH_BYTES, PREFETCH_RANGE, PREFETCH_REQUESTS, Profile,
    plan_layer,
};
use crate::tree::LayerFile;

/// What a profile prefetch did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchReport {
    /// Range requests made.
    pub runs: usize,
    /// Chunks asked for (those not in the store or under way already).
    pub chunks: usize,
    /// Compressed bytes the planned runs span.
    pub bytes: u64,
    /// Profile entries ignored (naming nothing of the image).
    pub ignored: usize,
    /// Chunks that failed (a reader fetches them again when it needs them).
    pub failed: usize,
}

/// The profile a prefetch waits for: `None` when there is none.
type ProfileSoon = Shared<BoxFuture<'static, Option<Arc<Profile>>>>;

/// A prefetch's runs not started yet, by (rank, arrival): the best-ranked
/// of all the layers planned so far goes next.
type Pending = BTreeMap<(usize, u64), (Digest, Vec<ChunkLoc>)>;

/// A profile's prefetch for an image being opened: fed each lazy layer as
/// its TOC comes in ([`ProfilePrefetch::layer`]), it fetches that layer's
/// profiled chunks at once ([`plan_layer`], gaps of [`JOIN_GAP`] joined,
/// requests of [`PREFETCH_RANGE`] at most), while other layers' TOCs are
/// still on their way and before the mount is made. The profile itself is
/// looked up meanwhile (a peer's answer may come after the first TOCs):
/// each layer's fetch starts once both are in, and nothing waits for the
/// profile but that fetch. At most [`PREFETCH_REQUESTS`] of its requests
/// are in flight, on no fetcher worker; whenever one ends, the best-ranked
/// run of all the layers planned so far starts. Failures are only counted.
pub struct ProfilePrefetch {
    fetcher: Fetcher,
    profile: ProfileSoon,
    /// What is left of [`MAX_PREFETCH_BYTES`].
    budget: AtomicU64,
    requests: Arc<tokio::sync::Semaphore>,
    pending: Mutex<Pending>,
    /// Runs planned and not done yet (pending or in flight).
    outstanding: AtomicUsize,
    seq: AtomicU64,
    done: tokio::sync::Notify,
    report: Mutex<PrefetchReport>,
    /// Layers fed so far.
    fed: Mutex<HashSet<Digest>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ProfilePrefetch {
    /// A prefetch through `fetcher` of the profile `profile` resolves to
    /// (`None`: none was found). Must be made inside a tokio runtime.
    pub fn new(
        fetcher: Fetcher,
        profile: impl Future<Output = Option<Profile>> + Send + 'static,
    ) -> Arc<ProfilePrefetch> {
        // On a task of its own: the lookup goes on whether or not a layer
        // waits for it yet.
        let lookup = tokio::spawn(profile);
        let profile = async move { lookup.await.ok().flatten().map(Arc::new) }
            .boxed()
            .shared();
        Arc::new(ProfilePrefetch {
            fetcher,
            profile,
            budget: AtomicU64::new(MAX_PREFETCH_BYTES),
            requests: Arc::new(tokio::sync::Semaphore::new(PREFETCH_REQUESTS)),
            pending: Mutex::new(BTreeMap::new()),
            outstanding: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            done: tokio::sync::Notify::new(),
            report: Mutex::new(PrefetchReport::default()),
            fed: Mutex::new(HashSet::new()),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Wait at most `wait` for the profile, then hint each layer of
    /// `image` it says where the TOC of ([`Profile::toc_tail`],
    /// `breakfs_fetch::hint_toc_tail`): those TOCs are read in one request
    /// each. A profile that comes later is still used for the chunks.
    /// Returns how many layers were hinted.
    pub async fn hint_tocs(&self, image: &mut Image, wait: Duration) -> usize {
        let Ok(Some(profile)) = tokio::time::timeout(wait, self.profile.clone()).await else {
            return 0;
        };
        let mut hinted = 0;
        for desc in &mut image.manifest.layers {
            if let Some(tail) = profile.toc_tail(desc) {
                breakfs_fetch::hint_toc_tail(desc, tail);
                hinted += 1;
            }
        }
        hinted
    }

    /// Layer `layer`'s TOC is in, with its files: fetch what the profile
    /// names of it (planned on a task of its own once the profile is in).
    pub fn layer(self: &Arc<Self>, layer: &Digest, files: &[LayerFile]) {
        self.fed.lock().insert(layer.clone());
        match self.profile.peek() {
            Some(None) => return,
            Some(Some(p)) if !p.entries.iter().any(|e| &e.layer == layer) => return,
            _ => {}
        }
        let chunks = LayerChunks::of_files(layer, files);
        let this = self.clone();
        let task = tokio::spawn(async move { this.plan_and_start(chunks).await });
        self.tasks.lock().push(task);
    }

    async fn plan_and_start(self: Arc<Self>, chunks: LayerChunks) {
        let Some(profile) = self.profile.clone().await else {
            return;
        };
        let max_range = self.fetcher.options().max_range.min(PREFETCH_RANGE);
        let plan = plan_layer(&chunks, &profile, max_range, JOIN_GAP, &self.budget);
        {
            let mut r = self.report.lock();
            r.ignored += plan.ignored;
            r.bytes += plan.bytes;
        }
        {
            let mut pending = self.pending.lock();
            for (rank, run) in plan.runs {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                self.outstanding.fetch_add(1, Ordering::Relaxed);
                pending.insert((rank, seq), (chunks.layer.clone(), run));
            }
        }
        self.dispatch();
    }

    /// Start the best-ranked pending runs while requests are free.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let Ok(permit) = self.requests.clone().try_acquire_owned() else {
                return;
            };
            let Some((_, (layer, run))) = self.pending.lock().pop_first() else {
                return;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let store = this.fetcher.store().clone();
                let missing: Vec<ChunkLoc> = run
                    .into_iter()
                    .filter(|l| !store.has_chunk(&l.digest))
                    .collect();
                if !missing.is_empty() {
                    let r = this.fetcher.fetch_run(&layer, &missing, JOIN_GAP).await;
                    let mut report = this.report.lock();
                    report.runs += r.requests;
                    report.chunks += r.chunks;
                    report.failed += r.failed;
                }
                drop(permit);
                this.outstanding.fetch_sub(1, Ordering::Relaxed);
                this.done.notify_waiters();
                this.dispatch();
            });
        }
    }

    /// Stop: the image will not be mounted (runs not started are dropped;
    /// a request under way completes).
    pub fn abort(&self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
        let dropped = std::mem::take(&mut *self.pending.lock()).len();
        self.outstanding.fetch_sub(dropped, Ordering::Relaxed);
        self.done.notify_waiters();
    }

    /// Wait until every layer fed so far is fetched; what the prefetch
    /// did, or `None` without a profile.
    pub async fn finish(&self) -> Option<PrefetchReport> {
        let profile = self.profile.clone().await?;
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        loop {
            let done = self.done.notified();
            if self.outstanding.load(Ordering::Relaxed) == 0 {
                break;
            }
            done.await;
        }
        let mut r = self.report.lock().clone();
        let fed = self.fed.lock();
        r.ignored += profile
            .entries
            .iter()
            .filter(|e| !fed.contains(&e.layer))
            .count();
        Some(r)
    }
}
