//! Crash consistency: SIGKILL of the node daemon and of mount processes
//! at random moments during hydration, eviction and prefetch (the loop is
//! `support::crashloop`, 100 iterations in `cargo bench --bench crash`),
//! and `breakfs verify` finding and repairing damage a kill cannot cause.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use crate::mount::{Mount, assert_same, breakfs, corpus, original_tree, refactor_into, run_dir};
use crate::support::crashloop;
use crate::support::registry::TestRegistry;
use crate::support::tree;

#[test]
fn sigkill_of_the_node_and_mounts_leaves_stores_that_verify_and_mounts_that_read_right() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let began = Instant::now();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let expected = original_tree(img);
    let seed = crashloop::seed_from_env();
    eprintln!(
        "crash loop seed {seed} (BREAKFS_CRASH_SEED={seed} repeats it); set up in {:.1}s",
        began.elapsed().as_secs_f64()
    );
    let opts = crashloop::Options::one_image_two_forms(
        env!("CARGO_BIN_EXE_breakfs").into(),
        run_dir(),
        tmp.path().join("crash"),
        &refs[0],
        &img.reference,
        expected,
        img.compressed_size() + img.uncompressed_size(),
        10,
        seed,
    );
    let began = Instant::now();
    let report = match crashloop::run(&opts, &mut |line| eprintln!("crash loop: {line}")) {
        Ok(r) => r,
        // BREAKFS_CRASH_KEEP=1 keeps the stores and logs of a failed run.
        Err(e) if std::env::var_os("BREAKFS_CRASH_KEEP").is_some() => {
            panic!("seed {seed}: {e:#}\nkept in {}", tmp.keep().display())
        }
        Err(e) => panic!("seed {seed}: {e:#}"),
    };
    eprintln!(
        "crash loop: {:.1}s: {report:?}",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(report.iterations, 10, "seed {seed}");
    assert!(
        report.corrupt.is_empty(),
        "seed {seed}: {:?}",
        report.corrupt
    );
    assert!(
        report.evictions > 0,
        "seed {seed}: the node never evicted: the loop did not test eviction"
    );
}

/// A whole-layer (plain gzip) image: its files are chunks that only the
/// blob holds; once `breakfs verify --repair` removes a corrupt one (or
/// eviction a whole layer's chunks), a new mount indexes the blob again
/// rather than fail reads with EIO.
#[test]
fn a_chunk_of_a_whole_layer_removed_by_repair_is_indexed_again() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let expected = original_tree(img);
    let point = tmp.path().join("mnt");
    {
        let m = Mount::new(&img.reference, &point, &cache, &[]);
        let st = m.status();
        assert!(st["whole_layers"].as_u64().unwrap() > 0, "{st}");
        m.wait_hydrated();
    }
    // Rot: a byte flipped in the biggest chunk.
    let chunk = biggest_file(&cache.join("chunks/sha256"));
    let mut bytes = std::fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&chunk, &bytes).unwrap();

    let (ok, stdout, stderr) = verify(&cache, &[]);
    assert!(!ok, "{stdout}{stderr}");
    let name = chunk.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stdout.contains(&name) && stdout.contains("hashes to"),
        "{stdout}"
    );
    assert!(stderr.contains("--repair"), "{stderr}");
    let (ok, stdout, stderr) = verify(&cache, &["--repair"]);
    assert!(ok && stdout.contains("(removed)"), "{stdout}{stderr}");
    assert!(!chunk.exists());

    let m = Mount::new(&img.reference, &point, &cache, &[]);
    assert_same(
        &expected,
        &tree::snapshot(&m.point).unwrap(),
        "a whole-layer image after verify --repair",
    );
    assert!(chunk.exists(), "the repaired chunk was not stored again");
    drop(m);
    let (ok, stdout, stderr) = verify(&cache, &[]);
    assert!(ok && stdout.contains("nothing corrupt"), "{stdout}{stderr}");
}

/// `breakfs verify ARGS --cache CACHE`: success, stdout, stderr.
fn verify(cache: &Path, args: &[&str]) -> (bool, String, String) {
    let out = breakfs()
        .arg("verify")
        .args(args)
        .arg("--cache")
        .arg(cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn biggest_file(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path()
}
