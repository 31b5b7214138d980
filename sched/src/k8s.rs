//! Kubernetes glue, thin over the node directory: watch Nodes and Pods for what
//! the extender's node-cache-capable mode (`NodeNames`) does not send
//! (allocatable and requested resources, node labels), discover node
//! daemons from node annotations, and publish each node's measured
//! registry link as node labels, read back for nodes whose daemon is not
//! polled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::directory::{
    ANNOTATION_DAEMON, ClusterNode, Directory, LABEL_CLUSTER, NodeEntry, default_cluster,
    labels_for, link_from_labels,
};
use crate::error::{Error, Result};
use crate::score::Link;
use crate::types::parse_quantity;

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
                    .unwrap_or_else(default_cluster),
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
pub async fn client(url: Option<&str>) -> Result<kube::Client> {
    let config = match url {
        Some(u) => {
            let uri: http::Uri = u.parse().map_err(|source| Error::KubeUrl {
                url: u.to_string(),
                source,
            })?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.map_err(Error::KubeInfer)?,
    };
    kube::Client::try_from(config).map_err(|e| Error::KubeClient(Box::new(e)))
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
                tracing::warn!("watching Kubernetes nodes: {}", breakfs_index::Causes(&e));
            }
        }));
        tokio::spawn(ps.for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!("watching Kubernetes pods: {}", breakfs_index::Causes(&e));
            }
        }));
        Arc::new(Glue { nodes, pods, api })
    }

    /// Wait until both watches have listed once.
    pub async fn ready(&self) -> Result<()> {
        self.nodes
            .wait_until_ready()
            .await
            .map_err(Error::KubeWatch)?;
        self.pods.wait_until_ready().await.map_err(Error::KubeWatch)
    }

    /// What the watches hold now, per node.
    pub fn snapshot(&self) -> HashMap<String, ClusterNode> {
        cluster_nodes(&self.nodes.state(), &self.pods.state())
    }

    /// Publish `link` as the labels of node `name`, unless they say so
    /// already; true when a patch was sent.
    pub async fn publish(&self, name: &str, link: &Link) -> Result<bool> {
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
            .map_err(|source| Error::Label {
                node: name.to_string(),
                source: Box::new(source),
            })?;
        Ok(true)
    }
}

/// Every `every`: hand the directory what the cluster says of its nodes,
/// and publish the links the node daemons measured as node labels.
pub fn spawn(directory: Arc<Directory>, glue: Arc<Glue>, every: Duration, publish: bool) {
    tokio::spawn(async move {
        if let Err(e) = glue.ready().await {
            tracing::warn!("{}", breakfs_index::Causes(&e));
            return;
        }
        loop {
            sync_once(&directory, &glue, publish).await;
            tokio::time::sleep(every).await;
        }
    });
}

/// One round of [`spawn`]'s work.
pub async fn sync_once(directory: &Directory, glue: &Glue, publish: bool) {
    directory.set_cluster(glue.snapshot());
    if !publish {
        return;
    }
    for (name, link) in directory.measured_links() {
        match glue.publish(&name, &link).await {
            Ok(true) => tracing::info!(node = %name, "published the registry link as labels"),
            Ok(false) => {}
            Err(e) => tracing::warn!("{}", breakfs_index::Causes(&e)),
        }
    }
}
