//! Filtering and scoring, pure functions over what the service knows of
//! each node: which layers it holds, how good its links are, its resources.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use breakfs_index::Digest;
use serde::{Deserialize, Serialize};

use crate::types::Limits;

/// A link's measured quality.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Bandwidth, Mbit/s.
    pub mbps: f64,
}

impl Link {
    /// Seconds to move `bytes` over the link (one round trip plus transfer).
    pub fn secs(&self, bytes: u64) -> f64 {
        self.rtt_ms / 1000.0 + bytes as f64 * 8.0 / (self.mbps.max(0.001) * 1e6)
    }
}

/// What the service knows of one node.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// Kubernetes node name.
    pub name: String,
    /// The edge cluster it belongs to.
    pub cluster: String,
    /// Layers it holds whole.
    pub whole: HashSet<Digest>,
    /// Layers it holds in part, with the bytes held.
    pub partial: HashMap<Digest, u64>,
    /// Its link to the registry, if measured.
    pub cloud: Option<Link>,
    /// Its links to other nodes (by node name), if measured.
    pub peers: HashMap<String, Link>,
    /// Bytes its cache can hold, if known: its budget (the node evicts
    /// colder layers to make room; what live mounts need, it refetches).
    pub cache_room: Option<u64>,
    /// Allocatable CPU cores and memory bytes, if known.
    pub allocatable: Option<(f64, f64)>,
    /// Requested CPU cores and memory bytes of the pods on it.
    pub requested: (f64, f64),
    /// It relays registry ranges for its peers and uses theirs
    /// (`breakfs node --relay`, published in its measurements).
    pub relays: bool,
    /// What a layer no node holds comes over when it and peers of its
    /// cluster relay: see [`pooled_cloud`]; `None`: its own registry link.
    pub pooled_cloud: Option<Link>,
}

impl NodeView {
    /// This view without the layers it holds and its peer links: what
    /// filtering and scoring read once the estimates are made (links to the
    /// registry, room, resources). Copying the layer sets of 1,000 nodes to
    /// set their resources took a Nodes-form call 0.1 s.
    pub fn without_layers(&self) -> NodeView {
        // Every field named, so that a new one is not forgotten here.
        let NodeView {
            name,
            cluster,
            whole: _,
            partial: _,
            cloud,
            peers: _,
            cache_room,
            allocatable,
            requested,
            relays,
            pooled_cloud,
        } = self;
        NodeView {
            name: name.clone(),
            cluster: cluster.clone(),
            cloud: *cloud,
            cache_room: *cache_room,
            allocatable: *allocatable,
            requested: *requested,
            relays: *relays,
            pooled_cloud: *pooled_cloud,
            ..NodeView::default()
        }
    }
}

/// One layer of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// Its digest.
    pub digest: Digest,
    /// Its compressed size.
    pub size: u64,
}

/// Where one layer should come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum From {
    /// Already on the node.
    Local,
    /// A peer node that holds it whole: of the same cluster, or of
    /// another when none of its own has it.
    Peer {
        /// The peer's node name.
        node: String,
    },
    /// The registry.
    Cloud,
}

/// A layer's source in a plan, with the expected seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// The layer.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Where from.
    #[serde(flatten)]
    pub from: From,
}

/// What a node is expected to cost for an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Node name.
    pub node: String,
    /// Seconds until the node has the image (parallel sources).
    pub fetch_secs: f64,
    /// Bytes of the image already there.
    pub local_bytes: u64,
    /// Bytes to fetch.
    pub missing_bytes: u64,
    /// Per layer.
    pub plan: Vec<LayerPlan>,
}

/// Assumed links when nothing was measured: a far cloud, a near peer.
pub const DEFAULT_CLOUD: Link = Link {
    rtt_ms: 50.0,
    mbps: 100.0,
};
/// See [`DEFAULT_CLOUD`].
pub const DEFAULT_PEER: Link = Link {
    rtt_ms: 1.0,
    mbps: 1000.0,
};
/// Assumed link to a peer in another cluster when nothing was measured:
/// between the two above, like the edge testbed's links across clusters.
pub const DEFAULT_FAR_PEER: Link = Link {
    rtt_ms: 20.0,
    mbps: 200.0,
};

