//! Placement and prefetch simulation driven by the IBM registry trace
//! sample (`../shared/data/ibm-dal09-blobs-sample.csv`).
//!
//! 4 edge clusters × 4 worker nodes (2 vCPU, 4 GB, like BREAK's testbed),
//! each node with a layer cache of a given budget and its own link to the
//! registry (RTT and bandwidth differ by cluster and by node), nodes of a
//! cluster 1 ms / 1 Gbit/s apart. The trace's clients are mapped onto the
//! clusters; each **deployment** is a client's run of blob requests for one
//! repository (its layers are the blobs it fetched, at the trace's time).
//! A third of the pods carry a delay limit; pods request CPU and memory and
//! run five minutes.
//!
//! Worlds, replayed side by side on the same deployments:
//!
//! * **breakfs**: the extender's filter and scores (sched/src/score.rs:
//!   expected fetch time over local, peer and cloud, layer locality,
//!   balanced, least requested; the paper's weights), nodes fetch missing
//!   layers from a peer (of their cluster, else of another: links across
//!   clusters around the edge testbed's 20 ms / 200 Mbit/s) or the cloud,
//!   as the node daemon does, caches evict by the node budget's value
//!   (fetch/src/budget.rs), and the prefetch planner (sched/src/planner.rs)
//!   runs every 30 s over the popularity that placements feed (a layer no
//!   node holds goes from the cloud into one cluster first, as sched's
//!   plan_once does); prefetches take the time their link needs, one at a
//!   time per node, and wait while a deployment on the node fetches.
//! * **default-like**: what a stock cluster does: kube-scheduler's
//!   least-requested and ImageLocality scores (an image counts only when
//!   all its layers are on the node, scaled by size and spread), each node
//!   pulls its missing layers from the registry, per-node LRU caches of the
//!   same size (never removing layers of running pods, like kubelet's image
//!   GC). It gets the pods' limits as a filter too, so both pick among the
//!   same nodes.
//! * ablations: default-like placement in the breakfs world (what placement
//!   alone is worth), breakfs without the planner; and a bound: always the
//!   node with the least expected fetch time, in the breakfs world.
//!
//! Reported: mean expected fetch time of the chosen nodes (sched's
//! estimator, with each world's sources), limit violations, unschedulable
//! pods, and the cluster-level byte hit ratio (bytes of each deployment
//! already on some node of its cluster when it is placed).
//!
//! `cargo bench --bench sched_sim -- [--trace FILE] [--seed N] [--runs N]
//! [--budget-share F] [--sum-share F] [--relay-efficiency F]`;
//! writes target/bench-sched-sim.md.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};

use breakfs_fetch::budget::layer_value;
use breakfs_index::Digest;
use breakfs_sched::planner::{Hot, LayerSet, edge_first, plan_prefetch};
use breakfs_sched::score::{self, Layer, Link, NodeView, Weights};
use breakfs_sched::types::Limits;
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

const CLUSTERS: usize = 4;
const PER: usize = 4;
/// Seconds a pod runs.
const POD_LIFE: f64 = 300.0;
/// Seconds between planner runs.
const PLAN_EVERY: f64 = 30.0;
/// Popularity half-life of the scheduler (sched/src/service.rs).
const POP_HALF_LIFE: f64 = 3600.0;
/// Seconds an asked-for prefetch counts as held (sched's `ASKED_TTL`).
const ASKED_TTL: f64 = 600.0;

/// One deployment: when (seconds into the trace), from which client,
/// which layers.
struct Deploy {
    at: f64,
    client: String,
    layers: Vec<Layer>,
}

fn seconds(ts: &str) -> f64 {
    // "2017-06-20 00:00:03.589": the sample spans one day.
    let time = ts.split(' ').nth(1).unwrap_or("0:0:0");
    let f: Vec<f64> = time.split(':').map(|x| x.parse().unwrap_or(0.0)).collect();
    f.first().unwrap_or(&0.0) * 3600.0 + f.get(1).unwrap_or(&0.0) * 60.0 + f.get(2).unwrap_or(&0.0)
}

