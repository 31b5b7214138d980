//! The node directory: which node daemons there are (configured, or
//! announced by a Kubernetes node annotation), what the Kubernetes API says
//! of each node (resources, labels), and what each daemon last published
//! (its cache index and link measurements, polled), made into the
//! [`NodeView`]s the scorer reads. Both the service and the Kubernetes glue
//! use it; it uses neither.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The node daemon's published types, read here only.
use breakfs_fetch::guard::{self, Token};
use breakfs_index::{CacheIndex, LinkStats, MAX_INDEX};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, PollError, Result};
use crate::score::{self, DEFAULT_CLOUD, DEFAULT_FAR_PEER, DEFAULT_PEER, Holdings, Link, NodeView};
use crate::types::{Node, parse_quantity};

/// Label: round trip from the node to the registry, ms.
pub const LABEL_RTT: &str = "breakfs.io/rtt-registry-ms";
/// Label: bandwidth from the registry to the node, Mbit/s.
pub const LABEL_BW: &str = "breakfs.io/bw-registry-mbps";
/// Label: the edge cluster a node belongs to.
pub const LABEL_CLUSTER: &str = "breakfs.io/cluster";
/// Annotation: the node daemon's URL, for discovery.
pub const ANNOTATION_DAEMON: &str = "breakfs.io/daemon-url";

/// One node daemon the service watches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    /// The Kubernetes node name.
    pub name: String,
    /// The daemon's URL (`http://HOST:PORT`).
    pub url: String,
    /// The edge cluster it belongs to.
    #[serde(default = "default_cluster")]
    pub cluster: String,
}

/// The cluster of a node no one placed in one.
pub(crate) fn default_cluster() -> String {
    "default".into()
}

impl std::str::FromStr for NodeEntry {
    type Err = Error;

    /// `NAME=URL` or `NAME=URL@CLUSTER` (the `--node` flag's form).
    fn from_str(s: &str) -> Result<NodeEntry> {
        let Some((name, rest)) = s.split_once('=') else {
            return Err(Error::NodeFlag(s.to_string()));
        };
        let (url, cluster) = match rest.rsplit_once('@') {
            Some((u, c)) if !c.contains('/') => (u, c.to_string()),
            _ => (rest, default_cluster()),
        };
        Ok(NodeEntry {
            name: name.to_string(),
            url: url.to_string(),
            cluster,
        })
    }
}

/// What the Kubernetes API says of one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterNode {
    /// Allocatable CPU cores and memory bytes.
    pub allocatable: Option<(f64, f64)>,
    /// CPU cores and memory bytes requested by the pods bound to it that
    /// have not finished.
    pub requested: (f64, f64),
    /// Its registry link as its labels say.
    pub link: Option<Link>,
    /// Its node daemon, if annotated.
    pub daemon: Option<NodeEntry>,
}

/// The registry link that `labels` publish, if both figures are there.
pub fn link_from_labels(labels: &BTreeMap<String, String>) -> Option<Link> {
    let rtt = labels.get(LABEL_RTT)?.parse::<f64>().ok()?;
    let bw = labels.get(LABEL_BW)?.parse::<f64>().ok()?;
    (rtt.is_finite() && bw.is_finite() && rtt >= 0.0 && bw > 0.0).then_some(Link {
        rtt_ms: rtt,
        mbps: bw,
    })
}

/// The labels that publish `link` (whole ms and Mbit/s, one decimal below
/// 10: label values must be short and should not change on every poll).
pub fn labels_for(link: &Link) -> BTreeMap<String, String> {
    let fmt = |x: f64| {
        if x < 10.0 {
            format!("{x:.1}")
        } else {
            format!("{:.0}", x)
        }
    };
    BTreeMap::from([
        (LABEL_RTT.to_string(), fmt(link.rtt_ms)),
        (LABEL_BW.to_string(), fmt(link.mbps)),
    ])
}

