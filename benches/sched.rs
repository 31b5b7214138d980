//! Latency and memory of the scheduler extender at scale: 1,000 nodes in 4
//! clusters, each holding 500 layers of a pool of 5,000, scored by `POST
//! /prioritize` (NodeNames form, all 1,000 candidates, a 10-layer image)
//! over loopback HTTP, as kube-scheduler calls it.
//!
//! `cargo bench --bench sched -- [--requests N]` (default 2,000); writes
//! target/bench-sched.md.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use breakfs_index::Digest;
use breakfs_sched::score::{Layer, Link, NodeView};
use breakfs_sched::{NodeEntry, Sched, SchedConfig, routes};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

const NODES: usize = 1000;
const CLUSTERS: usize = 4;
const LAYERS_PER_NODE: usize = 500;
const POOL: usize = 5000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let requests: usize = std::env::args()
        .skip_while(|a| a != "--requests")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let pool: Vec<Layer> = (0..POOL)
            .map(|i| Layer {
                digest: Digest::of(format!("layer-{i}").as_bytes()),
                size: 1_000_000 + (i as u64 * 7919) % 50_000_000,
            })
            .collect();
        let nodes: Vec<NodeEntry> = (0..NODES)
            .map(|i| NodeEntry {
                name: format!("edge-{i}"),
                url: format!("http://10.0.{}.{}:7480", i / 250, i % 250),
                cluster: format!("c{}", i % CLUSTERS),
            })
            .collect();
        let cfg = SchedConfig {
            nodes: nodes.clone(),
            stale_secs: 3600.0,
            ..SchedConfig::default()
        };
        let before = rss_kib();
        let sched = Sched::new(cfg).unwrap();
        let mut rng = SmallRng::seed_from_u64(0x2545F4914F6CDD1D);
        let views: Vec<NodeView> = nodes
            .iter()
            .map(|n| {
                let whole = (0..LAYERS_PER_NODE)
                    .map(|_| pool[rng.random_range(..POOL)].digest.clone())
                    .collect();
                let peers = nodes
                    .iter()
                    .filter(|o| o.cluster == n.cluster && o.name != n.name)
                    .take(16)
                    .map(|o| (o.name.clone(), Link { rtt_ms: 1.0, mbps: 1000.0 }))
                    .collect();
                NodeView {
                    name: n.name.clone(),
                    cluster: n.cluster.clone(),
                    whole,
                    cloud: Some(Link {
                        rtt_ms: rng.random_range(20..100) as f64,
                        mbps: rng.random_range(50..250) as f64,
                    }),
                    peers,
                    cache_room: Some(20 << 30),
                    ..NodeView::default()
                }
            })
            .collect();
        sched.update(views);
        let after = rss_kib();
        let image: Vec<Layer> = (0..10).map(|i| pool[i * 37].clone()).collect();
        sched.set_image("reg:5000/app:v1", image);
        // The same call in process: scoring alone, without HTTP and JSON.
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let args: breakfs_sched::types::ExtenderArgs = serde_json::from_value(serde_json::json!({
            "Pod": {"metadata": {"name": "p"}, "spec": {"containers": [{"image": "reg:5000/app:v1"}]}},
            "NodeNames": names,
        }))
        .unwrap();
        let mut inproc = Vec::new();
        for i in 0..requests.min(500) + 50 {
            let t = Instant::now();
            let r = sched.prioritize(args.clone()).await;
            if i >= 50 {
                inproc.push(t.elapsed());
            }
            assert_eq!(r.len(), NODES);
        }
        inproc.sort();
        let inproc_p50 = inproc[inproc.len() / 2];
        let inproc_p99 = inproc[(inproc.len() * 99 / 100).min(inproc.len() - 1)];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sched_ref = sched.clone();
        tokio::spawn(async move { axum::serve(listener, routes(sched)).await });
        let pod = serde_json::json!({
            "metadata": {"name": "p", "annotations": {"breakfs.io/limit-delay": "90"}},
            "spec": {"containers": [{"image": "reg:5000/app:v1",
                     "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]}});
        let body = bytes::Bytes::from(serde_json::json!({"Pod": pod, "NodeNames": names}).to_string());
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/prioritize");
        let times = time_calls(&client, &url, &body, requests, 100).await;
        // With the Kubernetes API watched (`kubernetes.enabled`, as in
        // sched/deploy/sched.yaml): each node's allocatable and requested
        // resources from it.
        sched_ref.set_cluster(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let node = breakfs_sched::ClusterNode {
                        allocatable: Some((2.0, 4.0 * (1u64 << 30) as f64)),
                        requested: ((i % 4) as f64 * 0.25, (i % 8) as f64 * 256e6),
                        link: None,
                        daemon: None,
                    };
                    (n.clone(), node)
                })
                .collect(),
        );
        let api_times = time_calls(&client, &url, &body, requests, 100).await;
        // The Nodes form (kube-scheduler's default, `nodeCacheCapable:
        // false`): every candidate's whole v1.Node, here the workers of the
        // kube fixtures (about 6.5 KB each) renamed.
        let fixture: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string("tests/data/kube/nodes.json").unwrap(),
        )
        .unwrap();
        let workers: Vec<&serde_json::Value> = fixture["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["metadata"]["labels"].get("node-role.kubernetes.io/control-plane").is_none())
            .collect();
        let items: Vec<serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut node = workers[i % workers.len()].clone();
                node["metadata"]["name"] = n.as_str().into();
                node
            })
            .collect();
        let nodes_body = bytes::Bytes::from(serde_json::json!({
            "Pod": pod,
            "Nodes": {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items},
        })
        .to_string());
        let nodes_calls = (requests / 10).max(20);
        let nodes_times = time_calls(&client, &url, &nodes_body, nodes_calls, 10).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let row = |t: &[Duration]| {
            format!(
                "{:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms",
                ms(pct(t, 0.5)),
                ms(pct(t, 0.9)),
                ms(pct(t, 0.99)),
                ms(*t.last().unwrap())
            )
        };
        let report = format!(
            "### Scheduler extender at scale\n\n\
             `cargo bench --bench sched` — {NODES} nodes in {CLUSTERS} clusters, {LAYERS_PER_NODE} cached layers each \
             (pool of {POOL}), a 10-layer image, {requests} `POST /prioritize` calls with all {NODES} nodes \
             (NodeNames form) over loopback HTTP, one at a time, after 100 warm-up calls; 2-core machine.\n\n\
             | form | p50 | p90 | p99 | max | target p99 | directory memory (RSS growth) |\n\
             |---|---|---|---|---|---|---|\n\
             | NodeNames | {} | ≤ 5 ms | {:.1} MB |\n\
             | NodeNames, resources from the Kubernetes API's view | {} | ≤ 5 ms | |\n\
             | Nodes ({:.1} MB bodies, {nodes_calls} calls) | {} | | |\n\n\
             Scoring alone (`Sched::prioritize` in process, same arguments, no HTTP or JSON): \
             p50 {:.2} ms, p99 {:.2} ms.\n",
            row(&times),
            (after.saturating_sub(before)) as f64 / 1024.0,
            row(&api_times),
            nodes_body.len() as f64 / 1e6,
            row(&nodes_times),
            ms(inproc_p50),
            ms(inproc_p99),
        );
        println!("{report}");
        let _ = std::fs::create_dir_all("target");
        std::fs::write("target/bench-sched.md", report).unwrap();
    });
}

/// The `p` quantile of sorted `times`.
fn pct(times: &[Duration], p: f64) -> Duration {
    times[((times.len() as f64 * p) as usize).min(times.len() - 1)]
}

/// `n` timed `POST`s of `body` to `url`, one at a time, after `warm`
/// untimed ones (the body is shared, not copied, per call); each reply
/// read typed, as kube-scheduler reads it.
/// Sorted.
async fn time_calls(
    client: &reqwest::Client,
    url: &str,
    body: &bytes::Bytes,
    n: usize,
    warm: usize,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        let r = client.post(url).body(body.clone()).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let scores: Vec<breakfs_sched::types::HostPriority> =
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        if i >= warm {
            times.push(t.elapsed());
        }
        assert_eq!(scores.len(), NODES);
    }
    times.sort();
    times
}
