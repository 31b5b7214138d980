//! The extender HTTP service: `POST {prefix}/filter`, `POST
//! {prefix}/prioritize`, `GET {prefix}/plan`, and the node directory it
//! scores from (cache indexes and measurements polled from node daemons).
//!
//! kube-scheduler calls the extender verbs without credentials (its
//! extender config has `tlsConfig` but no bearer token), so they stay
//! open; `/plan`, which counts a placement, needs the bearer token when one
//! is configured, and the same token goes to the node daemons. Request
//! bodies are limited to `maxBodySize`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakfs_fetch::guard::{self, Token};
use breakfs_fetch::{ClientOptions, Store};
use breakfs_index::{CacheIndex, LinkStats, MAX_INDEX};
use breakfs_index::{Digest, ImageRef};
use serde::{Deserialize, Serialize};

use crate::k8s::ClusterNode;
use crate::score::{
    self, DEFAULT_CLOUD, DEFAULT_FAR_PEER, DEFAULT_PEER, Holdings, Layer, Link, NodeView, Weights,
};
use crate::types::{ExtenderArgs, ExtenderFilterResult, HostPriority, NodeList, Pod};

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

fn default_cluster() -> String {
    "default".into()
}

/// The service's configuration (YAML, in the spirit of the paper's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// URL prefix of the extender verbs (`urlPrefix` in the scheduler's
    /// extender config ends here).
    #[serde(default)]
    pub prefix: String,
    /// Score weights.
    #[serde(flatten)]
    pub weights: Weights,
    /// Bytes of cache per cluster the prefetch planner may fill
    /// (e.g. `26Gi`).
    #[serde(default)]
    pub cache_sum_size: Option<String>,
    /// The node daemons to watch.
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    /// Talk plain HTTP to registries.
    #[serde(default)]
    pub plain_http: bool,
    /// Seconds between polls of each node daemon.
    #[serde(default = "default_poll")]
    pub poll_secs: f64,
    /// A node's data older than this many seconds is not trusted.
    #[serde(default = "default_stale")]
    pub stale_secs: f64,
    /// Seconds between runs of the prefetch planner (when `cacheSumSize`
    /// is set).
    #[serde(default = "default_plan")]
    pub plan_secs: f64,
    /// The Kubernetes API, when the service runs in a cluster.
    #[serde(default)]
    pub kubernetes: KubeSettings,
    /// A file holding the bearer token `/plan` requires and the node
    /// daemons are sent (their `--token-file`).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Request bodies larger than this are refused with 413 (a quantity
    /// like `32Mi`): `ExtenderArgs` in the `Nodes` form carry whole Node
    /// objects, about 6.5 KB each.
    #[serde(default = "default_max_body")]
    pub max_body_size: String,
}

fn default_max_body() -> String {
    "32Mi".into()
}

/// How the service uses the Kubernetes API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSettings {
    /// Watch Nodes and Pods (resources for `NodeNames` requests, node
    /// daemons announced by the `breakfs.io/daemon-url` annotation).
    #[serde(default)]
    pub enabled: bool,
    /// The API's URL without credentials (e.g. `kubectl proxy`'s); unset:
    /// in-cluster service account or kubeconfig.
    #[serde(default)]
    pub url: Option<String>,
    /// Publish each node's measured registry link as node labels
    /// (`breakfs.io/rtt-registry-ms`, `breakfs.io/bw-registry-mbps`).
    #[serde(default = "yes")]
    pub publish_labels: bool,
    /// Seconds between syncs with the API's view.
    #[serde(default = "default_sync")]
    pub sync_secs: f64,
}

fn yes() -> bool {
    true
}
fn default_sync() -> f64 {
    10.0
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            enabled: false,
            url: None,
            publish_labels: true,
            sync_secs: default_sync(),
        }
    }
}

fn default_plan() -> f64 {
    30.0
}

fn default_listen() -> String {
    "0.0.0.0:7490".into()
}
fn default_poll() -> f64 {
    2.0
}
fn default_stale() -> f64 {
    30.0
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            listen: default_listen(),
            prefix: String::new(),
            weights: Weights::default(),
            cache_sum_size: None,
            nodes: Vec::new(),
            plain_http: false,
            poll_secs: default_poll(),
            stale_secs: default_stale(),
            plan_secs: default_plan(),
            kubernetes: KubeSettings::default(),
            token_file: None,
            max_body_size: default_max_body(),
        }
    }
}

