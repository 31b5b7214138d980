//! Lazy layers under a tight cache budget, with a real containerd 1.6,
//! `ctr-remote` and a real docker-registry (the lab of `snapshotter_lazy`):
//! a file larger than half the node's `--budget` reads whole while other
//! data is fetched beside it.
#![allow(clippy::unwrap_used)]

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

