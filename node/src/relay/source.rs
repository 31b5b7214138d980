//! The source side of relaying: for a blob of a relayed registry, one
//! link per range request, the node's own or a relaying peer's, whichever
//! is least loaded for its measured throughput. A peer that fails a relay
//! rests for [`PEER_REST`] (as the fetcher rests a failing peer), one that
//! relays wrong bytes for [`DISTRUST`].

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use breakfs_fetch::{
    ClientOptions, CloudSource, Error, PEER_REST, RegistryRepo, Result, Source, SourceClass,
};
use breakfs_index::{Descriptor, Digest};
use futures::future::BoxFuture;
use reqwest::header::{AUTHORIZATION, HeaderName};
use serde::Serialize;

use super::{MAX_CLIENTS, MAX_RELAY_RANGE, RELAY_HEADER, Relay};
use crate::peer::{Peers, peer_repo};

/// How long a peer that relayed wrong bytes is not asked to relay.
const DISTRUST: std::time::Duration = std::time::Duration::from_secs(600);

/// The key of the node's own registry link among the relay links.
const OWN: &str = "own";

/// Transfers smaller than this say little about a link's throughput.
const MIN_SAMPLE: u64 = 64 << 10;

/// The weight of a new throughput sample.
const ALPHA: f64 = 0.3;

/// The source side's state.
#[derive(Default)]
pub(super) struct Striping {
    links: Mutex<BTreeMap<String, LinkLoad>>,
    /// Clients that ask a peer to relay, by peer, registry and repository.
    downstream: Mutex<HashMap<(String, String, String), RegistryRepo>>,
    /// Peers not asked to relay, until when.
    resting: Mutex<HashMap<String, Instant>>,
}

impl Striping {
    /// The links' loads now.
    pub(super) fn loads(&self) -> BTreeMap<String, LinkLoad> {
        self.links.lock().clone()
    }
}

/// One link to the registry as the requesting side sees it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LinkLoad {
    /// Range requests on it now.
    pub in_flight: usize,
    /// Measured throughput of the whole link, bytes/s (moving average).
    pub bytes_per_sec: Option<f64>,
    /// Requests it answered.
    pub requests: u64,
    /// Bytes it delivered.
    pub bytes: u64,
    /// Requests that failed on it.
    pub failures: u64,
}

impl Relay {
    /// A client for `repo` at peer `url` that asks it to relay from `host`.
    fn downstream_client(&self, url: &str, host: &str, repo: &str) -> Result<RegistryRepo> {
        let key = (url.to_string(), host.to_string(), repo.to_string());
        if let Some(r) = self.striping.downstream.lock().get(&key) {
            return Ok(r.clone());
        }
        // The peer answers only once it has the whole range from the
        // registry: give it the time a registry gets.
        let opts = ClientOptions {
            endpoints: BTreeMap::new(),
            foreign_redirects: false,
            ..self.opts.clone()
        };
        let mut r = peer_repo(url, repo, &opts)?
            .with_header(HeaderName::from_static(RELAY_HEADER), host)?;
        if let Some(t) = &self.token {
            r = r.with_header(AUTHORIZATION, &t.bearer())?;
        }
        let mut m = self.striping.downstream.lock();
        if m.len() >= MAX_CLIENTS {
            m.clear();
        }
        m.insert(key, r.clone());
        Ok(r)
    }

    /// Take a request slot on the least loaded of `keys` (see
    /// [`least_loaded`]).
    fn reserve(self: &Arc<Self>, keys: &[String]) -> Option<Slot> {
        let mut links = self.striping.links.lock();
        let loads: Vec<LinkLoad> = keys
            .iter()
            .map(|k| links.get(k).cloned().unwrap_or_default())
            .collect();
        let key = keys.get(least_loaded(&loads)?)?.clone();
        links.entry(key.clone()).or_default().in_flight += 1;
        Some(Slot {
            relay: self.clone(),
            key,
        })
    }

