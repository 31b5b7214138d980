//! The eStargz prefetch landmark, with images made by the real
//! `ctr-remote` (stargz-snapshotter's tool) in a private containerd:
//! `ctr-remote image optimize` runs the image's command in a container
//! (runc), records what it reads, and lays those files first in each
//! layer, ended by `.prefetch.landmark`. `breakfs mount --standalone` of
//! that image fetches each layer's landmarked region at mount, before
//! anything is read, in at most two Range requests per layer; the command
//! then needs no request inside those regions. The same original
//! converted by `ctr-remote image convert --estargz` (no recorded
//! workload) has no region and no such fetch. Landmark files are never in
//! the tree.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use breakfs_index::{Digest, Toc, TocEntryType};

use crate::mount::{Mount, corpus, ok};
use crate::support::containerd::{NAMESPACE, PULL_TIMEOUT, TestContainerd, output_with_timeout};
use crate::support::proxy::{CountingProxy, spans_cover};
use crate::support::registry::TestRegistry;

/// A layer of a converted image: digest, size, and where its TOC puts the
/// prefetch landmark and its first chunk (`None`: no landmarked region).
struct Layer {
    digest: String,
    size: u64,
    region: Option<(u64, u64)>,
}

fn ctr_remote(ctrd: &TestContainerd, args: &[&str]) {
    let mut cmd = Command::new("ctr-remote");
    cmd.arg("--address")
        .arg(ctrd.address())
        .args(["--namespace", NAMESPACE])
        .args(args);
    // Minutes on a loaded machine: optimize runs the command, and both
    // recompress every layer.
    let out = output_with_timeout(&mut cmd, PULL_TIMEOUT * 10).unwrap();
    assert!(
        out.status.success(),
        "ctr-remote {args:?} failed ({}): {}{}\ncontainerd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ctrd.log()
    );
}

/// The layers of `repo:tag` in `reg`, each TOC read from the blob itself.
fn layers(reg: &TestRegistry, repo: &str, tag: &str) -> Vec<Layer> {
    let get = |path: &str, accept: &str| -> Vec<u8> {
        let out = Command::new("curl")
            .args(["-sSfL", "-H", accept])
            .arg(format!("http://{}/v2/{repo}/{path}", reg.host()))
            .output()
            .unwrap();
        assert!(out.status.success(), "GET {path}: {:?}", out);
        out.stdout
    };
    let manifest: serde_json::Value = serde_json::from_slice(&get(
        &format!("manifests/{tag}"),
        "Accept: application/vnd.oci.image.manifest.v1+json",
    ))
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().to_string();
            let blob = get(&format!("blobs/{digest}"), "Accept: */*");
            assert_eq!(Digest::of(&blob).to_string(), digest);
            let size = blob.len() as u64;
            let breakfs_index::TailRead::Toc(tail) = Toc::read_from_blob_tail(&blob, size).unwrap()
            else {
                panic!("the TOC of {digest} is not in the blob's tail");
            };
            let entries = &tail.toc.entries;
            let end = entries
                .iter()
                .find(|e| e.name == breakfs_index::PREFETCH_LANDMARK)
                .map(|e| e.offset);
            let first = entries
                .iter()
                .filter(|e| e.kind == TocEntryType::Reg && e.size > 0 && e.offset > 0)
                .map(|e| e.offset)
                .min();
            let region = match (first, end) {
                (Some(f), Some(e)) if f < e => Some((f, e)),
                _ => None,
            };
            Layer {
                digest,
                size,
                region,
            }
        })
        .collect()
}

/// The requests of a layer of `size` bytes that reach into `[start, end)`,
/// but for TOC reads (those that run to the blob's end).
fn inside(spans: &[(u64, u64)], size: u64, (start, end): (u64, u64)) -> Vec<(u64, u64)> {
    spans
        .iter()
        .copied()
        .filter(|&(s, e)| s < end && e > start && e < size)
        .collect()
}

