//! The cache budget: keeps a content store within a configured size.
//!
//! Every write into the store reserves its bytes first; when the store
//! would go over its limit, kept ranges go first (a range is a second copy
//! of chunks the store holds, kept for peers and to assemble the whole
//! layer, and only while there is room for it), then the least valuable
//! layers are evicted (their whole blob and chunks) until the write fits
//! with some room to spare. A layer's value is its popularity (uses,
//! decayed by the hour) weighted by how recently it was used, ten times
//! more while a live mount uses it. A layer a live mount needs is never
//! evicted when it cannot be fetched again (a layer indexed whole, or no
//! peer and no reachable cloud), nor a chunk a reader has pinned
//! ([`Budget::pin_chunks`]) from before its fetch until its read is
//! answered. Uses are saved in the store (`meta/budget-uses.json`), so
//! values survive restarts.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use breakfs_index::Digest;
use serde::{Deserialize, Serialize};

use crate::ContentStore;

/// Says whether a layer can be fetched again if evicted.
pub type Refetchable = Box<dyn Fn(&Digest) -> bool + Send + Sync>;

/// How one layer has been used.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Use {
    /// Unix seconds of the last use.
    last: u64,
    /// Uses, decayed with a half-life of an hour.
    popularity: f64,
    /// Live mounts using it now (not saved).
    #[serde(skip)]
    live: u32,
    /// Indexed whole (its chunks cannot be fetched one by one).
    #[serde(default)]
    whole: bool,
}

/// What the budget knows; one lock, held during eviction.
#[derive(Default)]
struct State {
    used: u64,
    uses: HashMap<Digest, Use>,
    /// Layer → its chunks, from the store's TOC and index records.
    chunks_of: HashMap<Digest, Vec<Digest>>,
    /// How many meta records `chunks_of` was built from.
    records_seen: usize,
    /// Chunks readers have pinned, and how many pins each.
    reading: HashMap<Digest, u32>,
}

/// A size budget over one store.
pub struct Budget {
    limit: u64,
    state: Mutex<State>,
    refetchable: Mutex<Option<Refetchable>>,
    /// Layers evicted so far.
    pub evictions: AtomicU64,
    /// Bytes freed by evictions so far.
    pub evicted_bytes: AtomicU64,
}

