//! Lazy layers under a tight cache budget, and `breakfs status` of the
//! containerd snapshots, with a real containerd 1.6, `ctr-remote` and a
//! real docker-registry (the lab of `snapshotter_lazy`): a file larger
//! than half the node's `--budget` reads whole while other data is
//! fetched beside it; the status lists each layer snapshot as lazy, with
//! its layer, image, hydration and FUSE mount, the hydration rising after
//! a container read the layer.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::mount::ok;
use crate::snapshotter::run;
use crate::snapshotter_lazy::Lab;
use crate::support::images::{Layer, T, tar_of, write_image_with};

/// Refactor into `lab`'s registry, as `repo_tag`, an image of static
/// busybox in `/bin` and one layer per item of `layers` (files by path,
/// in top-level dirs); its reference as containerd reaches it.
pub(crate) fn busybox_image(
    lab: &Lab,
    work: &Path,
    busybox: &[u8],
    repo_tag: &str,
    layers: &[&[(&str, &[u8])]],
) -> String {
    let mut all = vec![Layer::gzip(tar_of(&[
        T::Dir("bin"),
        T::File("bin/busybox", busybox, 0o755),
    ]))];
    for files in layers {
        let mut entries = Vec::new();
        for (path, bytes) in files.iter() {
            let dir = path.split('/').next().unwrap();
            if !entries.iter().any(|e| matches!(e, T::Dir(d) if *d == dir)) {
                entries.push(T::Dir(dir));
            }
            entries.push(T::File(path, bytes, 0o644));
        }
        all.push(Layer::gzip(tar_of(&entries)));
    }
    let layout = work.join("layout");
    let tag = repo_tag.replace(['/', ':'], "-");
    write_image_with(
        &layout,
        &tag,
        &all,
        serde_json::json!({"Env": ["PATH=/bin"]}),
    );
    let to = format!("docker://{}/{repo_tag}", lab.reg.host());
    ok(crate::mount::breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(work.join("refactor"))
        .args(["--to", &to, &format!("oci:{}:{tag}", layout.display())]));
    lab.name(repo_tag)
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng as _, SeedableRng as _};
    let mut b = vec![0u8; n];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut b);
    b
}

/// A 3.5 MiB file (one chunk) in a lazy layer, over half the node's
/// 6 MiB budget, read by a container while it also reads files of
/// another lazy layer: its fetched range and chunk together would be over
/// the budget, yet the chunk the reader waits for is not evicted before
/// the read is answered (the range gives way), the file reads whole and
/// right, and the store stays within the budget.
#[test]
fn a_file_over_half_the_budget_reads_while_other_data_is_fetched() {
    let work = tempfile::Builder::new()
        .prefix("tight")
        .tempdir_in("/tmp")
        .unwrap();
    let busybox = crate::cri::busybox_static(work.path());
    let budget: u64 = 6 << 20;
    let lab = Lab::start_with(&["--budget", &budget.to_string()]);
    let big = random(7 << 19, 11);
    let small: Vec<Vec<u8>> = (0..4).map(|i| random(64 << 10, 20 + i)).collect();
    let names: Vec<String> = (0..small.len()).map(|i| format!("other/{i}")).collect();
    let others: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&small)
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let big_files: &[(&str, &[u8])] = &[("data/blob", &big)];
    let reference = busybox_image(
        &lab,
        work.path(),
        &busybox,
        "tight/app:v1",
        &[big_files, &others],
    );
    lab.rpull(&reference);
    let out = run(
        &lab.ctrd,
        &lab.node,
        &reference,
        &[
            "busybox",
            "sh",
            "-c",
            "busybox cat /other/* >/dev/null & busybox sha256sum /data/blob; wait",
        ],
    );
    let want = breakfs_index::Digest::of(&big).hex().to_string();
    assert!(out.contains(&want), "sha256sum said {out:?}, not {want}");
    let log = lab.node.log_text();
    assert!(!log.contains("kept being evicted"), "{log}");
    let store = &lab.node.cache;
    let held = crate::node::store_bytes(store);
    let chunk = crate::node::max_chunk(store);
    assert!(
        held <= budget + chunk,
        "the store holds {held} bytes, over the budget {budget} by more than a chunk ({chunk})"
    );
    eprintln!(
        "a {}-byte file read under a {budget}-byte budget; the store holds {held}",
        big.len()
    );
}

/// `breakfs status --node` (text, and `--json`) of the daemon.
fn status(lab: &Lab, json: bool) -> String {
    let mut cmd = crate::mount::breakfs();
    cmd.args(["status", "--node", &lab.node.control()]);
    if json {
        cmd.arg("--json");
    }
    ok(&mut cmd)
}

