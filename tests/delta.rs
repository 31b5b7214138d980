//! Delta updates through the containerd snapshotter: redis v2 refactored
//! after v1 into the same layout gets a delta artifact (zstd deltas of its
//! changed files against v1's); on a node that ran v1, the update fetches
//! fewer bytes from the registry with the artifact published than without
//! it, and the container reads the same files either way.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::mount::{breakfs, corpus, ok};
use crate::snapshotter::run;
use crate::snapshotter_lazy::Lab;
use crate::support::corpus::CorpusImage;

/// What the update's container prints: the version and the digests of the
/// program and of libraries it loads (all changed from v1 to v2).
const READ: &str = "redis-server --version && sha256sum /usr/bin/redis-check-rdb \
                    /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libcrypto.so.3 \
                    /lib/x86_64-linux-gnu/libssl.so.3";

/// The delta artifact tags (`sha256-HEX`) of layout `layout`.
fn delta_tags(layout: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .filter(|t| breakfs_fetch::delta::is_delta_tag(t))
        .map(str::to_string)
        .collect()
}

/// The digest of the delta pack in layout `layout`.
fn pack_digest(layout: &Path) -> String {
    let tag = &delta_tags(layout)[0];
    let raw = ok(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:{tag}", layout.display())));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == breakfs_fetch::delta::PACK_MEDIA_TYPE)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn copy(from: String, to: String) {
    ok(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(from)
        .arg(to));
}

/// v1 then v2 on a fresh node: the bytes the node's update fetched through
/// the proxy (from v2's rpull to its command done), and what the command
/// printed.
fn update(layout: &Path, v1: &CorpusImage, v2: &CorpusImage, deltas: bool) -> (u64, String) {
    let lab = Lab::start();
    for img in [v1, v2] {
        copy(
            format!("oci:{}:{}", layout.display(), img.tag),
            lab.reg.reference(&format!("refactored/redis:{}", img.tag)),
        );
    }
    if deltas {
        for tag in delta_tags(layout) {
            copy(
                format!("oci:{}:{tag}", layout.display()),
                lab.reg.reference(&format!("refactored/redis:{tag}")),
            );
        }
    }
    let (r1, r2) = (
        lab.name("refactored/redis:v1"),
        lab.name("refactored/redis:v2"),
    );
    lab.rpull(&r1);
    run(&lab.ctrd, &lab.node, &r1, &["sh", "-c", READ]);
    lab.proxy.reset();
    lab.rpull(&r2);
    let out = run(&lab.ctrd, &lab.node, &r2, &["sh", "-c", READ]);
    let down = lab.proxy.bytes_down();
    // The pack's ranges were asked for exactly when it was published.
    let pack = pack_digest(layout);
    let asked: Vec<(String, Option<String>)> = lab
        .proxy
        .requests_with_ranges()
        .into_iter()
        .filter(|(l, _)| l.contains(&pack))
        .collect();
    assert_eq!(!asked.is_empty(), deltas, "pack requests: {asked:?}");
    assert!(asked.iter().all(|(_, r)| r.is_some()), "{asked:?}");
    (down, out)
}

#[test]
fn an_update_with_deltas_fetches_fewer_bytes_and_reads_the_same() {
    let images = corpus();
    let pick = |tag: &str| {
        images
            .iter()
            .find(|i| i.family == "redis" && i.tag == tag)
            .unwrap()
            .clone()
    };
    let (v1, v2) = (pick("v1"), pick("v2"));
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    for img in [&v1, &v2] {
        ok(breakfs()
            .args(["refactor", "--deltas", "--work-dir"])
            .arg(work.path().join("work"))
            .arg("--to")
            .arg(format!("oci:{}:{}", layout.display(), img.tag))
            .arg(&img.reference));
    }
    assert_eq!(delta_tags(&layout).len(), 1, "v2 got no delta artifact");
    // The image stays standard: umoci unpacks it as before.
    ok(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v2", layout.display()))
        .arg(work.path().join("unpacked")));

    let (with, out_with) = update(&layout, &v1, &v2, true);
    let (without, out_without) = update(&layout, &v1, &v2, false);
    assert!(out_with.contains("Redis server v="), "{out_with}");
    assert_eq!(out_with, out_without);
    eprintln!("the update fetched {with} bytes with deltas, {without} without");
    // The start's changed files come as deltas (about a fifth of their
    // size); the new layers' TOCs and the rest of the reads do not change.
    assert!(
        with * 10 < without * 8,
        "with deltas {with} bytes, without {without}"
    );
}