const USES: &str = "budget-uses.json";
const HALF_LIFE_SECS: f64 = 3600.0;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Budget {
    /// A budget of `limit` bytes for `store`, starting from what is on
    /// disk; a store already over it (a smaller budget than last time, or
    /// what the live mounts of a killed daemon held) is evicted down at once.
    pub fn new(limit: u64, store: &ContentStore) -> Budget {
        let b = Budget::counted(limit, store);
        let used = b.used();
        if used > limit {
            tracing::info!(
                used,
                limit,
                "the store is over its budget: evicting the least valuable layers"
            );
            b.reserve(store, 0);
        }
        b
    }

    fn counted(limit: u64, store: &ContentStore) -> Budget {
        let uses = store
            .read_meta(USES)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Budget {
            limit,
            state: Mutex::new(State {
                used: store.usage(),
                uses,
                ..State::default()
            }),
            refetchable: Mutex::new(None),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes in use by the budget's count.
    pub fn used(&self) -> u64 {
        self.state.lock().used
    }

    /// Tell the budget how to know whether a layer can be fetched again.
    pub fn set_refetchable(&self, f: Refetchable) {
        *self.refetchable.lock() = Some(f);
    }

    /// Layers `layers` were used now (a mount opened or read them, a peer
    /// or a prefetch asked for them).
    pub fn touch<'a>(&self, layers: impl IntoIterator<Item = &'a Digest>) {
        let t = now();
        let mut st = self.state.lock();
        for l in layers {
            let u = st.uses.entry(l.clone()).or_default();
            let age = t.saturating_sub(u.last) as f64;
            u.popularity = u.popularity * 0.5f64.powf(age / HALF_LIFE_SECS) + 1.0;
            u.last = t;
        }
    }

    /// Layers are valued at least `popularity` (as of now) each: what the
    /// cluster's scheduler knows of them.
    pub fn at_least<'a>(&self, layers: impl IntoIterator<Item = (&'a Digest, f64)>) {
        let t = now();
        let mut st = self.state.lock();
        for (l, p) in layers {
            let u = st.uses.entry(l.clone()).or_default();
            let age = t.saturating_sub(u.last) as f64;
            u.popularity = (u.popularity * 0.5f64.powf(age / HALF_LIFE_SECS)).max(p);
            u.last = t;
        }
    }

    /// A live mount starts (`+1`) or stops (`-1`) using `layers`; `whole`
    /// marks layers indexed whole.
    pub fn live<'a>(&self, layers: impl IntoIterator<Item = (&'a Digest, bool)>, delta: i32) {
        let mut st = self.state.lock();
        for (l, whole) in layers {
            let u = st.uses.entry(l.clone()).or_default();
            u.live = u.live.saturating_add_signed(delta);
            u.whole |= whole;
        }
    }

    /// Count `layers` live until the returned pin is dropped: an image
    /// being opened, mounted or extracted pins its layers from the start,
    /// so that none is evicted under it before a mount is counted live
    /// (a layer indexed whole cannot be fetched again chunk by chunk).
    pub fn pin(self: &Arc<Self>, layers: impl IntoIterator<Item = Digest>) -> LivePin {
        let layers: Vec<Digest> = layers.into_iter().collect();
        self.live(layers.iter().map(|d| (d, false)), 1);
        LivePin {
            budget: self.clone(),
            layers,
        }
    }

    /// Layer `layer` is indexed whole: its chunks cannot be fetched one by
    /// one, so a live mount of it pins them.
    pub fn mark_whole(&self, layer: &Digest) {
        self.live([(layer, true)], 0);
    }

    /// Make room for `len` more bytes, evicting if needed, and count them.
    pub fn reserve(&self, store: &ContentStore, len: u64) {
        let mut st = self.state.lock();
        if st.used + len > self.limit {
            // Evict down to 90% so that evictions come in batches.
            let target = (self.limit / 10 * 9).saturating_sub(len);
            self.evict(store, &mut st, target, false);
        }
        st.used += len;
    }

    /// Make room for `len` bytes of a copy the store can do without (a
    /// kept range: its chunks are in the store too) and count them, if
    /// other such copies can give way; `false`, with nothing counted, when
    /// only chunks or blobs could: the copy is then not kept.
    pub fn reserve_copy(&self, store: &ContentStore, len: u64) -> bool {
        let mut st = self.state.lock();
        if st.used + len > self.limit {
            let target = (self.limit / 10 * 9).saturating_sub(len);
            self.evict(store, &mut st, target, true);
            if st.used + len > self.limit {
                return false;
            }
        }
        st.used += len;
        true
    }

    /// Keep chunks `chunks` from eviction until the returned pin drops,
    /// whether or not they are in the store yet: a reader pins the chunks
    /// of its answer before it fetches them and drops the pin once it has
    /// read them, so that what else is fetched meanwhile cannot evict them.
    pub fn pin_chunks(self: &Arc<Self>, chunks: impl IntoIterator<Item = Digest>) -> ChunkPin {
        let chunks: Vec<Digest> = chunks.into_iter().collect();
        let mut st = self.state.lock();
        for c in &chunks {
            *st.reading.entry(c.clone()).or_default() += 1;
        }
        ChunkPin {
            budget: Some(self.clone()),
            chunks,
        }
    }

    /// `len` reserved bytes were not written after all, or were removed.
    pub fn release(&self, len: u64) {
        let mut st = self.state.lock();
        st.used = st.used.saturating_sub(len);
    }

    /// Recount from disk (corrects drift from writes that raced).
    pub fn resync(&self, store: &ContentStore) {
        let used = store.usage();
        self.state.lock().used = used;
    }

    /// Save the use records (atomically).
    pub fn save(&self, store: &ContentStore) {
        let json = serde_json::to_vec(&self.state.lock().uses).unwrap_or_default();
        if let Err(e) = store.put_meta_replace(USES, &json) {
            tracing::warn!(
                "saving the cache budget's records: {e}",
                e = breakfs_index::Causes(&e)
            );
        }
    }

    /// Evict down to `target` bytes: chunks no known layer refers to
    /// first, then kept ranges (copies of chunks the store holds too),
    /// least valuable layers' first; then, unless `copies_only`, whole
    /// layers (blob, ranges and chunks), least valuable first. Never what
    /// a live mount needs and cannot fetch again, nor a chunk a reader
    /// has pinned.
    fn evict(&self, store: &ContentStore, st: &mut State, target: u64, copies_only: bool) {
        refresh_chunk_map(store, st);
        let ranked = self.ranked(store, st);
        let mut protected: HashSet<&Digest> = st.reading.keys().collect();
        for (_, l, pinned) in &ranked {
            if *pinned && let Some(c) = st.chunks_of.get(l) {
                protected.extend(c);
            }
        }
        let mut freed = 0u64;
        let over = |freed: u64| st.used.saturating_sub(freed) > target;
        let known: HashSet<&Digest> = st.chunks_of.values().flatten().collect();
        for (d, size) in store.chunks() {
            if !over(freed) {
                break;
            }
            if !known.contains(&d) && !protected.contains(&d) && store.remove_chunk(&d) {
                freed += size;
            }
        }
        for (_, l, _) in &ranked {
            if !over(freed) {
                break;
            }
            let n = store.remove_ranges_quietly(l);
            if n > 0 {
                freed += n;
                tracing::debug!(layer = %l, bytes = n, "dropped kept ranges to stay within the cache budget");
            }
        }
        let mut evicted = 0;
        for (_, l, pinned) in &ranked {
            if copies_only || !over(freed) {
                break;
            }
            if *pinned {
                continue;
            }
            let mut n = store.remove_blob(l);
            for c in st.chunks_of.get(l).into_iter().flatten() {
                if protected.contains(c) {
                    continue;
                }
                if let Ok(m) = std::fs::metadata(store.chunk_path(c))
                    && store.remove_chunk(c)
                {
                    n += m.len();
                }
            }
            if n > 0 {
                evicted += 1;
                freed += n;
                tracing::info!(layer = %l, bytes = n, "evicted to stay within the cache budget");
            }
        }
        st.used = st.used.saturating_sub(freed);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(freed, Ordering::Relaxed);
        if st.used > target && !copies_only {
            tracing::warn!(
                used = st.used,
                limit = self.limit,
                "the cache is over its budget: what is left is needed by live mounts and cannot \
                 be fetched again, or is being read"
            );
        }
    }

    /// The layers with something on disk, least valuable first, each
    /// with whether a live mount needs it and cannot fetch it again.
    fn ranked(&self, store: &ContentStore, st: &State) -> Vec<(f64, Digest, bool)> {
        let refetchable = self.refetchable.lock();
        let t = now();
        let mut layers: HashSet<Digest> = st.chunks_of.keys().cloned().collect();
        layers.extend(
            store
                .blobs()
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| st.chunks_of.contains_key(d) || st.uses.contains_key(d)),
        );
        layers.extend(store.partial_layers().into_iter().map(|(d, _)| d));
        let mut ranked: Vec<(f64, Digest, bool)> = layers
            .into_iter()
            .map(|l| {
                let u = st.uses.get(&l).cloned().unwrap_or_default();
                let pinned =
                    u.live > 0 && (u.whole || !refetchable.as_ref().is_some_and(|f| f(&l)));
                let age = t.saturating_sub(u.last) as f64;
                (layer_value(u.popularity, age, u.live > 0), l, pinned)
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        ranked
    }
}

