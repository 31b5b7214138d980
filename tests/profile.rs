//! Learned access profiles across real nodes: node A mounts an image and
//! reads a workload, and keeps the order of its first reads as a profile;
//! node B, a peer of A, mounts the image, gets A's profile and fetches the
//! profiled chunks before anything reads them, in merged Range requests
//! (counted at a proxy in front of a real docker-registry); the workload
//! then fetches nothing more. A peer that serves a hostile profile (too
//! big, malformed, naming what the image lacks, lying about order) costs
//! no failed read.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::mount::{corpus, files_of, hex_sha256, refactor_into};
use crate::node::Node;
use crate::rollout::lazy_mount;
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;

/// The workload: the first `n` regular files of the tree (path order) of
/// one chunk (4 MiB at most), read whole; their paths and sha256s.
fn workload(root: &Path, n: usize) -> Vec<(String, String)> {
    files_of(root)
        .into_iter()
        .filter(|(_, size)| *size > 0 && *size <= 4 << 20)
        .take(n)
        .map(|(p, _)| {
            let mut bytes = Vec::new();
            std::fs::File::open(root.join(&p))
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            (p, hex_sha256(&bytes))
        })
        .collect()
}

/// Wait, at most `limit`, until `node` serves a profile of `image` that
/// `ready` accepts; the profile.
fn wait_profile(
    node: &Node,
    image: &str,
    limit: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + limit;
    loop {
        let out = std::process::Command::new("curl")
            .args(["-sf", "--max-time", "10"])
            .arg(format!("{}/profiles/{image}", node.url))
            .output()
            .unwrap();
        if out.status.success() {
            let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if ready(&p) {
                return p;
            }
        }
        assert!(
            Instant::now() < until,
            "no profile of {image} on {}: {}",
            node.url,
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_profile_recorded_on_one_node_makes_its_peer_fetch_the_start_up_at_once() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    let reference = format!(
        "docker://{}/refactored/{}:{}",
        proxy.host(),
        img.family,
        img.tag
    );
    const FILES: usize = 60;

    // Node A: the workload read on demand, recorded.
    let a = Node::start(&tmp.path().join("a"), &[], &[]);
    proxy.reset();
    let (image, on_a, toc_ranges, a_ranges) = {
        let m = lazy_mount(
            &a,
            &reference,
            &tmp.path().join("mnt-a"),
            &tmp.path().join("ca"),
        );
        let image = m.status()["manifest"].as_str().unwrap().to_string();
        // The mount's own range requests: the layers' TOCs.
        let tocs = proxy.blob_range_requests();
        proxy.reset();
        let read = workload(&m.point, FILES);
        assert_eq!(m.status()["reads"]["reads_failed"], 0);
        (image, read, tocs, proxy.blob_range_requests())
    };
    let profile = wait_profile(&a, &image, Duration::from_secs(30), |_| true);
    let entries = profile["entries"].as_array().unwrap().len();
    assert_eq!(profile["runs"], 1);
    assert!(entries > 0, "an empty profile: {profile}");

    // Node B, A's peer, fresh: its mount fetches the profiled chunks with
    // nothing reading them (one chunk per distinct file content).
    let distinct = on_a
        .iter()
        .map(|(_, sha)| sha)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let b = Node::start(&tmp.path().join("b"), &[&a.url], &[]);
    proxy.reset();
    let m = lazy_mount(
        &b,
        &reference,
        &tmp.path().join("mnt-b"),
        &tmp.path().join("cb"),
    );
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let st = m.status();
        let stored = st["fetch"]["chunks_stored"].as_u64().unwrap_or(0) as usize;
        if stored >= distinct {
            assert_eq!(st["reads"]["bytes_read"], 0, "nothing read yet: {st}");
            break;
        }
        assert!(
            Instant::now() < until,
            "B fetched {stored} of the profile's {distinct} chunks: {st}\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Less the TOCs, which B's mount fetched as A's did.
    let b_ranges = proxy.blob_range_requests().saturating_sub(toc_ranges);
    eprintln!(
        "profile of {entries} chunks: A read on demand in {a_ranges} range requests, \
         B fetched them up front in {b_ranges}"
    );
    assert!(
        b_ranges < entries && b_ranges <= a_ranges,
        "B fetched {entries} profiled chunks in {b_ranges} range requests (A: {a_ranges})"
    );

    // The workload on B: the same bytes, nothing more from the registry.
    proxy.reset();
    let on_b = workload(&m.point, FILES);
    assert_eq!(on_a, on_b);
    assert_eq!(
        proxy.blob_range_requests(),
        0,
        "{:?}",
        proxy.requests_with_ranges()
    );
    assert_eq!(m.status()["reads"]["reads_failed"], 0);
    // B kept the profile and merged its own run into it.
    wait_profile(&b, &image, Duration::from_secs(30), |p| p["runs"] == 2);
}

/// A peer that answers `GET /profiles/...` with `body` (`None`: never,
/// holding the connection open) and anything else with 404; its port.
fn hostile_peer(body: Option<Vec<u8>>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut head = [0u8; 4096];
            let n = c.read(&mut head).unwrap_or(0);
            let line = String::from_utf8_lossy(&head[..n]).to_string();
            const NOT_FOUND: &[u8] =
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let reply = match &body {
                _ if !line.starts_with("GET /profiles/") => NOT_FOUND.to_vec(),
                None => {
                    held.push(c);
                    continue;
                }
                Some(body) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
            };
            let _ = c.write_all(&reply);
        }
    });
    port
}

