//! The kube-scheduler extender wire types (`k8s.io/kube-scheduler/extender/v1`)
//! and the parts of `v1.Pod` and `v1.Node` the service reads. Field names on
//! the wire are the Go names (`NodeNames`, `FailedNodes`); the embedded Pod
//! and Node keep Kubernetes' camelCase. Unknown fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `ExtenderArgs`: the pod and its candidate nodes, either whole
/// (`Nodes`) or by name (`NodeNames`, node-cache-capable mode).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs {
    /// The pod being scheduled.
    #[serde(default)]
    pub pod: Option<Pod>,
    /// Candidate nodes, whole.
    #[serde(default)]
    pub nodes: Option<NodeList>,
    /// Candidate nodes, by name.
    #[serde(default)]
    pub node_names: Option<Vec<String>>,
}

/// `ExtenderFilterResult`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult {
    /// Nodes that passed, whole (when the request had `Nodes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// Nodes that passed, by name (when the request had `NodeNames`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    /// Nodes filtered out, with the reason in words.
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes filtered out that preemption cannot help.
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// An error that fails the whole call.
    pub error: String,
}

/// `HostPriority`: one node's score, 0–10.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HostPriority {
    /// The node name.
    pub host: String,
    /// 0 (worst) to 10 (best).
    pub score: i64,
}

/// `v1.NodeList`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeList {
    /// The nodes.
    #[serde(default)]
    pub items: Vec<Node>,
    /// Everything else, passed back unchanged.
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

/// `v1.Node`, kept whole (so that a filter result returns it unchanged),
/// with accessors for what scoring reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Node(pub serde_json::Value);

impl Node {
    /// `metadata.name`.
    pub fn name(&self) -> Option<&str> {
        self.0["metadata"]["name"].as_str()
    }

    /// `status.allocatable[key]` parsed as a quantity.
    pub fn allocatable(&self, key: &str) -> Option<f64> {
        parse_quantity(self.0["status"]["allocatable"][key].as_str()?)
    }

    /// `metadata.labels[key]`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.0["metadata"]["labels"][key].as_str()
    }
}

/// `v1.Pod`, the parts read.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pod {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
}

/// `metadata`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `spec`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PodSpec {
    /// Containers.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// A container.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Container {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Image reference.
    #[serde(default)]
    pub image: String,
    /// Resources.
    #[serde(default)]
    pub resources: Resources,
}

/// `resources`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Requests (`cpu`, `memory`).
    #[serde(default)]
    pub requests: BTreeMap<String, serde_json::Value>,
}

impl Pod {
    /// The pod's limits: `breakfs.io/limit-delay` (ms) and
    /// `breakfs.io/limit-bandwidth` (Mbit/s) from annotations or labels, or
    /// the talk's `limit_delay` / `limit_bandwidth` labels.
    pub fn limits(&self) -> Limits {
        let get = |keys: &[&str]| {
            keys.iter().find_map(|k| {
                self.metadata
                    .annotations
                    .get(*k)
                    .or_else(|| self.metadata.labels.get(*k))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        };
        Limits {
            delay_ms: get(&["breakfs.io/limit-delay", "limit_delay", "limit-delay"]),
            bandwidth_mbps: get(&[
                "breakfs.io/limit-bandwidth",
                "limit_bandwidth",
                "limit-bandwidth",
            ]),
        }
    }

    /// Total requests of `key` over the containers.
    pub fn request(&self, key: &str) -> f64 {
        self.spec
            .containers
            .iter()
            .filter_map(|c| c.resources.requests.get(key))
            .filter_map(|v| match v {
                serde_json::Value::String(s) => parse_quantity(s),
                serde_json::Value::Number(n) => n.as_f64(),
                _ => None,
            })
            .sum()
    }
}

/// A pod's network limits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// The highest RTT to the image's sources it accepts, in ms.
    pub delay_ms: Option<f64>,
    /// The lowest bandwidth it accepts, in Mbit/s.
    pub bandwidth_mbps: Option<f64>,
}

/// A Kubernetes quantity (`500m`, `2`, `1Gi`, `128974848`, `1.5G`).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let m = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1048576.0,
        "Gi" => 1073741824.0,
        "Ti" => 1099511627776.0,
        _ => return None,
    };
    Some(n * m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("1.5G"), Some(1.5e9));
        assert_eq!(parse_quantity("12Q"), None);
    }

    #[test]
    fn args_read_pascal_case_and_ignore_unknown_fields() {
        let a: ExtenderArgs = serde_json::from_str(
            r#"{"Pod":{"metadata":{"name":"p","annotations":{"breakfs.io/limit-delay":"25"},
                 "labels":{"limit_bandwidth":"200"}},"spec":{"containers":[{"image":"r/a:1",
                 "resources":{"requests":{"cpu":"500m","memory":"1Gi"}}}]},"status":{}},
                "NodeNames":["n1","n2"],"Extra":1}"#,
        )
        .unwrap();
        let pod = a.pod.unwrap();
        assert_eq!(pod.limits().delay_ms, Some(25.0));
        assert_eq!(pod.limits().bandwidth_mbps, Some(200.0));
        assert_eq!(pod.request("cpu"), 0.5);
        assert_eq!(a.node_names.unwrap(), vec!["n1", "n2"]);
        let r = ExtenderFilterResult {
            node_names: Some(vec!["n1".into()]),
            ..ExtenderFilterResult::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("NodeNames").is_some() && v.get("FailedNodes").is_some());
        assert!(v.get("FailedAndUnresolvableNodes").is_some() && v.get("Error").is_some());
    }
}