/// Node daemons polled at once. Each poll holds the node's cache index
/// (about 50 KB for 500 layers) until it is made a view: polling 1,000
/// nodes all at once and keeping every answer until the last one came
/// grew an idle service from 170 to 600 MiB.
const POLLS_IN_FLIGHT: usize = 128;

/// How long a request to a node daemon may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP client for the node daemons: a timeout, and the bearer token
/// on every request when there is one. A client that cannot be built is an
/// error (polling without the token and the timeout would fail later, and
/// quietly).
pub(crate) fn node_client(token: Option<&Token>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v =
            reqwest::header::HeaderValue::from_str(&t.bearer()).map_err(Error::TokenHeader)?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .timeout(NODE_TIMEOUT)
        .default_headers(headers)
        .build()
        .map_err(Error::NodeClient)
}

/// The views at one moment, rebuilt after each poll and read by requests
/// without copying.
#[derive(Default)]
pub(crate) struct Snapshot {
    /// Node views by name, with when they were polled.
    views: rustc_hash::FxHashMap<String, (Arc<NodeView>, Instant)>,
    /// Which node of the fresh views holds which layer whole.
    pub(crate) holdings: Holdings,
}

/// What the service knows of every node.
pub struct Directory {
    /// The configured node daemons.
    configured: Vec<NodeEntry>,
    /// A node's view older than this is not trusted.
    stale_secs: f64,
    /// The client for the node daemons (timeout, token).
    http: reqwest::Client,
    /// The latest views.
    snapshot: Mutex<Arc<Snapshot>>,
    /// The node daemons: the configured ones, then those discovered from
    /// node annotations.
    entries: Mutex<Arc<Vec<NodeEntry>>>,
    /// What the Kubernetes API says of each node (empty without it).
    cluster: Mutex<Arc<HashMap<String, ClusterNode>>>,
}

impl Directory {
    /// The directory of the `configured` node daemons, whose views are
    /// trusted for `stale_secs` and whose requests carry `token`; an error
    /// if the client for the node daemons cannot be built.
    pub fn new(
        configured: Vec<NodeEntry>,
        stale_secs: f64,
        token: Option<&Token>,
    ) -> Result<Directory> {
        Ok(Directory {
            http: node_client(token)?,
            snapshot: Mutex::new(Arc::new(Snapshot::default())),
            entries: Mutex::new(Arc::new(configured.clone())),
            configured,
            stale_secs,
            cluster: Mutex::new(Arc::new(HashMap::new())),
        })
    }

    /// The client for the node daemons.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The node daemons watched: configured and discovered.
    pub fn node_entries(&self) -> Arc<Vec<NodeEntry>> {
        self.entries.lock().clone()
    }

