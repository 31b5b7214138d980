//! The cooperative cache's client side: the peer edge nodes a node knows,
//! what each holds (its published cache index), how good the link to each
//! is (measured), and [`PeerSource`], which puts the peers that hold a blob
//! into the fetch chain, best first.
//!
//! A peer speaks the OCI distribution read API for what it holds, so a peer
//! is read with the same registry client as the cloud; only
//! content-addressed data is asked of it, and the fetcher checks every
//! chunk it returns.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakfs_fetch::{
    ChunkLoc, ClientOptions, ContentStore, Error, Plan, RegistryRepo, Result, Source, SourceClass,
};
use breakfs_index::{
    CacheIndex, Causes, Descriptor, Digest, HeldBlob, LinkStats, MAX_INDEX, PartialLayer,
};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// The repository name a node uses when reading blobs from peers (peers
/// serve blobs under any name: blobs are addressed by digest).
pub const PEER_REPO: &str = "breakfs/cache";

/// A peer's index is not trusted for routing after this long without a refresh.
const STALE: Duration = Duration::from_secs(15);

/// Peers learned from other peers' indexes, at most: a hostile index cannot
/// make the node poll the whole network.
const MAX_LEARNED: usize = 256;

/// The index of `store` as it is on disk now, published as `node`.
pub fn index_of_store(
    store: &ContentStore,
    node: &str,
    budget: Option<u64>,
    peers: Vec<String>,
) -> CacheIndex {
    let mut blobs: Vec<HeldBlob> = store
        .blobs()
        .into_iter()
        .map(|(digest, size)| HeldBlob { digest, size })
        .collect();
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    let mut partial: Vec<PartialLayer> = store
        .partial_layers()
        .into_iter()
        .map(|(digest, ranges)| PartialLayer { digest, ranges })
        .collect();
    partial.sort_by(|a, b| a.digest.cmp(&b.digest));
    let chunks = store.chunks();
    let chunk_bytes: u64 = chunks.iter().map(|(_, n)| n).sum();
    let held: u64 = blobs.iter().map(|b| b.size).sum::<u64>()
        + partial
            .iter()
            .flat_map(|p| p.ranges.iter().map(|(s, e)| e - s))
            .sum::<u64>();
    CacheIndex {
        node: node.to_string(),
        blobs,
        partial,
        chunks: chunks.len() as u64,
        chunk_bytes,
        used: held + chunk_bytes,
        budget,
        peers,
        relay: Vec::new(),
    }
}

/// The weight of a new sample in the moving averages.
const ALPHA: f64 = 0.3;

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    })
}

/// One link's measurements and when it last carried something.
#[derive(Clone, Default)]
struct Link {
    stats: LinkStats,
    last_ok: Option<Instant>,
}

/// Link measurements by name (`registry HOST`, or a peer's URL).
#[derive(Default)]
pub struct Links {
    map: Mutex<BTreeMap<String, Link>>,
}

impl Links {
    /// A transfer of `bytes` over `link` that took `secs`.
    pub fn transfer(&self, link: &str, bytes: u64, secs: f64) {
        let mut m = self.map.lock();
        let Link { stats: l, last_ok } = m.entry(link.to_string()).or_default();
        l.samples += 1;
        *last_ok = Some(Instant::now());
        if bytes >= 64 << 10 && secs > 0.0 {
            // The first byte costs a round trip; the rest is bandwidth.
            let rtt = l.rtt_ms.unwrap_or(0.0) / 1000.0;
            let secs = (secs - rtt).max(secs * 0.2);
            l.bandwidth_mbps = ewma(l.bandwidth_mbps, bytes as f64 * 8.0 / secs / 1e6);
        }
    }

    /// A round trip of `secs` measured on `link`.
    pub fn rtt(&self, link: &str, secs: f64) {
        let mut m = self.map.lock();
        let Link { stats: l, last_ok } = m.entry(link.to_string()).or_default();
        l.samples += 1;
        *last_ok = Some(Instant::now());
        l.rtt_ms = ewma(l.rtt_ms, secs * 1000.0);
    }

    /// A failed probe or transfer on `link`.
    pub fn failure(&self, link: &str) {
        self.map
            .lock()
            .entry(link.to_string())
            .or_default()
            .stats
            .failures += 1;
    }