/// Layers counted live while it lives (see [`Budget::pin`]).
pub struct LivePin {
    budget: Arc<Budget>,
    layers: Vec<Digest>,
}

impl Drop for LivePin {
    fn drop(&mut self) {
        self.budget.live(self.layers.iter().map(|d| (d, false)), -1);
    }
}

/// Chunks kept from eviction while it lives (see [`Budget::pin_chunks`]).
pub struct ChunkPin {
    budget: Option<Arc<Budget>>,
    chunks: Vec<Digest>,
}

impl ChunkPin {
    /// A pin of nothing (a store without a budget evicts nothing).
    pub fn none() -> ChunkPin {
        ChunkPin {
            budget: None,
            chunks: Vec::new(),
        }
    }
}

impl Drop for ChunkPin {
    fn drop(&mut self) {
        let Some(b) = &self.budget else {
            return;
        };
        let mut st = b.state.lock();
        for c in &self.chunks {
            if let Some(n) = st.reading.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    st.reading.remove(c);
                }
            }
        }
    }
}

/// A layer's value to the cache, the order of eviction (least first):
/// its uses (`popularity` as of its last use, `age_secs` ago) decayed with
/// a half-life of an hour, weighted by recency (halved after ten minutes)
/// and ten times more while a live mount uses it.
pub fn layer_value(popularity: f64, age_secs: f64, live: bool) -> f64 {
    let pop = popularity * 0.5f64.powf(age_secs / HALF_LIFE_SECS);
    let recency = 1.0 / (1.0 + age_secs / 600.0);
    (1.0 + pop) * recency * if live { 10.0 } else { 1.0 }
}

