//! The scheduler extender's HTTP handlers, `POST /filter` and `POST
//! /prioritize`, fed the request body through the real router.
//!
//! No network: the pod's images are given layers beforehand (as the
//! simulation does with `Sched::set_image`), and three nodes have views
//! holding some of them, so scoring runs over parsed input. Checked: an
//! answer is 200 or 400, never a panic or a 500; a filter result accounts
//! for every candidate; priorities are 0–10, one per candidate, in order.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use breakfs_index::Digest;
use breakfs_sched::score::{Layer, Link, NodeView};
use breakfs_sched::{NodeEntry, Sched, SchedConfig};
use breakfs_sched::types::ExtenderArgs;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tower::ServiceExt as _;

/// Runs between fresh services, so that the image cache stays small.
const RUNS_PER_SERVICE: u32 = 4096;

struct Harness {
    rt: tokio::runtime::Runtime,
    state: Mutex<(u32, Arc<Sched>, Router)>,
}

fn layers() -> Vec<Layer> {
    (0u8..4)
        .map(|i| Layer {
            digest: Digest::of(&[i]),
            size: 1_000_000 * (u64::from(i) + 1),
        })
        .collect()
}

fn service() -> (Arc<Sched>, Router) {
    let nodes = ["n1", "n2", "n3"];
    let cfg = SchedConfig {
        nodes: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeEntry {
                name: n.to_string(),
                url: format!("http://127.0.0.1:{}", 9 + i),
                cluster: if i < 2 { "edge" } else { "far" }.to_string(),
            })
            .collect(),
        ..SchedConfig::default()
    };
    let sched = Sched::new(cfg).expect("a client for the node daemons");
    let ls = layers();
    let views = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeView {
            name: n.to_string(),
            cluster: if i < 2 { "edge" } else { "far" }.to_string(),
            whole: ls.iter().take(3 - i).map(|l| l.digest.clone()).collect(),
            cloud: Some(Link {
                rtt_ms: 10.0 * (i as f64 + 1.0),
                mbps: 100.0,
            }),
            cache_room: (i == 2).then_some(2_000_000),
            ..NodeView::default()
        })
        .collect();
    sched.update(views);
    let router = breakfs_sched::routes(sched.clone());
    (sched, router)
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (sched, router) = rt.block_on(async { service() });
        Harness {
            rt,
            state: Mutex::new((0, sched, router)),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let (sched, router) = {
        let mut st = h.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        if st.0 >= RUNS_PER_SERVICE {
            let (s, r) = h.rt.block_on(async { service() });
            *st = (0, s, r);
        }
        (st.1.clone(), st.2.clone())
    };
    // Give every image the body names layers, so nothing is resolved
    // over the network.
    let args: Option<ExtenderArgs> = serde_json::from_slice(data).ok();
    if let Some(pod) = args.as_ref().and_then(|a| a.pod.as_ref()) {
        for c in &pod.spec.containers {
            sched.set_image(&c.image, layers());
        }
    }
    let candidates = args.as_ref().map(candidates);
    h.rt.block_on(async {
        for verb in ["/filter", "/prioritize"] {
            let req = Request::post(verb)
                .header("content-type", "application/json")
                .body(Body::from(data.to_vec()))
                .expect("a request");
            let resp = router.clone().oneshot(req).await.expect("infallible");
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("a body");
            assert!(
                status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
                "{verb} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            if status != StatusCode::OK {
                continue;
            }
            let Some(names) = &candidates else {
                panic!("{verb} accepted a body that is not ExtenderArgs");
            };
            let v: Value = serde_json::from_slice(&body).expect("a JSON answer");
            if verb == "/filter" {
                check_filter(&v, names);
            } else {
                check_priorities(&v, names);
            }
        }
    });
});

/// The candidate names, as the service reads them.
fn candidates(a: &ExtenderArgs) -> Vec<String> {
    match (&a.nodes, &a.node_names) {
        (Some(list), _) => list
            .items
            .iter()
            .filter_map(|n| n.name().map(String::from))
            .collect(),
        (None, Some(n)) => n.clone(),
        (None, None) => Vec::new(),
    }
}

fn check_filter(v: &Value, names: &[String]) {
    let failed = v["FailedNodes"].as_object().expect("FailedNodes");
    let passed: Vec<&str> = match (v["NodeNames"].as_array(), v["Nodes"]["items"].as_array()) {
        (Some(n), _) => n.iter().filter_map(Value::as_str).collect(),
        (None, Some(items)) => items
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str())
            .collect(),
        (None, None) => panic!("a filter result without Nodes or NodeNames: {v}"),
    };
    for n in names {
        assert!(
            passed.contains(&n.as_str()) || failed.contains_key(n),
            "candidate {n:?} neither passed nor failed: {v}"
        );
    }
    for p in &passed {
        assert!(
            names.iter().any(|n| n == p),
            "{p:?} passed but was not a candidate"
        );
    }
    for f in failed.keys() {
        assert!(names.contains(f), "{f:?} failed but was not a candidate");
    }
}

fn check_priorities(v: &Value, names: &[String]) {
    let list = v.as_array().expect("a priority list");
    let hosts: Vec<&str> = list.iter().filter_map(|p| p["Host"].as_str()).collect();
    assert_eq!(
        hosts, names,
        "priorities are not one per candidate, in order"
    );
    for p in list {
        let s = p["Score"].as_i64().expect("an integer score");
        assert!((0..=10).contains(&s), "score {s} outside 0..10");
    }
}
