//! `breakfs refactor` on bad input: a clear error naming the image, the
//! layer and the entry, and nothing written to the destination. Hostile
//! paths, links, sizes and TOCs go through refactor, mount and pull in
//! `hostile.rs`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use crate::support::images::{Layer, T, digest, gzip, tar_of, write_image};
use crate::support::registry::{TestRegistry, free_port};

fn breakfs(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_breakfs"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Refactor `src` into a fresh layout; it must fail, write nothing, and
/// its message must contain every one of `needles`.
fn must_fail(src: &str, needles: &[&str], extra: &[&str], env: &[(&str, &Path)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let work = tmp.path().join("work");
    let to = format!("oci:{}", dest.display());
    let mut args = vec!["refactor", "--to", &to, "--work-dir"];
    let w = work.display().to_string();
    args.push(&w);
    args.extend_from_slice(extra);
    args.push(src);
    let out = breakfs(&args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "refactor of {src} succeeded: {stderr}"
    );
    eprintln!("refactor {src}: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "error for {src} does not mention {n:?}: {stderr}"
        );
    }
    assert!(
        !dest.join("index.json").exists(),
        "a failed refactor left an image in the destination"
    );
    // Nothing outside the work dir and the destination: the only entries
    // of the temp dir are those two.
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            name == "dest" || name == "work",
            "unexpected {name:?} written"
        );
    }
    stderr
}

fn image_with(tmp: &Path, layers: Vec<Layer>) -> String {
    let dir = tmp.join("src");
    write_image(&dir, "v1", &layers);
    format!("oci:{}:v1", dir.display())
}

#[test]
fn truncated_gzip_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = tar_of(&[T::File("big", &vec![7u8; 300_000], 0o644)]);
    let mut blob = gzip(&tar);
    blob.truncate(blob.len() / 2);
    let d = digest(&blob);
    let layer = Layer {
        tar,
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        declared_digest: None,
        annotations: Default::default(),
    };
    let src = image_with(tmp.path(), vec![layer]);
    must_fail(&src, &[&src, &d[..19]], &[], &[]);
}

#[test]
fn blob_digest_mismatch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layer = Layer::gzip(tar_of(&[T::File("a", b"a", 0o644)]));
    // The layout stores the blob under the declared (wrong) digest.
    let wrong = digest(b"something else");
    layer.declared_digest = Some(wrong.clone());
    let src = image_with(tmp.path(), vec![layer]);
    let blobs = tmp.path().join("src/blobs/sha256");
    let real = digest(&gzip(&tar_of(&[T::File("a", b"a", 0o644)])));
    std::fs::rename(blobs.join(&real[7..]), blobs.join(&wrong[7..])).unwrap();
    must_fail(&src, &[&wrong, "mismatch"], &[], &[]);
}

#[test]
fn unknown_media_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layer = Layer::gzip(tar_of(&[T::File("a", b"a", 0o644)]));
    layer.media_type = "application/vnd.example.strange+lz4".into();
    let src = image_with(tmp.path(), vec![layer]);
    must_fail(&src, &["application/vnd.example.strange+lz4"], &[], &[]);
}

#[test]
fn unreachable_registry_is_named() {
    let port = free_port();
    let src = format!("docker://127.0.0.1:{port}/app:v1");
    let started = std::time::Instant::now();
    must_fail(
        &src,
        &[&format!("127.0.0.1:{port}")],
        &["--plain-http"],
        &[],
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn registry_401_without_credentials_says_how_to_log_in() {
    let reg = TestRegistry::start_with_auth("edge", "s3cret");
    let empty = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/app:v1", reg.host());
    let stderr = must_fail(
        &src,
        &[&reg.host(), "docker login"],
        &["--plain-http"],
        &[("DOCKER_CONFIG", empty.path())],
    );
    assert!(!stderr.contains("s3cret"));
}

#[test]
fn diff_id_mismatch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layer = Layer::gzip(tar_of(&[T::File("a", b"a", 0o644)]));
    // The config's diff_id describes another tar than the blob holds.
    layer.tar = tar_of(&[T::File("b", b"b", 0o644)]);
    let d = digest(&layer.blob);
    let src = image_with(tmp.path(), vec![layer]);
    must_fail(&src, &[&src, &d[..19], "diff_id"], &[], &[]);
}