    /// A transfer of `bytes` in `secs` on link `key` finished.
    fn sample(&self, key: &str, bytes: u64, secs: f64) {
        let mut links = self.striping.links.lock();
        let l = links.entry(key.to_string()).or_default();
        l.requests += 1;
        l.bytes += bytes;
        if bytes >= MIN_SAMPLE && secs > 0.0 {
            // The requests on the link at once share it: the link moved
            // about this one's rate times their number.
            let rate = bytes as f64 / secs * l.in_flight.max(1) as f64;
            l.bytes_per_sec = Some(match l.bytes_per_sec {
                Some(o) => o + ALPHA * (rate - o),
                None => rate,
            });
        }
    }

    /// Peer `url` is not asked to relay for `for_`.
    fn rest(&self, url: &str, for_: std::time::Duration) {
        self.striping
            .resting
            .lock()
            .insert(url.to_string(), Instant::now() + for_);
        if let Some(l) = self.striping.links.lock().get_mut(url) {
            l.failures += 1;
        }
    }

    /// Whether peer `url` rests now.
    fn resting(&self, url: &str) -> bool {
        let mut b = self.striping.resting.lock();
        match b.get(url) {
            Some(t) if *t > Instant::now() => true,
            Some(_) => {
                b.remove(url);
                false
            }
            None => false,
        }
    }
}

/// The index of the link to send the next request over: the one with the
/// fewest requests in flight for its measured throughput,
/// `(in_flight + 1) / bytes_per_sec`. A link not measured yet counts as
/// fast as the best measured one (as 1 byte/s if none is). Ties go to the
/// link asked least so far, so that every link gets tried and measured
/// even by one request at a time, then to the first. `None` for no links.
pub fn least_loaded(links: &[LinkLoad]) -> Option<usize> {
    let rate = |l: &LinkLoad| l.bytes_per_sec.filter(|r| *r > 0.0);
    let best = links
        .iter()
        .filter_map(rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
        .unwrap_or(1.0);
    let score = |l: &LinkLoad| (l.in_flight + 1) as f64 / rate(l).unwrap_or(best);
    let asked = |l: &LinkLoad| l.requests + l.failures;
    let mut pick: Option<usize> = None;
    for (i, l) in links.iter().enumerate() {
        let better = pick.is_none_or(|p| {
            let (s, b) = (score(l), score(&links[p]));
            s < b * (1.0 - 1e-9) || (s <= b * (1.0 + 1e-9) && asked(l) < asked(&links[p]))
        });
        if better {
            pick = Some(i);
        }
    }
    pick
}

/// A request slot on one link, given back when the link the fetcher was
/// handed is dropped (the request is over, or was never made).
struct Slot {
    relay: Arc<Relay>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(l) = self.relay.striping.links.lock().get_mut(&self.key) {
            l.in_flight = l.in_flight.saturating_sub(1);
        }
    }
}

/// The relays as one entry of the fetch chain, between the peers and the
/// cloud: for a blob from a relayed registry, expands into one link, the
/// node's own or a relaying peer's, whichever is least loaded now.
pub struct RelaySource {
    /// What is relayed, and the links' loads.
    pub relay: Arc<Relay>,
    /// The peers (those whose index says they relay for the registry).
    pub peers: Arc<Peers>,
    /// Where blobs come from (their registry and repository), and the own link.
    pub cloud: Arc<CloudSource>,
}

impl Source for RelaySource {
    fn name(&self) -> String {
        "relays".into()
    }

    fn class(&self) -> SourceClass {
        SourceClass::Relay
    }

    fn expand(&self, blob: &Digest) -> Option<Vec<Arc<dyn Source>>> {
        let Some((host, repo)) = self.cloud.registry_home(blob) else {
            return Some(Vec::new());
        };
        if !self.relay.hosts.contains(&host) {
            return Some(Vec::new());
        }
        let relays: Vec<String> = self
            .peers
            .relays_for(&host)
            .into_iter()
            .filter(|u| !self.relay.resting(u))
            .collect();
        if relays.is_empty() {
            // Nothing to stripe over: the cloud source after this one.
            return Some(Vec::new());
        }
        let mut keys = vec![OWN.to_string()];
        keys.extend(relays);
        let Some(slot) = self.relay.reserve(&keys) else {
            return Some(Vec::new());
        };
        if slot.key == OWN {
            let own = OwnLink {
                cloud: self.cloud.clone(),
                slot,
            };
            return Some(vec![Arc::new(own) as Arc<dyn Source>]);
        }
        match self.relay.downstream_client(&slot.key, &host, &repo) {
            Ok(repo) => Some(vec![Arc::new(RelayLink { repo, slot }) as Arc<dyn Source>]),
            Err(e) => {
                tracing::warn!(peer = %slot.key, "cannot ask the peer to relay: {e}", e = breakfs_index::Causes(&e));
                Some(Vec::new())
            }
        }
    }
}