fn read_trace(path: &str) -> Vec<Deploy> {
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
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut sizes: HashMap<String, u64> = HashMap::new();
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
        let e = sizes.entry(blob.clone()).or_insert(1);
        *e = (*e).max(bytes);
        rows.push((f[ts].to_string(), f[client].to_string(), repo, blob));
    }
    rows.sort();
    // A deployment: a client's run of requests for one repository.
    let mut deploys: Vec<Deploy> = Vec::new();
    let mut open: HashMap<String, (String, usize)> = HashMap::new();
    for (ts, client, repo, blob) in &rows {
        let i = match open.get(client) {
            Some((r, i)) if r == repo => *i,
            _ => {
                deploys.push(Deploy {
                    at: seconds(ts),
                    client: client.clone(),
                    layers: Vec::new(),
                });
                open.insert(client.clone(), (repo.clone(), deploys.len() - 1));
                deploys.len() - 1
            }
        };
        let d = Digest::of(blob.as_bytes());
        if !deploys[i].layers.iter().any(|l| l.digest == d) {
            deploys[i].layers.push(Layer {
                digest: d,
                size: sizes[blob],
            });
        }
    }
    deploys
}

/// A layer in a node's cache.
#[derive(Clone)]
struct Held {
    size: u64,
    /// When it is on the node (a prefetch in flight: later than now).
    ready: f64,
    last: f64,
    uses: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Breakfs,
    Default,
    /// The candidate with the least expected fetch time (a bound).
    Fastest,
}

#[derive(Clone, Copy)]
struct World {
    name: &'static str,
    policy: Policy,
    peers: bool,
    planner: bool,
    lru: bool,
    /// Nodes relay registry ranges for their cluster's peers
    /// (`breakfs node --relay`: each node here has its own uplink).
    relays: bool,
}

struct Node {
    view: NodeView,
    budget: u64,
    cache: BTreeMap<Digest, Held>,
    used: u64,
    /// When its registry link is free for the next prefetch.
    link_free: f64,
    /// Until when a deployment's fetch uses its registry link (its own,
    /// or relaying for a peer's).
    fetching_until: f64,
    /// Running pods: until when, CPU, memory, layers.
    pods: Vec<(f64, f64, f64, Vec<Digest>)>,
}

impl Node {
    fn live(&self) -> HashSet<&Digest> {
        self.pods.iter().flat_map(|p| p.3.iter()).collect()
    }