#[test]
fn an_optimized_estargz_image_has_its_landmarked_region_fetched_at_mount() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let proxy = CountingProxy::start(&reg.host());
    let work = tempfile::Builder::new()
        .prefix("landmark")
        .tempdir_in("/tmp")
        .unwrap();
    let original = format!("{}/orig/{}:v1", reg.host(), img.family);
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &img.reference,
        &format!("docker://{original}"),
    ]));
    let ctrd = TestContainerd::start().unwrap();
    ctrd.pull_plain_http(&original).unwrap();
    let optimized = format!("{}/opt/{}:v1", reg.host(), img.family);
    let plain = format!("{}/esgz/{}:v1", reg.host(), img.family);
    // The image's own command (its entrypoint and cmd), run and recorded;
    // gzip level 1 (ctr-remote's default is 9): the same layout, sooner.
    let level = "--estargz-compression-level=1";
    ctr_remote(
        &ctrd,
        &["image", "optimize", "--oci", level, &original, &optimized],
    );
    ctr_remote(
        &ctrd,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            level,
            &original,
            &plain,
        ],
    );
    for r in [&optimized, &plain] {
        ctrd.ctr_checked(&["image", "push", "--plain-http", r], PULL_TIMEOUT)
            .unwrap();
    }
    drop(ctrd);

    let opt_layers = layers(&reg, &format!("opt/{}", img.family), "v1");
    assert!(
        opt_layers.iter().any(|l| l.region.is_some()),
        "ctr-remote optimize recorded no landmarked region"
    );
    let cache = work.path().join("cache");
    proxy.reset();
    let m = Mount::new(
        &format!("docker://{}/opt/{}:v1", proxy.host(), img.family),
        &work.path().join("opt"),
        &cache,
        &["--standalone", "--no-hydrate"],
    );
    let with_region: Vec<&Layer> = opt_layers.iter().filter(|l| l.region.is_some()).collect();
    assert_eq!(
        m.status()["landmarked_layers"].as_u64(),
        Some(with_region.len() as u64),
        "{}",
        m.log()
    );
    // Nothing is read; the regions come by themselves.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = proxy.ranges_by_blob();
        let missing: Vec<&str> = with_region
            .iter()
            .filter(|l| {
                let spans = seen.get(&l.digest).map(Vec::as_slice).unwrap_or_default();
                !spans_cover(spans, l.region.unwrap())
            })
            .map(|l| l.digest.as_str())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "landmarked regions of {missing:?} not fetched at mount; requests: {:?}\n{}",
            proxy.requests_with_ranges(),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let at_mount = proxy.ranges_by_blob();
    for l in &with_region {
        let asked = inside(&at_mount[&l.digest], l.size, l.region.unwrap());
        assert!(
            asked.len() <= 2,
            "layer {}: region {:?} took {} requests: {asked:?}",
            l.digest,
            l.region,
            asked.len()
        );
    }
    // No landmark file in the tree; the recorded command runs and asks
    // nothing more inside the regions.
    for name in [
        breakfs_index::PREFETCH_LANDMARK,
        breakfs_index::NO_PREFETCH_LANDMARK,
        breakfs_index::TOC_TAR_NAME,
    ] {
        assert!(!m.point.join(name).exists(), "{name} is in the tree");
    }
    let mut cmd = Command::new("chroot");
    cmd.arg(&m.point).args(&img.command);
    ok(&mut cmd);
    let after = proxy.ranges_by_blob();
    for l in &with_region {
        let before = inside(&at_mount[&l.digest], l.size, l.region.unwrap()).len();
        let now = inside(&after[&l.digest], l.size, l.region.unwrap());
        assert_eq!(
            now.len(),
            before,
            "layer {}: the command asked inside the prefetched region: {now:?}",
            l.digest
        );
    }
    drop(m);

    // Converted without a recorded workload: no region, no such fetch.
    let plain_layers = layers(&reg, &format!("esgz/{}", img.family), "v1");
    assert!(plain_layers.iter().all(|l| l.region.is_none()));
    proxy.reset();
    let m = Mount::new(
        &format!("docker://{}/esgz/{}:v1", proxy.host(), img.family),
        &work.path().join("plain"),
        &work.path().join("cache-plain"),
        &["--standalone", "--no-hydrate"],
    );
    assert_eq!(m.status()["landmarked_layers"].as_u64(), Some(0));
    // Only TOC reads: each blob's ranges join into one span of its tail
    // (a second read asks only what the first lacked, just before it).
    let seen = proxy.ranges_by_blob();
    for l in &plain_layers {
        let mut spans = seen.get(&l.digest).cloned().unwrap_or_default();
        spans.sort();
        let mut tail: Option<(u64, u64)> = None;
        for &(s, e) in &spans {
            tail = match tail {
                None => Some((s, e)),
                Some((ts, te)) if s <= te => Some((ts, te.max(e))),
                Some(_) => panic!(
                    "layer {}: requests {spans:?} of {} bytes at mount, not one tail: not TOC reads",
                    l.digest, l.size
                ),
            };
        }
        if let Some((s, e)) = tail {
            assert!(
                e >= l.size && s > 0,
                "layer {}: requests {spans:?} of {} bytes at mount, not a TOC read",
                l.digest,
                l.size
            );
        }
    }
}