/// The node's own registry link, chosen for one request: the cloud source,
/// counted among the relay links' loads.
struct OwnLink {
    cloud: Arc<CloudSource>,
    slot: Slot,
}

impl Source for OwnLink {
    fn name(&self) -> String {
        self.cloud.name()
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        self.cloud.read_range(blob, start, len)
    }

    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        self.cloud.blob_to_file(desc, path)
    }

    fn observe(&self, bytes: u64, secs: f64) {
        self.cloud.observe(bytes, secs);
        self.slot.relay.sample(&self.slot.key, bytes, secs);
    }
}

/// A peer's registry link, chosen for one request.
struct RelayLink {
    repo: RegistryRepo,
    slot: Slot,
}

impl Source for RelayLink {
    fn name(&self) -> String {
        format!("relay {}", self.slot.key)
    }

    fn class(&self) -> SourceClass {
        SourceClass::Relay
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let url = &self.slot.key;
            if len > MAX_RELAY_RANGE {
                return Err(Error::NotFound {
                    what: format!(
                        "bytes {start}+{len} of {blob} through relay {url} (a relay moves at \
                         most {MAX_RELAY_RANGE} bytes a request)"
                    ),
                });
            }
            // Cut off by the fetcher's attempt timeout (the future dropped),
            // the peer rests as after an error.
            let mut watch = Unfinished {
                relay: &self.slot.relay,
                url,
                finished: false,
            };
            let r = self.repo.read_range(blob, start, len).await;
            watch.finished = true;
            match r {
                Err(Error::Status {
                    status: 503,
                    what,
                    body,
                }) => Err(Error::Busy { what, reason: body }),
                Err(e) if !matches!(e, Error::NotFound { .. }) => {
                    self.slot.relay.rest(url, PEER_REST);
                    Err(e)
                }
                Ok(b) if b.len() as u64 != len => {
                    self.slot.relay.rest(url, PEER_REST);
                    Err(Error::Unavailable {
                        what: format!("bytes {start}+{len} of {blob} through relay {url}"),
                        reason: format!("it sent {} bytes", b.len()),
                    })
                }
                other => other,
            }
        })
    }

    fn observe(&self, bytes: u64, secs: f64) {
        self.slot.relay.sample(&self.slot.key, bytes, secs);
    }

    fn wrong_bytes(&self) {
        tracing::warn!(peer = %self.slot.key, "a relay delivered wrong bytes; not asked to relay for {DISTRUST:?}");
        self.slot.relay.rest(&self.slot.key, DISTRUST);
    }
}

