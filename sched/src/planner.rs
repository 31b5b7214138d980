//! The proactive prefetch planner: per cluster, keep the hottest layers
//! within the cluster's `cacheSumSize`, one copy in the cluster before a
//! second, placed on the nodes with the most room.

use rustc_hash::FxHashMap as HashMap;

use breakfs_index::Digest;

use crate::score::NodeView;

/// A set of layers.
pub type LayerSet = rustc_hash::FxHashSet<Digest>;

/// A layer with its popularity.
#[derive(Clone, Debug, PartialEq)]
pub struct Hot {
    /// The layer.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its popularity (decayed placements).
    pub popularity: f64,
}

/// Which node of `cluster` should prefetch which layers, so that the
/// hottest layers (`hot`, any order) are in the cluster within `cache_sum`
/// bytes: every hot layer once (most popular first), then second copies
/// while the sum allows, each on the node with the most room for it.
///
/// A node's room for a layer is its `cache_room` (unknown: unlimited) less
/// the hot layers it holds that are at least as popular and what this plan
/// already gives it: colder layers it holds make way (the node's budget
/// evicts the least valuable), hotter ones never do.
pub fn plan_prefetch(cluster: &[&NodeView], hot: &[Hot], cache_sum: u64) -> Vec<(String, Digest)> {
    let mut hot: Vec<&Hot> = hot.iter().filter(|h| h.popularity > 0.0).collect();
    hot.sort_by(|a, b| b.popularity.total_cmp(&a.popularity));
    // Bytes each node keeps for layers hotter than the one at hand, and
    // for what is planned.
    let mut committed: HashMap<&str, u64> = HashMap::default();
    let room = |n: &NodeView, committed: &HashMap<&str, u64>| {
        n.cache_room
            .unwrap_or(u64::MAX)
            .saturating_sub(committed.get(n.name.as_str()).copied().unwrap_or(0))
    };
    let mut planned: Vec<(String, Digest)> = Vec::new();
    let is_planned = |planned: &[(String, Digest)], n: &str, d: &Digest| {
        planned.iter().any(|(p, q)| p == n && q == d)
    };
    let mut sum = 0u64;
    for round in 1..=2usize {
        for h in &hot {
            let holders: Vec<&&NodeView> = cluster
                .iter()
                .filter(|n| n.whole.contains(&h.digest))
                .collect();
            if round == 1 {
                for n in &holders {
                    *committed.entry(n.name.as_str()).or_default() += h.size;
                }
            }
            let have = holders.len() + planned.iter().filter(|(_, d)| *d == h.digest).count();
            if have >= round {
                if round == 1 {
                    sum += h.size;
                }
                continue;
            }
            if sum + h.size > cache_sum {
                continue;
            }
            let target = cluster
                .iter()
                .filter(|n| {
                    !n.whole.contains(&h.digest) && !is_planned(&planned, &n.name, &h.digest)
                })
                .filter(|n| room(n, &committed) >= h.size)
                .max_by_key(|n| room(n, &committed));
            if let Some(n) = target {
                *committed.entry(n.name.as_str()).or_default() += h.size;
                sum += h.size;
                planned.push((n.name.clone(), h.digest.clone()));
            }
        }
    }
    planned
}

