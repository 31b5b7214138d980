//! The proactive prefetch planner: per cluster, keep the hottest layers
//! within the cluster's `cacheSumSize`, one copy in the cluster before a
//! second, placed on the nodes with the most room.

use rustc_hash::FxHashMap as HashMap;

use breakfs_index::Digest;

use crate::score::NodeView;

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
/// while the sum allows. A node takes a layer only if its free cache
/// (`disk_free`, unknown: unlimited) holds it.
pub fn plan_prefetch(cluster: &[&NodeView], hot: &[Hot], cache_sum: u64) -> Vec<(String, Digest)> {
    let mut hot: Vec<&Hot> = hot.iter().filter(|h| h.popularity > 0.0).collect();
    hot.sort_by(|a, b| b.popularity.total_cmp(&a.popularity));
    let mut free: HashMap<&str, u64> = cluster
        .iter()
        .map(|n| (n.name.as_str(), n.disk_free.unwrap_or(u64::MAX)))
        .collect();
    let copies = |d: &Digest, planned: &[(String, Digest)]| {
        cluster.iter().filter(|n| n.whole.contains(d)).count()
            + planned.iter().filter(|(_, p)| p == d).count()
    };
    let mut planned: Vec<(String, Digest)> = Vec::new();
    let mut sum = 0u64;
    for round in 1..=2usize {
        for h in &hot {
            let have = copies(&h.digest, &planned);
            if have >= round {
                if round == 1 {
                    sum += h.size;
                }
                continue;
            }
            if sum + h.size > cache_sum {
                continue;
            }
            // The node with the most room that does not hold it.
            let target = cluster
                .iter()
                .filter(|n| {
                    !n.whole.contains(&h.digest)
                        && !planned.iter().any(|(p, d)| p == &n.name && d == &h.digest)
                })
                .filter(|n| free.get(n.name.as_str()).is_some_and(|f| *f >= h.size))
                .max_by_key(|n| free.get(n.name.as_str()).copied().unwrap_or(0));
            if let Some(n) = target {
                if let Some(f) = free.get_mut(n.name.as_str()) {
                    *f = f.saturating_sub(h.size);
                }
                sum += h.size;
                planned.push((n.name.clone(), h.digest.clone()));
            }
        }
    }
    planned
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
    fn one_copy_of_the_hottest_before_any_second_within_the_sum() {
        let a = NodeView {
            name: "a".into(),
            whole: [Digest::of(&[1])].into_iter().collect(),
            disk_free: Some(100),
            ..NodeView::default()
        };
        let b = NodeView {
            name: "b".into(),
            disk_free: Some(60),
            ..NodeView::default()
        };
        let hots = [hot(1, 40, 9.0), hot(2, 40, 5.0), hot(3, 40, 1.0)];
        // 120 bytes: layer 1 is there, 2 and 3 get their first copy.
        let p = plan_prefetch(&[&a, &b], &hots, 120);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|(_, d)| *d == Digest::of(&[2])));
        assert!(p.iter().any(|(_, d)| *d == Digest::of(&[3])));
        // 80 bytes: only the hotter of the missing two fits.
        let p = plan_prefetch(&[&a, &b], &hots, 80);
        assert_eq!(p, vec![("a".to_string(), Digest::of(&[2]))]);
        // Room for more: a second copy of the hottest goes to a node with
        // room for it, before any other second copy.
        let roomy = NodeView {
            disk_free: Some(200),
            ..b.clone()
        };
        let p = plan_prefetch(&[&a, &roomy], &hots, 160);
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[2], ("b".to_string(), Digest::of(&[1])), "{p:?}");
        // Nodes' free space is never exceeded.
        let tiny = NodeView {
            name: "t".into(),
            disk_free: Some(10),
            ..NodeView::default()
        };
        assert!(plan_prefetch(&[&tiny], &hots, 1000).is_empty());
    }
}
