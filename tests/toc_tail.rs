//! The TOC tail a refactored image's manifest says: `breakfs refactor`
//! writes `dev.breakfs.toc-tail` on every layer descriptor (new layers and
//! those it reuses from the destination), the exact bytes from the TOC's
//! member to the blob's end, so that a fresh node with no profile reads
//! each layer's TOC in one range request (counted at a proxy in front of
//! a real docker-registry). A manifest that lies about it (short, long,
//! out of bounds, not a number) still mounts the same tree.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::mount::{assert_same, breakfs, corpus, ok, original_tree, refactor_into};
use crate::node::Node;
use crate::rollout::lazy_mount;
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;
use crate::support::tree;

const HINT: &str = "dev.breakfs.toc-tail";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The manifest of `repo:tag` in `reg`, as JSON.
fn manifest(reg: &TestRegistry, repo: &str, tag: &str) -> serde_json::Value {
    let out = ok(Command::new("curl")
        .args(["-sf", "-H", &format!("Accept: {OCI_MANIFEST}")])
        .arg(format!("http://{}/v2/{repo}/manifests/{tag}", reg.host())));
    serde_json::from_str(&out).unwrap()
}

/// Put `m` as `repo:tag` in `reg`.
fn put_manifest(reg: &TestRegistry, repo: &str, tag: &str, m: &serde_json::Value) {
    ok(Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {OCI_MANIFEST}"),
        ])
        .args(["--data-binary", &m.to_string()])
        .arg(format!("http://{}/v2/{repo}/manifests/{tag}", reg.host())));
}

/// The bytes from layer `digest`'s TOC member to its end (`size` bytes
/// long), as its footer says.
fn true_tail(reg: &TestRegistry, repo: &str, digest: &str, size: u64) -> u64 {
    let footer = breakfs_index::FOOTER_SIZE;
    let out = Command::new("curl")
        .args(["-sf", "-r", &format!("{}-{}", size - footer, size - 1)])
        .arg(format!("http://{}/v2/{repo}/blobs/{digest}", reg.host()))
        .output()
        .unwrap();
    assert!(out.status.success());
    size - breakfs_index::parse_footer(&out.stdout).unwrap()
}

/// Each layer of `m` (digest, size, the tail its annotation says), every
/// one annotated with its exact tail.
fn annotated_layers(
    reg: &TestRegistry,
    repo: &str,
    m: &serde_json::Value,
) -> Vec<(String, u64, u64)> {
    let layers: Vec<(String, u64, u64)> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().to_string();
            let size = l["size"].as_u64().unwrap();
            let said = l["annotations"][HINT]
                .as_str()
                .unwrap_or_else(|| panic!("layer {digest} has no {HINT}: {l}"));
            (digest, size, said.parse().unwrap())
        })
        .collect();
    assert!(!layers.is_empty());
    for (digest, size, said) in &layers {
        assert_eq!(*said, true_tail(reg, repo, digest, *size), "layer {digest}");
    }
    layers
}

#[test]
fn a_refactored_image_says_its_toc_tails_and_a_fresh_node_reads_each_toc_once() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    refactor_into(&reg, std::slice::from_ref(img), &work);
    let repo = format!("refactored/{}", img.family);
    let v1 = manifest(&reg, &repo, &img.tag);
    let layers = annotated_layers(&reg, &repo, &v1);

    // A fresh node, no profile: one range request per layer reaches into
    // its TOC's tail, and it is exactly that tail.
    let proxy = CountingProxy::start(&reg.host());
    let reference = format!("docker://{}/{repo}:{}", proxy.host(), img.tag);
    let node = Node::start(&tmp.path().join("node"), &[], &[]);
    proxy.reset();
    let m = lazy_mount(
        &node,
        &reference,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
    );
    let ranges = proxy.ranges_by_blob();
    for (digest, size, tail) in &layers {
        let into_tail: Vec<(u64, u64)> = ranges
            .get(digest)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&(_, end)| end > size - tail)
            .collect();
        assert_eq!(
            into_tail,
            [(size - tail, *size)],
            "layer {digest}: the TOC read in one request of its tail"
        );
    }
    assert_same(
        &original_tree(img),
        &tree::snapshot(&m.point).unwrap(),
        "the refactored image",
    );
    assert_eq!(m.status()["reads"]["reads_failed"], 0);
    drop(m);

    // The next version into the same repository reuses layers from it:
    // those are annotated too, read from their TOC or from the layer
    // index a second run keeps.
    let v2 = images
        .iter()
        .find(|i| i.family == img.family && i.tag != img.tag)
        .unwrap();
    for tag in [v2.tag.clone(), format!("{}-again", v2.tag)] {
        ok(breakfs()
            .args(["refactor", "--plain-http", "--work-dir"])
            .arg(&work)
            .args([
                "--to",
                &reg.reference(&format!("{repo}:{tag}")),
                &v2.reference,
            ]));
        let m2 = manifest(&reg, &repo, &tag);
        let reused = annotated_layers(&reg, &repo, &m2)
            .iter()
            .filter(|l| layers.contains(l))
            .count();
        assert!(reused > 0, "{tag} reuses no layer of {}: {m2}", img.tag);
    }
}

#[test]
fn a_manifest_that_lies_about_its_toc_tails_still_mounts_right() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let repo = format!("refactored/{}", img.family);
    let mut m = manifest(&reg, &repo, &img.tag);
    // Short (a second read), long (one read of more), beyond the blob,
    // beyond any TOC, negative, not a number: layer by layer in turn.
    for (i, l) in m["layers"].as_array_mut().unwrap().iter_mut().enumerate() {
        let size = l["size"].as_u64().unwrap();
        let tail: u64 = l["annotations"][HINT].as_str().unwrap().parse().unwrap();
        let lie = match i % 6 {
            0 => (tail / 2).max(breakfs_index::FOOTER_SIZE).to_string(),
            1 => (tail + 1000).min(size).to_string(),
            2 => (size + 1).to_string(),
            3 => u64::MAX.to_string(),
            4 => "-5".to_string(),
            _ => "a lot".to_string(),
        };
        l["annotations"][HINT] = lie.into();
    }
    put_manifest(&reg, &repo, "lies", &m);
    let node = Node::start(&tmp.path().join("node"), &[], &[]);
    let mnt = lazy_mount(
        &node,
        &reg.reference(&format!("{repo}:lies")),
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
    );
    assert_same(
        &original_tree(img),
        &tree::snapshot(&mnt.point).unwrap(),
        "the image with lying TOC tails",
    );
    assert_eq!(mnt.status()["reads"]["reads_failed"], 0);
}