/// A cluster's `plan` with the layers that would come from the cloud
/// while the edge already has them coming: a layer no node holds whole
/// (`at_edge`) is asked of one cluster only; it stays out of the others'
/// plans while it is `in_flight`, and they get it from that cluster once it
/// is there. Layers asked here are added to `in_flight`.
pub fn edge_first(
    plan: Vec<(String, Digest)>,
    at_edge: &LayerSet,
    in_flight: &mut LayerSet,
) -> Vec<(String, Digest)> {
    let mut asked_here = LayerSet::default();
    plan.into_iter()
        .filter(|(_, d)| {
            if at_edge.contains(d) || asked_here.contains(d) {
                return true;
            }
            if in_flight.insert(d.clone()) {
                asked_here.insert(d.clone());
                return true;
            }
            false
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hot(i: u8, size: u64, pop: f64) -> Hot {
        Hot {
            digest: Digest::of(&[i]),
            size,
            popularity: pop,
        }
    }

    #[test]
    fn a_layer_new_to_the_edge_goes_to_one_cluster_first() {
        let d = |i: u8| Digest::of(&[i]);
        let at_edge: LayerSet = [d(1)].into_iter().collect();
        let mut in_flight: LayerSet = [d(2)].into_iter().collect();
        let plan = |n: &str| {
            vec![
                (format!("{n}1"), d(1)),
                (format!("{n}1"), d(2)),
                (format!("{n}1"), d(3)),
                (format!("{n}2"), d(3)),
            ]
        };
        // Held somewhere: every cluster may take it (from that peer); in
        // flight elsewhere: wait; new: this cluster, both its copies.
        let a = edge_first(plan("a"), &at_edge, &mut in_flight);
        assert_eq!(
            a,
            vec![
                ("a1".to_string(), d(1)),
                ("a1".to_string(), d(3)),
                ("a2".to_string(), d(3))
            ]
        );
        assert!(in_flight.contains(&d(3)));
        // The next cluster waits for layer 3.
        let b = edge_first(plan("b"), &at_edge, &mut in_flight);
        assert_eq!(b, vec![("b1".to_string(), d(1))]);
    }

    #[test]
    fn one_copy_of_the_hottest_before_any_second_within_the_sum() {
        let a = NodeView {
            name: "a".into(),
            whole: [Digest::of(&[1])].into_iter().collect(),
            cache_room: Some(100),
            ..NodeView::default()
        };
        let b = NodeView {
            name: "b".into(),
            cache_room: Some(60),
            ..NodeView::default()
        };
        let hots = [hot(1, 40, 9.0), hot(2, 40, 5.0), hot(3, 40, 1.0)];
        // 120 bytes: layer 1 is there, 2 and 3 get their first copy.
        let p = plan_prefetch(&[&a, &b], &hots, 120);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|(_, d)| *d == Digest::of(&[2])));
        assert!(p.iter().any(|(_, d)| *d == Digest::of(&[3])));
        // 80 bytes: only the hotter of the missing two fits, on the node
        // with the most room left (a keeps 40 for layer 1: 60 each; b
        // then only 20, so layer 3 would go to a).
        let p = plan_prefetch(&[&a, &b], &hots, 80);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].1, Digest::of(&[2]));
        let p = plan_prefetch(&[&a, &b], &hots, 120);
        let on = |d: u8| {
            p.iter()
                .find(|(_, x)| *x == Digest::of(&[d]))
                .map(|(n, _)| n.as_str())
        };
        assert_ne!(on(2), on(3), "{p:?}");
        // Room for more: a second copy of the hottest goes to a node with
        // room for it, before any other second copy.
        let roomy = NodeView {
            cache_room: Some(200),
            ..b.clone()
        };
        let p = plan_prefetch(&[&a, &roomy], &hots, 160);
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[2], ("b".to_string(), Digest::of(&[1])), "{p:?}");
        // Colder layers a node holds make way; hotter ones do not: a
        // full node holding only a cold layer takes the hot one, a full
        // node holding a hotter layer takes nothing.
        let cold = NodeView {
            name: "c".into(),
            whole: [Digest::of(&[9])].into_iter().collect(),
            cache_room: Some(40),
            ..NodeView::default()
        };
        let with_cold = [hot(9, 40, 0.5), hot(2, 40, 5.0)];
        assert_eq!(
            plan_prefetch(&[&cold], &with_cold, 1000),
            vec![("c".to_string(), Digest::of(&[2]))]
        );
        let with_hot = [hot(9, 40, 50.0), hot(2, 40, 5.0)];
        assert!(plan_prefetch(&[&cold], &with_hot, 1000).is_empty());
        // A node's room is never exceeded.
        let tiny = NodeView {
            name: "t".into(),
            cache_room: Some(10),
            ..NodeView::default()
        };
        assert!(plan_prefetch(&[&tiny], &hots, 1000).is_empty());
    }
}
