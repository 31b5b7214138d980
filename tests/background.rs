//! Background work yields at the link (docs/node.md, "Background work
//! yields"): a node prefetching through a shaped link measures every
//! request's round trip; when another client's reads fill that link, the
//! node's background window for it shrinks to the floor and its background
//! requests wait, and once the link is free the window opens again and the
//! prefetch finishes. The node's own reads meanwhile get the right bytes.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::mount::{Mount, Shaper, assert_same, corpus, original_tree, refactor_into};
use crate::node::{Node, layers_of, parse_metrics, wait_prefetched};
use crate::support::registry::TestRegistry;
use crate::support::tree;

/// The node's background metric `name` for the cloud (0 before it exists).
fn cloud(node: &Node, name: &str) -> f64 {
    let key = format!("breakfs_background_{name}{{source=\"cloud\"}}");
    parse_metrics(&node.get("/metrics"))
        .into_iter()
        .find(|(k, _)| *k == key)
        .map_or(0.0, |(_, v)| v)
}

/// Wait until `ok` holds, at most `limit`; panics with `what` otherwise.
fn wait_for(limit: Duration, what: &dyn Fn() -> String, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < until, "{}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn background_prefetch_yields_the_link_to_another_clients_reads() {
    let images = corpus();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, &images, &tmp.path().join("work"));
    // 20 ms, 24 Mbit/s: the corpus takes the prefetch most of a minute.
    let link = Shaper::start(&reg.host(), 20, 24);
    let slow: Vec<String> = refs
        .iter()
        .map(|r| r.replace(&reg.host(), &link.1))
        .collect();
    let node = Node::start(&tmp.path().join("n"), &[], &[]);
    let state = || {
        let page = node.get("/metrics");
        page.lines()
            .filter(|l| l.starts_with("breakfs_background_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let body = serde_json::json!({ "images": slow }).to_string();
    node.post("/prefetch", &body);

    // Alone on the link, the window opens past its initial 128 KiB.
    wait_for(Duration::from_secs(120), &state, || {
        cloud(&node, "window_bytes") > 131_072.0
    });

    // Another client's reads fill the link: three pulls of the first
    // image's layers at once, over and over, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let repo = refs[0]
        .trim_start_matches("docker://")
        .split_once('/')
        .and_then(|(_, r)| r.rsplit_once(':'))
        .map(|(repo, _)| repo.to_string())
        .unwrap();
    let urls: Vec<String> = layers_of(&refs[0])
        .iter()
        .map(|d| format!("http://{}/v2/{repo}/blobs/{d}", link.1))
        .collect();
    let pullers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, urls) = (stop.clone(), urls.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for u in &urls {
                        let _ = Command::new("curl")
                            .args(["-sSf", "-o", "/dev/null", "--max-time", "20", u])
                            .status();
                    }
                }
            })
        })
        .collect();
    // The node measures the queue the pulls make and shrinks its window to
    // the floor (16 KiB); background requests then wait for it.
    let held_before = cloud(&node, "held_total");
    wait_for(Duration::from_secs(180), &state, || {
        cloud(&node, "window_low_bytes") <= 16_384.0 && cloud(&node, "over_target_total") > 0.0
    });
    wait_for(Duration::from_secs(60), &state, || {
        cloud(&node, "held_total") > held_before
    });
    stop.store(true, Ordering::Relaxed);
    for p in pullers {
        p.join().unwrap();
    }

    // The node's own reads while its prefetch goes on get the image's bytes.
    let img = &images[0];
    let m = node.mount(&slow[0], &tmp.path().join("mnt"));
    let expected = original_tree(img);
    assert_same(
        &expected,
        &tree::snapshot(&m.point).unwrap(),
        "a mount read while the node prefetched",
    );
    assert_eq!(m.status()["reads"]["reads_failed"], 0, "{}", m.status());
    drop::<Mount>(m);

    // The link free again, the window opens and the prefetch finishes.
    wait_prefetched(&node);
    assert!(
        cloud(&node, "window_bytes") > 16_384.0,
        "the window stayed shut once the link was free: {}",
        state()
    );
}
