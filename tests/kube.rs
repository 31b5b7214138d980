//! The scheduler's Kubernetes glue against an in-process API server that
//! answers with API-server JSON (tests/data/kube: lists, watch events) and
//! applies label patches the way the API server does (merge, then a
//! MODIFIED event on the node watch). No API server runs here; the glue's
//! client is kube's own, over HTTP.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use breakfs_sched::k8s::{self, Glue};
use breakfs_sched::score::{Link, NodeView};
use breakfs_sched::types::ExtenderArgs;
use breakfs_sched::{SHUTDOWN_GRACE, Sched, SchedConfig, Server};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/kube");

struct Api {
    nodes: Mutex<Value>,
    pods: Value,
    pod_events: String,
    node_events: broadcast::Sender<String>,
    patches: Mutex<Vec<(String, String, Value)>>,
}

type Params = Query<std::collections::HashMap<String, String>>;

/// A watch response: `first` lines, then whatever `more` brings, held open.
fn watch_body(first: String, more: Option<broadcast::Receiver<String>>) -> Body {
    let head = futures::stream::iter(
        first
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Ok::<_, std::io::Error>(Bytes::from(format!("{l}\n"))))
            .collect::<Vec<_>>(),
    );
    let tail = futures::stream::unfold(more, |rx| async move {
        match rx {
            Some(mut rx) => match rx.recv().await {
                Ok(line) => Some((Ok(Bytes::from(format!("{line}\n"))), Some(rx))),
                Err(_) => None,
            },
            None => futures::future::pending().await,
        }
    });
    Body::from_stream(futures::StreamExt::chain(head, tail))
}

async fn nodes(State(api): State<Arc<Api>>, q: Params) -> axum::response::Response {
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return axum::response::Response::new(watch_body(
            String::new(),
            Some(api.node_events.subscribe()),
        ));
    }
    axum::Json(api.nodes.lock().unwrap().clone()).into_response()
}

async fn pods(State(api): State<Arc<Api>>, q: Params) -> axum::response::Response {
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return axum::response::Response::new(watch_body(api.pod_events.clone(), None));
    }
    axum::Json(api.pods.clone()).into_response()
}

/// `PATCH /api/v1/nodes/{name}` with a JSON merge patch of labels.
async fn patch_node(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let patch: Value = serde_json::from_slice(&body).unwrap();
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    api.patches
        .lock()
        .unwrap()
        .push((name.clone(), ctype, patch.clone()));
    let mut list = api.nodes.lock().unwrap();
    let version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap()
        + 1;
    list["metadata"]["resourceVersion"] = json!(version.to_string());
    let node = list["items"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|n| n["metadata"]["name"] == name.as_str())
        .unwrap();
    for (k, v) in patch["metadata"]["labels"].as_object().unwrap() {
        node["metadata"]["labels"][k] = v.clone();
    }
    node["metadata"]["resourceVersion"] = json!(version.to_string());
    let mut obj = node.clone();
    obj["kind"] = json!("Node");
    obj["apiVersion"] = json!("v1");
    let _ = api
        .node_events
        .send(json!({"type": "MODIFIED", "object": obj}).to_string());
    axum::Json(obj).into_response()
}

