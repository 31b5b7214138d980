//! The prefetch planner loop: layer popularity fed by placements (`/plan`),
//! and every `planSecs` the hottest layers placed per cluster within
//! `cacheSumSize` ([`crate::planner`]) and asked of the node daemons with
//! `POST /prefetch`. Prefetches asked for count as held until the node's
//! index shows them.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakfs_index::Digest;

use crate::directory::Directory;
use crate::planner::{Hot, edge_first, plan_prefetch};
use crate::score::{Layer, NodeView};

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

/// The planner's state between runs.
#[derive(Default)]
pub(crate) struct Prefetch {
    /// Layer popularity fed by placements (decayed by the hour), with the
    /// layer's size and an image it belongs to.
    popularity: Mutex<HashMap<Digest, Popular>>,
    /// Prefetches asked for, by node and layer, and when: counted as held
    /// by the planner until the node's index shows them (then forgotten:
    /// the index says the rest) or they expire, so a layer in flight is not
    /// asked of a second node.
    asked: Mutex<HashMap<(String, Digest), Instant>>,
    /// Planner runs so far.
    runs: AtomicU64,
}

impl Prefetch {
    /// Count a placement of `image`'s `layers`.
    pub(crate) fn placed(&self, image: &str, layers: &[Layer]) {
        let mut pop = self.popularity.lock();
        for l in layers {
            let e = pop.entry(l.digest.clone()).or_insert(Popular {
                score: 0.0,
                at: Instant::now(),
                size: l.size,
                image: image.to_string(),
            });
            e.score = e.now() + 1.0;
            e.at = Instant::now();
        }
    }

    /// Forget the asked-for prefetches that `views` (polled now) show: from
    /// then on the index says whether the node still holds the layer
    /// (counted as held until the TTL, a layer the node evicted would not
    /// be planned again for that long).
    pub(crate) fn shown(&self, views: &[NodeView]) {
        let mut asked = self.asked.lock();
        if asked.is_empty() {
            return;
        }
        let polled: HashMap<&str, &NodeView> = views.iter().map(|v| (v.name.as_str(), v)).collect();
        asked.retain(|(node, l), _| {
            !polled
                .get(node.as_str())
                .is_some_and(|v| v.whole.contains(l))
        });
    }