/// Rests a relaying peer if dropped before its request finished.
struct Unfinished<'a> {
    relay: &'a Relay,
    url: &'a str,
    finished: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.relay.rest(self.url, PEER_REST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link with `in_flight` requests, measured at `rate` bytes/s, asked
    /// `asked` times so far.
    fn link(in_flight: usize, rate: Option<f64>, asked: u64) -> LinkLoad {
        LinkLoad {
            in_flight,
            bytes_per_sec: rate,
            requests: asked,
            ..LinkLoad::default()
        }
    }

    #[test]
    fn unmeasured_links_share_requests_evenly_first_link_on_ties() {
        assert_eq!(least_loaded(&[]), None);
        let idle = link(0, None, 0);
        assert_eq!(
            least_loaded(&[idle.clone(), idle.clone(), idle.clone()]),
            Some(0)
        );
        let busy = link(1, None, 0);
        assert_eq!(
            least_loaded(&[busy.clone(), idle.clone(), idle.clone()]),
            Some(1)
        );
        assert_eq!(least_loaded(&[busy.clone(), busy, idle]), Some(2));
    }

    #[test]
    fn one_request_at_a_time_still_tries_every_link() {
        // The own link answered one request and is measured; the peers are
        // unknown, so count as fast: the one asked least goes next.
        let own = link(0, Some(2e6), 1);
        assert_eq!(
            least_loaded(&[own.clone(), link(0, None, 0), link(0, None, 0)]),
            Some(1)
        );
        assert_eq!(
            least_loaded(&[own.clone(), link(0, Some(2e6), 1), link(0, None, 0)]),
            Some(2)
        );
        // Once all are measured, the fastest takes a lone request.
        assert_eq!(
            least_loaded(&[own, link(0, Some(3e6), 1), link(0, Some(1e6), 1)]),
            Some(1)
        );
    }

    #[test]
    fn a_faster_link_takes_more_requests_in_flight() {
        // 10 MB/s with 3 in flight beats 1 MB/s with none...
        assert_eq!(
            least_loaded(&[link(3, Some(10e6), 9), link(0, Some(1e6), 0)]),
            Some(0)
        );
        // ...but not with 10 in flight: 11/10 > 1/1.
        assert_eq!(
            least_loaded(&[link(10, Some(10e6), 9), link(0, Some(1e6), 0)]),
            Some(1)
        );
    }

    #[test]
    fn an_unmeasured_link_counts_as_the_best_measured_one() {
        // Own link measured at 1 MB/s with a request on it; an unknown peer
        // counts as 1 MB/s with none: it is tried.
        assert_eq!(
            least_loaded(&[link(1, Some(1e6), 5), link(0, None, 0)]),
            Some(1)
        );
        // Against a slow measured link, an unknown one counts as the fast one.
        assert_eq!(
            least_loaded(&[
                link(0, Some(1e5), 0),
                link(1, Some(1e7), 0),
                link(1, None, 0)
            ]),
            Some(1)
        );
    }

    /// Hand out `n` requests one after another (none finishing) and count
    /// how many each link got.
    fn spread(rates: &[Option<f64>], n: usize) -> Vec<usize> {
        let mut links: Vec<LinkLoad> = rates.iter().map(|r| link(0, *r, 0)).collect();
        for _ in 0..n {
            let i = least_loaded(&links).expect("a link");
            links[i].in_flight += 1;
        }
        links.iter().map(|l| l.in_flight).collect()
    }

    #[test]
    fn requests_spread_in_proportion_to_throughput() {
        assert_eq!(spread(&[None, None, None], 8), vec![3, 3, 2]);
        assert_eq!(spread(&[Some(2e6), Some(1e6), Some(1e6)], 8), vec![4, 2, 2]);
        assert_eq!(spread(&[Some(3e6), Some(1e6)], 8), vec![6, 2]);
    }

    #[test]
    fn slots_are_given_back_when_links_are_dropped_and_samples_scale_by_sharing() {
        let relay = Relay::new(&["reg:5000".into()], &ClientOptions::default(), None);
        let keys: Vec<String> = vec![OWN.into(), "http://b:1".into(), "http://c:1".into()];
        let slots: Vec<Slot> = (0..6)
            .map(|_| relay.reserve(&keys).expect("slot"))
            .collect();
        let status = relay.status();
        for k in &keys {
            assert_eq!(status.links[k].in_flight, 2, "{k}: {status:?}");
        }
        // Two requests of 1 MB in 1 s each on B at once: B moves 2 MB/s.
        relay.sample("http://b:1", 1_000_000, 1.0);
        let b = relay.status().links["http://b:1"].clone();
        assert_eq!(b.bytes_per_sec, Some(2e6));
        assert_eq!((b.requests, b.bytes), (1, 1_000_000));
        drop(slots);
        assert!(relay.status().links.values().all(|l| l.in_flight == 0));
        // B now measures faster than the unknown-as-best others... equal:
        // unknown ones count as 2 MB/s; the first key wins the tie.
        assert_eq!(
            relay.reserve(&keys).map(|s| s.key.clone()),
            Some(OWN.to_string())
        );
    }
}
