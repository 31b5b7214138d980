//! `breakfs node --relay`: a cold image striped over three nodes' registry
//! links. A real docker-registry (behind a counting proxy, to weigh what it
//! sent) is reached by each node daemon through a shaped link of its own
//! (`breakfs shape`, given with `--registry-endpoint`); node A mounts an
//! image no node holds and reads every file, B and C relay for it. Also
//! what a relaying node refuses, and why.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::mount::{Shaper, assert_same, corpus, files_of, original_tree, refactor_into};
use crate::node::{Node, layers_of, metric, parse_metrics};
use crate::sched::SchedProc;
use crate::support::proxy::CountingProxy;
use crate::support::registry::{TestRegistry, free_port};
use crate::support::tree;

/// Each node's registry link.
const LINK_MBIT: u64 = 16;
const LINK_RTT_MS: u64 = 20;

/// `GET /v2/REPO/blobs/DIGEST` of `node` with a Range and the relay header
/// (and `token` as a bearer token); the status and the body.
fn relay_ask(
    node: &Node,
    repo: &str,
    digest: &str,
    host: &str,
    range: (u64, u64),
    token: Option<&str>,
) -> (u16, Vec<u8>) {
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-H", &format!("Breakfs-Relay: {host}")])
        .args(["-H", &format!("Range: bytes={}-{}", range.0, range.1 - 1)]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c
        .arg(format!("{}/v2/{repo}/blobs/{digest}", node.url))
        .output()
        .unwrap();
    let body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&body[nl + 1..]).parse().unwrap();
    (status, body[..nl].to_vec())
}

/// Read every file under `root` on `threads` threads at once (so that the
/// node has several range requests to spread).
fn read_all_at_once(root: &Path, threads: usize) {
    let files: Vec<String> = files_of(root).into_iter().map(|(p, _)| p).collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let files = &files;
            s.spawn(move || {
                for p in files.iter().skip(t).step_by(threads) {
                    std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"));
                }
            });
        }
    });
}

