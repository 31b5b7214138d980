//! Placement and prefetch simulation driven by the IBM registry trace
//! sample (`../shared/data/ibm-dal09-blobs-sample.csv`): 4 edge clusters ×
//! 4 nodes with given cache budgets, links and loads; each deployment of
//! the trace (a client fetching a repository's blobs) is placed in the
//! client's cluster by
//!
//! * **breakfs**: the extender's filter and scores (expected fetch time over
//!   local, peer and cloud, layer locality, balanced, least requested), with
//!   the prefetch planner keeping the hottest layers in each cluster;
//! * **default-like**: least requested plus whole-image locality (after
//!   kube-scheduler's ImageLocality: an image counts only when all its
//!   layers are on the node), per-node LRU caches.
//!
//! Reported: mean expected fetch time of the chosen nodes (same estimator
//! for both), limit violations, and the cluster-level byte hit ratio
//! (bytes of each deployment already in its cluster).
//!
//! `cargo bench --bench sched_sim -- [--trace FILE] [--seed N]`; writes
//! target/bench-sched-sim.md. A first version: the trace sample is small
//! (999 requests), so figures move with the seed.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};

use breakfs_index::Digest;
use breakfs_sched::planner::{Hot, plan_prefetch};
use breakfs_sched::score::{self, Layer, Link, NodeView, Weights};
use breakfs_sched::types::Limits;

const CLUSTERS: usize = 4;
const PER: usize = 4;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1e6
    }
}

/// One deployment: when, from which client, which image.
struct Deploy {
    client: String,
    image: String,
}

fn read_trace(path: &str) -> (Vec<Deploy>, HashMap<String, Vec<Layer>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (uri, size, client, ts) = (
        col("http.request.uri"),
        col("http.response.written"),
        col("http.request.remoteaddr"),
        col("timestamp"),
    );
    let mut rows: Vec<(String, String, String, String, u64)> = Vec::new();
    for l in lines {
        // The user agent has no commas in this sample; split plainly.
        let f: Vec<&str> = l.split(',').collect();
        if f.len() < header.len() {
            continue;
        }
        let parts: Vec<&str> = f[uri].split('/').collect();
        if parts.len() < 5 || parts[parts.len() - 2] != "blobs" {
            continue;
        }
        let repo = parts[1..parts.len() - 2].join("/");
        let blob = parts[parts.len() - 1].to_string();
        let bytes = f[size].parse::<f64>().unwrap_or(0.0) as u64;
        rows.push((f[ts].to_string(), f[client].to_string(), repo, blob, bytes));
    }
    rows.sort();
    let mut images: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
    for (_, _, repo, blob, bytes) in &rows {
        let e = images
            .entry(repo.clone())
            .or_default()
            .entry(blob.clone())
            .or_insert(0);
        *e = (*e).max(*bytes).max(1);
    }
    // A deployment: a client's first blob request for a repository in a
    // run of requests (a new run after another repository's).
    let mut deploys = Vec::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for (_, client, repo, _, _) in &rows {
        if last.get(client) != Some(repo) {
            deploys.push(Deploy {
                client: client.clone(),
                image: repo.clone(),
            });
            last.insert(client.clone(), repo.clone());
        }
    }
    let layers = images
        .into_iter()
        .map(|(repo, blobs)| {
            let ls = blobs
                .into_iter()
                .map(|(b, size)| Layer {
                    digest: Digest::of(b.as_bytes()),
                    size,
                })
                .collect();
            (repo, ls)
        })
        .collect();
    (deploys, layers)
}

/// A node's cache: layers with their last use, within a budget (LRU).
#[derive(Clone, Default)]
struct Cache {
    budget: u64,
    used: u64,
    held: HashMap<Digest, (u64, u64)>,
}

impl Cache {
    fn touch(&mut self, l: &Layer, t: u64) {
        if let Some(e) = self.held.get_mut(&l.digest) {
            e.1 = t;
            return;
        }
        if l.size > self.budget {
            return;
        }
        while self.used + l.size > self.budget {
            let (d, (s, _)) = self
                .held
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(d, v)| (d.clone(), *v))
                .unwrap();
            self.held.remove(&d);
            self.used -= s;
        }
        self.held.insert(l.digest.clone(), (l.size, t));
        self.used += l.size;
    }
}

struct Sim {
    views: Vec<NodeView>,
    caches: Vec<Cache>,
    load: Vec<(f64, f64)>,
}