/// Rebuild the layer → chunks map when the store has new records.
fn refresh_chunk_map(store: &ContentStore, st: &mut State) {
    let records: Vec<String> = std::fs::read_dir(store.root().join("meta"))
        .into_iter()
        .flat_map(|d| d.flatten())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with("toc-") || n.starts_with("layer-"))
        .collect();
    if records.len() == st.records_seen {
        return;
    }
    st.records_seen = records.len();
    for name in records {
        let Some(hex) = name
            .strip_prefix("toc-")
            .or_else(|| name.strip_prefix("layer-"))
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Ok(layer) = Digest::parse(&format!("sha256:{hex}")) else {
            continue;
        };
        let Ok(Some(bytes)) = store.read_meta(&name) else {
            continue;
        };
        let mut chunks = Vec::new();
        if name.starts_with("toc-") {
            let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes[nl + 1..]) else {
                continue;
            };
            for e in v["entries"].as_array().into_iter().flatten() {
                let d = e["chunkDigest"].as_str().or_else(|| e["digest"].as_str());
                if let Some(d) = d.and_then(|d| Digest::parse(d).ok()) {
                    chunks.push(d);
                }
            }
        } else {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            for e in v.as_array().into_iter().flatten() {
                if let Some(d) = e["digest"].as_str().and_then(|d| Digest::parse(d).ok()) {
                    chunks.push(d);
                }
            }
            st.uses.entry(layer.clone()).or_default().whole = true;
        }
        st.chunks_of.insert(layer, chunks);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_store_over_its_budget_at_start_is_evicted_down_at_once() {
        // What a daemon killed while live mounts pinned more than its
        // budget leaves, or a budget made smaller across a restart.
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let budget = Arc::new(Budget::new(10_000, &store));
        store.set_budget(budget.clone());
        for n in 1..=3u8 {
            let b = vec![n; 1000];
            store.put_blob(&Digest::of(&b), &b).unwrap();
            budget.touch([&Digest::of(&b)]);
        }
        budget.save(&store);
        let store = ContentStore::open(dir.path()).unwrap();
        let budget = Budget::new(2500, &store);
        assert!(budget.used() <= 2500, "{} bytes", budget.used());
        assert_eq!(store.usage(), budget.used());
        assert!(budget.evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_schedulers_popularity_keeps_a_layer_over_a_locally_used_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let budget = Arc::new(Budget::new(2500, &store));
        store.set_budget(budget.clone());
        let (a, b, c) = (vec![1u8; 1000], vec![2u8; 1000], vec![3u8; 1000]);
        let (da, db, dc) = (Digest::of(&a), Digest::of(&b), Digest::of(&c));
        store.put_blob(&da, &a).unwrap();
        store.put_blob(&db, &b).unwrap();
        // A was used twice here; B was prefetched for a layer the cluster
        // placed ten times.
        budget.touch([&da]);
        budget.touch([&da]);
        budget.touch([&db]);
        budget.at_least([(&db, 10.0)]);
        store.put_blob(&dc, &c).unwrap();
        assert!(store.has_blob(&db) && store.has_blob(&dc));
        assert!(!store.has_blob(&da));
        assert_eq!(budget.evictions.load(Ordering::Relaxed), 1);
    }

    /// A TOC record in `store` naming `chunks` as layer `layer`'s.
    fn toc_record(store: &ContentStore, layer: &Digest, chunks: &[&Digest]) {
        let entries: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, d)| serde_json::json!({"name": format!("f{i}"), "type": "reg", "digest": d}))
            .collect();
        let toc = serde_json::json!({"version": 1, "entries": entries});
        let rec = format!("0\n{toc}");
        store
            .put_meta(&format!("toc-{}.json", layer.hex()), rec.as_bytes())
            .unwrap();
    }

    #[test]
    fn a_chunk_a_reader_pinned_is_never_evicted_and_other_chunks_give_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let budget = Arc::new(Budget::new(10_000, &store));
        store.set_budget(budget.clone());
        let (a, b, c) = (vec![1u8; 6000], vec![2u8; 3000], vec![3u8; 3000]);
        let (da, db, dc) = (Digest::of(&a), Digest::of(&b), Digest::of(&c));
        // A is pinned before it arrives (a reader waits on its fetch); it
        // is the least valuable chunk in the store, of no known layer.
        let pin = store.pin_chunks([da.clone()]);
        store.put_chunk(&da, &a).unwrap();
        store.put_chunk(&dc, &c).unwrap();
        store.put_chunk(&db, &b).unwrap();
        assert!(store.has_chunk(&da) && store.has_chunk(&db));
        assert!(!store.has_chunk(&dc));
        assert!(budget.used() <= 10_000);
        // Unpinned, it gives way like any other.
        drop(pin);
        let d = vec![4u8; 7000];
        store.put_chunk(&Digest::of(&d), &d).unwrap();
        assert!(!store.has_chunk(&da));
        assert!(store.has_chunk(&Digest::of(&d)));
        assert_eq!(budget.used(), store.usage());
    }

    #[test]
    fn kept_ranges_give_way_before_chunks_and_never_push_chunks_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let budget = Arc::new(Budget::new(10_000, &store));
        store.set_budget(budget.clone());
        let (a, b) = (vec![1u8; 4000], vec![2u8; 4000]);
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        let (la, lb) = (Digest::of(b"layer a"), Digest::of(b"layer b"));
        toc_record(&store, &la, &[&da]);
        toc_record(&store, &lb, &[&db]);
        // Layer A fetched: its chunk and its range (room for both).
        store.put_chunk(&da, &a).unwrap();
        assert!(store.put_range(&la, 0, &[1u8; 3000]).unwrap());
        budget.touch([&lb]);
        // Layer B's chunk needs room: A's range goes, A's chunk stays
        // although layer A is the less valuable one.
        store.put_chunk(&db, &b).unwrap();
        assert!(store.has_chunk(&da) && store.has_chunk(&db));
        assert!(store.held_ranges(&la).is_empty());
        // B's range would only fit in place of a chunk: not kept.
        assert!(!store.put_range(&lb, 0, &[2u8; 4000]).unwrap());
        assert!(store.has_chunk(&da) && store.held_ranges(&lb).is_empty());
        assert_eq!(budget.used(), store.usage());
        assert!(budget.used() <= 10_000);
        assert_eq!(budget.evictions.load(Ordering::Relaxed), 0);
    }
}
