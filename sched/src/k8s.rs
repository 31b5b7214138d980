//! Kubernetes glue, thin over the service: watch Nodes and Pods for what
//! the extender's node-cache-capable mode (`NodeNames`) does not send
//! (allocatable and requested resources, node labels), discover node
//! daemons from node annotations, and publish each node's measured
//! registry link as node labels, read back for nodes whose daemon is not
//! polled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::score::Link;
use crate::service::{NodeEntry, Sched};
use crate::types::parse_quantity;

/// Label: round trip from the node to the registry, ms.
pub const LABEL_RTT: &str = "breakfs.io/rtt-registry-ms";
/// Label: bandwidth from the registry to the node, Mbit/s.
pub const LABEL_BW: &str = "breakfs.io/bw-registry-mbps";
/// Label: the edge cluster a node belongs to.
pub const LABEL_CLUSTER: &str = "breakfs.io/cluster";
/// Annotation: the node daemon's URL, for discovery.
pub const ANNOTATION_DAEMON: &str = "breakfs.io/daemon-url";

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

fn quantity(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> f64 {
    q.and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0)
}

/// Per node: allocatable resources, the requests of the pods bound to it
/// (not Succeeded or Failed), its published link and daemon.
pub fn cluster_nodes(nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> HashMap<String, ClusterNode> {
    let mut out: HashMap<String, ClusterNode> = HashMap::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let alloc = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let allocatable = alloc.and_then(|a| {
            let cpu = parse_quantity(&a.get("cpu")?.0)?;
            let mem = parse_quantity(&a.get("memory")?.0)?;
            Some((cpu, mem))
        });
        let daemon = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_DAEMON))
            .map(|url| NodeEntry {
                name: name.clone(),
                url: url.clone(),
                cluster: labels
                    .get(LABEL_CLUSTER)
                    .cloned()
                    .unwrap_or_else(|| "default".into()),
            });
        out.insert(
            name,
            ClusterNode {
                allocatable,
                requested: (0.0, 0.0),
                link: link_from_labels(&labels),
                daemon,
            },
        );
    }
    for p in pods {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(entry) = out.get_mut(node) else {
            continue;
        };
        for c in p.spec.iter().flat_map(|s| &s.containers) {
            let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            entry.requested.0 += quantity(req.and_then(|r| r.get("cpu")));
            entry.requested.1 += quantity(req.and_then(|r| r.get("memory")));
        }
    }
    out
}

/// A client for the cluster: `url` when given (no credentials: a local
/// proxy such as `kubectl proxy`, or a test server), else kube's inference
/// (in-cluster service account, then `KUBECONFIG` / ~/.kube/config).
pub async fn client(url: Option<&str>) -> Result<kube::Client, String> {
    let config = match url {
        Some(u) => {
            let uri: http::Uri = u
                .parse()
                .map_err(|e| format!("the Kubernetes API URL {u:?}: {e}"))?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("finding the Kubernetes API (in-cluster or kubeconfig): {e}; give --kube-url")
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("a Kubernetes client: {e}"))
}

/// Watches of Nodes and Pods, kept in memory.
pub struct Glue {
    nodes: reflector::Store<Node>,
    pods: reflector::Store<Pod>,
    api: Api<Node>,
}

impl Glue {
    /// Start watching with `client` (the watches retry with backoff).
    pub fn start(client: kube::Client) -> Arc<Glue> {
        let api: Api<Node> = Api::all(client.clone());
        let (nodes, nw) = reflector::store::<Node>();
        let (pods, pw) = reflector::store::<Pod>();
        let ns = reflector(nw, watcher(api.clone(), watcher::Config::default())).default_backoff();
        let ps = reflector(
            pw,
            watcher(Api::<Pod>::all(client), watcher::Config::default()),
        )
        .default_backoff();
        tokio::spawn(ns.for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!("watching Kubernetes nodes: {e}");
            }
        }));
        tokio::spawn(ps.for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!("watching Kubernetes pods: {e}");
            }
        }));
        Arc::new(Glue { nodes, pods, api })
    }

    /// Wait until both watches have listed once.
    pub async fn ready(&self) -> Result<(), String> {
        self.nodes
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())?;
        self.pods
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())
    }

    /// What the watches hold now, per node.
    pub fn snapshot(&self) -> HashMap<String, ClusterNode> {
        cluster_nodes(&self.nodes.state(), &self.pods.state())
    }

    /// Publish `link` as the labels of node `name`, unless they say so
    /// already; true when a patch was sent.
    pub async fn publish(&self, name: &str, link: &Link) -> Result<bool, String> {
        let want = labels_for(link);
        let current = self
            .nodes
            .state()
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        if want.iter().all(|(k, v)| current.get(k) == Some(v)) {
            return Ok(false);
        }
        let patch = serde_json::json!({"metadata": {"labels": want}});
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("labelling node {name}: {e}"))?;
        Ok(true)
    }
}

/// Every `every`: hand the service what the cluster says of its nodes, and
/// publish the links the node daemons measured as node labels.
pub fn spawn(sched: Arc<Sched>, glue: Arc<Glue>, every: Duration, publish: bool) {
    tokio::spawn(async move {
        if let Err(e) = glue.ready().await {
            tracing::warn!("the Kubernetes watches stopped: {e}");
            return;
        }
        loop {
            sync_once(&sched, &glue, publish).await;
            tokio::time::sleep(every).await;
        }
    });
}

/// One round of [`spawn`]'s work.
pub async fn sync_once(sched: &Sched, glue: &Glue, publish: bool) {
    sched.set_cluster(glue.snapshot());
    if !publish {
        return;
    }
    for (name, link) in sched.measured_links() {
        match glue.publish(&name, &link).await {
            Ok(true) => tracing::info!(node = %name, "published the registry link as labels"),
            Ok(false) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
}