impl SchedConfig {
    /// Parse a YAML config.
    pub fn from_yaml(text: &str) -> Result<SchedConfig, String> {
        let c: SchedConfig = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        c.max_body()?;
        Ok(c)
    }

    /// `maxBodySize` in bytes.
    pub fn max_body(&self) -> Result<usize, String> {
        crate::types::parse_quantity(&self.max_body_size)
            .filter(|n| *n >= 1.0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                format!(
                    "maxBodySize {:?} is not a size like 32Mi or 1000000",
                    self.max_body_size
                )
            })
    }
}

/// What the service knows of every node, rebuilt after each poll and read
/// by requests without copying.
#[derive(Default)]
pub struct Directory {
    /// Node views by name, with when they were polled.
    views: rustc_hash::FxHashMap<String, (Arc<NodeView>, Instant)>,
    /// Which node of the fresh views holds which layer whole.
    holdings: Holdings,
}

/// The service state.
pub struct Sched {
    cfg: SchedConfig,
    client: ClientOptions,
    http: reqwest::Client,
    directory: Mutex<Arc<Directory>>,
    images: Mutex<HashMap<String, (Vec<Layer>, Instant)>>,
    /// Resolutions under way, by image: calls that need the image
    /// meanwhile wait for the one resolution instead of each asking the
    /// registry.
    resolving: Mutex<HashMap<String, Resolving>>,
    /// Layer popularity fed by placements (decayed by the hour), with the
    /// layer's size and an image it belongs to.
    popularity: Mutex<HashMap<Digest, Popular>>,
    /// Prefetches asked for, by node and layer, and when: counted as held
    /// by the planner until the node's index shows them (then forgotten:
    /// the index says the rest) or they expire, so a layer in flight is not
    /// asked of a second node.
    asked: Mutex<HashMap<(String, Digest), Instant>>,
    /// Planner runs so far.
    plan_runs: std::sync::atomic::AtomicU64,
    /// The node daemons: the configured ones, then those discovered from
    /// node annotations.
    entries: Mutex<Arc<Vec<NodeEntry>>>,
    /// What the Kubernetes API says of each node (empty without it).
    cluster: Mutex<Arc<HashMap<String, ClusterNode>>>,
    /// The bearer token `/plan` requires and requests to nodes carry.
    token: Option<Token>,
}

/// Node daemons polled at once. Each poll holds the node's cache index
/// (about 50 KB for 500 layers) until it is made a view: polling 1,000
/// nodes all at once and keeping every answer until the last one came
/// grew an idle service from 170 to 600 MiB.
const POLLS_IN_FLIGHT: usize = 128;

/// How long an asked-for prefetch counts as held without showing up.
const ASKED_TTL: Duration = Duration::from_secs(600);

/// A layer's popularity record.
#[derive(Clone, Debug)]
struct Popular {
    score: f64,
    at: Instant,
    size: u64,
    image: String,
}

impl Popular {
    fn now(&self) -> f64 {
        self.score * 0.5f64.powf(self.at.elapsed().as_secs_f64() / 3600.0)
    }
}

/// How long a resolved tag is trusted.
const IMAGE_TTL: Duration = Duration::from_secs(60);

/// One image's resolution, awaited by every call that needs it meanwhile.
type Resolving =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<Vec<Layer>, String>>>;

impl Sched {
    /// A service for `cfg`, without a token.
    pub fn new(cfg: SchedConfig) -> Arc<Sched> {
        Sched::with_token(cfg, None)
    }