    /// Put `layer` in the cache at `t` (ready at `ready`), evicting by the
    /// world's rule; false when it cannot fit.
    /// A prefetch passes the scheduler's popularity (`at_least`), as
    /// `POST /prefetch` does.
    fn keep(&mut self, l: &Layer, t: f64, ready: f64, lru: bool, at_least: f64) -> bool {
        if let Some(h) = self.cache.get_mut(&l.digest) {
            h.uses = (h.uses * 0.5f64.powf((t - h.last).max(0.0) / 3600.0) + 1.0).max(at_least);
            h.last = t;
            h.ready = h.ready.min(ready);
            return true;
        }
        while self.used + l.size > self.budget {
            let live = self.live();
            let victim = self
                .cache
                .iter()
                .filter(|(d, _)| !live.contains(d))
                .map(|(d, h)| {
                    let key = if lru {
                        h.last
                    } else {
                        layer_value(h.uses, t - h.last, false)
                    };
                    (key, d.clone())
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let Some((_, d)) = victim else { return false };
            let h = self.cache.remove(&d).unwrap();
            self.used -= h.size;
        }
        self.cache.insert(
            l.digest.clone(),
            Held {
                size: l.size,
                ready,
                last: t,
                uses: at_least.max(1.0),
            },
        );
        self.used += l.size;
        true
    }

    /// What its published index shows at `t` (layers on disk), and, for
    /// the planner, what was asked of it too.
    fn sync(&mut self, t: f64, pending: Option<&HashSet<Digest>>) {
        self.pods.retain(|p| p.0 > t);
        self.view.requested = self
            .pods
            .iter()
            .fold((0.0, 0.0), |a, p| (a.0 + p.1, a.1 + p.2));
        self.view.whole = self
            .cache
            .iter()
            .filter(|(_, h)| h.ready <= t)
            .map(|(d, _)| d.clone())
            .collect();
        // The scheduler counts what it asked for as held until it shows.
        self.view
            .whole
            .extend(pending.into_iter().flatten().cloned());
        self.view.cache_room = Some(self.budget);
    }
}

struct Sim {
    world: World,
    nodes: Vec<Node>,
    popularity: BTreeMap<Digest, (f64, f64, u64)>,
    /// Prefetches asked for: (node, layer) → when (sched's `asked`).
    asked: BTreeMap<(usize, Digest), f64>,
    /// Planner runs so far (sched's `plan_runs`).
    plan_runs: usize,
    next_plan: f64,
    sum_share: f64,
    times: Vec<f64>,
    /// The same, with a relaying peer counted only when its registry
    /// link is idle (no prefetch queued, no other deployment's fetch):
    /// the estimator assumes them idle.
    busy_times: Vec<f64>,
    /// See [`build_nodes`].
    relay_eff: f64,
    hit: u64,
    /// Bytes already on the chosen node.
    on_node: u64,
    total: u64,
    unschedulable: usize,
    violations: usize,
    from_cloud: u64,
    /// Bytes deployments took from peers in other clusters.
    from_far: u64,
    /// Layers some deployment of the trace used before (placed or not).
    seen: HashSet<Digest>,
    /// Per placed pod, lower bounds of its fetch time for any placement
    /// and prefetcher: the bytes no deployment used before (cold) over the
    /// fastest registry link its limits allow, all else free; and the
    /// same over all those links at once (a pull striped across nodes).
    bounds: Vec<(f64, f64)>,
    rng: SmallRng,
}

/// Node links: clusters differ in how far the registry is, nodes of a
/// cluster in their access (fibre, cable, radio); between clusters, one
/// link per ordered pair around the edge testbed's 20 ms / 200 Mbit/s.
/// With `relays`, every node relays, and what the relaying peers add to a
/// node's link counts at `relay_eff` (1: the estimator's ideal sum).
fn build_nodes(seed: u64, budget: u64, relays: bool, relay_eff: f64) -> Vec<Node> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut nodes = Vec::new();
    for c in 0..CLUSTERS {
        let (rtt, mbps) = [(30.0, 200.0), (50.0, 100.0), (70.0, 80.0), (90.0, 50.0)][c];
        for n in 0..PER {
            let mut peers = NodeView::default().peers;
            for m in 0..PER {
                if m != n {
                    peers.insert(
                        format!("c{c}n{m}"),
                        Link {
                            rtt_ms: 0.5 + rng.random::<f64>(),
                            mbps: 800.0 + 400.0 * rng.random::<f64>(),
                        },
                    );
                }
            }
            nodes.push(Node {
                view: NodeView {
                    name: format!("c{c}n{n}"),
                    cluster: format!("c{c}"),
                    cloud: Some(Link {
                        rtt_ms: rtt * (0.5 + 1.5 * rng.random::<f64>()),
                        mbps: mbps * (0.25 + 1.0 * rng.random::<f64>()),
                    }),
                    peers,
                    allocatable: Some((2.0, 4e9)),
                    ..NodeView::default()
                },
                budget,
                cache: BTreeMap::new(),
                used: 0,
                link_free: 0.0,
                fetching_until: 0.0,
                pods: Vec::new(),
            });
        }
    }
    // Drawn apart, so that the links above are those of every world.
    let mut far = SmallRng::seed_from_u64(seed.wrapping_add(1 << 32));
    for a in 0..CLUSTERS {
        for b in (0..CLUSTERS).filter(|&b| b != a) {
            let link = Link {
                rtt_ms: 20.0 * (0.75 + 0.5 * far.random::<f64>()),
                mbps: 200.0 * (0.75 + 0.5 * far.random::<f64>()),
            };
            for n in a * PER..(a + 1) * PER {
                for m in b * PER..(b + 1) * PER {
                    let name = nodes[m].view.name.clone();
                    nodes[n].view.peers.insert(name, link);
                }
            }
        }
    }
    if relays {
        for n in &mut nodes {
            n.view.relays = true;
        }
        for c in 0..CLUSTERS {
            let range = c * PER..(c + 1) * PER;
            let pooled: Vec<Option<Link>> = range
                .clone()
                .map(|n| {
                    pooled_at(
                        &nodes[n].view,
                        nodes[range.clone()].iter().map(|m| &m.view),
                        relay_eff,
                    )
                })
                .collect();
            for (n, p) in range.zip(pooled) {
                nodes[n].view.pooled_cloud = p;
            }
        }
    }
    nodes
}

/// `node`'s pooled registry link over its relaying `mates`, with what the
/// mates add counted at `eff` of their sum (1: sched's estimate).
fn pooled_at<'a>(
    node: &NodeView,
    mates: impl IntoIterator<Item = &'a NodeView>,
    eff: f64,
) -> Option<Link> {
    let own = node.cloud?;
    score::pooled_cloud(node, mates).map(|p| Link {
        mbps: own.mbps + eff * (p.mbps - own.mbps),
        ..p
    })
}