#[test]
fn a_cold_image_comes_over_three_links_and_relays_refuse_what_they_should() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    // HOST: the registry as the image reference names it; each node
    // reaches it over its own shaped link.
    let host = proxy.host();
    let repo = format!("refactored/{}", img.family);
    let reference = format!("docker://{host}/{repo}:{}", img.tag);
    let layers = layers_of(&reference);
    let token = tmp.path().join("token");
    std::fs::write(&token, "edge-secret\n").unwrap();
    let token = token.display().to_string();

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let links: Vec<Shaper> = (0..3)
        .map(|_| Shaper::start(&host, LINK_RTT_MS, LINK_MBIT))
        .collect();
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let peers: Vec<&str> = (0..3)
                .filter(|&j| j != i)
                .map(|j| urls[j].as_str())
                .collect();
            let endpoint = format!("{host}={}", links[i].1);
            Node::start_at(
                &tmp.path().join(name),
                Some(ports[i]),
                &peers,
                &[
                    "--relay",
                    &host,
                    "--registry-endpoint",
                    &endpoint,
                    "--token-file",
                    &token,
                    // A slow link: no read gives up while all three are busy.
                    "--deadline",
                    "120",
                ],
            )
        })
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    a.wait_for_peers(&[&b.url, &c.url]);
    let index = b.json("/cache/index");
    assert_eq!(index["relay"], serde_json::json!([host]), "{index}");

    // A reads the image no node holds, every file, eight readers at once.
    let before = proxy.bytes_down();
    let m = a.mount(&reference, &tmp.path().join("mnt-a"));
    read_all_at_once(&m.point, 8);
    let expected = original_tree(img);
    assert_same(&expected, &tree::snapshot(&m.point).unwrap(), "A's mount");
    assert_eq!(m.status()["reads"]["reads_failed"], 0, "{}", m.status());
    m.wait_hydrated();
    a.wait_whole(&layers);
    let down = (proxy.bytes_down() - before) as f64;

    // B and C relayed a good share of it, each over its own link, and A
    // got through them what they relayed.
    let got = |n: &Node, key: &str| metric(&parse_metrics(&n.get("/metrics")), key);
    let relayed: Vec<f64> = [b, c]
        .iter()
        .map(|n| got(n, "breakfs_relay_served_bytes_total"))
        .collect();
    let a_relay = got(a, "breakfs_fetch_bytes_total{source=\"relay\"}");
    let a_cloud = got(a, "breakfs_fetch_bytes_total{source=\"cloud\"}");
    let a_total = a_relay + a_cloud;
    eprintln!(
        "A: {a_cloud} bytes over its own link, {a_relay} through relays; B relayed {}, C {}; \
         the registry sent {down}",
        relayed[0], relayed[1]
    );
    assert!(relayed.iter().all(|r| *r > 0.0), "{relayed:?}");
    assert!(
        relayed[0] + relayed[1] >= 0.3 * a_total,
        "B and C relayed {relayed:?} of A's {a_total} bytes"
    );
    assert!(
        a_relay > 0.0 && relayed[0] + relayed[1] >= a_relay,
        "A got {a_relay} bytes through relays, B and C relayed {relayed:?}"
    );
    // The registry's bytes add up: all it sent is what A fetched over its
    // link and what B and C relayed, with heads and probes on top.
    let accounted = a_cloud + relayed[0] + relayed[1];
    assert!(
        down >= accounted && down <= accounted * 1.1 + 2e6,
        "the registry sent {down} bytes; the nodes account for {accounted}"
    );
    // A's view of its links; B and C keep nothing of what they relayed.
    let measured = a.json("/measurements");
    for u in [&b.url, &c.url] {
        assert!(
            measured["relay"]["links"][u]["bytes"].as_u64() > Some(0),
            "{measured}"
        );
    }
    for n in [b, c] {
        let idx = n.json("/cache/index");
        assert!(
            idx["blobs"].as_array().unwrap().is_empty()
                && idx["partial"].as_array().unwrap().is_empty(),
            "a relaying node kept bytes: {idx}"
        );
    }

    // What a relaying node refuses: a request without the edge's token,
    // a range over 16 MiB, a registry it does not relay for.
    let layer = &layers[0];
    let (s, body) = relay_ask(b, &repo, layer, &host, (0, 1000), None);
    let text = String::from_utf8_lossy(&body);
    assert!(s == 401 && text.contains("--token-file"), "{s} {text}");
    let (s, body) = relay_ask(
        b,
        &repo,
        layer,
        &host,
        (0, (16 << 20) + 1),
        Some("edge-secret"),
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        s == 400 && text.contains("at most 16777216 bytes"),
        "{s} {text}"
    );
    let (s, body) = relay_ask(
        b,
        &repo,
        layer,
        "elsewhere.example:5000",
        (0, 10),
        Some("edge-secret"),
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        s == 403 && text.contains("elsewhere.example:5000") && text.contains("--relay"),
        "{s} {text}"
    );
    // With the token, B relays the registry's very bytes.
    let (s, body) = relay_ask(b, &repo, layer, &host, (1000, 5000), Some("edge-secret"));
    let original = std::fs::read(reg.blob_data_path(layer.trim_start_matches("sha256:"))).unwrap();
    assert_eq!(s, 206);
    assert!(body == original[1000..5000], "B relayed other bytes");

    // A node without --relay says how to turn it on.
    let plain = Node::start(&tmp.path().join("d"), &[], &[]);
    let (s, body) = relay_ask(&plain, &repo, layer, &host, (0, 10), None);
    let text = String::from_utf8_lossy(&body);
    assert!(
        s == 403 && text.contains("--relay") && text.contains(&host),
        "{s} {text}"
    );

    // The scheduler learns from the indexes that the three relay, and
    // plans a layer no node holds over the pooled links: for A, whose own
    // link it measured while reading above, an image none of them holds
    // is expected in well under the time over A's link alone.
    let other = images
        .iter()
        .find(|i| i.tag == "v1" && i.family != img.family)
        .unwrap();
    refactor_into(&reg, std::slice::from_ref(other), &tmp.path().join("work2"));
    let image2 = format!("{host}/refactored/{}:{}", other.family, other.tag);
    let sched = SchedProc::start(&[
        "--token-file".into(),
        token.clone(),
        "--node".into(),
        format!("a={}@edge", a.url),
        "--node".into(),
        format!("b={}@edge", b.url),
        "--node".into(),
        format!("c={}@edge", c.url),
    ]);
    // What B and C relayed measured their registry links, as their own
    // fetches would.
    for n in [b, c] {
        let m = n.json("/measurements");
        let bw = m["links"]["cloud"]["bandwidth_mbps"].as_f64();
        assert!(bw.is_some_and(|bw| bw < 2.0 * LINK_MBIT as f64), "{m}");
    }
    let own = a.json("/measurements")["links"]["cloud"].clone();
    let (rtt, mbps) = (
        own["rtt_ms"].as_f64().unwrap(),
        own["bandwidth_mbps"].as_f64().unwrap(),
    );
    assert!(
        mbps < 2.0 * LINK_MBIT as f64,
        "A measured {own} of its {LINK_MBIT} Mbit/s link"
    );
    let mut last = serde_json::Value::Null;
    let pooled = (0..120).any(|_| {
        let out = Command::new("curl")
            .args(["-sS", "-G", "-H", "Authorization: Bearer edge-secret"])
            .arg(format!("{}/plan", sched.1))
            .args(["--data-urlencode", &format!("image={image2}")])
            .args(["--data-urlencode", "node=a"])
            .output()
            .unwrap();
        last = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let plan = last["plan"].as_array().cloned().unwrap_or_default();
        let cloud: u64 = plan
            .iter()
            .filter(|l| l["from"] == "cloud")
            .map(|l| l["size"].as_u64().unwrap())
            .sum();
        let alone = rtt / 1000.0 + cloud as f64 * 8.0 / (mbps * 1e6);
        let expected = last["fetch_secs"].as_f64().unwrap_or(f64::MAX);
        let done = cloud > 1_000_000 && expected < 0.5 * alone;
        if done {
            eprintln!("A's plan: {cloud} bytes from the cloud in {expected:.2} s ({alone:.2} s over its own link)");
        } else {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        done
    });
    assert!(
        pooled,
        "A's plan for {image2} does not pool the relays' links (own link {mbps} Mbit/s, {rtt} ms): {last}"
    );
}