    /// All links now.
    pub fn snapshot(&self) -> BTreeMap<String, LinkStats> {
        self.map
            .lock()
            .iter()
            .map(|(name, l)| {
                let stats = LinkStats {
                    last_ok_secs: l.last_ok.map(|t| t.elapsed().as_secs_f64()),
                    ..l.stats.clone()
                };
                (name.clone(), stats)
            })
            .collect()
    }

    /// Whether `link` carried a transfer or probe within the last `secs`.
    pub fn ok_within(&self, link: &str, secs: f64) -> bool {
        self.map
            .lock()
            .get(link)
            .and_then(|l| l.last_ok)
            .is_some_and(|t| t.elapsed().as_secs_f64() < secs)
    }

    /// One link now.
    pub fn get(&self, link: &str) -> Option<LinkStats> {
        self.map.lock().get(link).map(|l| l.stats.clone())
    }

    /// Expected seconds to move `bytes` over `link` (unknown links count as
    /// 100 ms and 100 Mbit/s).
    pub fn cost(&self, link: &str, bytes: u64) -> f64 {
        let l = self.get(link).unwrap_or_default();
        let rtt = l.rtt_ms.unwrap_or(100.0) / 1000.0;
        let bw = l.bandwidth_mbps.unwrap_or(100.0).max(0.01);
        rtt + bytes as f64 * 8.0 / (bw * 1e6)
    }
}

struct PeerState {
    repo: RegistryRepo,
    index: Option<CacheIndex>,
    refreshed: Option<Instant>,
    configured: bool,
}

/// The peers a node knows and what they hold.
pub struct Peers {
    me: String,
    client: reqwest::Client,
    opts: ClientOptions,
    peers: Mutex<BTreeMap<String, PeerState>>,
    /// Who holds which blob, by the peers' last indexes. Locked after
    /// `peers` when both are held.
    holdings: Mutex<Holdings>,
    links: Arc<Links>,
    /// Whether peers named in other peers' indexes are added.
    learn: std::sync::atomic::AtomicBool,
    /// What it is fetching and deciding on, for peers asking directly.
    pub(crate) rollout: crate::rollout::Rollout,
}