/// kube-scheduler's default scores for the candidates: NodeResourcesFit
/// (least allocated) plus ImageLocality (whole images only: the sum of
/// their sizes × the share of nodes holding them, between 23 MB and 1 GB
/// per container), each 0–100.
fn default_scores(
    cluster: &[&NodeView],
    cand: &[usize],
    layers: &[Layer],
    pod: (f64, f64),
) -> Vec<f64> {
    let whole = |v: &NodeView| layers.iter().all(|l| v.whole.contains(&l.digest));
    let spread = cluster.iter().filter(|v| whole(v)).count() as f64 / cluster.len() as f64;
    let size: u64 = layers.iter().map(|l| l.size).sum();
    let (min, max) = (23.0 * 1024.0 * 1024.0, 1000.0 * 1024.0 * 1024.0);
    cand.iter()
        .map(|&k| {
            let v = cluster[k];
            let (cpu, mem) = v.allocatable.unwrap();
            let least =
                50.0 * ((cpu - v.requested.0 - pod.0) / cpu + (mem - v.requested.1 - pod.1) / mem);
            let image = if whole(v) {
                let s = (size as f64 * spread).clamp(min, max);
                100.0 * (s - min) / (max - min)
            } else {
                0.0
            };
            least + image
        })
        .collect()
}

impl Sim {
    fn deploy(
        &mut self,
        d: &Deploy,
        c: usize,
        limits: &Limits,
        pod: (f64, f64),
        weights: &Weights,
    ) {
        let t = d.at;
        let cold: u64 = d
            .layers
            .iter()
            .filter(|l| !self.seen.contains(&l.digest))
            .map(|l| l.size)
            .sum();
        self.seen.extend(d.layers.iter().map(|l| l.digest.clone()));
        self.plan_until(t);
        let idx: Vec<usize> = (c * PER..(c + 1) * PER).collect();
        for n in &mut self.nodes {
            n.sync(t, None);
        }
        self.shown(t);
        let cluster: Vec<&NodeView> = idx.iter().map(|&n| &self.nodes[n].view).collect();
        // breakfs nodes fetch from any peer that holds a layer, a peer of
        // another cluster too; the default-like nodes from the registry.
        let holdings = if self.world.peers {
            score::Holdings::new(self.nodes.iter().map(|n| &n.view))
        } else {
            score::Holdings::default()
        };
        let ests: Vec<score::Estimate> = cluster
            .iter()
            .map(|v| holdings.estimate_time(v, &d.layers))
            .collect();
        // kube-scheduler's own filter (resources) and the extender's
        // (limits, cache room), for every policy.
        let cand: Vec<usize> = (0..PER)
            .filter(|&k| {
                let v = cluster[k];
                let (cpu, mem) = v.allocatable.unwrap();
                v.requested.0 + pod.0 <= cpu + 1e-9 && v.requested.1 + pod.1 <= mem
            })
            .filter(|&k| score::refuse(cluster[k], &ests[k], limits).is_none())
            .collect();
        if cand.is_empty() {
            self.unschedulable += 1;
            return;
        }
        let keys: Vec<f64> = match self.world.policy {
            Policy::Breakfs => {
                let views: Vec<&NodeView> = cand.iter().map(|&k| cluster[k]).collect();
                let e: Vec<score::Estimate> = cand.iter().map(|&k| ests[k].clone()).collect();
                score::scores(&views, &e, pod, weights)
                    .into_iter()
                    .map(|(s, _)| s as f64)
                    .collect()
            }
            Policy::Default => default_scores(&cluster, &cand, &d.layers, pod),
            Policy::Fastest => cand.iter().map(|&k| -ests[k].fetch_secs).collect(),
        };
        // Highest score; ties broken at random, as kube-scheduler does.
        let best = keys.iter().copied().fold(f64::MIN, f64::max);
        let ties: Vec<usize> = (0..cand.len())
            .filter(|&i| keys[i] >= best - 1e-9)
            .collect();
        let k = cand[ties[self.rng.random_range(..ties.len())]];
        if let (Some(max), Some(link)) = (limits.delay_ms, cluster[k].cloud)
            && link.rtt_ms > max
        {
            self.violations += 1;
        }
        let bytes: u64 = d.layers.iter().map(|l| l.size).sum();
        let in_cluster: u64 = d
            .layers
            .iter()
            .filter(|l| cluster.iter().any(|v| v.whole.contains(&l.digest)))
            .map(|l| l.size)
            .sum();
        let local: u64 = ests[k].local_bytes;
        let plan = holdings.estimate(cluster[k], &d.layers).plan;
        let from = |far: bool| -> u64 {
            plan.iter()
                .filter(|p| match &p.from {
                    score::From::Cloud => !far,
                    score::From::Peer { node } => {
                        far && !idx.iter().any(|&n| self.nodes[n].view.name == *node)
                    }
                    score::From::Local => false,
                })
                .map(|p| p.size)
                .sum()
        };
        self.total += bytes;
        self.hit += in_cluster;
        self.on_node += local;
        let (cloud_bytes, far_bytes) = (from(false), from(true));
        self.from_cloud += cloud_bytes;
        self.from_far += far_bytes;
        self.times.push(ests[k].fetch_secs);
        let busy = match cluster[k].pooled_cloud {
            Some(_) => {
                let idle = idx
                    .iter()
                    .map(|&n| &self.nodes[n])
                    .filter(|n| n.link_free <= t && n.fetching_until <= t)
                    .map(|n| &n.view);
                let pooled = pooled_at(cluster[k], idle, self.relay_eff);
                let mut v = cluster[k].clone();
                v.pooled_cloud = pooled;
                holdings.estimate_time(&v, &d.layers).fetch_secs
            }
            None => ests[k].fetch_secs,
        };
        self.busy_times.push(busy);
        let allowed: Vec<Link> = (0..PER)
            .filter(|&j| score::refuse(cluster[j], &ests[j], limits).is_none())
            .filter_map(|j| cluster[j].cloud)
            .collect();
        self.bounds.push(if cold == 0 {
            (0.0, 0.0)
        } else {
            let one = allowed
                .iter()
                .map(|l| l.secs(cold))
                .fold(f64::MAX, f64::min);
            // Relays carry bytes for a pod whatever its limits: every
            // registry link of the cluster.
            let links: Vec<Link> = cluster.iter().filter_map(|v| v.cloud).collect();
            let all = Link {
                rtt_ms: links.iter().map(|l| l.rtt_ms).fold(f64::MAX, f64::min),
                mbps: links.iter().map(|l| l.mbps).sum(),
            };
            (one, all.secs(cold))
        });
        // The node daemon starts no background request while a deployment
        // reads (fetch/src/fetcher.rs, take_batch): the prefetches queued
        // on the node wait until the deployment has its layers. Layers
        // pulled over relays take the relaying peers' registry links too:
        // their queued prefetches wait as long.
        let fetch = ests[k].fetch_secs;
        let relayed = self.world.relays && cloud_bytes > 0;
        for n in idx.iter().copied().filter(|&n| n == idx[k] || relayed) {
            let node = &mut self.nodes[n];
            node.fetching_until = node.fetching_until.max(t + fetch);
            if node.link_free > t {
                for h in node.cache.values_mut().filter(|h| h.ready > t) {
                    h.ready += fetch;
                }
                node.link_free += fetch;
            }
        }
        let node = &mut self.nodes[idx[k]];
        for l in &d.layers {
            node.keep(l, t, t, self.world.lru, 0.0);
        }
        node.pods.push((
            t + POD_LIFE,
            pod.0,
            pod.1,
            d.layers.iter().map(|l| l.digest.clone()).collect(),
        ));
        // A placement feeds popularity (/plan).
        for l in &d.layers {
            let e = self
                .popularity
                .entry(l.digest.clone())
                .or_insert((0.0, t, l.size));
            e.0 = e.0 * 0.5f64.powf((t - e.1) / POP_HALF_LIFE) + 1.0;
            e.1 = t;
        }
    }