/// The link a layer that no node holds comes over to `node` when it and
/// peers of its cluster (`cluster`, which may list `node` itself) relay
/// registry ranges (`breakfs node --relay`): the node spreads its range
/// requests over its own registry link and each relaying peer's, so the
/// bandwidths add up (a relayed range is bounded by the smaller of the
/// peer's registry link and the link to the peer), and the slowest round
/// trip counts (a relayed one is the peer's plus the hop). `None` when
/// the node does not relay, or no peer of its cluster does, or its own
/// registry link was not measured.
pub fn pooled_cloud<'a>(
    node: &NodeView,
    cluster: impl IntoIterator<Item = &'a NodeView>,
) -> Option<Link> {
    if !node.relays {
        return None;
    }
    let own = node.cloud?;
    let mut pooled = own;
    let mut any = false;
    for p in cluster {
        if p.name == node.name || !p.relays {
            continue;
        }
        let (Some(up), hop) = (
            p.cloud,
            node.peers.get(&p.name).copied().unwrap_or(DEFAULT_PEER),
        ) else {
            continue;
        };
        pooled.mbps += up.mbps.min(hop.mbps);
        pooled.rtt_ms = pooled.rtt_ms.max(up.rtt_ms + hop.rtt_ms);
        any = true;
    }
    any.then_some(pooled)
}

/// Who holds which layer whole, at the edge, with node names numbered:
/// what estimates read. The scoring path of a 1,000-node call compares and
/// looks up numbers, not name strings (which were a third of its time).
///
/// Built from the views of the nodes heard from lately. Each cluster's
/// holders of a layer are listed in the order of those views; the
/// edge-wide list has one holder per cluster that has the layer (within a
/// cluster links are alike, so one stands for all), in name order.
#[derive(Clone, Debug, Default)]
pub struct Holdings {
    /// Node name → number (numbers follow name order).
    ids: HashMap<String, u32>,
    /// Number → node name.
    names: Vec<String>,
    /// Every node's measured links to peers, in one block (a map per node
    /// cost a cache miss per lookup): node `k`'s peers are
    /// `peer_ids[spans[k]..spans[k + 1]]` (sorted), their links alongside
    /// in `peer_links`.
    peer_ids: Vec<u32>,
    /// See `peer_ids`.
    peer_links: Vec<Link>,
    /// See `peer_ids`.
    spans: Vec<u32>,
    /// Per cluster: layer → the nodes holding it whole.
    clusters: HashMap<String, HashMap<Digest, Vec<u32>>>,
    /// Layer → one holder per cluster that has it.
    edge: HashMap<Digest, Vec<u32>>,
}

/// Peers examined per layer at most (the first holders listed: within a
/// cluster links are alike, and scoring 1,000 nodes must stay fast).
const MAX_HOLDERS: usize = 3;

fn held_by<'h>(holders: Option<&'h HashMap<Digest, Vec<u32>>>, l: &Layer) -> &'h [u32] {
    holders
        .and_then(|h| h.get(&l.digest))
        .map_or(&[][..], |h| h.as_slice())
}