#[test]
fn hostile_profiles_from_a_peer_cost_no_read() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let reference = reg.reference(&format!("refactored/{}:{}", img.family, img.tag));
    // The image's manifest digest and its real layers, to lie with.
    let probe = Node::start(&tmp.path().join("probe"), &[], &[]);
    let (image, expected) = {
        let m = lazy_mount(
            &probe,
            &reference,
            &tmp.path().join("mnt-probe"),
            &tmp.path().join("cp"),
        );
        (
            m.status()["manifest"].as_str().unwrap().to_string(),
            workload(&m.point, 40),
        )
    };
    let real = wait_profile(&probe, &image, Duration::from_secs(30), |_| true);
    drop(probe);
    let layer = real["entries"][0]["layer"].as_str().unwrap().to_string();
    let mut lying: Vec<serde_json::Value> = Vec::new();
    // Real chunks in reverse order, each with a made-up end too.
    for e in real["entries"].as_array().unwrap().iter().rev() {
        let mut e = e.clone();
        e["rank"] = serde_json::json!(-1.0);
        lying.push(e.clone());
        e["end"] = serde_json::json!(e["end"].as_u64().unwrap() + 1);
        lying.push(e);
    }
    // Paths and members that are not in the image, in bulk.
    for i in 0..20_000u64 {
        lying.push(serde_json::json!({
            "layer": if i % 2 == 0 { layer.clone() } else { format!("sha256:{:064x}", i) },
            "offset": (1u64 << 40) + i * 100, "end": (1u64 << 40) + i * 100 + 50,
            "path": format!("no/such/file{i}"), "rank": 0.0,
        }));
    }
    let doc = |entries: &[serde_json::Value]| {
        serde_json::to_vec(&serde_json::json!({
            "version": 1, "image": image, "runs": 1_000_000, "entries": entries,
        }))
        .unwrap()
    };
    let mut huge = doc(&lying);
    huge.extend(std::iter::repeat_n(b' ', 5 << 20));
    let bodies: [(&str, Option<Vec<u8>>); 5] = [
        ("lying", Some(doc(&lying))),
        ("huge", Some(huge)),
        ("malformed", Some(b"{\"version\": 1, \"image\": [".to_vec())),
        ("another image's", {
            let other = format!("sha256:{:064x}", 7);
            Some(
                String::from_utf8(doc(&lying[..10]))
                    .unwrap()
                    .replace(&image, &other)
                    .into_bytes(),
            )
        }),
        // A peer that never answers: the mount does not wait for it.
        ("unanswered", None),
    ];
    for (i, (what, body)) in bodies.into_iter().enumerate() {
        let peer = format!("http://127.0.0.1:{}", hostile_peer(body));
        let n = Node::start(&tmp.path().join(format!("n{i}")), &[&peer], &[]);
        let m = lazy_mount(
            &n,
            &reference,
            &tmp.path().join(format!("mnt{i}")),
            &tmp.path().join(format!("c{i}")),
        );
        let got = workload(&m.point, 40);
        assert_eq!(got, expected, "{what} profile");
        assert_eq!(m.status()["reads"]["reads_failed"], 0, "{what} profile");
        // What the node keeps is bounded and names only what it read or
        // what the peer's profile named of the image.
        let kept = wait_profile(&n, &image, Duration::from_secs(30), |_| true);
        let kept_entries = kept["entries"].as_array().unwrap();
        assert!(
            kept_entries.len() <= 16_384,
            "{what}: {}",
            kept_entries.len()
        );
        assert!(kept["runs"].as_u64().unwrap() <= 1 << 16, "{what}");
    }
}