    /// A service for `cfg` whose `/plan` requires `token` and whose
    /// requests to node daemons carry it.
    pub fn with_token(cfg: SchedConfig, token: Option<Token>) -> Arc<Sched> {
        let client = ClientOptions {
            plain_http: cfg.plain_http,
            ..ClientOptions::default()
        };
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(mut v) = token
            .as_ref()
            .and_then(|t| reqwest::header::HeaderValue::from_str(&t.bearer()).ok())
        {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        Arc::new(Sched {
            client,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .default_headers(headers)
                .build()
                .unwrap_or_default(),
            token,
            directory: Mutex::new(Arc::new(Directory::default())),
            images: Mutex::new(HashMap::new()),
            resolving: Mutex::new(HashMap::new()),
            popularity: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashMap::new()),
            plan_runs: std::sync::atomic::AtomicU64::new(0),
            entries: Mutex::new(Arc::new(cfg.nodes.clone())),
            cluster: Mutex::new(Arc::new(HashMap::new())),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    /// The node daemons watched: configured and discovered.
    pub fn node_entries(&self) -> Arc<Vec<NodeEntry>> {
        lock(&self.entries).clone()
    }

    /// Take what the Kubernetes API says of the nodes: resources, labelled
    /// links, and node daemons announced by annotation (added to those
    /// watched; a configured entry wins).
    pub fn set_cluster(&self, nodes: HashMap<String, ClusterNode>) {
        let mut entries = self.cfg.nodes.clone();
        for n in nodes.values() {
            if let Some(d) = &n.daemon
                && !entries.iter().any(|e| e.name == d.name)
            {
                entries.push(d.clone());
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        *lock(&self.entries) = Arc::new(entries);
        *lock(&self.cluster) = Arc::new(nodes);
    }

    /// The registry links the node daemons measured (fresh views only).
    pub fn measured_links(&self) -> Vec<(String, Link)> {
        let d = lock(&self.directory).clone();
        let mut out: Vec<(String, Link)> = d
            .views
            .iter()
            .filter(|(_, (_, at))| at.elapsed().as_secs_f64() < self.cfg.stale_secs)
            .filter_map(|(name, (v, _))| Some((name.clone(), v.cloud?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Poll every node daemon once, [`POLLS_IN_FLIGHT`] at a time, each
    /// answer made into a view as it arrives.
    pub async fn poll(&self) {
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
                Some(view) => fresh.extend(view),
                None => break,
            }
        }
        self.update(fresh);
    }

    /// Poll one node daemon: its view, or `None` (logged) if it failed.
    async fn poll_one(&self, n: &NodeEntry) -> Option<NodeView> {
        let get = |path: &'static str| {
            let url = format!("{}{path}", n.url.trim_end_matches('/'));
            async move {
                let r = self.http.get(url).send().await.map_err(|e| e.to_string())?;
                let r = r.error_for_status().map_err(|e| e.to_string())?;
                guard::body_within(r, MAX_INDEX, path)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let polled = async {
            let index: CacheIndex =
                serde_json::from_slice(&get("/cache/index").await?).map_err(|e| e.to_string())?;
            let m: serde_json::Value =
                serde_json::from_slice(&get("/measurements").await?).map_err(|e| e.to_string())?;
            Ok::<_, String>((index, m))
        };
        match polled.await {
            Ok((index, m)) => {
                let links: HashMap<String, LinkStats> =
                    serde_json::from_value(m["links"].clone()).unwrap_or_default();
                Some(self.view_of(&n.name, &index, &links))
            }
            Err(e) => {
                tracing::debug!(node = %n.name, "polling the node daemon failed: {e}");
                None
            }
        }
    }

    /// Replace the views of the nodes in `views` (polled now) and rebuild
    /// the cluster holder maps; the simulation and benchmarks feed views
    /// here directly.
    pub fn update(&self, views: Vec<NodeView>) {
        let old = lock(&self.directory).clone();
        let mut d = Directory {
            views: old.views.clone(),
            holdings: Holdings::default(),
        };
        let now = Instant::now();
        // A prefetch asked of a node is done once its index shows the
        // layer: from then on the index says whether the node still holds
        // it (counted as held until the TTL, a layer the node evicted
        // would not be planned again for that long).
        {
            let mut asked = lock(&self.asked);
            if !asked.is_empty() {
                let polled: HashMap<&str, &NodeView> =
                    views.iter().map(|v| (v.name.as_str(), v)).collect();
                asked.retain(|(node, l), _| {
                    !polled
                        .get(node.as_str())
                        .is_some_and(|v| v.whole.contains(l))
                });
            }
        }
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
                .filter(|(_, at)| at.elapsed().as_secs_f64() < self.cfg.stale_secs)
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
        let stale = self.cfg.stale_secs;
        d.holdings = Holdings::new(
            d.views
                .values()
                .filter(|(_, at)| at.elapsed().as_secs_f64() < stale)
                .map(|(v, _)| &**v),
        );
        *lock(&self.directory) = Arc::new(d);
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

    /// Poll every `poll_secs` until the process ends.
    pub fn spawn_polling(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let every = Duration::from_secs_f64(self.cfg.poll_secs.max(0.1));
        tokio::spawn(async move {
            loop {
                let Some(s) = me.upgrade() else { return };
                s.poll().await;
                drop(s);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The view of node `name` in `d` (an unwatched or stale node: nothing
    /// cached, nothing measured).
    fn view(&self, d: &Directory, name: &str) -> Arc<NodeView> {
        match d.views.get(name) {
            Some((v, at)) if at.elapsed().as_secs_f64() < self.cfg.stale_secs => v.clone(),
            _ => Arc::new(NodeView {
                name: name.to_string(),
                cluster: self.cluster_of(name),
                ..NodeView::default()
            }),
        }
    }

    /// Take `layers` as the layers of `image` for a while (the simulation
    /// and benchmarks have no registry).
    pub fn set_image(&self, image: &str, layers: Vec<Layer>) {
        let mut images = lock(&self.images);
        // Forget what expired, so the map holds only images of the last TTL.
        images.retain(|_, (_, at)| at.elapsed() < IMAGE_TTL);
        images.insert(image.to_string(), (layers, Instant::now()));
    }

    /// The layers of `image` (a pod's image reference), resolved and cached.
    /// Concurrent calls for an image not cached share one resolution (a
    /// burst of 1,000 calls for a new image asked the registry 278 times).
    pub async fn layers(&self, image: &str) -> Result<Vec<Layer>, String> {
        if let Some((l, at)) = lock(&self.images).get(image)
            && at.elapsed() < IMAGE_TTL
        {
            return Ok(l.clone());
        }
        let pending = lock(&self.resolving)
            .entry(image.to_string())
            .or_insert_with(|| {
                use futures::FutureExt as _;
                resolve_layers(image.to_string(), self.client.clone())
                    .boxed()
                    .shared()
            })
            .clone();
        let out = pending.clone().await;
        // Whoever sees it end first files the answer (the call that started
        // it may have been dropped meanwhile).
        let mut resolving = lock(&self.resolving);
        if resolving.get(image).is_some_and(|p| p.ptr_eq(&pending)) {
            resolving.remove(image);
            if let Ok(l) = &out {
                self.set_image(image, l.clone());
            }
        }
        out
    }

    /// Views and estimates of `names` for `pod`.
    async fn evaluate(
        &self,
        pod: &Pod,
        names: &[String],
    ) -> (Vec<Arc<NodeView>>, Vec<score::Estimate>) {
        let mut layers = Vec::new();
        for c in &pod.spec.containers {
            match self.layers(&c.image).await {
                Ok(l) => layers.extend(l),
                Err(e) => {
                    tracing::warn!(image = %c.image, "cannot resolve the image, scoring without it: {e}")
                }
            }
        }
        let d = lock(&self.directory).clone();
        let views: Vec<Arc<NodeView>> = names.iter().map(|n| self.view(&d, n)).collect();
        let refs: Vec<&NodeView> = views.iter().map(|v| v.as_ref()).collect();
        let ests = d.holdings.estimate_times(&refs, &layers);
        (views, ests)
    }

    /// The extender's filter.
    pub async fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        let pod = args.pod.unwrap_or_default();
        let (names, nodes) = candidate_names(&args.nodes, &args.node_names);
        let limits = pod.limits();
        let (mut views, ests) = self.evaluate(&pod, &names).await;
        fill_resources(&mut views, nodes, &lock(&self.cluster).clone());
        let mut result = ExtenderFilterResult::default();
        let mut passed = Vec::new();
        for (v, e) in views.iter().zip(&ests) {
            match score::refuse(v, e, &limits) {
                Some(why) => {
                    result.failed_nodes.insert(v.name.clone(), why);
                }
                None => passed.push(v.name.clone()),
            }
        }
        match args.nodes {
            Some(list) => {
                let passed: rustc_hash::FxHashSet<&str> =
                    passed.iter().map(|p| p.as_str()).collect();
                result.nodes = Some(NodeList {
                    items: list
                        .items
                        .into_iter()
                        .filter(|n| n.name().is_some_and(|x| passed.contains(x)))
                        .collect(),
                    rest: list.rest,
                });
            }
            None => result.node_names = Some(passed),
        }
        result
    }

    /// The extender's prioritize.
    pub async fn prioritize(&self, args: ExtenderArgs) -> Vec<HostPriority> {
        let pod = args.pod.unwrap_or_default();
        let (names, nodes) = candidate_names(&args.nodes, &args.node_names);
        let (mut views, ests) = self.evaluate(&pod, &names).await;
        fill_resources(&mut views, nodes, &lock(&self.cluster).clone());
        let refs: Vec<&NodeView> = views.iter().map(|v| v.as_ref()).collect();
        let pod_req = (pod.request("cpu"), pod.request("memory"));
        score::scores(&refs, &ests, pod_req, &self.cfg.weights)
            .into_iter()
            .zip(&views)
            .map(|((s, _), v)| HostPriority {
                host: v.name.clone(),
                score: s,
            })
            .collect()
    }

    /// Where each layer of `image` should come from for `node`; counts as
    /// a placement for popularity.
    pub async fn plan(&self, image: &str, node: &str) -> Result<score::Estimate, String> {
        let layers = self.layers(image).await?;
        let d = lock(&self.directory).clone();
        let v = self.view(&d, node);
        let est = d.holdings.estimate(&v, &layers);
        let mut pop = lock(&self.popularity);
        for l in &layers {
            let e = pop.entry(l.digest.clone()).or_insert(Popular {
                score: 0.0,
                at: Instant::now(),
                size: l.size,
                image: image.to_string(),
            });
            e.score = e.now() + 1.0;
            e.at = Instant::now();
        }
        Ok(est)
    }

    /// Run the prefetch planner every `planSecs` when `cacheSumSize` is set.
    pub fn spawn_planner(self: &Arc<Self>) {
        let Some(sum) = self
            .cfg
            .cache_sum_size
            .as_deref()
            .and_then(crate::types::parse_quantity)
        else {
            return;
        };
        let me = Arc::downgrade(self);
        let every = Duration::from_secs_f64(self.cfg.plan_secs.max(0.1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = me.upgrade() else { return };
                s.plan_once(sum as u64).await;
            }
        });
    }

    /// One planner run: per cluster, the hottest layers placed within
    /// `sum` bytes, pushed to the node daemons with `POST /prefetch`.
    pub async fn plan_once(&self, sum: u64) {
        let hot: Vec<(crate::planner::Hot, String)> = lock(&self.popularity)
            .iter()
            .map(|(d, p)| {
                (
                    crate::planner::Hot {
                        digest: d.clone(),
                        size: p.size,
                        popularity: p.now(),
                    },
                    p.image.clone(),
                )
            })
            .collect();
        if hot.is_empty() {
            return;
        }
        let layers: Vec<crate::planner::Hot> = hot.iter().map(|(h, _)| h.clone()).collect();
        let pop_of: HashMap<Digest, f64> = layers
            .iter()
            .map(|h| (h.digest.clone(), h.popularity))
            .collect();
        let image_of: HashMap<Digest, String> =
            hot.into_iter().map(|(h, i)| (h.digest, i)).collect();
        let d = lock(&self.directory).clone();
        let mut clusters: HashMap<String, Vec<Arc<NodeView>>> = HashMap::new();
        // Layers some node at the edge holds whole, and those on their way
        // to one: a layer goes from the cloud into one cluster only; the
        // others wait until it is there and then take it from that peer
        // (closer than the registry, and the cloud link stays free).
        let mut at_edge: rustc_hash::FxHashSet<Digest> = Default::default();
        let mut in_flight: rustc_hash::FxHashSet<Digest> = Default::default();
        {
            let mut asked = lock(&self.asked);
            asked.retain(|_, at| at.elapsed() < ASKED_TTL);
            for n in self.node_entries().iter() {
                let mut v = self.view(&d, &n.name);
                at_edge.extend(v.whole.iter().cloned());
                let pending: Vec<Digest> = asked
                    .keys()
                    .filter(|(node, l)| *node == n.name && !v.whole.contains(l))
                    .map(|(_, l)| l.clone())
                    .collect();
                if !pending.is_empty() {
                    in_flight.extend(pending.iter().cloned());
                    Arc::make_mut(&mut v).whole.extend(pending);
                }
                clusters.entry(n.cluster.clone()).or_default().push(v);
            }
        }
        // Clusters in turn, starting one further each run, so that first
        // copies spread over the clusters.
        let mut order: Vec<&String> = clusters.keys().collect();
        order.sort();
        let turn = self
            .plan_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !order.is_empty() {
            let k = turn as usize % order.len();
            order.rotate_left(k);
        }
        for cluster in order {
            let refs: Vec<&NodeView> = clusters[cluster].iter().map(|v| v.as_ref()).collect();
            let plan = crate::planner::plan_prefetch(&refs, &layers, sum);
            let plan = crate::planner::edge_first(plan, &at_edge, &mut in_flight);
            // One request per node and image.
            let mut asks: HashMap<(String, String), Vec<Digest>> = HashMap::new();
            for (node, digest) in plan {
                if let Some(image) = image_of.get(&digest) {
                    asks.entry((node, image.clone())).or_default().push(digest);
                }
            }
            for ((node, image), digests) in asks {
                let Some(url) = self
                    .node_entries()
                    .iter()
                    .find(|n| n.name == node)
                    .map(|n| n.url.clone())
                else {
                    continue;
                };
                let image = if image.contains("://") {
                    image
                } else {
                    format!("docker://{image}")
                };
                let popularity: BTreeMap<&Digest, f64> = digests
                    .iter()
                    .filter_map(|d| pop_of.get(d).map(|p| (d, *p)))
                    .collect();
                let body = serde_json::json!({"image": image, "layers": digests, "popularity": popularity});
                let r = self
                    .http
                    .post(format!("{}/prefetch", url.trim_end_matches('/')))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        tracing::info!(node = %node, layers = digests.len(), "prefetch planned");
                        let mut asked = lock(&self.asked);
                        for l in digests {
                            asked.insert((node.clone(), l), Instant::now());
                        }
                    }
                    Ok(r) => {
                        tracing::warn!(node = %node, status = %r.status(), "the node refused a prefetch")
                    }
                    Err(e) => tracing::warn!(node = %node, "asking for a prefetch failed: {e}"),
                }
            }
        }
    }
}

/// The candidate names, and the whole nodes when given.
fn candidate_names<'a>(
    nodes: &'a Option<NodeList>,
    names: &Option<Vec<String>>,
) -> (Vec<String>, &'a [crate::types::Node]) {
    match (nodes, names) {
        (Some(list), _) => (
            list.items
                .iter()
                .filter_map(|n| n.name().map(String::from))
                .collect(),
            &list.items,
        ),
        (None, Some(n)) => (n.clone(), &[]),
        (None, None) => (Vec::new(), &[]),
    }
}

/// Resources and links the daemons' views lack: allocatable from the
/// request's nodes, else the Kubernetes API's; requested from the API (the
/// pods bound to the node), else the `breakfs.io/requested-cpu` /
/// `-memory` labels; the registry link from the node's labels when its
/// daemon was not heard from.
fn fill_resources(
    views: &mut [Arc<NodeView>],
    nodes: &[crate::types::Node],
    cluster: &HashMap<String, ClusterNode>,
) {
    // By name: with 1,000 nodes, a search per node took a million compares.
    let by_name: rustc_hash::FxHashMap<&str, &crate::types::Node> = nodes
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
            let q = |k| {
                n.label(k)
                    .and_then(crate::types::parse_quantity)
                    .unwrap_or(0.0)
            };
            v.requested = (
                q("breakfs.io/requested-cpu"),
                q("breakfs.io/requested-memory"),
            );
            if v.cloud.is_none()
                && let (Some(rtt), Some(bw)) = (
                    n.label(crate::k8s::LABEL_RTT),
                    n.label(crate::k8s::LABEL_BW),
                )
            {
                let labels = [(crate::k8s::LABEL_RTT, rtt), (crate::k8s::LABEL_BW, bw)]
                    .into_iter()
                    .map(|(k, x)| (k.to_string(), x.to_string()))
                    .collect();
                v.cloud = crate::k8s::link_from_labels(&labels);
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

/// Resolve a pod's image reference to its layers (a bare `HOST/REPO:TAG`
/// is a registry image).
async fn resolve_layers(image: String, client: ClientOptions) -> Result<Vec<Layer>, String> {
    let r = if image.contains("://") || image.starts_with("oci:") {
        image
    } else {
        format!("docker://{image}")
    };
    let reference = ImageRef::parse(&r).map_err(|e| e.to_string())?;
    let store = Store::open(&reference, &client)
        .await
        .map_err(|e| e.to_string())?;
    let resolved = store.resolve(&reference).await.map_err(|e| e.to_string())?;
    Ok(resolved
        .layers()
        .iter()
        .map(|d| Layer {
            digest: d.digest.clone(),
            size: d.size,
        })
        .collect())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Extender calls handled at once; more wait their turn before their body
/// is read, so that what calls hold (each its `ExtenderArgs` and scores,
/// about 100 KB for 1,000 nodes) is bounded however many arrive together.
/// kube-scheduler makes one call per pod it schedules.
const VERBS_IN_FLIGHT: usize = 64;

/// The routes, under the configured prefix: the extender verbs open (at
/// most [`VERBS_IN_FLIGHT`] handled at once), `/plan` behind the token if
/// there is one, bodies within `maxBodySize`.
pub fn routes(s: Arc<Sched>) -> Router {
    let p = s.cfg.prefix.trim_end_matches('/').to_string();
    let verbs = Router::new()
        .route(&format!("{p}/filter"), post(filter))
        .route(&format!("{p}/prioritize"), post(prioritize))
        .with_state(s.clone());
    let open =
        guard::limit_in_flight(verbs, VERBS_IN_FLIGHT).route("/healthz", get(|| async { "ok\n" }));
    let control = Router::new()
        .route(&format!("{p}/plan"), get(plan))
        .with_state(s.clone());
    let control = guard::require_token(control, s.token.clone(), "scheduler");
    let max = s.cfg.max_body().unwrap_or(32 << 20);
    guard::limit_body(
        open.merge(control),
        max,
        "; raise maxBodySize in the scheduler config (--max-body-size)",
    )
}

/// A 400 answer saying why the body is not `ExtenderArgs`.
fn bad_request(why: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!(
            "the body is not an ExtenderArgs document ({{\"Pod\": ..., \"Nodes\"|\"NodeNames\": ...}}): {why}\n"
        ),
    )
        .into_response()
}

/// The request body as `ExtenderArgs`, or why not.
fn check_args(body: &[u8]) -> Result<Box<ExtenderArgs>, String> {
    // Straight into the types (no JSON tree first: this is the hot path);
    // serde would take a JSON array for a struct, so look first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("it is not a JSON object".into());
    }
    let args: ExtenderArgs = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if args.pod.is_none() {
        return Err("it has no Pod".into());
    }
    if args.nodes.is_none() && args.node_names.is_none() {
        return Err("it has neither Nodes nor NodeNames".into());
    }
    Ok(Box::new(args))
}

async fn filter(State(s): State<Arc<Sched>>, body: axum::body::Bytes) -> Response {
    match check_args(&body) {
        Ok(a) => axum::Json(s.filter(*a).await).into_response(),
        Err(why) => bad_request(why),
    }
}

async fn prioritize(State(s): State<Arc<Sched>>, body: axum::body::Bytes) -> Response {
    match check_args(&body) {
        Ok(a) => axum::Json(s.prioritize(*a).await).into_response(),
        Err(why) => bad_request(why),
    }
}

#[derive(Deserialize)]
struct PlanQuery {
    image: String,
    node: String,
}

async fn plan(
    State(s): State<Arc<Sched>>,
    q: Result<Query<PlanQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return (StatusCode::BAD_REQUEST, "give ?image=REF&node=NAME\n").into_response();
    };
    match s.plan(&q.image, &q.node).await {
        Ok(e) => axum::Json(e).into_response(),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("planning {} on {}: {e}\n", q.image, q.node),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_unknown_keys_are_refused() {
        let c = SchedConfig::from_yaml(include_str!("../deploy/sched.yaml")).unwrap();
        assert_eq!(c.weights.net_weight, 1.5);
        assert_eq!(c.weights.layer_weight, 2.0);
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.nodes[2].cluster, "west");
        assert_eq!(c.cache_sum_size.as_deref(), Some("26Gi"));
        let e = SchedConfig::from_yaml("netWeight: 1\nnetWeiht: 2\n").unwrap_err();
        assert!(e.contains("netWeiht"), "{e}");
        assert_eq!(c.max_body(), Ok(32 << 20));
        assert_eq!(c.token_file, None);
        let e = SchedConfig::from_yaml("maxBodySize: lots\n").unwrap_err();
        assert!(e.contains("maxBodySize \"lots\""), "{e}");
    }

    fn two_clusters() -> Arc<Sched> {
        let entry = |name: &str, cluster: &str| NodeEntry {
            name: name.into(),
            url: format!("http://{name}:7480"),
            cluster: cluster.into(),
        };
        Sched::new(SchedConfig {
            nodes: vec![
                entry("w1", "west"),
                entry("w2", "west"),
                entry("e1", "east"),
            ],
            ..SchedConfig::default()
        })
    }

    #[test]
    fn a_prefetch_is_no_longer_counted_as_asked_once_the_index_shows_it() {
        let s = two_clusters();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        {
            let mut asked = lock(&s.asked);
            asked.insert(("w1".into(), a.clone()), Instant::now());
            asked.insert(("w1".into(), b.clone()), Instant::now());
        }
        s.update(vec![NodeView {
            name: "w1".into(),
            cluster: "west".into(),
            whole: [a.clone()].into_iter().collect(),
            ..NodeView::default()
        }]);
        // Shown: from now on the index alone says whether w1 holds it (an
        // eviction makes it plannable again); b is still on its way.
        let asked = lock(&s.asked);
        assert!(!asked.contains_key(&("w1".into(), a)));
        assert!(asked.contains_key(&("w1".into(), b)));
    }

    #[test]
    fn relaying_nodes_pool_their_cluster_mates_registry_links_polled_now_or_before() {
        let s = two_clusters();
        let view = |name: &str, cluster: &str, mbps: f64| NodeView {
            name: name.into(),
            cluster: cluster.into(),
            cloud: Some(Link { rtt_ms: 50.0, mbps }),
            relays: true,
            ..NodeView::default()
        };
        let pooled = |name: &str| lock(&s.directory).views[name].0.pooled_cloud;
        s.update(vec![
            view("w1", "west", 100.0),
            view("w2", "west", 40.0),
            view("e1", "east", 10.0),
        ]);
        assert_eq!(pooled("w1").map(|l| l.mbps), Some(140.0));
        assert_eq!(pooled("w2").map(|l| l.mbps), Some(140.0));
        // e1 has no relaying mate in its cluster.
        assert_eq!(pooled("e1"), None);
        // Polled alone, w1 still pools w2's link from the directory.
        s.update(vec![view("w1", "west", 60.0)]);
        assert_eq!(pooled("w1").map(|l| l.mbps), Some(100.0));
        // A node that stops relaying gets its own link only.
        let mut quiet = view("w2", "west", 40.0);
        quiet.relays = false;
        s.update(vec![quiet]);
        assert_eq!(pooled("w2"), None);
    }

    #[test]
    fn peers_in_another_cluster_get_the_far_defaults_and_serve_what_the_cluster_lacks() {
        let s = two_clusters();
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
        let v = s.view_of("w1", &CacheIndex::default(), &links);
        assert_eq!(v.cluster, "west");
        assert_eq!(v.peers["w2"].mbps, DEFAULT_PEER.mbps);
        assert_eq!(v.peers["e1"].mbps, DEFAULT_FAR_PEER.mbps);
        assert_eq!(v.peers["e1"].rtt_ms, 25.0);
        // A layer only the other cluster holds: /plan sends w1 there.
        let l = Layer {
            digest: Digest::of(b"layer"),
            size: 50_000_000,
        };
        let east = NodeView {
            name: "e1".into(),
            cluster: "east".into(),
            whole: [l.digest.clone()].into_iter().collect(),
            ..NodeView::default()
        };
        s.update(vec![v, east]);
        s.set_image("reg/app:1", vec![l]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(s.plan("reg/app:1", "w1")).unwrap();
        assert_eq!(
            e.plan[0].from,
            score::From::Peer { node: "e1".into() },
            "{e:?}"
        );
    }

    /// A registry on loopback that answers `/v2/` and, slowly, 404 to
    /// every manifest; the manifest requests it got.
    async fn slow_registry() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let answer = if head.contains("/manifests/") {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
                        };
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (host, asked)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_for_one_image_resolve_it_once() {
        let (host, asked) = slow_registry().await;
        let s = Sched::new(SchedConfig {
            plain_http: true,
            ..SchedConfig::default()
        });
        let image = format!("{host}/app:v1");
        let calls = (0..50).map(|_| s.layers(&image));
        let results = futures::future::join_all(calls).await;
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        // One resolution for the 50 calls (it failed: the next call asks again).
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(lock(&s.resolving).is_empty());
        assert!(s.layers(&image).await.is_err());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn bodies_that_are_not_extender_args_are_refused_with_a_reason() {
        for (body, why) in [
            (&b"[]"[..], "not a JSON object"),
            (b"{}", "no Pod"),
            (b"{\"Pod\": {}}", "neither Nodes nor NodeNames"),
            (b"{\"Pod\": {}, \"NodeNames\": 3}", "invalid type"),
        ] {
            let e = check_args(body).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let a = check_args(b"{\"Pod\": {}, \"NodeNames\": [\"n\"], \"X\": 1}").unwrap();
        assert_eq!(a.node_names.unwrap(), vec!["n"]);
    }
}