impl Peers {
    /// Peers from `urls` (`http://HOST:PORT`), this node being `me` (never
    /// its own peer).
    pub fn new(me: &str, urls: &[String], links: Arc<Links>) -> Result<Arc<Peers>> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Unavailable {
                what: "an HTTP client for peers".into(),
                reason: Causes(&e).to_string(),
            })?;
        let peers = Arc::new(Peers {
            me: normalize(me),
            client,
            opts: ClientOptions {
                timeout: Duration::from_secs(5),
                foreign_redirects: false,
                ..ClientOptions::default()
            },
            peers: Mutex::new(BTreeMap::new()),
            holdings: Mutex::new(Holdings::default()),
            links,
            learn: std::sync::atomic::AtomicBool::new(true),
            rollout: crate::rollout::Rollout::default(),
        });
        for u in urls {
            peers.add(u, true)?;
        }
        Ok(peers)
    }

    /// Learn of peer `url`.
    pub fn add(&self, url: &str, configured: bool) -> Result<()> {
        let url = normalize(url);
        if url == self.me || url.is_empty() {
            return Ok(());
        }
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get_mut(&url) {
            p.configured |= configured;
            return Ok(());
        }
        if !configured && peers.values().filter(|p| !p.configured).count() >= MAX_LEARNED {
            return Err(Error::Protocol {
                what: format!("peer {url}"),
                reason: format!("{MAX_LEARNED} peers are learned already; not added"),
            });
        }
        let repo = peer_repo(&url, PEER_REPO, &self.opts)?;
        peers.insert(
            url,
            PeerState {
                repo,
                index: None,
                refreshed: None,
                configured,
            },
        );
        Ok(())
    }

    /// Whether to learn of the peers other peers know (on by default).
    /// Off, only the configured peers are asked: for networks where a peer
    /// is reached at a different address from each place (NAT, proxies).
    pub fn set_learning(&self, on: bool) {
        self.learn.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// This node's id (its URL, normalized).
    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    /// The HTTP client for peers.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The known peers' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.peers.lock().keys().cloned().collect()
    }

    /// The id peer `url` gave itself in its last cache index (normalized),
    /// if it published one.
    pub(crate) fn id_of(&self, url: &str) -> Option<String> {
        let peers = self.peers.lock();
        let index = peers.get(url)?.index.as_ref()?;
        Some(normalize(&index.node))
    }

    /// The peers with a fresh index that say they relay for registry
    /// `host`.
    pub fn relays_for(&self, host: &str) -> Vec<String> {
        self.peers
            .lock()
            .iter()
            .filter(|(_, p)| fresh(p).is_some_and(|i| i.relay.iter().any(|h| h == host)))
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// The link measurements.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }

    /// Fetch every peer's cache index once (timing it: the light probe of
    /// the link), learning the peers they know.
    pub async fn refresh(&self) {
        let urls = self.urls();
        let polls = urls.iter().map(|u| async move {
            let began = Instant::now();
            let r = async {
                let resp = self
                    .client
                    .get(format!("{u}/cache/index"))
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| Causes(&e).to_string())?;
                let body = breakfs_fetch::guard::body_within(resp, MAX_INDEX, "the cache index")
                    .await
                    .map_err(|e| Causes(&e).to_string())?;
                serde_json::from_slice::<CacheIndex>(&body).map_err(|e| e.to_string())
            }
            .await;
            (u.clone(), began.elapsed(), r)
        });
        for (u, took, r) in futures::future::join_all(polls).await {
            match r {
                Ok(index) => {
                    self.links.rtt(&u, took.as_secs_f64());
                    let learned: Vec<String> =
                        if self.learn.load(std::sync::atomic::Ordering::Relaxed) {
                            index.peers.clone()
                        } else {
                            Vec::new()
                        };
                    self.indexed(&u, Some(index));
                    for l in learned {
                        let _ = self.add(&l, false);
                    }
                }
                Err(e) => {
                    self.links.failure(&u);
                    tracing::debug!(peer = %u, "cache index poll failed: {e}");
                    self.indexed(&u, None);
                }
            }
        }
    }

    /// Peer `url`'s index is now `index` (`None`: its poll failed): keep
    /// it, and what it holds in the holdings.
    fn indexed(&self, url: &str, index: Option<CacheIndex>) {
        let mut peers = self.peers.lock();
        let Some(p) = peers.get_mut(url) else { return };
        let mut holdings = self.holdings.lock();
        if let Some(old) = &p.index {
            holdings.forget(url, old);
        }
        if let Some(new) = &index {
            holdings.learn(url, new);
            p.refreshed = Some(Instant::now());
        }
        p.index = index;
    }

    /// Poll the peers every `every` until `stop` is cancelled.
    pub fn spawn_polling(self: &Arc<Self>, every: Duration, stop: CancellationToken) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(p) = me.upgrade() else { return };
                tokio::select! {
                    _ = p.refresh() => {}
                    _ = stop.cancelled() => return,
                }
                drop(p);
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Whether a peer with a fresh index holds all of `blob`.
    pub fn someone_holds(&self, blob: &Digest) -> bool {
        let whole: Vec<String> = self
            .holdings
            .lock()
            .of(blob)
            .filter(|(_, held)| held.is_none())
            .map(|(u, _)| u.clone())
            .collect();
        let peers = self.peers.lock();
        whole.iter().any(|u| peers.get(u).and_then(fresh).is_some())
    }

    /// Whether a peer with a fresh index holds some of `blob`.
    pub(crate) fn someone_holds_some(&self, blob: &Digest) -> bool {
        let urls: Vec<String> = self
            .holdings
            .lock()
            .of(blob)
            .map(|(u, _)| u.clone())
            .collect();
        let peers = self.peers.lock();
        urls.iter().any(|u| peers.get(u).and_then(fresh).is_some())
    }

    /// The peers holding (some of) `blob`, cheapest first for a 1 MiB read.
    fn holders(&self, blob: &Digest) -> Vec<Arc<dyn Source>> {
        let held: Vec<(String, Held)> = self
            .holdings
            .lock()
            .of(blob)
            .map(|(u, h)| (u.clone(), h.clone()))
            .collect();
        let peers = self.peers.lock();
        let mut out: Vec<(f64, PeerLink)> = held
            .into_iter()
            .filter_map(|(u, held)| {
                let p = peers.get(&u).filter(|p| fresh(p).is_some())?;
                Some((
                    self.links.cost(&u, 1 << 20),
                    PeerLink {
                        url: u,
                        repo: p.repo.clone(),
                        ranges: held.map(|r| r.to_vec()),
                        links: self.links.clone(),
                    },
                ))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.into_iter()
            .map(|(_, l)| Arc::new(l) as Arc<dyn Source>)
            .collect()
    }
}

/// How much of a blob a peer holds: `None` whole, else the ranges.
type Held = Option<Arc<[(u64, u64)]>>;

/// Which peers hold which blob, by their last indexes: a peer's entries are
/// replaced each time its index is, so finding a blob's holders is one map
/// read rather than a scan of every index.
#[derive(Default)]
struct Holdings(HashMap<Digest, BTreeMap<String, Held>>);

impl Holdings {
    /// The peers holding `blob` and how much.
    fn of(&self, blob: &Digest) -> impl Iterator<Item = (&String, &Held)> {
        self.0.get(blob).into_iter().flatten()
    }

    /// Record what `peer`'s `index` holds (whole before partial, as
    /// [`CacheIndex::holding`] answers).
    fn learn(&mut self, peer: &str, index: &CacheIndex) {
        for b in &index.blobs {
            let at = self.0.entry(b.digest.clone()).or_default();
            at.insert(peer.to_string(), None);
        }
        for p in &index.partial {
            let at = self.0.entry(p.digest.clone()).or_default();
            at.entry(peer.to_string())
                .or_insert_with(|| Some(p.ranges.as_slice().into()));
        }
    }

    /// Drop what `peer`'s `index` held.
    fn forget(&mut self, peer: &str, index: &CacheIndex) {
        let digests = index.blobs.iter().map(|b| &b.digest);
        for d in digests.chain(index.partial.iter().map(|p| &p.digest)) {
            if let Some(at) = self.0.get_mut(d) {
                at.remove(peer);
                if at.is_empty() {
                    self.0.remove(d);
                }
            }
        }
    }
}

fn fresh(p: &PeerState) -> Option<&CacheIndex> {
    let ok = p.refreshed.is_some_and(|t| t.elapsed() < STALE);
    ok.then_some(p.index.as_ref()).flatten()
}

/// A client for repository `repo` at the peer at `url` (`http://HOST:PORT`,
/// normalized), with `opts` (plain HTTP when the URL says so).
pub(crate) fn peer_repo(url: &str, repo: &str, opts: &ClientOptions) -> Result<RegistryRepo> {
    let parsed = reqwest::Url::parse(url).map_err(|e| Error::Protocol {
        what: format!("peer {url}"),
        reason: format!("not a URL like http://10.0.0.2:7070: {e}"),
    })?;
    let host = match (parsed.host_str(), parsed.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        _ => {
            return Err(Error::Protocol {
                what: format!("peer {url}"),
                reason: "it has no host".into(),
            });
        }
    };
    let opts = ClientOptions {
        plain_http: parsed.scheme() == "http",
        ..opts.clone()
    };
    RegistryRepo::new(&host, repo, &opts)
}

fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// The peers as one entry of the fetch chain: expands, per blob, into the
/// peers that hold it.
pub struct PeerSource {
    /// The peers.
    pub peers: Arc<Peers>,
}

impl Source for PeerSource {
    fn name(&self) -> String {
        "peers".into()
    }

    fn class(&self) -> SourceClass {
        SourceClass::Peer
    }

    fn expand(&self, blob: &Digest) -> Option<Vec<Arc<dyn Source>>> {
        Some(self.peers.holders(blob))
    }

    /// The peers asked directly which chunks they have or are fetching
    /// (`crate::rollout`).
    fn plan<'a>(
        &'a self,
        blob: &'a Digest,
        chunks: &'a [ChunkLoc],
        prio: breakfs_fetch::Priority,
    ) -> Option<futures::future::BoxFuture<'a, Plan>> {
        crate::rollout::plan(&self.peers, blob, chunks, prio)
    }

    /// The peers asked directly whether they have or read a config or a
    /// TOC (`crate::rollout`).
    fn metadata<'a>(
        &'a self,
        meta: breakfs_fetch::Meta<'a>,
    ) -> Option<futures::future::BoxFuture<'a, breakfs_fetch::MetaTurn>> {
        crate::rollout::meta_turn(&self.peers, meta)
    }
}

