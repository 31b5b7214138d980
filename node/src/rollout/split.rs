//! Splitting a layer among the nodes that want it. A node that asks its
//! peers about chunks of a layer announces that it wants the layer; each
//! node keeps who asked it, lately, per layer. The layer's compressed
//! bytes are cut into stripes, and each stripe has an owner among the
//! nodes that want the layer: the one whose hash of (node, layer, stripe)
//! is highest (rendezvous hashing, so that a node joining or leaving moves
//! only its own stripes). A node asked about a chunk of a stripe it owns,
//! that nobody has or fetches yet, takes it on (fetches it from its chain,
//! the cloud for a new layer) and says so; the asker waits on it. So the
//! nodes of a cluster fetch disjoint parts of a new layer over the cloud
//! link, each once, and take the rest from each other.
//!
//! The same order settles two nodes deciding on one chunk at once: the
//! one ranked lower waits on the other. Waits only go up that order, or to
//! a node that fetches or took the chunk on (which waits on nobody ranked
//! below it), so they never form a cycle.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use breakfs_index::Digest;

/// Bytes of a layer's compressed blob in one stripe: runs of neighbouring
/// small chunks stay one range request, and a batch of a few MiB spreads
/// over several owners.
pub(super) const STRIPE: u64 = 256 << 10;

/// How long a node counts a peer that asked it about a layer as wanting it.
const INTEREST_TTL: Duration = Duration::from_secs(60);

/// Layers tracked at most, and nodes per layer (questions come from
/// untrusted peers).
const MAX_LAYERS: usize = 1024;
const MAX_NODES: usize = 256;

/// Where node `node` stands for the stripe of `offset` in `layer`: the
/// higher, the likelier it fetches it (ties broken by id).
fn rank<'a>(node: &'a str, layer: &Digest, offset: u64) -> (u64, &'a str) {
    let h = Digest::of(format!("{node}\n{layer}\n{}", offset / STRIPE).as_bytes());
    let top = h
        .hex()
        .get(..16)
        .and_then(|x| u64::from_str_radix(x, 16).ok())
        .unwrap_or(0);
    (top, node)
}

/// Whether node `a` ranks above node `b` for the chunk at `offset` of
/// `layer`.
pub(super) fn above(a: &str, b: &str, layer: &Digest, offset: u64) -> bool {
    rank(a, layer, offset) > rank(b, layer, offset)
}

/// Whether `me` owns the stripe of `offset` in `layer` among itself and
/// `others` (the nodes that want the layer).
pub(super) fn owns<'a>(
    me: &str,
    others: impl IntoIterator<Item = &'a str>,
    layer: &Digest,
    offset: u64,
) -> bool {
    others
        .into_iter()
        .filter(|o| *o != me)
        .all(|o| above(me, o, layer, offset))
}

/// The owner of the stripe of `offset` in `layer` among `me` and the
/// peers `peers` (their ids): `None` when it is `me`, else the peer's
/// index.
pub(super) fn owner(me: &str, peers: &[String], layer: &Digest, offset: u64) -> Option<usize> {
    let mut top: Option<usize> = None;
    for (k, p) in peers.iter().enumerate() {
        if p == me {
            continue;
        }
        let best = top.map_or(me, |t| peers[t].as_str());
        if above(p, best, layer, offset) {
            top = Some(k);
        }
    }
    top
}

/// Who asked this node about which layer, lately.
#[derive(Default)]
pub(super) struct Interest {
    layers: Mutex<HashMap<Digest, HashMap<String, Instant>>>,
}

impl Interest {
    /// Node `node` asked about `layer` now.
    pub(super) fn note(&self, layer: &Digest, node: &str) {
        let mut l = self.layers.lock();
        if l.len() >= MAX_LAYERS && !l.contains_key(layer) {
            l.retain(|_, nodes| nodes.values().any(|t| t.elapsed() < INTEREST_TTL));
            if l.len() >= MAX_LAYERS {
                return;
            }
        }
        let nodes = l.entry(layer.clone()).or_default();
        if nodes.len() >= MAX_NODES && !nodes.contains_key(node) {
            nodes.retain(|_, t| t.elapsed() < INTEREST_TTL);
            if nodes.len() >= MAX_NODES {
                return;
            }
        }
        nodes.insert(node.to_string(), Instant::now());
    }

    /// The nodes that asked about `layer` within the last minute.
    pub(super) fn members(&self, layer: &Digest) -> Vec<String> {
        self.layers
            .lock()
            .get(layer)
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|(_, t)| t.elapsed() < INTEREST_TTL)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stripe_has_one_owner_and_the_owners_spread() {
        let layer = Digest::of(b"layer");
        let nodes: Vec<String> = (0..8).map(|i| format!("http://10.0.0.{i}:7070")).collect();
        let mut owned = vec![0usize; nodes.len()];
        for stripe in 0..400u64 {
            let off = stripe * STRIPE + 17;
            let owners: Vec<usize> = (0..nodes.len())
                .filter(|&i| owns(&nodes[i], nodes.iter().map(|n| n.as_str()), &layer, off))
                .collect();
            assert_eq!(owners.len(), 1, "stripe {stripe}: {owners:?}");
            owned[owners[0]] += 1;
            // One stripe, one owner: every offset in it agrees.
            assert!(owns(
                &nodes[owners[0]],
                nodes.iter().map(|n| n.as_str()),
                &layer,
                stripe * STRIPE + STRIPE - 1
            ));
        }
        // 50 each on average: none idle, none with most of the layer.
        assert!(owned.iter().all(|&k| (20..=90).contains(&k)), "{owned:?}");
    }

    #[test]
    fn the_owner_is_the_one_owning_the_stripe_among_all() {
        let layer = Digest::of(b"layer");
        let nodes: Vec<String> = (0..8).map(|i| format!("http://10.0.0.{i}:7070")).collect();
        for stripe in 0..100u64 {
            let off = stripe * STRIPE;
            let all = || nodes.iter().map(String::as_str);
            for (i, me) in nodes.iter().enumerate() {
                let others: Vec<String> = nodes
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| k != i)
                    .map(|(_, n)| n.clone())
                    .collect();
                match owner(me, &others, &layer, off) {
                    None => assert!(owns(me, all(), &layer, off)),
                    Some(k) => assert!(owns(&others[k], all(), &layer, off)),
                }
            }
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_stripes() {
        let layer = Digest::of(b"layer");
        let all = ["a", "b", "c", "d"];
        let owner = |set: &[&str], off: u64| -> String {
            set.iter()
                .find(|n| owns(n, set.iter().copied(), &layer, off))
                .map(|n| n.to_string())
                .unwrap_or_default()
        };
        for stripe in 0..200u64 {
            let off = stripe * STRIPE;
            let before = owner(&all, off);
            let after = owner(&["a", "b", "c"], off);
            if before != "d" {
                assert_eq!(before, after, "stripe {stripe}");
            }
        }
    }

    #[test]
    fn interest_is_remembered_per_layer_and_bounded() {
        let i = Interest::default();
        let (l1, l2) = (Digest::of(b"1"), Digest::of(b"2"));
        i.note(&l1, "http://a");
        i.note(&l1, "http://b");
        i.note(&l2, "http://c");
        let mut m = i.members(&l1);
        m.sort();
        assert_eq!(m, ["http://a", "http://b"]);
        assert_eq!(i.members(&l2), ["http://c"]);
        for k in 0..2 * MAX_NODES {
            i.note(&l1, &format!("http://n{k}"));
        }
        assert_eq!(i.members(&l1).len(), MAX_NODES);
    }
}