async fn serve_api() -> (String, Arc<Api>) {
    let read = |f: &str| std::fs::read_to_string(format!("{DATA}/{f}")).unwrap();
    let api = Arc::new(Api {
        nodes: Mutex::new(serde_json::from_str(&read("nodes.json")).unwrap()),
        pods: serde_json::from_str(&read("pods.json")).unwrap(),
        pod_events: read("pod-events.jsonl"),
        node_events: broadcast::channel(16).0,
        patches: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{name}", axum::routing::patch(patch_node))
        .route("/api/v1/pods", get(pods))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, api)
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(20), "waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_kube_glue_reads_resources_discovers_daemons_and_publishes_links() {
    let (url, api) = serve_api().await;
    let client = k8s::client(Some(&url)).await.unwrap();
    let glue = Glue::start(client);
    tokio::time::timeout(Duration::from_secs(20), glue.ready())
        .await
        .expect("the watches list within 20 s")
        .unwrap();

    // Requests of bound, unfinished pods; the ADDED event reaches edge-c.
    wait_for("the watched ADDED pod on edge-c", || {
        glue.snapshot()
            .get("edge-c")
            .is_some_and(|n| n.requested.0 > 0.0)
    })
    .await;
    let nodes = glue.snapshot();
    let close = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 0.5;
    let expect = [
        ("edge-a", (0.85, 872_415_232.0), (1.9, 3_820_580.0 * 1024.0)),
        (
            "edge-b",
            (1.0, 1_073_741_824.0),
            (2.0, 3_820_580.0 * 1024.0),
        ),
        ("edge-c", (0.75, 314_572_800.0), (2.0, 3_820_580.0 * 1024.0)),
        ("edge-cp", (0.1, 104_857_600.0), (4.0, 7_901_940.0 * 1024.0)),
    ];
    for (name, requested, allocatable) in expect {
        let n = &nodes[name];
        assert!(close(n.requested, requested), "{name}: {:?}", n.requested);
        assert!(
            close(n.allocatable.unwrap(), allocatable),
            "{name}: {:?}",
            n.allocatable
        );
    }
    assert_eq!(
        nodes["edge-c"].link,
        Some(Link {
            rtt_ms: 42.5,
            mbps: 87.0
        })
    );
    assert_eq!(nodes["edge-a"].link, None);

    // The service: edge-b's daemon is discovered from its annotation.
    let sched = Sched::new(SchedConfig::default()).unwrap();
    k8s::sync_once(sched.directory(), &glue, false).await;
    let entries = sched.node_entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        (
            entries[0].name.as_str(),
            entries[0].url.as_str(),
            entries[0].cluster.as_str()
        ),
        ("edge-b", "http://10.0.1.12:7480", "east")
    );

    // NodeNames mode: resources come from the API. All else equal (no
    // cache, same default links), edge-a (0.85 of 1.9 CPU, 832Mi) leaves
    // more free than edge-b (1 of 2 CPU, 1Gi) for a 0.5 CPU / 512Mi pod.
    sched.set_image("example/app:1", Vec::new());
    let args: ExtenderArgs = serde_json::from_value(json!({
        "Pod": {"metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [{"name": "app", "image": "example/app:1",
                         "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}}}]}},
        "NodeNames": ["edge-a", "edge-b"]
    }))
    .unwrap();
    let scores = sched.prioritize(args.clone()).await;
    let score = |h: &str| scores.iter().find(|s| s.host == h).unwrap().score;
    assert_eq!((score("edge-a"), score("edge-b")), (10, 0), "{scores:?}");
    // Without the API's view the two are alike.
    let blind = Sched::new(SchedConfig::default()).unwrap();
    blind.set_image("example/app:1", Vec::new());
    let scores = blind.prioritize(args).await;
    assert!(scores.iter().all(|s| s.score == 10), "{scores:?}");

    // Publishing: the link edge-a's daemon measured becomes its labels, by
    // a merge patch; once the watch shows them, nothing more is sent.
    sched.update(vec![NodeView {
        name: "edge-a".into(),
        cluster: "east".into(),
        cloud: Some(Link {
            rtt_ms: 12.34,
            mbps: 95.6,
        }),
        ..NodeView::default()
    }]);
    k8s::sync_once(sched.directory(), &glue, true).await;
    {
        let p = api.patches.lock().unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "edge-a");
        assert!(
            p[0].1.starts_with("application/merge-patch+json"),
            "{}",
            p[0].1
        );
        assert_eq!(
            p[0].2,
            json!({"metadata": {"labels": {
                "breakfs.io/rtt-registry-ms": "12",
                "breakfs.io/bw-registry-mbps": "96"}}})
        );
    }
    wait_for("the MODIFIED node event", || {
        glue.snapshot()["edge-a"].link
            == Some(Link {
                rtt_ms: 12.0,
                mbps: 96.0,
            })
    })
    .await;
    k8s::sync_once(sched.directory(), &glue, true).await;
    assert_eq!(api.patches.lock().unwrap().len(), 1);
}

/// `breakfs sched --kube-url`'s life, in process: the service starts once
/// the watches have listed, knows the daemons the nodes announce, serves,
/// and stops when its shutdown token fires.
#[tokio::test]
async fn the_server_starts_from_the_kube_api_and_stops_on_shutdown() {
    let (url, _api) = serve_api().await;
    let mut cfg = SchedConfig::default();
    cfg.kubernetes.enabled = true;
    cfg.kubernetes.url = Some(url);
    cfg.kubernetes.publish_labels = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::start(cfg, None, listener).await.unwrap();
    let entries = server.sched().node_entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].name, "edge-b");
    let addr = server.local_addr();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(health, "ok\n");
    shutdown.cancel();
    tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), serving)
        .await
        .expect("the service stops after its grace at the latest")
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