impl Holdings {
    /// Who of `views` holds what.
    pub fn new<'a>(views: impl IntoIterator<Item = &'a NodeView>) -> Holdings {
        let views: Vec<&NodeView> = views.into_iter().collect();
        let mut names: Vec<String> = views.iter().map(|v| v.name.clone()).collect();
        names.sort_unstable();
        names.dedup();
        let ids: HashMap<String, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        let mut by_id: Vec<Option<&NodeView>> = vec![None; names.len()];
        let mut clusters: HashMap<String, HashMap<Digest, Vec<u32>>> = HashMap::default();
        for v in &views {
            let id = ids[&v.name];
            by_id[id as usize] = Some(v);
            let c = clusters.entry(v.cluster.clone()).or_default();
            for d in &v.whole {
                c.entry(d.clone()).or_default().push(id);
            }
        }
        let mut edge: HashMap<Digest, Vec<u32>> = HashMap::default();
        for c in clusters.values() {
            for (d, h) in c {
                if let Some(&first) = h.first() {
                    edge.entry(d.clone()).or_default().push(first);
                }
            }
        }
        // The same order whatever the clusters' order (a stable plan).
        for h in edge.values_mut() {
            h.sort_unstable();
        }
        let (mut peer_ids, mut peer_links, mut spans) = (Vec::new(), Vec::new(), vec![0]);
        for v in by_id {
            let mut mine: Vec<(u32, Link)> = v
                .into_iter()
                .flat_map(|v| &v.peers)
                .filter_map(|(p, l)| ids.get(p).map(|&q| (q, *l)))
                .collect();
            mine.sort_unstable_by_key(|(q, _)| *q);
            peer_ids.extend(mine.iter().map(|(q, _)| *q));
            peer_links.extend(mine.iter().map(|(_, l)| *l));
            spans.push(peer_ids.len() as u32);
        }
        Holdings {
            ids,
            names,
            peer_ids,
            peer_links,
            spans,
            clusters,
            edge,
        }
    }

    /// How `node` would get `layers`: from itself, a peer of its cluster
    /// holding the layer, else a peer of another cluster, else the
    /// registry, whichever is expected first. A node these holdings were
    /// built from is taken with the peer links it had then.
    pub fn estimate(&self, node: &NodeView, layers: &[Layer]) -> Estimate {
        self.estimate_with(node, layers, true)
    }

    /// [`Holdings::estimate`] without the per-layer plan (no allocation
    /// per layer).
    pub fn estimate_time(&self, node: &NodeView, layers: &[Layer]) -> Estimate {
        self.estimate_with(node, layers, false)
    }

    fn estimate_with(&self, node: &NodeView, layers: &[Layer], with_plan: bool) -> Estimate {
        let near = self.clusters.get(&node.cluster);
        self.estimate_core(
            node,
            self.ids.get(&node.name).copied(),
            layers,
            with_plan,
            |_, l| node.whole.contains(&l.digest),
            |_, l| held_by(near, l),
            |_, l| held_by(Some(&self.edge), l),
        )
    }

    /// [`Holdings::estimate_time`] for many nodes: each layer's holders are
    /// looked up once per cluster, and which layers a node holds comes from
    /// them (one lookup per node, not one per layer), so a node is taken to
    /// hold what it held when these holdings were built.
    pub fn estimate_times(&self, views: &[&NodeView], layers: &[Layer]) -> Vec<Estimate> {
        if layers.len() > 64 {
            return views
                .iter()
                .map(|v| self.estimate_time(v, layers))
                .collect();
        }
        let far: Vec<&[u32]> = layers
            .iter()
            .map(|l| held_by(Some(&self.edge), l))
            .collect();
        // Per cluster: each layer's holders, and each holder's layers as bits.
        struct Ctx<'h> {
            cands: Vec<&'h [u32]>,
            held: HashMap<u32, u64>,
        }
        let mut ctxs: HashMap<&str, Ctx<'_>> = HashMap::default();
        views
            .iter()
            .map(|v| {
                let ctx = ctxs.entry(v.cluster.as_str()).or_insert_with(|| {
                    let h = self.clusters.get(&v.cluster);
                    let cands: Vec<&[u32]> = layers.iter().map(|l| held_by(h, l)).collect();
                    let mut held: HashMap<u32, u64> = HashMap::default();
                    for (i, c) in cands.iter().enumerate() {
                        for &id in c.iter() {
                            *held.entry(id).or_default() |= 1 << i;
                        }
                    }
                    Ctx { cands, held }
                });
                let me = self.ids.get(&v.name).copied();
                let mask = me.and_then(|id| ctx.held.get(&id)).copied().unwrap_or(0);
                self.estimate_core(
                    v,
                    me,
                    layers,
                    false,
                    |i, _| mask >> i & 1 == 1,
                    |i, _| ctx.cands[i],
                    |i, _| far[i],
                )
            })
            .collect()
    }

    /// The estimate of `node` (numbered `me`, if these holdings know it)
    /// for `layers`, given which it holds (`holds`), which nodes of its
    /// cluster hold each (`cands`), and which nodes of other clusters
    /// (`far`: asked only when its cluster has none; peers of its own
    /// cluster come first, as the node daemon keeps them closer).
    #[allow(clippy::too_many_arguments)]
    fn estimate_core<'c>(
        &self,
        node: &NodeView,
        me: Option<u32>,
        layers: &[Layer],
        with_plan: bool,
        holds: impl Fn(usize, &Layer) -> bool,
        cands: impl Fn(usize, &Layer) -> &'c [u32],
        far: impl Fn(usize, &Layer) -> &'c [u32],
    ) -> Estimate {
        let mine = me.map(|id| {
            let span = self.spans[id as usize] as usize..self.spans[id as usize + 1] as usize;
            (&self.peer_ids[span.clone()], &self.peer_links[span])
        });
        let link = |p: u32| match mine {
            Some((ids, links)) => ids.binary_search(&p).ok().map(|k| links[k]),
            None => node.peers.get(&self.names[p as usize]).copied(),
        };
        let other = |p: &u32| Some(*p) != me;
        let mut plan = Vec::new();
        let (mut local, mut missing) = (0u64, 0u64);
        // Bytes per source (None: the cloud), fetched in parallel across
        // sources; a few sources at most, kept inline (no allocation).
        let mut per_source: [(Option<u32>, Link, u64); 8] = [(None, DEFAULT_CLOUD, 0); 8];
        let mut sources = 0usize;
        let cloud = node.cloud.unwrap_or(DEFAULT_CLOUD);
        for (i, l) in layers.iter().enumerate() {
            if holds(i, l) {
                local += l.size;
                if with_plan {
                    plan.push(LayerPlan {
                        digest: l.digest.clone(),
                        size: l.size,
                        from: From::Local,
                    });
                }
                continue;
            }
            let held = if node.partial.is_empty() {
                0
            } else {
                node.partial
                    .get(&l.digest)
                    .copied()
                    .unwrap_or(0)
                    .min(l.size)
            };
            local += held;
            let need = l.size - held;
            missing += need;
            let near = cands(i, l);
            let (peers, default) = if near.iter().any(other) {
                (near, DEFAULT_PEER)
            } else {
                (far(i, l), DEFAULT_FAR_PEER)
            };
            // A layer no peer holds comes over the pooled registry links when
            // the node relays (the daemon asks relays only after every peer).
            let up = match node.pooled_cloud {
                Some(p) if !peers.iter().any(other) => p,
                _ => cloud,
            };
            let mut best: (f64, Option<u32>, Link) = (up.secs(need), None, up);
            for &p in peers.iter().filter(|p| other(p)).take(MAX_HOLDERS) {
                let link = link(p).unwrap_or(default);
                let t = link.secs(need);
                if t < best.0 {
                    best = (t, Some(p), link);
                }
            }
            const SLOTS: usize = 8;
            match per_source[..sources]
                .iter()
                .position(|(k, _, _)| *k == best.1)
            {
                Some(i) => per_source[i].2 += need,
                None if sources < SLOTS => {
                    per_source[sources] = (best.1, best.2, need);
                    sources += 1;
                }
                // More sources than slots: count the bytes on the last one kept.
                None => per_source[SLOTS - 1].2 += need,
            }
            if with_plan {
                plan.push(LayerPlan {
                    digest: l.digest.clone(),
                    size: l.size,
                    from: match best.1 {
                        Some(p) => From::Peer {
                            node: self.names[p as usize].clone(),
                        },
                        None => From::Cloud,
                    },
                });
            }
        }
        let fetch_secs = per_source[..sources]
            .iter()
            .map(|(_, link, bytes)| link.secs(*bytes))
            .fold(0.0, f64::max);
        Estimate {
            node: if with_plan {
                node.name.clone()
            } else {
                String::new()
            },
            fetch_secs,
            local_bytes: local,
            missing_bytes: missing,
            plan,
        }
    }
}

