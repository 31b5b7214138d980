//! The service: the state behind the extender verbs and the planner, and
//! the verbs themselves as methods (`filter`, `prioritize`, `plan`) over
//! the directory's views and the resolved images, callable in process
//! (benchmarks, simulation) or over HTTP (the `http` module).

use std::sync::Arc;
use std::time::Duration;

use breakfs_fetch::ClientOptions;
use breakfs_fetch::guard::Token;

use crate::config::SchedConfig;
use crate::directory::{ClusterNode, Directory, NodeEntry};
use crate::error::Result;
use crate::prefetch::Prefetch;
use crate::resolve::Resolver;
use crate::score::{self, Layer, Link, NodeView};
use crate::types::{ExtenderArgs, ExtenderFilterResult, HostPriority, Node, NodeList, Pod};

/// The service state.
pub struct Sched {
    cfg: SchedConfig,
    /// The nodes and what is known of them.
    directory: Arc<Directory>,
    /// Pods' images made into layers.
    resolver: Resolver,
    /// The prefetch planner's state.
    prefetch: Prefetch,
    /// The bearer token `/plan` requires and requests to nodes carry.
    token: Option<Token>,
}

impl Sched {
    /// A service for `cfg`, without a token.
    pub fn new(cfg: SchedConfig) -> Result<Arc<Sched>> {
        Sched::with_token(cfg, None)
    }

    /// A service for `cfg` whose `/plan` requires `token` and whose
    /// requests to node daemons carry it; an error if the client for the
    /// node daemons cannot be built.
    pub fn with_token(cfg: SchedConfig, token: Option<Token>) -> Result<Arc<Sched>> {
        let client = ClientOptions {
            plain_http: cfg.plain_http,
            ..ClientOptions::default()
        };
        Ok(Arc::new(Sched {
            directory: Arc::new(Directory::new(
                cfg.nodes.clone(),
                cfg.stale_secs,
                token.as_ref(),
            )?),
            resolver: Resolver::new(client),
            prefetch: Prefetch::default(),
            token,
            cfg,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    /// The bearer token `/plan` requires, if any.
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    /// The node directory (what the Kubernetes glue feeds).
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The node daemons watched: configured and discovered.
    pub fn node_entries(&self) -> Arc<Vec<NodeEntry>> {
        self.directory.node_entries()
    }

    /// Take what the Kubernetes API says of the nodes
    /// ([`Directory::set_cluster`]).
    pub fn set_cluster(&self, nodes: std::collections::HashMap<String, ClusterNode>) {
        self.directory.set_cluster(nodes)
    }

    /// The registry links the node daemons measured (fresh views only).
    pub fn measured_links(&self) -> Vec<(String, Link)> {
        self.directory.measured_links()
    }

    /// Poll every node daemon once and take the views of those that
    /// answered.
    pub async fn poll(&self) {
        let views = self.directory.poll().await;
        self.update(views);
    }

    /// Replace the views of the nodes in `views` (polled now); the
    /// simulation and benchmarks feed views here directly.
    pub fn update(&self, views: Vec<NodeView>) {
        self.prefetch.shown(&views);
        self.directory.update(views);
    }

    /// Poll every `poll_secs` until the service is dropped.
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

    /// Take `layers` as the layers of `image` for a while (the simulation
    /// and benchmarks have no registry).
    pub fn set_image(&self, image: &str, layers: Vec<Layer>) {
        self.resolver.set_image(image, layers)
    }

    /// The layers of `image` (a pod's image reference), resolved and cached.
    pub async fn layers(&self, image: &str) -> Result<Vec<Layer>> {
        self.resolver.layers(image).await
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
                    tracing::warn!(image = %c.image, "cannot resolve the image, scoring without it: {}", breakfs_index::Causes(&e))
                }
            }
        }
        let d = self.directory.snapshot();
        let views: Vec<Arc<NodeView>> = names.iter().map(|n| self.directory.view(&d, n)).collect();
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
        self.directory.fill_resources(&mut views, nodes);
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
        self.directory.fill_resources(&mut views, nodes);
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
    pub async fn plan(&self, image: &str, node: &str) -> Result<score::Estimate> {
        let layers = self.layers(image).await?;
        let d = self.directory.snapshot();
        let v = self.directory.view(&d, node);
        let est = d.holdings.estimate(&v, &layers);
        self.prefetch.placed(image, &layers);
        Ok(est)
    }

    /// Run the prefetch planner every `planSecs` when `cacheSumSize` is
    /// set, until the service is dropped.
    pub fn spawn_planner(self: &Arc<Self>) {
        let Ok(Some(sum)) = self.cfg.cache_sum_bytes() else {
            return;
        };
        let me = Arc::downgrade(self);
        let every = Duration::from_secs_f64(self.cfg.plan_secs.max(0.1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(s) = me.upgrade() else { return };
                s.plan_once(sum).await;
            }
        });
    }

    /// One planner run: per cluster, the hottest layers placed within
    /// `sum` bytes, pushed to the node daemons with `POST /prefetch`.
    pub async fn plan_once(&self, sum: u64) {
        self.prefetch.run_once(&self.directory, sum).await
    }
}

/// The candidate names, and the whole nodes when given.
fn candidate_names<'a>(
    nodes: &'a Option<NodeList>,
    names: &Option<Vec<String>>,
) -> (Vec<String>, &'a [Node]) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use breakfs_index::Digest;

    use super::*;

    #[test]
    fn a_layer_only_another_cluster_holds_is_planned_from_its_peer() {
        let entry = |name: &str, cluster: &str| NodeEntry {
            name: name.into(),
            url: format!("http://{name}:7480"),
            cluster: cluster.into(),
        };
        let s = Sched::new(SchedConfig {
            nodes: vec![entry("w1", "west"), entry("e1", "east")],
            ..SchedConfig::default()
        })
        .unwrap();
        let l = Layer {
            digest: Digest::of(b"layer"),
            size: 50_000_000,
        };
        let west = NodeView {
            name: "w1".into(),
            cluster: "west".into(),
            // As polled: e1 measured 25 ms away, the rest defaults.
            peers: [(
                "e1".to_string(),
                Link {
                    rtt_ms: 25.0,
                    ..score::DEFAULT_FAR_PEER
                },
            )]
            .into_iter()
            .collect(),
            cloud: Some(Link {
                rtt_ms: 90.0,
                ..score::DEFAULT_CLOUD
            }),
            ..NodeView::default()
        };
        let east = NodeView {
            name: "e1".into(),
            cluster: "east".into(),
            whole: [l.digest.clone()].into_iter().collect(),
            ..NodeView::default()
        };
        s.update(vec![west, east]);
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
}