/// One peer holding one blob (whole, or the given ranges).
struct PeerLink {
    url: String,
    repo: RegistryRepo,
    ranges: Option<Vec<(u64, u64)>>,
    links: Arc<Links>,
}

impl Source for PeerLink {
    fn name(&self) -> String {
        format!("peer {}", self.repo.host())
    }

    fn class(&self) -> SourceClass {
        SourceClass::Peer
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            if let Some(r) = &self.ranges {
                let end = start + len;
                if !r.iter().any(|(s, e)| *s <= start && end <= *e) {
                    return Err(Error::NotFound {
                        what: format!("bytes {start}+{len} of {blob} at peer {}", self.url),
                    });
                }
            }
            let r = self.repo.read_range(blob, start, len).await;
            if r.is_err() {
                self.links.failure(&self.url);
            }
            r
        })
    }

    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.ranges.is_some() {
                return Err(Error::NotFound {
                    what: format!("whole blob {} at peer {}", desc.digest, self.url),
                });
            }
            self.repo.blob_to_file(desc, path).await
        })
    }

    fn observe(&self, bytes: u64, secs: f64) {
        self.links.transfer(&self.url, bytes, secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_discounts_the_round_trip_and_averages() {
        let l = Links::default();
        l.rtt("p", 0.05);
        // 1 MiB in 0.05 s RTT + 0.168 s at 50 Mbit/s.
        l.transfer("p", 1 << 20, 0.05 + (8.0 * 1048576.0) / 50e6);
        let s = l.get("p").expect("measured");
        let bw = s.bandwidth_mbps.expect("bandwidth");
        assert!((bw - 50.0).abs() < 1.0, "{bw}");
        assert!(l.cost("p", 1 << 20) < l.cost("unknown-slow", 100 << 20));
    }

    #[tokio::test]
    async fn learned_peers_are_bounded_and_configured_ones_always_added() {
        let peers = Peers::new("http://me:1", &[], Arc::new(Links::default())).expect("peers");
        for i in 0..MAX_LEARNED + 10 {
            let _ = peers.add(&format!("http://10.0.{}.{}:7480", i / 256, i % 256), false);
        }
        assert_eq!(peers.urls().len(), MAX_LEARNED);
        peers
            .add("http://10.9.9.9:7480", true)
            .expect("a configured peer is added");
        assert_eq!(peers.urls().len(), MAX_LEARNED + 1);
    }

    #[tokio::test]
    async fn holders_follow_each_refreshed_index() {
        let a = "http://10.0.0.2:7480";
        let b = "http://10.0.0.3:7480";
        let peers = Peers::new(
            "http://me:1",
            &[a.into(), b.into()],
            Arc::new(Links::default()),
        )
        .expect("peers");
        let whole = Digest::of(b"whole");
        let part = Digest::of(b"part");
        let index = |blobs: &[&Digest], partial: &[&Digest]| CacheIndex {
            blobs: blobs
                .iter()
                .map(|d| HeldBlob {
                    digest: (*d).clone(),
                    size: 5,
                })
                .collect(),
            partial: partial
                .iter()
                .map(|d| PartialLayer {
                    digest: (*d).clone(),
                    ranges: vec![(0, 4)],
                })
                .collect(),
            ..CacheIndex::default()
        };
        let names =
            |d: &Digest| -> Vec<String> { peers.holders(d).iter().map(|s| s.name()).collect() };
        assert!(names(&whole).is_empty());

        peers.indexed(a, Some(index(&[&whole], &[&part])));
        peers.indexed(b, Some(index(&[&whole], &[])));
        assert_eq!(names(&whole).len(), 2);
        assert_eq!(names(&part), vec!["peer 10.0.0.2:7480".to_string()]);
        assert!(peers.someone_holds(&whole));
        assert!(!peers.someone_holds(&part));

        // a's next index drops both blobs; b's poll fails.
        peers.indexed(a, Some(index(&[], &[])));
        assert_eq!(names(&whole), vec!["peer 10.0.0.3:7480".to_string()]);
        assert!(names(&part).is_empty());
        peers.indexed(b, None);
        assert!(names(&whole).is_empty());
        assert!(!peers.someone_holds(&whole));
    }
}
