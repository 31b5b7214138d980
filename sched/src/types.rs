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
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct NodeList {
    /// The nodes.
    pub items: Vec<Node>,
    /// Everything else, passed back unchanged.
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_json::Value>,
}

// By hand: `#[serde(flatten)]` would first buffer the whole list (~6 MB
// for 1,000 nodes) as a tree, and `Node`'s raw JSON cannot come from one.
impl<'de> Deserialize<'de> for NodeList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NodeList, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = NodeList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a v1.NodeList object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<NodeList, A::Error> {
                let mut list = NodeList::default();
                while let Some(key) = m.next_key::<String>()? {
                    if key == "items" {
                        list.items = m.next_value::<Option<Vec<Node>>>()?.unwrap_or_default();
                    } else {
                        list.rest.insert(key, m.next_value()?);
                    }
                }
                Ok(list)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// `v1.Node`, kept as received (a filter result returns it unchanged),
/// with what scoring reads parsed from it. Not made a JSON tree: a
/// Nodes-form body of 1,000 nodes is about 6 MB, and the tree took most of
/// a call's time.
#[derive(Clone, Debug)]
pub struct Node {
    raw: Box<serde_json::value::RawValue>,
    read: NodeFields,
}

/// The parts of a `v1.Node` scoring reads.
#[derive(Clone, Debug, Default, Deserialize)]
struct NodeFields {
    #[serde(default)]
    metadata: NodeMeta,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeStatus {
    #[serde(default)]
    allocatable: BTreeMap<String, String>,
}

impl NodeFields {
    /// What a node of unusual shape (a `null` where an object belongs, a
    /// number where a string does) still says: the strings where they are
    /// expected, nothing else.
    fn leniently(v: &serde_json::Value) -> NodeFields {
        let strings = |m: &serde_json::Value| -> BTreeMap<String, String> {
            m.as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, x)| Some((k.clone(), x.as_str()?.to_string())))
                .collect()
        };
        NodeFields {
            metadata: NodeMeta {
                name: v["metadata"]["name"].as_str().map(String::from),
                labels: strings(&v["metadata"]["labels"]),
            },
            status: NodeStatus {
                allocatable: strings(&v["status"]["allocatable"]),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let read = serde_json::from_str(raw.get()).unwrap_or_else(|_| {
            NodeFields::leniently(&serde_json::from_str(raw.get()).unwrap_or_default())
        });
        Ok(Node { raw, read })
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl PartialEq for Node {
    fn eq(&self, other: &Node) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl Node {
    /// `metadata.name`.
    pub fn name(&self) -> Option<&str> {
        self.read.metadata.name.as_deref()
    }

    /// `status.allocatable[key]` parsed as a quantity.
    pub fn allocatable(&self, key: &str) -> Option<f64> {
        parse_quantity(self.read.status.allocatable.get(key)?)
    }

    /// `metadata.labels[key]`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.read.metadata.labels.get(key).map(String::as_str)
    }

    /// The node as received.
    pub fn json(&self) -> &str {
        self.raw.get()
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
    fn nodes_are_read_from_their_json_and_passed_back_byte_for_byte() {
        // A recorded-shape NodeList (tests/data/kube), with odd spacing kept.
        let fixture = include_str!("../../tests/data/kube/nodes.json");
        let list: NodeList = serde_json::from_str(fixture).unwrap();
        assert_eq!(list.items.len(), 4);
        assert_eq!(list.rest["kind"], "NodeList");
        let c = list
            .items
            .iter()
            .find(|n| n.name() == Some("edge-c"))
            .unwrap();
        assert_eq!(c.label("breakfs.io/rtt-registry-ms"), Some("42.5"));
        assert!(c.allocatable("cpu").unwrap() > 0.0);
        assert!(c.allocatable("memory").unwrap() > 1e9);
        let original: serde_json::Value = serde_json::from_str(fixture).unwrap();
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(again, original);
        let spaced = r#"{ "metadata" : { "name" : "x" } , "future" : [1, 2] }"#;
        let n: Node = serde_json::from_str(spaced).unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), spaced);
    }

    #[test]
    fn nodes_of_odd_shape_still_say_what_they_can() {
        let odd = r#"{"items": [
            {"metadata": {"name": "a", "labels": {"k": "v", "n": 3}}, "status": null},
            {"metadata": null},
            7
        ], "metadata": {}}"#;
        let list: NodeList = serde_json::from_str(odd).unwrap();
        assert_eq!(list.items[0].name(), Some("a"));
        assert_eq!(list.items[0].label("k"), Some("v"));
        assert_eq!(list.items[0].label("n"), None);
        assert_eq!(list.items[0].allocatable("cpu"), None);
        assert_eq!(list.items[1].name(), None);
        assert_eq!(list.items[2].json(), "7");
        let empty: NodeList = serde_json::from_str(r#"{"items": null}"#).unwrap();
        assert!(empty.items.is_empty());
        assert!(serde_json::from_str::<NodeList>("[1]").is_err());
    }

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