impl Sim {
    fn new(rng: &mut Rng, budget: u64) -> Sim {
        let mut views = Vec::new();
        for c in 0..CLUSTERS {
            // Clusters differ in how far the cloud is.
            let (rtt, mbps) = [(30.0, 200.0), (60.0, 100.0), (90.0, 50.0), (120.0, 30.0)][c];
            for n in 0..PER {
                views.push(NodeView {
                    name: format!("c{c}n{n}"),
                    cluster: format!("c{c}"),
                    cloud: Some(Link {
                        rtt_ms: rtt * (0.8 + 0.4 * rng.unit()),
                        mbps: mbps * (0.7 + 0.6 * rng.unit()),
                    }),
                    allocatable: Some((8.0, 32e9)),
                    ..NodeView::default()
                });
            }
        }
        let n = views.len();
        Sim {
            views,
            caches: vec![
                Cache {
                    budget,
                    ..Cache::default()
                };
                n
            ],
            load: (0..n)
                .map(|_| (rng.unit() * 4.0, rng.unit() * 16e9))
                .collect(),
        }
    }

    fn sync(&mut self) {
        for (v, c) in self.views.iter_mut().zip(&self.caches) {
            v.whole = c
                .held
                .keys()
                .cloned()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            v.disk_free = Some(c.budget - c.used);
        }
        for (v, l) in self.views.iter_mut().zip(&self.load) {
            v.requested = *l;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let trace = opt("--trace").unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/ibm-dal09-blobs-sample.csv"
        )
        .to_string()
    });
    let seed: u64 = opt("--seed").and_then(|s| s.parse().ok()).unwrap_or(7);
    let (deploys, images) = read_trace(&trace);
    let unique: u64 = images
        .values()
        .flatten()
        .map(|l| (l.digest.clone(), l.size))
        .collect::<HashMap<_, _>>()
        .values()
        .sum();
    // Each node's cache holds an eighth of all the trace's distinct bytes;
    // the planner may fill half of a cluster's total.
    let budget = unique / 8;
    let cache_sum = budget * PER as u64 / 2;
    let clients: Vec<String> = {
        let mut c: Vec<String> = deploys.iter().map(|d| d.client.clone()).collect();
        c.sort();
        c.dedup();
        c
    };
    let cluster_of = |client: &str| clients.iter().position(|c| c == client).unwrap() % CLUSTERS;
    let mut rng = Rng(seed.max(1) * 0x9E3779B97F4A7C15);
    let mut ours = Sim::new(&mut rng, budget);
    let mut rng = Rng(seed.max(1) * 0x9E3779B97F4A7C15);
    let mut base = Sim::new(&mut rng, budget);
    let mut popularity: HashMap<Digest, (f64, u64)> = HashMap::new();
    let (mut t_ours, mut t_base) = (Vec::new(), Vec::new());
    let (mut hit_ours, mut hit_base, mut total) = (0u64, 0u64, 0u64);
    let mut violations = 0;
    // The weights of the paper's scheduler YAML (netWeight 1.5, layerWeight 2).
    let weights = Weights {
        net_weight: 1.5,
        layer_weight: 2.0,
        ..Weights::default()
    };
    let mut unschedulable = 0;
    let mut prng = Rng(seed.max(1) + 99);
    for (i, d) in deploys.iter().enumerate() {
        let t = i as u64 + 1;
        let layers = &images[&d.image];
        let c = cluster_of(&d.client);
        let idx: Vec<usize> = (c * PER..(c + 1) * PER).collect();
        // A third of the pods ask for a delay limit.
        let limits = Limits {
            delay_ms: prng.next().is_multiple_of(3).then_some(100.0),
            bandwidth_mbps: None,
        };
        let pod = (0.25, 0.5e9);
        let bytes: u64 = layers.iter().map(|l| l.size).sum();
        total += bytes;
        for (sim, times, hits, is_ours) in [
            (&mut ours, &mut t_ours, &mut hit_ours, true),
            (&mut base, &mut t_base, &mut hit_base, false),
        ] {
            sim.sync();
            let cluster: Vec<&NodeView> = idx.iter().map(|&n| &sim.views[n]).collect();
            let holders = score::holders(cluster.iter().copied());
            let ests: Vec<score::Estimate> = cluster
                .iter()
                .map(|v| score::estimate_time(v, &holders, layers))
                .collect();
            let in_cluster: u64 = layers
                .iter()
                .filter(|l| holders.contains_key(&l.digest))
                .map(|l| l.size)
                .sum();
            *hits += in_cluster;
            let pick = if is_ours {
                let ok: Vec<usize> = (0..PER)
                    .filter(|&k| score::refuse(cluster[k], &ests[k], &limits).is_none())
                    .collect();
                if ok.is_empty() {
                    // No node of the cluster meets the pod's limit: the pod
                    // stays pending (kube-scheduler would report it).
                    unschedulable += 1;
                }
                let cand: Vec<&NodeView> = ok.iter().map(|&k| cluster[k]).collect();
                let cest: Vec<score::Estimate> = ok.iter().map(|&k| ests[k].clone()).collect();
                let s = score::scores(&cand, &cest, pod, &weights);
                ok.get(
                    s.iter()
                        .enumerate()
                        .max_by_key(|(_, (s, _))| *s)
                        .map(|(k, _)| k)
                        .unwrap_or(0),
                )
                .copied()
                .unwrap_or(0)
            } else {
                // Least requested + whole-image locality.
                (0..PER)
                    .max_by(|&a, &b| {
                        let key = |k: usize| {
                            let v = cluster[k];
                            let (cpu, mem) = v.allocatable.unwrap();
                            let least = 1.0
                                - ((v.requested.0 + pod.0) / cpu + (v.requested.1 + pod.1) / mem)
                                    / 2.0;
                            let whole = layers.iter().all(|l| v.whole.contains(&l.digest));
                            least + if whole { 1.0 } else { 0.0 }
                        };
                        key(a).total_cmp(&key(b))
                    })
                    .unwrap()
            };
            let chosen = cluster[pick];
            if let (Some(max), Some(cl)) = (limits.delay_ms, chosen.cloud)
                && cl.rtt_ms > max
                && is_ours
                && score::refuse(chosen, &ests[pick], &Limits::default()).is_none()
                && !(0..PER).all(|k| score::refuse(cluster[k], &ests[k], &limits).is_some())
            {
                violations += 1;
            }
            times.push(ests[pick].fetch_secs);
            let node = idx[pick];
            for l in layers {
                sim.caches[node].touch(l, t);
            }
            sim.load[node].0 = (sim.load[node].0 + pod.0).min(7.5);
            sim.load[node].1 = (sim.load[node].1 + pod.1).min(30e9);
        }
        // breakfs: placements feed popularity; the planner runs every 10.
        for l in layers {
            let e = popularity.entry(l.digest.clone()).or_insert((0.0, l.size));
            e.0 += 1.0;
        }
        if i % 10 == 9 {
            for e in popularity.values_mut() {
                e.0 *= 0.9;
            }
            ours.sync();
            let hot: Vec<Hot> = popularity
                .iter()
                .map(|(d, (p, s))| Hot {
                    digest: d.clone(),
                    size: *s,
                    popularity: *p,
                })
                .collect();
            for c in 0..CLUSTERS {
                let idx: Vec<usize> = (c * PER..(c + 1) * PER).collect();
                let cluster: Vec<&NodeView> = idx.iter().map(|&n| &ours.views[n]).collect();
                let plan = plan_prefetch(&cluster, &hot, cache_sum);
                for (node, digest) in plan {
                    let n = ours.views.iter().position(|v| v.name == node).unwrap();
                    let size = popularity[&digest].1;
                    ours.caches[n].touch(&Layer { digest, size }, t);
                }
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (mo, mb) = (mean(&t_ours), mean(&t_base));
    let (ho, hb) = (
        hit_ours as f64 / total as f64,
        hit_base as f64 / total as f64,
    );
    let report = format!(
        "### Placement and prefetch simulation (IBM trace sample)\n\n\
         `cargo bench --bench sched_sim -- --seed {seed}`: {} deployments of {} images from {} clients \
         mapped onto {CLUSTERS} clusters × {PER} nodes; node cache {:.1} MB each (an eighth of the trace's \
         {:.1} MB of distinct layers), planner cacheSumSize {:.1} MB per cluster; cloud links 30–120 ms, \
         30–200 Mbit/s by cluster; a third of the pods limit delay to 100 ms.\n\n\
         | | breakfs | default-like | ratio | target |\n|---|---:|---:|---:|---|\n\
         | mean expected fetch time of the chosen node | {:.3} s | {:.3} s | {:.2} | ≤ 0.5 |\n\
         | cluster byte hit ratio | {:.3} | {:.3} | {:.2} | ≥ 1.3 |\n\
         | delay-limit violations | {violations} | – | | 0 |\n\
         | pods no node of their cluster could take (limit) | {unschedulable} | – | | |\n",
        deploys.len(),
        images.len(),
        clients.len(),
        budget as f64 / 1e6,
        unique as f64 / 1e6,
        cache_sum as f64 / 1e6,
        mo,
        mb,
        mo / mb.max(1e-9),
        ho,
        hb,
        ho / hb.max(1e-9),
    );
    println!("{report}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-sched-sim.md", report).unwrap();
}