/// Why `node` cannot take the pod, in words, or `None` if it can.
pub fn refuse(node: &NodeView, est: &Estimate, limits: &Limits) -> Option<String> {
    if let (Some(max), Some(c)) = (limits.delay_ms, node.cloud)
        && c.rtt_ms > max
    {
        return Some(format!(
            "its round trip to the registry is {:.0} ms; the pod allows at most {max:.0} ms (breakfs.io/limit-delay)",
            c.rtt_ms
        ));
    }
    if let (Some(min), Some(c)) = (limits.bandwidth_mbps, node.cloud)
        && c.mbps < min
    {
        return Some(format!(
            "its bandwidth to the registry is {:.0} Mbit/s; the pod needs at least {min:.0} Mbit/s (breakfs.io/limit-bandwidth)",
            c.mbps
        ));
    }
    if let Some(room) = node.cache_room
        && est.missing_bytes > room
    {
        return Some(format!(
            "its image cache holds at most {} MB; the image needs {} MB more",
            room / 1_000_000,
            est.missing_bytes.div_ceil(1_000_000)
        ));
    }
    None
}

/// Weights of the score parts (the paper's netWeight, layerWeight, ...).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Weights {
    /// Expected time to get the image.
    #[serde(default = "one")]
    pub net_weight: f64,
    /// Share of the image already on the node.
    #[serde(default = "one")]
    pub layer_weight: f64,
    /// CPU and memory use balanced.
    #[serde(default = "one")]
    pub balanced_weight: f64,
    /// Least requested.
    #[serde(default = "one")]
    pub least_requested_weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            net_weight: 1.0,
            layer_weight: 1.0,
            balanced_weight: 1.0,
            least_requested_weight: 1.0,
        }
    }
}