    /// The views now.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.lock().clone()
    }

    /// Take what the Kubernetes API says of the nodes: resources, labelled
    /// links, and node daemons announced by annotation (added to those
    /// watched; a configured entry wins).
    pub fn set_cluster(&self, nodes: HashMap<String, ClusterNode>) {
        let mut entries = self.configured.clone();
        for n in nodes.values() {
            if let Some(d) = &n.daemon
                && !entries.iter().any(|e| e.name == d.name)
            {
                entries.push(d.clone());
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        *self.entries.lock() = Arc::new(entries);
        *self.cluster.lock() = Arc::new(nodes);
    }

    /// The registry links the node daemons measured (fresh views only).
    pub fn measured_links(&self) -> Vec<(String, Link)> {
        let d = self.snapshot();
        let mut out: Vec<(String, Link)> = d
            .views
            .iter()
            .filter(|(_, (_, at))| self.fresh(at))
            .filter_map(|(name, (v, _))| Some((name.clone(), v.cloud?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn fresh(&self, at: &Instant) -> bool {
        at.elapsed().as_secs_f64() < self.stale_secs
    }

    /// Poll every node daemon once, [`POLLS_IN_FLIGHT`] at a time, each
    /// answer made into a view as it arrives; the views of those that
    /// answered (the others are logged).
    pub async fn poll(&self) -> Vec<NodeView> {
        use futures::StreamExt as _;
        let entries = self.node_entries();
        let mut waiting = entries.iter();
        let mut polls = futures::stream::FuturesUnordered::new();
        let mut fresh = Vec::new();
        loop {
            while polls.len() < POLLS_IN_FLIGHT {
                let Some(n) = waiting.next() else { break };
                polls.push(self.poll_one(n));
            }
            match polls.next().await {
                Some(Ok(view)) => fresh.push(view),
                Some(Err(e)) => tracing::debug!("{}", breakfs_index::Causes(&e)),
                None => break,
            }
        }
        fresh
    }

    /// Poll one node daemon: its view.
    async fn poll_one(&self, n: &NodeEntry) -> Result<NodeView> {
        let index: CacheIndex = self.get_json(n, "/cache/index").await?;
        let m: serde_json::Value = self.get_json(n, "/measurements").await?;
        let links: HashMap<String, LinkStats> =
            serde_json::from_value(m["links"].clone()).unwrap_or_default();
        Ok(self.view_of(&n.name, &index, &links))
    }

    /// `GET path` of node daemon `n`, as JSON.
    async fn get_json<T: DeserializeOwned>(&self, n: &NodeEntry, path: &'static str) -> Result<T> {
        let url = format!("{}{path}", n.url.trim_end_matches('/'));
        let got = async {
            let r = self.http.get(&url).send().await?.error_for_status()?;
            let body = guard::body_within(r, MAX_INDEX, path).await?;
            Ok::<T, PollError>(serde_json::from_slice(&body)?)
        };
        got.await.map_err(|source| Error::Poll {
            node: n.name.clone(),
            url,
            source: Box::new(source),
        })
    }

    /// Replace the views of the nodes in `views` (polled now) and rebuild
    /// the cluster holder maps.
    pub fn update(&self, views: Vec<NodeView>) {
        let old = self.snapshot();
        let mut d = Snapshot {
            views: old.views.clone(),
            holdings: Holdings::default(),
        };
        let now = Instant::now();
        // What a relaying node's cold layers come over, from its cluster's
        // latest views (those polled now, else the directory's).
        let pooled: Vec<Option<Link>> = if views.iter().any(|v| v.relays) {
            let polled: std::collections::HashSet<&str> =
                views.iter().map(|v| v.name.as_str()).collect();
            let mut mates: HashMap<&str, Vec<&NodeView>> = HashMap::new();
            // A node not heard from lately relays for no one.
            let known = d
                .views
                .values()
                .filter(|(_, at)| self.fresh(at))
                .map(|(o, _)| &**o);
            for o in views
                .iter()
                .chain(known.filter(|o| !polled.contains(o.name.as_str())))
            {
                mates.entry(o.cluster.as_str()).or_default().push(o);
            }
            views
                .iter()
                .map(|v| {
                    let m = mates.get(v.cluster.as_str()).into_iter().flatten();
                    score::pooled_cloud(v, m.copied())
                })
                .collect()
        } else {
            vec![None; views.len()]
        };
        for (mut v, p) in views.into_iter().zip(pooled) {
            v.pooled_cloud = p;
            d.views.insert(v.name.clone(), (Arc::new(v), now));
        }
        d.holdings = Holdings::new(
            d.views
                .values()
                .filter(|(_, at)| self.fresh(at))
                .map(|(v, _)| &**v),
        );
        *self.snapshot.lock() = Arc::new(d);
    }

    /// A node's view from its published index and measurements.
    fn view_of(
        &self,
        name: &str,
        index: &CacheIndex,
        links: &HashMap<String, LinkStats>,
    ) -> NodeView {
        let mut v = NodeView {
            name: name.to_string(),
            cluster: self.cluster_of(name),
            ..NodeView::default()
        };
        v.whole = index.blobs.iter().map(|b| b.digest.clone()).collect();
        v.partial = index
            .partial
            .iter()
            .map(|l| (l.digest.clone(), l.ranges.iter().map(|(s, e)| e - s).sum()))
            .collect();
        v.cache_room = index.budget;
        // `breakfs node --relay HOST`: the registries it relays for.
        v.relays = !index.relay.is_empty();
        let link = |l: &LinkStats, d: Link| Link {
            rtt_ms: l.rtt_ms.unwrap_or(d.rtt_ms),
            mbps: l.bandwidth_mbps.unwrap_or(d.mbps),
        };
        v.cloud = links.get("cloud").map(|l| link(l, DEFAULT_CLOUD));
        for n in self.node_entries().iter() {
            if let Some(l) = links.get(n.url.trim_end_matches('/')) {
                // What was not measured of a peer in another cluster is
                // taken as a link across clusters, not as one within.
                let default = if n.cluster == v.cluster {
                    DEFAULT_PEER
                } else {
                    DEFAULT_FAR_PEER
                };
                v.peers.insert(n.name.clone(), link(l, default));
            }
        }
        v
    }

    fn cluster_of(&self, name: &str) -> String {
        self.node_entries()
            .iter()
            .find(|n| n.name == name)
            .map_or_else(default_cluster, |e| e.cluster.clone())
    }

    /// The view of node `name` in `d` (an unwatched or stale node: nothing
    /// cached, nothing measured).
    pub(crate) fn view(&self, d: &Snapshot, name: &str) -> Arc<NodeView> {
        match d.views.get(name) {
            Some((v, at)) if self.fresh(at) => v.clone(),
            _ => Arc::new(NodeView {
                name: name.to_string(),
                cluster: self.cluster_of(name),
                ..NodeView::default()
            }),
        }
    }

    /// Resources and links the daemons' views lack: allocatable from the
    /// request's nodes, else the Kubernetes API's; requested from the API
    /// (the pods bound to the node), else the `breakfs.io/requested-cpu` /
    /// `-memory` labels; the registry link from the node's labels when its
    /// daemon was not heard from.
    pub(crate) fn fill_resources(&self, views: &mut [Arc<NodeView>], nodes: &[Node]) {
        let cluster = self.cluster.lock().clone();
        // By name: with 1,000 nodes, a search per node took a million compares.
        let by_name: rustc_hash::FxHashMap<&str, &Node> = nodes
            .iter()
            .filter_map(|n| n.name().map(|x| (x, n)))
            .collect();
        for v in views {
            let given = by_name.get(v.name.as_str()).copied();
            let known = cluster.get(&v.name);
            if given.is_none() && known.is_none() {
                continue;
            }
            // The estimates are made: what is read from here on is the
            // registry link, room and resources, not the layer sets.
            *v = Arc::new(v.without_layers());
            let v = Arc::make_mut(v);
            if let Some(n) = given {
                if let (Some(cpu), Some(mem)) = (n.allocatable("cpu"), n.allocatable("memory")) {
                    v.allocatable = Some((cpu, mem));
                }
                let q = |k| n.label(k).and_then(parse_quantity).unwrap_or(0.0);
                v.requested = (
                    q("breakfs.io/requested-cpu"),
                    q("breakfs.io/requested-memory"),
                );
                if v.cloud.is_none()
                    && let (Some(rtt), Some(bw)) = (n.label(LABEL_RTT), n.label(LABEL_BW))
                {
                    let labels = [(LABEL_RTT, rtt), (LABEL_BW, bw)]
                        .into_iter()
                        .map(|(k, x)| (k.to_string(), x.to_string()))
                        .collect();
                    v.cloud = link_from_labels(&labels);
                }
            }
            if let Some(k) = known {
                if v.allocatable.is_none() {
                    v.allocatable = k.allocatable;
                }
                v.requested = k.requested;
                if v.cloud.is_none() {
                    v.cloud = k.link;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_flags_name_url_and_cluster() {
        let n: super::NodeEntry = "edge-1=http://10.0.0.1:7480@east".parse().expect("parses");
        assert_eq!(
            (n.name.as_str(), n.url.as_str(), n.cluster.as_str()),
            ("edge-1", "http://10.0.0.1:7480", "east")
        );
        let n: super::NodeEntry = "b=http://h:1".parse().expect("parses");
        assert_eq!(n.cluster, "default");
        let e = "nope".parse::<super::NodeEntry>().expect_err("no NAME=URL");
        assert!(e.to_string().contains("NAME=URL@CLUSTER"), "{e}");
    }

    fn two_clusters() -> Directory {
        let entry = |name: &str, cluster: &str| NodeEntry {
            name: name.into(),
            url: format!("http://{name}:7480"),
            cluster: cluster.into(),
        };
        let nodes = vec![
            entry("w1", "west"),
            entry("w2", "west"),
            entry("e1", "east"),
        ];
        Directory::new(nodes, 30.0, None).unwrap()
    }

    #[test]
    fn labels_round_trip_a_link() {
        let l = Link {
            rtt_ms: 42.4,
            mbps: 7.25,
        };
        let labels = labels_for(&l);
        assert_eq!(labels[LABEL_RTT], "42");
        assert_eq!(labels[LABEL_BW], "7.2");
        assert_eq!(
            link_from_labels(&labels),
            Some(Link {
                rtt_ms: 42.0,
                mbps: 7.2
            })
        );
        let mut bad = labels.clone();
        bad.insert(LABEL_BW.into(), "fast".into());
        assert_eq!(link_from_labels(&bad), None);
    }

    #[test]
    fn relaying_nodes_pool_their_cluster_mates_registry_links_polled_now_or_before() {
        let d = two_clusters();
        let view = |name: &str, cluster: &str, mbps: f64| NodeView {
            name: name.into(),
            cluster: cluster.into(),
            cloud: Some(Link { rtt_ms: 50.0, mbps }),
            relays: true,
            ..NodeView::default()
        };
        let pooled = |name: &str| d.snapshot().views[name].0.pooled_cloud;
        d.update(vec![
            view("w1", "west", 100.0),
            view("w2", "west", 40.0),
            view("e1", "east", 10.0),
        ]);
        assert_eq!(pooled("w1").map(|l| l.mbps), Some(140.0));
        assert_eq!(pooled("w2").map(|l| l.mbps), Some(140.0));
        // e1 has no relaying mate in its cluster.
        assert_eq!(pooled("e1"), None);
        // Polled alone, w1 still pools w2's link from the directory.
        d.update(vec![view("w1", "west", 60.0)]);
        assert_eq!(pooled("w1").map(|l| l.mbps), Some(100.0));
        // A node that stops relaying gets its own link only.
        let mut quiet = view("w2", "west", 40.0);
        quiet.relays = false;
        d.update(vec![quiet]);
        assert_eq!(pooled("w2"), None);
    }

    #[test]
    fn peers_in_another_cluster_get_the_far_defaults() {
        let d = two_clusters();
        let stats = |rtt: f64| LinkStats {
            rtt_ms: Some(rtt),
            ..LinkStats::default()
        };
        let links: HashMap<String, LinkStats> = [
            ("http://w2:7480".to_string(), stats(1.0)),
            ("http://e1:7480".to_string(), stats(25.0)),
            ("cloud".to_string(), stats(90.0)),
        ]
        .into_iter()
        .collect();
        let v = d.view_of("w1", &CacheIndex::default(), &links);
        assert_eq!(v.cluster, "west");
        assert_eq!(v.peers["w2"].mbps, DEFAULT_PEER.mbps);
        assert_eq!(v.peers["e1"].mbps, DEFAULT_FAR_PEER.mbps);
        assert_eq!(v.peers["e1"].rtt_ms, 25.0);
        assert_eq!(v.cloud.map(|l| l.rtt_ms), Some(90.0));
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_is_an_error_naming_it_and_left_out() {
        // A port that refuses: bound, then closed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let gone = NodeEntry {
            name: "gone".into(),
            url: url.clone(),
            cluster: "west".into(),
        };
        let d = Directory::new(vec![gone.clone()], 30.0, None).unwrap();
        let e = d.poll_one(&gone).await.unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("gone at {url}/cache/index")),
            "{}",
            breakfs_index::Causes(&e)
        );
        assert!(d.poll().await.is_empty());
    }
}