    /// Planner runs due before `t`.
    fn plan_until(&mut self, t: f64) {
        if !self.world.planner {
            return;
        }
        while self.next_plan <= t {
            let now = self.next_plan;
            self.next_plan += PLAN_EVERY;
            let hot: Vec<Hot> = self
                .popularity
                .iter()
                .map(|(d, (p, at, s))| Hot {
                    digest: d.clone(),
                    size: *s,
                    popularity: p * 0.5f64.powf((now - at) / POP_HALF_LIFE),
                })
                .collect();
            self.asked.retain(|_, at| now - *at < ASKED_TTL);
            self.shown(now);
            // As sched's plan_once: what some node holds whole (at_edge)
            // and what is on its way to one (in_flight), then the clusters
            // in turn, one further each run.
            let mut at_edge = LayerSet::default();
            let mut in_flight = LayerSet::default();
            for n in 0..self.nodes.len() {
                self.nodes[n].sync(now, None);
                at_edge.extend(self.nodes[n].view.whole.iter().cloned());
                let pending: HashSet<Digest> = self
                    .asked
                    .keys()
                    .filter(|(m, d)| *m == n && !self.nodes[n].view.whole.contains(d))
                    .map(|(_, d)| d.clone())
                    .collect();
                in_flight.extend(pending.iter().cloned());
                self.nodes[n].sync(now, Some(&pending));
            }
            let turn = self.plan_runs;
            self.plan_runs += 1;
            for c in (0..CLUSTERS).map(|c| (c + turn) % CLUSTERS) {
                let idx: Vec<usize> = (c * PER..(c + 1) * PER).collect();
                let cluster: Vec<&NodeView> = idx.iter().map(|&n| &self.nodes[n].view).collect();
                let plan = plan_prefetch(&cluster, &hot, self.cache_sum());
                let plan = edge_first(plan, &at_edge, &mut in_flight);
                for (name, digest) in plan {
                    let n = idx
                        .iter()
                        .copied()
                        .find(|&n| self.nodes[n].view.name == name)
                        .unwrap();
                    let size = self.popularity[&digest].2;
                    // As the node daemon does: from the best peer that has
                    // it, of any cluster, else the cloud; one prefetch at a
                    // time per node.
                    let peer = (0..self.nodes.len())
                        .filter(|&m| {
                            m != n
                                && self.nodes[m]
                                    .cache
                                    .get(&digest)
                                    .is_some_and(|h| h.ready <= now)
                        })
                        .map(|m| self.nodes[n].view.peers[&self.nodes[m].view.name])
                        .min_by(|a, b| a.secs(size).total_cmp(&b.secs(size)));
                    let link = peer.unwrap_or_else(|| self.nodes[n].view.cloud.unwrap());
                    let pop = hot
                        .iter()
                        .find(|h| h.digest == digest)
                        .map_or(0.0, |h| h.popularity);
                    self.asked.insert((n, digest.clone()), now);
                    let node = &mut self.nodes[n];
                    let start = node.link_free.max(now);
                    let ready = start + link.secs(size);
                    if node.keep(&Layer { digest, size }, now, ready, false, pop) {
                        node.link_free = ready;
                        if peer.is_none() {
                            self.from_cloud += size;
                        }
                    }
                }
            }
        }
    }