    /// One planner run: per cluster, the hottest layers placed within
    /// `sum` bytes, pushed to the node daemons with `POST /prefetch`.
    pub(crate) async fn run_once(&self, dir: &Directory, sum: u64) {
        let hot: Vec<(Hot, String)> = self
            .popularity
            .lock()
            .iter()
            .map(|(d, p)| {
                (
                    Hot {
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
        let layers: Vec<Hot> = hot.iter().map(|(h, _)| h.clone()).collect();
        let pop_of: HashMap<Digest, f64> = layers
            .iter()
            .map(|h| (h.digest.clone(), h.popularity))
            .collect();
        let image_of: HashMap<Digest, String> =
            hot.into_iter().map(|(h, i)| (h.digest, i)).collect();
        let d = dir.snapshot();
        let mut clusters: HashMap<String, Vec<std::sync::Arc<NodeView>>> = HashMap::new();
        // Layers some node at the edge holds whole, and those on their way
        // to one: a layer goes from the cloud into one cluster only; the
        // others wait until it is there and then take it from that peer
        // (closer than the registry, and the cloud link stays free).
        let mut at_edge: rustc_hash::FxHashSet<Digest> = Default::default();
        let mut in_flight: rustc_hash::FxHashSet<Digest> = Default::default();
        {
            let mut asked = self.asked.lock();
            asked.retain(|_, at| at.elapsed() < ASKED_TTL);
            for n in dir.node_entries().iter() {
                let mut v = dir.view(&d, &n.name);
                at_edge.extend(v.whole.iter().cloned());
                let pending: Vec<Digest> = asked
                    .keys()
                    .filter(|(node, l)| *node == n.name && !v.whole.contains(l))
                    .map(|(_, l)| l.clone())
                    .collect();
                if !pending.is_empty() {
                    in_flight.extend(pending.iter().cloned());
                    std::sync::Arc::make_mut(&mut v).whole.extend(pending);
                }
                clusters.entry(n.cluster.clone()).or_default().push(v);
            }
        }
        // Clusters in turn, starting one further each run, so that first
        // copies spread over the clusters.
        let mut order: Vec<&String> = clusters.keys().collect();
        order.sort();
        let turn = self.runs.fetch_add(1, Ordering::Relaxed);
        if !order.is_empty() {
            let k = turn as usize % order.len();
            order.rotate_left(k);
        }
        for cluster in order {
            let refs: Vec<&NodeView> = clusters[cluster].iter().map(|v| v.as_ref()).collect();
            let plan = plan_prefetch(&refs, &layers, sum);
            let plan = edge_first(plan, &at_edge, &mut in_flight);
            // One request per node and image.
            let mut asks: HashMap<(String, String), Vec<Digest>> = HashMap::new();
            for (node, digest) in plan {
                if let Some(image) = image_of.get(&digest) {
                    asks.entry((node, image.clone())).or_default().push(digest);
                }
            }
            for ((node, image), digests) in asks {
                let popularity: BTreeMap<&Digest, f64> = digests
                    .iter()
                    .filter_map(|d| pop_of.get(d).map(|p| (d, *p)))
                    .collect();
                self.ask(dir, &node, image, &digests, popularity).await;
            }
        }
    }

    /// Ask node `node` to prefetch `digests` of `image`.
    async fn ask(
        &self,
        dir: &Directory,
        node: &str,
        image: String,
        digests: &[Digest],
        popularity: BTreeMap<&Digest, f64>,
    ) {
        let Some(url) = dir
            .node_entries()
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.url.clone())
        else {
            return;
        };
        let image = if image.contains("://") {
            image
        } else {
            format!("docker://{image}")
        };
        let body = serde_json::json!({"image": image, "layers": digests, "popularity": popularity});
        let r = dir
            .http()
            .post(format!("{}/prefetch", url.trim_end_matches('/')))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                tracing::info!(node = %node, layers = digests.len(), "prefetch planned");
                let mut asked = self.asked.lock();
                for l in digests {
                    asked.insert((node.to_string(), l.clone()), Instant::now());
                }
            }
            Ok(r) => {
                tracing::warn!(node = %node, status = %r.status(), "the node refused a prefetch")
            }
            Err(e) => {
                tracing::warn!(node = %node, "asking for a prefetch failed: {}", breakfs_index::Causes(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_prefetch_is_no_longer_counted_as_asked_once_the_index_shows_it() {
        let p = Prefetch::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        {
            let mut asked = p.asked.lock();
            asked.insert(("w1".into(), a.clone()), Instant::now());
            asked.insert(("w1".into(), b.clone()), Instant::now());
        }
        p.shown(&[NodeView {
            name: "w1".into(),
            cluster: "west".into(),
            whole: [a.clone()].into_iter().collect(),
            ..NodeView::default()
        }]);
        // Shown: from now on the index alone says whether w1 holds it (an
        // eviction makes it plannable again); b is still on its way.
        let asked = p.asked.lock();
        assert!(!asked.contains_key(&("w1".into(), a)));
        assert!(asked.contains_key(&("w1".into(), b)));
    }

    /// What the log shows.
    #[derive(Clone, Default)]
    struct Log(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A node that cannot be asked: the warning says why (the refused
    /// connection), not only that the request failed.
    #[tokio::test]
    async fn a_failed_prefetch_request_is_logged_with_its_cause() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let node = crate::directory::NodeEntry {
            name: "gone".into(),
            url,
            cluster: "west".into(),
        };
        let dir = Directory::new(vec![node], 30.0, None).unwrap();
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let layer = Digest::of(b"a");
        Prefetch::default()
            .ask(&dir, "gone", "reg/app:v1".into(), &[layer], BTreeMap::new())
            .await;
        let text = String::from_utf8_lossy(&log.0.lock()).into_owned();
        assert!(text.contains("asking for a prefetch failed"), "{text}");
        assert!(text.contains("Connection refused"), "no cause: {text}");
    }
}