/// The lazy layer snapshots of `status --json` (the others left out), by
/// layer digest: (key,
/// parent, held bytes, total bytes, mounted).
fn lazy_layers(lab: &Lab) -> BTreeMap<String, (String, String, u64, u64, bool)> {
    let v: serde_json::Value = serde_json::from_str(&status(lab, true)).unwrap();
    let snaps = v["snapshotter"]["snapshots"].as_array().unwrap();
    // A container's own (active) snapshot may still be there as well,
    // ordinary, until containerd's GC removes it.
    snaps
        .iter()
        .filter(|s| s["lazy"].is_object())
        .map(|s| {
            let l = &s["lazy"];
            assert_eq!(s["kind"], "committed", "{s}");
            let key = s["key"].as_str().unwrap().to_string();
            assert!(key.ends_with(s["name"].as_str().unwrap()), "{s}");
            let h = &l["hydration"];
            let layer = l["layer"]
                .as_str()
                .unwrap_or_else(|| panic!("not lazy: {s}"));
            assert!(
                l["image"].as_str().unwrap().contains("status/app@sha256:"),
                "{s}"
            );
            // The top layer of a refactored image holds no file content:
            // 0 of 0 bytes.
            let total = h["total_bytes"].as_u64().unwrap_or_else(|| panic!("{s}"));
            let entry = (
                key,
                s["parent"].as_str().unwrap().to_string(),
                h["held_bytes"].as_u64().unwrap(),
                total,
                l["mounted"].as_bool().unwrap(),
            );
            (layer.to_string(), entry)
        })
        .collect()
}

/// `breakfs status` without a mountpoint lists the containerd snapshots
/// the daemon holds: after rpull, each layer of the refactored image is a
/// committed lazy snapshot over the one below, with its layer digest,
/// image, hydration (nothing of the file contents yet) and no FUSE
/// mount; after a container read a 1 MiB file, the layers are mounted
/// and their hydration rose by at least that file.
#[test]
fn status_lists_the_lazy_layer_snapshots_and_their_hydration() {
    let work = tempfile::Builder::new()
        .prefix("status")
        .tempdir_in("/tmp")
        .unwrap();
    let busybox = crate::cri::busybox_static(work.path());
    let lab = Lab::start();
    let blob = random(1 << 20, 5);
    let files: &[(&str, &[u8])] = &[("data/blob", &blob)];
    let reference = busybox_image(&lab, work.path(), &busybox, "status/app:v1", &[files]);
    let layers = lab.layers("status/app:v1");
    lab.rpull(&reference);

    let before = lazy_layers(&lab);
    assert_eq!(
        before.keys().collect::<BTreeSet<_>>(),
        layers.iter().collect::<BTreeSet<_>>()
    );
    for (i, l) in layers.iter().enumerate() {
        let (_, parent, _, _, mounted) = &before[l];
        assert!(!mounted, "layer {l} is mounted before any container ran");
        let below = if i == 0 {
            ""
        } else {
            &before[&layers[i - 1]].0
        };
        assert_eq!(parent, below, "the parent of layer {l}");
    }
    let text = status(&lab, false);
    let n = layers.len();
    assert!(
        text.contains(&format!(
            ": {n} ({n} committed, 0 active, 0 views); {n} lazy layers, 0 ordinary"
        )),
        "{text}"
    );
    for l in &layers {
        assert!(text.contains(l.as_str()), "{l} not in:\n{text}");
    }
    assert!(text.contains("lazy, not mounted"), "{text}");

    let out = run(
        &lab.ctrd,
        &lab.node,
        &reference,
        &["busybox", "sha256sum", "/data/blob"],
    );
    assert!(
        out.contains(breakfs_index::Digest::of(&blob).hex()),
        "{out}"
    );
    let after = lazy_layers(&lab);
    let held = |m: &BTreeMap<String, (String, String, u64, u64, bool)>| -> u64 {
        m.values().map(|e| e.2).sum()
    };
    for (l, e) in &after {
        assert!(e.4, "layer {l} is not mounted after the run");
        assert!(e.2 >= before[l].2 && e.2 <= e.3, "layer {l}: {e:?}");
    }
    assert!(
        held(&after) >= held(&before) + blob.len() as u64,
        "hydration rose from {} to {} bytes only",
        held(&before),
        held(&after)
    );
    let text = status(&lab, false);
    assert!(text.contains("lazy, FUSE mount up"), "{text}");
    eprintln!("{text}");

    lab.remove(&reference);
    crate::snapshotter::wait_for(
        std::time::Duration::from_secs(30),
        "the snapshots are removed",
        || crate::snapshotter::listed(&lab.sock).is_empty(),
    );
}