    /// Forget the prefetches asked for that the nodes' indexes show at `t`
    /// (sched's `update` after a poll; deployments and planner runs stand
    /// for the polls, and nothing is evicted between them).
    fn shown(&mut self, t: f64) {
        let nodes = &self.nodes;
        self.asked
            .retain(|(n, d), _| !nodes[*n].cache.get(d).is_some_and(|h| h.ready <= t));
    }

    /// The planner's cacheSumSize: a share of the cluster's cache.
    fn cache_sum(&self) -> u64 {
        (self.nodes[0].budget as f64 * PER as f64 * self.sum_share) as u64
    }
}

const WORLDS: [World; 6] = [
    World {
        name: "breakfs",
        policy: Policy::Breakfs,
        peers: true,
        planner: true,
        lru: false,
        relays: true,
    },
    World {
        name: "default-like",
        policy: Policy::Default,
        peers: false,
        planner: false,
        lru: true,
        relays: false,
    },
    World {
        name: "default-like placement, breakfs caches",
        policy: Policy::Default,
        peers: true,
        planner: true,
        lru: false,
        relays: true,
    },
    World {
        name: "breakfs without the planner",
        policy: Policy::Breakfs,
        peers: true,
        planner: false,
        lru: false,
        relays: true,
    },
    World {
        name: "breakfs without relays",
        policy: Policy::Breakfs,
        peers: true,
        planner: true,
        lru: false,
        relays: false,
    },
    World {
        name: "greedy: always the fastest node, breakfs caches",
        policy: Policy::Fastest,
        peers: true,
        planner: true,
        lru: false,
        relays: true,
    },
];