/// The parts of one node's score, each 0..1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Parts {
    /// 1 for the fastest candidate, 0 for the slowest.
    pub net: f64,
    /// Share of the image's bytes on the node.
    pub layer: f64,
    /// 1 when CPU and memory would be used in the same proportion.
    pub balanced: f64,
    /// Share of CPU and memory left free.
    pub least_requested: f64,
}

/// Scores 0–10 for candidates `ests` (with their views), for a pod that
/// requests `pod` (CPU cores, memory bytes): the weighted sum of the parts,
/// stretched so the best candidate gets 10 and the worst 0 (the protocol's
/// scores are integers: unstretched, nodes that differ would often tie).
pub fn scores(
    views: &[&NodeView],
    ests: &[Estimate],
    pod: (f64, f64),
    w: &Weights,
) -> Vec<(i64, Parts)> {
    let t_max = ests.iter().map(|e| e.fetch_secs).fold(0.0, f64::max);
    let t_min = ests
        .iter()
        .map(|e| e.fetch_secs)
        .fold(f64::INFINITY, f64::min);
    let raw: Vec<(f64, Parts)> = views
        .iter()
        .zip(ests)
        .map(|(v, e)| {
            let net = if t_max - t_min <= 1e-9 {
                1.0
            } else {
                (t_max - e.fetch_secs) / (t_max - t_min)
            };
            let total = e.local_bytes + e.missing_bytes;
            let layer = if total == 0 {
                1.0
            } else {
                e.local_bytes as f64 / total as f64
            };
            let (balanced, least_requested) = match v.allocatable {
                Some((cpu, mem)) if cpu > 0.0 && mem > 0.0 => {
                    let fc = ((v.requested.0 + pod.0) / cpu).min(1.0);
                    let fm = ((v.requested.1 + pod.1) / mem).min(1.0);
                    (1.0 - (fc - fm).abs(), 1.0 - (fc + fm) / 2.0)
                }
                _ => (1.0, 1.0),
            };
            let p = Parts {
                net,
                layer,
                balanced,
                least_requested,
            };
            let s = w.net_weight * net
                + w.layer_weight * layer
                + w.balanced_weight * balanced
                + w.least_requested_weight * least_requested;
            (s, p)
        })
        .collect();
    let hi = raw.iter().map(|r| r.0).fold(f64::MIN, f64::max);
    let lo = raw.iter().map(|r| r.0).fold(f64::MAX, f64::min);
    raw.into_iter()
        .map(|(s, p)| {
            let s = if hi - lo <= 1e-9 {
                10.0
            } else {
                10.0 * (s - lo) / (hi - lo)
            };
            (s.round().clamp(0.0, 10.0) as i64, p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;

    fn layers(n: usize) -> Vec<Layer> {
        (0..n)
            .map(|i| Layer {
                digest: Digest::of(format!("layer{i}").as_bytes()),
                size: 1_000_000 * (i as u64 + 1),
            })
            .collect()
    }

    #[test]
    fn a_peer_in_the_cluster_beats_the_far_cloud() {
        let ls = layers(2);
        let holder = NodeView {
            name: "a".into(),
            whole: ls.iter().map(|l| l.digest.clone()).collect(),
            ..NodeView::default()
        };
        let empty = NodeView {
            name: "b".into(),
            ..NodeView::default()
        };
        let e = Holdings::new([&holder, &empty]).estimate(&empty, &ls);
        assert!(
            e.plan
                .iter()
                .all(|p| p.from == From::Peer { node: "a".into() })
        );
        let far = Holdings::default().estimate(&empty, &ls);
        assert!(far.fetch_secs > e.fetch_secs * 10.0);
        assert_eq!(
            Holdings::new([&holder]).estimate(&holder, &ls).fetch_secs,
            0.0
        );
    }

    #[test]
    fn a_peer_in_another_cluster_serves_what_the_cluster_lacks_when_it_beats_the_cloud() {
        let ls = layers(2);
        let all: HashSet<Digest> = ls.iter().map(|l| l.digest.clone()).collect();
        // Layer 0 is in the node's cluster (at "near"), both are in the
        // other cluster (at "far"); the node's link to far is measured.
        let near = NodeView {
            name: "near".into(),
            cluster: "west".into(),
            whole: [ls[0].digest.clone()].into_iter().collect(),
            ..NodeView::default()
        };
        let far = NodeView {
            name: "far".into(),
            cluster: "east".into(),
            whole: all,
            ..NodeView::default()
        };
        let node = |cloud: Link| NodeView {
            name: "n".into(),
            cluster: "west".into(),
            cloud: Some(cloud),
            peers: [(
                "far".to_string(),
                Link {
                    rtt_ms: 20.0,
                    mbps: 200.0,
                },
            )]
            .into_iter()
            .collect(),
            ..NodeView::default()
        };
        let edge = Holdings::new([&near, &far]);
        let from = |e: &Estimate| e.plan.iter().map(|p| p.from.clone()).collect::<Vec<_>>();
        let peer = |n: &str| From::Peer { node: n.into() };
        // A slow registry link: the far peer, but the near one first.
        let slow = node(Link {
            rtt_ms: 90.0,
            mbps: 50.0,
        });
        let e = edge.estimate(&slow, &ls);
        assert_eq!(from(&e), vec![peer("near"), peer("far")]);
        let cloud_only = Holdings::new([&near]).estimate(&slow, &ls);
        assert!(e.fetch_secs < cloud_only.fetch_secs / 2.0, "{e:?}");
        // A registry link better than the far peer's: the registry.
        let fast = node(Link {
            rtt_ms: 5.0,
            mbps: 300.0,
        });
        let e = edge.estimate(&fast, &ls);
        assert_eq!(from(&e), vec![peer("near"), From::Cloud]);
        // An unmeasured far peer is taken as the testbed's link across
        // clusters, not as a peer of the cluster.
        let unmeasured = NodeView {
            peers: HashMap::default(),
            ..slow.clone()
        };
        let e = edge.estimate(&unmeasured, &ls[1..]);
        assert_eq!(e.fetch_secs, DEFAULT_FAR_PEER.secs(ls[1].size));
        // The many-node path agrees.
        let many = edge.estimate_times(&[&slow, &fast], &ls);
        assert_eq!(
            many[0].fetch_secs,
            edge.estimate_time(&slow, &ls).fetch_secs
        );
        assert_eq!(
            many[1].fetch_secs,
            edge.estimate_time(&fast, &ls).fetch_secs
        );
    }

    #[test]
    fn relaying_peers_pool_registry_links_for_layers_no_peer_holds() {
        let ls = layers(2);
        let up = |mbps: f64, rtt_ms: f64| Some(Link { rtt_ms, mbps });
        let node = |name: &str, cloud: Option<Link>, relays: bool| NodeView {
            name: name.into(),
            cluster: "west".into(),
            cloud,
            relays,
            ..NodeView::default()
        };
        let a = node("a", up(50.0, 20.0), true);
        let b = node("b", up(100.0, 30.0), true);
        let c = node("c", up(2000.0, 10.0), true);
        let quiet = node("d", up(500.0, 10.0), false);
        // b's uplink counts in full; c's only up to the 1 Gbit/s hop to it;
        // d does not relay; the slowest round trip is b's plus the hop.
        let pooled = pooled_cloud(&a, [&a, &b, &c, &quiet]).unwrap();
        assert_eq!(pooled.mbps, 50.0 + 100.0 + 1000.0);
        assert_eq!(pooled.rtt_ms, 31.0);
        // Nothing to pool: a node that does not relay, or alone, or unmeasured.
        assert_eq!(pooled_cloud(&quiet, [&a, &b, &quiet]), None);
        assert_eq!(pooled_cloud(&a, [&a, &quiet]), None);
        assert_eq!(pooled_cloud(&node("e", None, true), [&a, &b]), None);

        let none = Holdings::default();
        let alone = none.estimate(&a, &ls);
        let mut relaying = a.clone();
        relaying.pooled_cloud = Some(pooled);
        let striped = none.estimate(&relaying, &ls);
        assert!(striped.fetch_secs < alone.fetch_secs / 5.0);
        assert!(striped.plan.iter().all(|p| p.from == From::Cloud));
        // A layer a peer holds still comes from the peer (the daemon asks
        // relays only after every peer).
        let holder = NodeView {
            name: "h".into(),
            whole: [ls[1].digest.clone()].into_iter().collect(),
            ..node("h", None, false)
        };
        let e = Holdings::new([&holder]).estimate(&relaying, &ls);
        assert_eq!(e.plan[1].from, From::Peer { node: "h".into() });
    }

    #[test]
    fn limits_and_disk_refuse_in_words() {
        let far = NodeView {
            name: "far".into(),
            cloud: Some(Link {
                rtt_ms: 80.0,
                mbps: 50.0,
            }),
            cache_room: Some(1_000),
            ..NodeView::default()
        };
        let e = Holdings::default().estimate(&far, &layers(1));
        let delay = Limits {
            delay_ms: Some(25.0),
            bandwidth_mbps: None,
        };
        assert!(refuse(&far, &e, &delay).unwrap().contains("80 ms"));
        let bw = Limits {
            delay_ms: None,
            bandwidth_mbps: Some(200.0),
        };
        assert!(refuse(&far, &e, &bw).unwrap().contains("50 Mbit/s"));
        assert!(
            refuse(&far, &e, &Limits::default())
                .unwrap()
                .contains("at most 0 MB")
        );
    }

    proptest! {
        /// The many-node path gives what the one-node path gives.
        #[test]
        fn estimating_many_equals_estimating_each(
            held in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 6), 1..9),
            partial in proptest::collection::vec(0u64..3_000_000, 6),
        ) {
            let ls = layers(6);
            let views: Vec<NodeView> = held
                .iter()
                .enumerate()
                .map(|(k, h)| NodeView {
                    name: format!("n{k}"),
                    cluster: format!("c{}", k % 2),
                    whole: ls.iter().zip(h).filter(|(_, x)| **x).map(|(l, _)| l.digest.clone()).collect(),
                    partial: if k == 0 {
                        ls.iter().zip(&partial).map(|(l, p)| (l.digest.clone(), *p)).collect()
                    } else {
                        HashMap::default()
                    },
                    cloud: Some(Link { rtt_ms: 10.0 + k as f64, mbps: 100.0 }),
                    peers: [("n1".to_string(), Link { rtt_ms: 5.0, mbps: 50.0 })].into_iter().collect(),
                    ..NodeView::default()
                })
                .collect();
            let h = Holdings::new(&views);
            let refs: Vec<&NodeView> = views.iter().collect();
            let many = h.estimate_times(&refs, &ls);
            for (v, m) in views.iter().zip(&many) {
                let one = h.estimate_time(v, &ls);
                prop_assert_eq!(&one, m);
            }
        }

        /// All else equal, a node holding more of the image's layers never
        /// scores lower.
        #[test]
        fn holding_more_layers_never_scores_lower(
            n in 1usize..8,
            held_a in proptest::collection::vec(any::<bool>(), 8),
            extra in proptest::collection::vec(any::<bool>(), 8),
            rtt in 1.0f64..200.0,
            mbps in 1.0f64..1000.0,
            others in 0usize..4,
        ) {
            let ls = layers(n);
            let cloud = Some(Link { rtt_ms: rtt, mbps });
            let less: HashSet<Digest> = ls.iter().zip(&held_a).filter(|(_, h)| **h).map(|(l, _)| l.digest.clone()).collect();
            let mut more = less.clone();
            more.extend(ls.iter().zip(&extra).filter(|(_, h)| **h).map(|(l, _)| l.digest.clone()));
            let a = NodeView { name: "a".into(), whole: less, cloud, ..NodeView::default() };
            let b = NodeView { name: "b".into(), whole: more, cloud, ..NodeView::default() };
            let mut views = vec![a, b];
            for i in 0..others {
                views.push(NodeView { name: format!("o{i}"), cloud, whole: ls.iter().take(i).map(|l| l.digest.clone()).collect(), ..NodeView::default() });
            }
            let refs: Vec<&NodeView> = views.iter().collect();
            let none = Holdings::default();
            let ests: Vec<Estimate> = refs.iter().map(|v| none.estimate(v, &ls)).collect();
            let s = scores(&refs, &ests, (0.0, 0.0), &Weights::default());
            prop_assert!(s[1].0 >= s[0].0, "{:?}", s);
        }
    }
}