/// One replay of the trace with clients mapped onto clusters at random
/// (`seed`); the worlds' outcomes.
fn replay(
    deploys: &[Deploy],
    seed: u64,
    budget: u64,
    sum_share: f64,
    relay_eff: f64,
) -> (Vec<Sim>, usize) {
    let mut clients: Vec<String> = deploys.iter().map(|d| d.client.clone()).collect();
    clients.sort();
    clients.dedup();
    let mut crng = SmallRng::seed_from_u64(seed.wrapping_add(2 << 32));
    let cluster: HashMap<String, usize> = clients
        .into_iter()
        .map(|c| (c, crng.random_range(..CLUSTERS)))
        .collect();
    let mut sims: Vec<Sim> = WORLDS
        .iter()
        .map(|&world| Sim {
            world,
            nodes: build_nodes(seed, budget, world.relays, relay_eff),
            popularity: BTreeMap::new(),
            asked: BTreeMap::new(),
            plan_runs: 0,
            next_plan: PLAN_EVERY,
            sum_share,
            times: Vec::new(),
            busy_times: Vec::new(),
            relay_eff,
            hit: 0,
            on_node: 0,
            total: 0,
            unschedulable: 0,
            violations: 0,
            from_cloud: 0,
            from_far: 0,
            seen: HashSet::new(),
            bounds: Vec::new(),
            rng: SmallRng::seed_from_u64(seed.wrapping_add(3 << 32)),
        })
        .collect();
    // The paper's scheduler YAML: netWeight 1.5, layerWeight 2.
    let weights = Weights {
        net_weight: 1.5,
        layer_weight: 2.0,
        ..Weights::default()
    };
    let mut prng = SmallRng::seed_from_u64(seed.wrapping_add(4 << 32));
    let mut limited = 0;
    for d in deploys {
        // A third of the pods limit the registry delay to 60 ms.
        let limits = Limits {
            delay_ms: prng.random_ratio(1, 3).then_some(60.0),
            bandwidth_mbps: None,
        };
        limited += usize::from(limits.delay_ms.is_some());
        let pod = [(0.1, 0.25e9), (0.25, 0.5e9), (0.5, 1e9)][prng.random_range(..3usize)];
        for s in &mut sims {
            s.deploy(d, cluster[&d.client], &limits, pod, &weights);
        }
    }
    (sims, limited)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // The project's shared copy, else the one in the repository.
    let trace = opt("--trace").unwrap_or_else(|| {
        let shared = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/ibm-dal09-blobs-sample.csv"
        );
        if std::path::Path::new(shared).exists() {
            shared.to_string()
        } else {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/ibm-dal09-blobs-sample.csv"
            )
            .to_string()
        }
    });
    let seed: u64 = opt("--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let runs: u64 = opt("--runs").and_then(|s| s.parse().ok()).unwrap_or(20);
    let share: f64 = opt("--budget-share")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.125);
    // cacheSumSize as a share of a cluster's cache (default: half).
    let sum_share: f64 = opt("--sum-share")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    // What relaying peers add to a node's registry link, as a share of
    // their links' sum (the daemon's relay benchmark: 0.60x the time alone
    // with three equal links, where the ideal is 0.33x).
    let relay_eff: f64 = opt("--relay-efficiency")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let deploys = read_trace(&trace);
    let unique: u64 = deploys
        .iter()
        .flat_map(|d| d.layers.iter().map(|l| (l.digest.clone(), l.size)))
        .collect::<HashMap<_, _>>()
        .values()
        .sum();
    // Each node's cache holds a share of all the trace's distinct bytes.
    let budget = (unique as f64 * share) as u64;
    let clients = deploys
        .iter()
        .map(|d| &d.client)
        .collect::<HashSet<_>>()
        .len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let ceiling = {
        let mut seen: HashSet<&Digest> = HashSet::new();
        let (mut again, mut all) = (0u64, 0u64);
        for d in &deploys {
            for l in &d.layers {
                all += l.size;
                if seen.contains(&l.digest) {
                    again += l.size;
                }
            }
            seen.extend(d.layers.iter().map(|l| &l.digest));
        }
        again as f64 / all.max(1) as f64
    };
    // Per world: sums over the runs, and each run's ratios to default-like.
    let n = WORLDS.len();
    let mut time_sum = vec![0.0; n];
    let mut busy_sum = vec![0.0; n];
    let mut placed = vec![0usize; n];
    let mut hits = vec![0u64; n];
    let mut on_node = vec![0u64; n];
    let mut total = vec![0u64; n];
    let mut cloud = vec![0u64; n];
    let mut far = vec![0u64; n];
    let mut unsched = vec![0usize; n];
    let mut violations = vec![0usize; n];
    let mut t_ratio: Vec<Vec<f64>> = vec![Vec::new(); n];
    // The lower bounds on the default-like world's placed pods, against
    // its mean: sums, and per run.
    let (mut bound_sum, mut striped_sum) = (0.0, 0.0);
    let (mut b_ratio, mut s_ratio) = (Vec::new(), Vec::new());
    let mut h_ratio: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut limited = 0;
    let mut cache_sum = 0;
    for r in 0..runs {
        let (sims, lim) = replay(&deploys, seed + r, budget, sum_share, relay_eff);
        limited += lim;
        cache_sum = sims[0].cache_sum();
        let bt = mean(&sims[1].times);
        let bh = sims[1].hit as f64 / sims[1].total.max(1) as f64;
        let b: Vec<f64> = sims[1].bounds.iter().map(|b| b.0).collect();
        let st: Vec<f64> = sims[1].bounds.iter().map(|b| b.1).collect();
        bound_sum += b.iter().sum::<f64>();
        striped_sum += st.iter().sum::<f64>();
        b_ratio.push(mean(&b) / bt.max(1e-9));
        s_ratio.push(mean(&st) / bt.max(1e-9));
        for (w, s) in sims.iter().enumerate() {
            time_sum[w] += s.times.iter().sum::<f64>();
            busy_sum[w] += s.busy_times.iter().sum::<f64>();
            placed[w] += s.times.len();
            hits[w] += s.hit;
            on_node[w] += s.on_node;
            total[w] += s.total;
            cloud[w] += s.from_cloud;
            far[w] += s.from_far;
            unsched[w] += s.unschedulable;
            violations[w] += s.violations;
            t_ratio[w].push(mean(&s.times) / bt.max(1e-9));
            h_ratio[w].push(s.hit as f64 / s.total.max(1) as f64 / bh.max(1e-9));
        }
    }
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        format!("{:.2} ({:.2}–{:.2})", v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let base_t = time_sum[1] / placed[1].max(1) as f64;
    let base_h = hits[1] as f64 / total[1].max(1) as f64;
    let mut table = String::from(
        "| world | placed | unschedulable | limit violations | mean expected fetch time | vs default-like (per run: median, min–max) | busy relays not counted | cluster byte hit ratio | vs default-like (per run) | bytes on the chosen node | from other clusters | registry bytes (incl. prefetch) |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|\n",
    );
    for w in 0..n {
        let t = time_sum[w] / placed[w].max(1) as f64;
        let h = hits[w] as f64 / total[w].max(1) as f64;
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} s = {:.3}× | {} | {:.3}× | {:.3} = {:.3}× | {} | {:.3} | {:.3} | {:.2}× |\n",
            WORLDS[w].name,
            placed[w],
            unsched[w],
            violations[w],
            t,
            t / base_t.max(1e-9),
            spread(&t_ratio[w]),
            busy_sum[w] / placed[w].max(1) as f64 / base_t.max(1e-9),
            h,
            h / base_h.max(1e-9),
            spread(&h_ratio[w]),
            on_node[w] as f64 / total[w].max(1) as f64,
            far[w] as f64 / total[w].max(1) as f64,
            cloud[w] as f64 / cloud[1].max(1) as f64,
        ));
    }
    let report = format!(
        "### Placement and prefetch simulation (IBM trace sample)\n\n\
         `cargo bench --bench sched_sim -- --seed {seed} --runs {runs} --budget-share {share} --sum-share {sum_share} --relay-efficiency {relay_eff}`: \
         {} deployments over {:.0} min from {clients} clients, replayed {runs} times with the clients \
         mapped onto {CLUSTERS} clusters × {PER} nodes (2 vCPU, 4 GB) at random (seeds {seed}–{}); \
         node cache {:.0} MB each ({share} of the trace's {:.0} MB of distinct layers), planner \
         cacheSumSize {:.0} MB per cluster, every {PLAN_EVERY:.0} s; registry links 30/50/70/90 ms × 0.5–2 \
         and 200/100/80/50 Mbit/s × 0.25–1.25 by cluster × node, peers ~1 ms / ~1 Gbit/s in a cluster and \
         20 ms / 200 Mbit/s × 0.75–1.25 between clusters (breakfs nodes fetch from peers of any cluster); {:.0} of the pods \
         per run limit delay to 60 ms; pods request 0.1–0.5 CPU and 0.25–1 GB for {POD_LIFE:.0} s. \
         Totals over all runs; ratios against default-like.\n\n{table}\n\
         Ceiling of the cluster byte hit ratio for any prefetcher (every layer deployed anywhere before \
         already in the cluster, caches unbounded, all deployments): {ceiling:.3} = {:.3}× default-like.\n\n\
         Lower bound of the mean expected fetch time for any placement and prefetcher that fetches each byte \
         over one node's registry link, on the default-like world's placed pods: per pod, the bytes no \
         deployment of the trace used before, over the fastest registry link among the nodes of its cluster \
         its limits allow (resources ignored), every other byte free: {:.2} s = {:.3}× default-like \
         (per run {}). The same bytes pulled over all the registry links of its cluster at once \
         (striped, each node's link its own, as relays do; every byte any deployment used before free): {:.2} s = {:.3}× (per run {}).\n",
        deploys.len(),
        (deploys.last().map_or(0.0, |d| d.at) - deploys.first().map_or(0.0, |d| d.at)) / 60.0,
        seed + runs - 1,
        budget as f64 / 1e6,
        unique as f64 / 1e6,
        cache_sum as f64 / 1e6,
        limited as f64 / runs as f64,
        ceiling / base_h.max(1e-9),
        bound_sum / placed[1].max(1) as f64,
        bound_sum / placed[1].max(1) as f64 / base_t.max(1e-9),
        spread(&b_ratio),
        striped_sum / placed[1].max(1) as f64,
        striped_sum / placed[1].max(1) as f64 / base_t.max(1e-9),
        spread(&s_ratio),
    );
    println!("{report}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-sched-sim.md", report).unwrap();
}
