//! `breakfs mount`, `pull --extract`, `umount` and `status` against a real
//! docker-registry: trees equal to `umoci unpack`, real programs (chroot
//! and runc) on overlayfs over the mount, faults (registry killed or hung,
//! corrupt blobs, SIGKILL and remount, writes), and bad input.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::corpus::{self, CorpusImage, IMAGE_PATH, TEST_FAMILIES};
use crate::support::images::{Layer, T, estargz_layer, tar_of, write_image};
use crate::support::measure::ADDED;
use crate::support::memo::Memo;
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;
use crate::support::tree::{self, CompareOptions};

pub(crate) fn breakfs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_breakfs"));
    c.env("BREAKFS_RUN_DIR", run_dir());
    c
}

/// Status records of the test mounts, apart from real ones.
pub(crate) fn run_dir() -> PathBuf {
    std::env::temp_dir().join("breakfs-test-run")
}

pub(crate) fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A breakfs mount that is unmounted (with anything stacked on it) on drop.
pub(crate) struct Mount {
    pub(crate) point: PathBuf,
    cache: PathBuf,
    stacked: Vec<PathBuf>,
}

impl Mount {
    pub(crate) fn new(reference: &str, point: &Path, cache: &Path, extra: &[&str]) -> Mount {
        Mount::with_env(reference, point, cache, extra, &[])
    }

    /// A mount whose `breakfs mount` runs with `env` set too.
    pub(crate) fn with_env(
        reference: &str,
        point: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mount {
        let out = Mount::try_with_env(reference, point, cache, extra, env);
        assert!(
            out.status.success(),
            "breakfs mount {reference} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            point: point.canonicalize().unwrap(),
            cache: cache.to_path_buf(),
            stacked: Vec::new(),
        }
    }

    pub(crate) fn try_new(reference: &str, point: &Path, cache: &Path, extra: &[&str]) -> Output {
        Mount::try_with_env(reference, point, cache, extra, &[])
    }

    fn try_with_env(
        reference: &str,
        point: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Output {
        std::fs::create_dir_all(point).unwrap();
        breakfs()
            .envs(env.iter().copied())
            .args(["mount", "--plain-http", "--cache"])
            .arg(cache)
            .args(extra)
            .arg(reference)
            .arg(point)
            .output()
            .unwrap()
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        let out = ok(breakfs().args(["status", "--json"]).arg(&self.point));
        serde_json::from_str(&out).unwrap()
    }

    /// A status record written after this call.
    pub(crate) fn fresh_status(&self) -> serde_json::Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.status();
            if st["updated"].as_u64().unwrap() > now {
                return st;
            }
            assert!(
                Instant::now() < until,
                "the status of {} is not updated: {st}\nlog: {}",
                self.point.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.status()["pid"].as_u64().unwrap() as u32
    }

    /// Wait until every chunk is in the store.
    pub(crate) fn wait_hydrated(&self) {
        let until = Instant::now() + Duration::from_secs(300);
        while Instant::now() < until {
            if self.status()["hydrated"] == true {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{} did not hydrate: {}",
            self.point.display(),
            self.status()
        );
    }

    /// The mount process's log.
    pub(crate) fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.cache.join("logs"))
            .unwrap()
            .flatten()
        {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        all
    }

    /// Overlayfs with this mount as the lower layer, upper on tmpfs.
    pub(crate) fn overlay(&mut self, dir: &Path) -> PathBuf {
        let (scratch, merged) = (dir.join("scratch"), dir.join("merged"));
        for d in [&scratch, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&scratch));
        self.stacked.push(scratch.clone());
        for d in ["upper", "work"] {
            std::fs::create_dir_all(scratch.join(d)).unwrap();
        }
        ok(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                self.point.display(),
                scratch.join("upper").display(),
                scratch.join("work").display()
            ))
            .arg(&merged));
        self.stacked.push(merged.clone());
        merged
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for p in self.stacked.iter().rev() {
            let _ = Command::new("umount").arg(p).status();
        }
        let _ = breakfs().arg("umount").arg(&self.point).output();
    }
}

pub(crate) fn corpus() -> Vec<CorpusImage> {
    corpus::build_families(TEST_FAMILIES).unwrap()
}

pub(crate) fn umoci_tree(image: &CorpusImage, out: &Path) -> BTreeMap<String, tree::Node> {
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{}", image.layout.display(), image.tag))
        .arg(out));
    tree::snapshot(&out.join("rootfs")).unwrap()
}

/// [`umoci_tree`] of `image`, unpacked once per test binary (for tests
/// that need the tree only, not the unpacked files).
pub(crate) fn original_tree(image: &CorpusImage) -> BTreeMap<String, tree::Node> {
    static TREES: Memo<(PathBuf, String), BTreeMap<String, tree::Node>> = Memo::new();
    TREES
        .get((image.layout.clone(), image.tag.clone()), || {
            let tmp = tempfile::tempdir().unwrap();
            umoci_tree(image, &tmp.path().join("umoci"))
        })
        .clone()
}

fn compare_opts() -> CompareOptions {
    CompareOptions {
        ignore_paths: ADDED.iter().map(|s| s.to_string()).collect(),
        ignore_root_mtime: true,
        ..CompareOptions::default()
    }
}

pub(crate) fn assert_same(
    a: &BTreeMap<String, tree::Node>,
    b: &BTreeMap<String, tree::Node>,
    what: &str,
) {
    let diff = tree::compare(a, b, &compare_opts());
    assert!(
        diff.is_empty(),
        "{what}: {} differences with umoci unpack, first: {:?}",
        diff.len(),
        &diff[..diff.len().min(10)]
    );
}

/// Refactor `images` in turn into `reg` (a later build of a family
/// reusing the layers of the earlier ones), as
/// `REG/refactored/FAMILY:TAG`.
///
/// Into repositories that hold nothing yet, the refactoring depends on the
/// images alone (its output is deterministic): it is made once per test
/// binary into OCI layouts, one per repository as the registry keeps one,
/// and copied into `reg` with skopeo (the same manifests and blobs).
pub(crate) fn refactor_into(
    reg: &TestRegistry,
    images: &[CorpusImage],
    work: &Path,
) -> Vec<String> {
    let repo = |img: &CorpusImage| format!("refactored/{}", img.family);
    let dests: Vec<String> = images
        .iter()
        .map(|img| reg.reference(&format!("{}:{}", repo(img), img.tag)))
        .collect();
    let empty = images.iter().all(|img| {
        !reg.storage_dir()
            .join("docker/registry/v2/repositories")
            .join(repo(img))
            .exists()
    });
    if !empty {
        for (img, dest) in images.iter().zip(&dests) {
            ok(breakfs()
                .args(["refactor", "--plain-http", "--work-dir"])
                .arg(work)
                .args(["--to", dest, &img.reference]));
        }
        return dests;
    }
    static LAYOUTS: Memo<Vec<String>, PathBuf> = Memo::new();
    let key: Vec<String> = images.iter().map(|i| i.reference.clone()).collect();
    let layouts = LAYOUTS.get(key, || {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = refactored_layouts().join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
        let _ = std::fs::remove_dir_all(&dir);
        for img in images {
            let to = format!("oci:{}:{}", dir.join(img.family).display(), img.tag);
            ok(breakfs().args(["refactor", "--work-dir"]).arg(work).args([
                "--to",
                &to,
                &img.reference,
            ]));
        }
        dir
    });
    for (img, dest) in images.iter().zip(&dests) {
        ok(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!(
                "oci:{}:{}",
                layouts.join(img.family).display(),
                img.tag
            ))
            .arg(dest));
    }
    dests
}

/// Where this test binary keeps the layouts of [`refactor_into`]
/// (`target/tmp/refactored-PID`); those of binaries no longer running are
/// removed on first use.
fn refactored_layouts() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("refactored-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        root.join(format!("refactored-{}", std::process::id()))
    })
    .clone()
}

#[test]
fn mounted_trees_equal_umoci_unpack_for_original_and_refactored_images() {
    let images = corpus();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refactored = refactor_into(&reg, &images, &tmp.path().join("work"));
    let cache = tmp.path().join("cache");
    for (i, (img, rref)) in images.iter().zip(&refactored).enumerate() {
        let expected = original_tree(img);
        // The original (plain gzip layers, fetched whole) from its layout,
        // the refactored one lazily from the registry.
        for (what, reference) in [("original", img.reference.as_str()), ("refactored", rref)] {
            let point = tmp.path().join(format!("mnt-{i}-{what}"));
            let m = Mount::new(reference, &point, &cache, &[]);
            let got = tree::snapshot(&m.point).unwrap();
            assert_same(&expected, &got, &format!("{what} {reference}"));
            let st = m.status();
            let lazy = st["lazy_layers"].as_u64().unwrap();
            if what == "refactored" {
                assert!(lazy > 0 && st["whole_layers"] == 0, "{st}");
            } else {
                assert_eq!(lazy, 0, "{st}");
            }
            let statfs = ok(Command::new("stat").arg("-f").arg(&m.point));
            assert!(statfs.contains("fuse"), "stat -f: {statfs}");
        }
    }
}

#[test]
fn pull_extract_writes_the_same_tree_as_umoci() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let expected = original_tree(img);
    for (what, reference) in [
        ("original", img.reference.as_str()),
        ("refactored", &refs[0]),
    ] {
        let dest = tmp.path().join(format!("x-{what}"));
        let out = ok(breakfs()
            .args(["pull", "--plain-http", "--cache"])
            .arg(tmp.path().join(format!("cache-{what}")))
            .arg("--extract")
            .arg(&dest)
            .arg(reference));
        assert!(out.contains("extracted"), "{out}");
        let got = tree::snapshot(&dest).unwrap();
        assert_same(&expected, &got, &format!("pull --extract of {what}"));
    }
}

#[test]
fn programs_run_from_overlayfs_on_the_mount_with_chroot_and_runc() {
    let images = corpus();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let v1: Vec<CorpusImage> = images.into_iter().filter(|i| i.tag == "v1").collect();
    let refs = refactor_into(&reg, &v1, &tmp.path().join("work"));
    for (i, (img, reference)) in v1.iter().zip(&refs).enumerate() {
        let mut m = Mount::new(
            reference,
            &tmp.path().join(format!("mnt{i}")),
            &tmp.path().join("cache"),
            &["--no-hydrate"],
        );
        let rootfs = m.overlay(&tmp.path().join(format!("ovl{i}")));
        let out = corpus::run_in_rootfs(&rootfs, &img.command).unwrap();
        assert!(
            out.status.success(),
            "{:?} in a chroot of {reference}: {}{}",
            img.command,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Only what the command read was fetched (no hydration).
        let st = m.status();
        assert!(
            st["hydrated_bytes"].as_u64().unwrap() < st["chunk_bytes"].as_u64().unwrap(),
            "{st}"
        );

        // runc with the overlay as the container's rootfs.
        let bundle = tmp.path().join(format!("bundle{i}"));
        std::fs::create_dir_all(&bundle).unwrap();
        ok(Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle));
        let spec_path = bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(img.command);
        spec["process"]["env"] = serde_json::json!([format!("PATH={IMAGE_PATH}"), "HOME=/root"]);
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let id = format!("breakfs-test-{}-{i}", std::process::id());
        let out = Command::new("runc")
            .args(["--root"])
            .arg(tmp.path().join("runc"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runc run {:?} on {reference}: {}{}",
            img.command,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if i == 0 {
            // Unmounted under a live overlay, the mount process keeps
            // serving the overlay until it goes.
            let pid = m.pid();
            ok(breakfs().arg("umount").arg(&m.point));
            assert!(!breakfs_fs::is_mountpoint(&m.point));
            let again = corpus::run_in_rootfs(&rootfs, &img.command).unwrap();
            assert!(
                again.status.success(),
                "the overlay broke after the unmount: {}",
                String::from_utf8_lossy(&again.stderr)
            );
            assert!(running(pid));
            drop(m); // unmounts the overlay: the process then ends
            let until = Instant::now() + Duration::from_secs(20);
            while running(pid) {
                assert!(
                    Instant::now() < until,
                    "the mount process outlived its overlay"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Whether process `pid` runs (an exited process not yet reaped does not:
/// a dead child stays in /proc as a zombie until reaped).
pub(crate) fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Regular files of a tree with their sizes, paths relative to it; reads
/// metadata only, never content.
pub(crate) fn files_of(root: &Path) -> Vec<(String, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(root, &e.path(), out);
            } else if meta.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.push((rel, meta.len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

pub(crate) fn read_all(root: &Path) {
    for (p, _) in files_of(root) {
        std::fs::read(root.join(&p)).unwrap_or_else(|e| panic!("reading {p}: {e}"));
    }
}

#[test]
fn registry_faults_give_eio_in_bounded_time_and_recover() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let mut reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let m = Mount::new(
        &refs[0],
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &[
            "--no-hydrate",
            "--no-dependency-prefetch",
            "--deadline",
            "4",
        ],
    );
    // Big files first: each sits in chunks of its own. (No dependency
    // prefetch: reading a program must not fetch the libraries this test
    // expects to be missing.)
    let mut files = files_of(&m.point);
    files.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    // Distinct sizes: no two share content (copies would share chunks).
    files.dedup_by_key(|(_, size)| *size);
    let (cached, uncached, hung) = (&files[0].0, &files[1].0, &files[2].0);
    let cached_bytes = std::fs::read(m.point.join(cached)).unwrap();

    reg.kill();
    assert_eq!(std::fs::read(m.point.join(cached)).unwrap(), cached_bytes);
    let t = Instant::now();
    let err = std::fs::read(m.point.join(uncached))
        .map(|b| b.len())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    eprintln!("registry down: EIO after {:?}", t.elapsed());

    reg.restart();
    let again = std::fs::read(m.point.join(uncached)).unwrap();
    assert_eq!(again.len() as u64, files[1].1);

    // A registry that accepts connections and never answers: the read
    // still fails, after the deadline, instead of hanging.
    reg.freeze(true);
    let t = Instant::now();
    let err = std::fs::read(m.point.join(hung))
        .map(|b| b.len())
        .unwrap_err();
    let waited = t.elapsed();
    reg.freeze(false);
    assert_eq!(err.raw_os_error(), Some(5), "expected EIO, got {err}");
    assert!(
        waited < Duration::from_secs(60),
        "the read hung for {waited:?}"
    );
    eprintln!("registry hung: EIO after {waited:?} (deadline 4 s)");
    std::fs::read(m.point.join(hung)).unwrap();
}

pub(crate) fn hex_sha256(b: &[u8]) -> String {
    breakfs_index::Digest::of(b).hex().to_string()
}

#[test]
fn a_corrupt_blob_in_the_registry_is_detected_and_never_served() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let reference = &refs[0];
    // The largest layer: flip bytes in the middle of its payload.
    let manifest =
        ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", reference]));
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap();
    let digest = layer["digest"].as_str().unwrap().to_string();
    let m = Mount::new(
        reference,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &["--no-hydrate", "--deadline", "10"],
    );
    let data = reg.blob_data_path(&digest[7..]);
    let mut bytes = std::fs::read(&data).unwrap();
    let size = bytes.len();
    for b in &mut bytes[size / 3..size / 3 + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&data, bytes).unwrap();

    let mut failed = 0;
    for (p, _) in files_of(&m.point) {
        match std::fs::read(m.point.join(&p)) {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(5), "{p}: {e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no read failed although a layer is corrupt");
    let log = m.log();
    assert!(
        log.contains(&digest),
        "the log does not name {digest}: {log}"
    );
    // Nothing unverified entered the store: every chunk file hashes to its name.
    for e in std::fs::read_dir(tmp.path().join("cache/chunks/sha256"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().into_string().unwrap();
        assert_eq!(hex_sha256(&std::fs::read(e.path()).unwrap()), name);
    }
}

#[test]
fn after_sigkill_a_remount_fetches_no_cached_chunk_again() {
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
    let (point, cache) = (tmp.path().join("mnt"), tmp.path().join("cache"));
    let m = Mount::new(&reference, &point, &cache, &[]);
    m.wait_hydrated();
    let before = proxy.blob_requests().len();
    assert!(before > 0);
    // Adjacent chunks were merged into fewer Range requests.
    let st = m.fresh_status();
    let (requests, chunks) = (
        st["fetch"]["sources"]["cloud"]["requests"]
            .as_u64()
            .unwrap(),
        st["fetch"]["chunks_stored"].as_u64().unwrap(),
    );
    assert!(
        requests * 2 < chunks,
        "{requests} requests for {chunks} chunks"
    );
    // Writes fail with EROFS.
    for r in [
        std::fs::write(m.point.join("new-file"), b"x"),
        std::fs::create_dir(m.point.join("new-dir")),
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.point.join("etc/passwd"))
            .map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(30), "expected EROFS");
    }

    let pid = m.pid();
    ok(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stdin(Stdio::null()));
    let until = Instant::now() + Duration::from_secs(20);
    while running(pid) {
        assert!(
            Instant::now() < until,
            "the mount process {pid} still runs 20 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // breakfs umount detaches the dead mount.
    ok(breakfs().arg("umount").arg(&m.point));
    assert!(
        !breakfs_fs::is_mountpoint(&m.point),
        "the dead mount is still attached after breakfs umount"
    );
    drop(m);
    proxy.reset();
    let m = Mount::new(&reference, &point, &cache, &[]);
    read_all(&m.point);
    m.wait_hydrated();
    let blobs = proxy.blob_requests();
    assert!(
        blobs.is_empty(),
        "the remount asked for blobs again: {blobs:?}"
    );
    assert!(
        proxy.requests().iter().any(|r| r.contains("/manifests/")),
        "the remount did not even resolve the tag"
    );
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let base = || {
        Layer::gzip(tar_of(&[
            T::Dir("etc"),
            T::File("etc/hostname", b"breakfs\n", 0o644),
        ]))
    };
    write_image(
        &layout,
        "outside",
        &[
            base(),
            estargz_layer(&[("a", b"aaaa"), ("b", b"bbbb")], |toc| {
                toc.entries[1].offset = 1 << 40;
            }),
        ],
    );
    write_image(
        &layout,
        "dotdot",
        &[estargz_layer(&[("a", b"aaaa")], |toc| {
            toc.entries[0].name = "../../etc/evil".into();
        })],
    );
    write_image(
        &layout,
        "digest",
        &[estargz_layer(
            &[("good", b"good"), ("bad", b"bad!")],
            |toc| {
                toc.entries[1].chunk_digest = crate::support::images::digest(b"something else");
            },
        )],
    );
    write_image(&layout, "fine", &[base()]);
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    let oci = |tag: &str| format!("oci:{}:{tag}", layout.display());

    for (tag, needle) in [("outside", "outside the blob"), ("dotdot", "..")] {
        let out = Mount::try_new(&oci(tag), &mnt, &cache, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounting {tag} succeeded");
        assert!(err.contains(needle), "error for {tag}: {err}");
        assert!(!breakfs_fs::is_mountpoint(&mnt.canonicalize().unwrap()));
    }

    let m = Mount::new(&oci("digest"), &mnt, &cache, &["--deadline", "5"]);
    assert_eq!(std::fs::read(m.point.join("good")).unwrap(), b"good");
    let err = std::fs::read(m.point.join("bad"))
        .map(|b| b.len())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(m.log().contains("digest mismatch"), "{}", m.log());

    // Mountpoints: missing, a file, already mounted.
    let missing = tmp.path().join("nowhere");
    let out = breakfs()
        .args(["mount", "--cache"])
        .arg(&cache)
        .arg(oci("fine"))
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("mkdir -p"), "{err}");
    let out = Mount::try_new(&oci("fine"), &m.point, &cache, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already mounted"),
        "{err}"
    );
    let out = breakfs()
        .args(["umount"])
        .arg(tmp.path().join("layout"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is mounted"));
}

/// `breakfs shape` in front of `upstream`, killed on drop.
pub(crate) struct Shaper(std::process::Child, pub(crate) String);

impl Shaper {
    pub(crate) fn start(upstream: &str, rtt_ms: u64, mbit: u64) -> Shaper {
        let port = crate::support::registry::free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = breakfs()
            .args(["shape", "--listen", &listen, "--upstream", upstream])
            .args(["--rtt-ms", &rtt_ms.to_string(), "--mbit", &mbit.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < until, "breakfs shape did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Shaper(child, listen)
    }

    /// Lift the shaping (`breakfs shape` on SIGUSR1): bytes pass at once,
    /// for what a test reads once the link's speed no longer matters.
    pub(crate) fn lift(&self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reads_pass_ahead_of_background_hydration() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    // A slow link: hydrating the whole image takes several seconds.
    let link = Shaper::start(&reg.host(), 20, 24);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    let m = Mount::new(
        &reference,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &[],
    );
    // The last files in hydration (inode) order.
    let files = files_of(&m.point);
    let last: Vec<&(String, u64)> = files.iter().rev().filter(|(_, s)| *s > 0).take(3).collect();
    for (p, size) in &last {
        assert_eq!(std::fs::read(m.point.join(p)).unwrap().len() as u64, *size);
    }
    let st = m.fresh_status();
    assert_eq!(
        st["hydrated"], false,
        "hydration finished before the reads: {st}"
    );
    assert!(st["reads"]["reads_waited"].as_u64().unwrap() > 0, "{st}");
    // The rest of the hydration need not crawl.
    link.lift();
    m.wait_hydrated();
}

/// Append one entry to `b`; `f` adjusts the header.
fn add(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    f: &dyn Fn(&mut tar::Header),
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    f(&mut h);
    b.append_data(&mut h, path, data).unwrap();
}

/// A layer with every kind of entry an image can hold.
fn special_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let none = |_: &mut tar::Header| {};
    add(&mut b, "dev", tar::EntryType::Directory, 0o755, b"", &none);
    add(&mut b, "dev/null", tar::EntryType::Char, 0o666, b"", &|h| {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    });
    add(
        &mut b,
        "dev/loop0",
        tar::EntryType::Block,
        0o660,
        b"",
        &|h| {
            h.set_device_major(7).unwrap();
            h.set_device_minor(0).unwrap();
            h.set_gid(6);
        },
    );
    add(&mut b, "run", tar::EntryType::Directory, 0o755, b"", &none);
    add(&mut b, "run/fifo", tar::EntryType::Fifo, 0o600, b"", &none);
    add(&mut b, "tmp", tar::EntryType::Directory, 0o1777, b"", &none);
    add(&mut b, "usr", tar::EntryType::Directory, 0o755, b"", &none);
    add(
        &mut b,
        "usr/bin",
        tar::EntryType::Directory,
        0o755,
        b"",
        &none,
    );
    add(
        &mut b,
        "usr/bin/su",
        tar::EntryType::Regular,
        0o4755,
        b"#!/bin/sh\necho su\n",
        &none,
    );
    add(
        &mut b,
        "usr/bin/wall",
        tar::EntryType::Regular,
        0o2755,
        b"wall",
        &|h| h.set_gid(5),
    );
    add(
        &mut b,
        "usr/bin/a",
        tar::EntryType::Regular,
        0o755,
        b"same inode",
        &none,
    );
    for link in ["usr/bin/b", "usr/bin/c"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_link(&mut h, link, "usr/bin/a").unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_mtime(1_700_000_000);
    b.append_link(&mut h, "usr/bin/sh", "../../bin/dash")
        .unwrap();
    // An xattr, as a PAX record.
    b.append_pax_extensions([("SCHILY.xattr.user.breakfs", b"on".as_slice())])
        .unwrap();
    add(
        &mut b,
        "usr/bin/tagged",
        tar::EntryType::Regular,
        0o644,
        b"tagged",
        &none,
    );
    b.into_inner().unwrap()
}

#[test]
fn devices_fifos_setuid_xattrs_and_hardlinks_come_through() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_image(&layout, "special", &[Layer::gzip(special_tar())]);
    let original = format!("oci:{}:special", layout.display());
    let refactored = format!("oci:{}:special", tmp.path().join("refactored").display());
    ok(breakfs()
        .args(["refactor", "--work-dir"])
        .arg(tmp.path().join("work"))
        .args(["--to", &refactored, &original]));
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:special", layout.display()))
        .arg(tmp.path().join("umoci")));
    let expected = tree::snapshot(&tmp.path().join("umoci/rootfs")).unwrap();
    assert_eq!(
        expected["usr/bin/a"].hardlinks.len(),
        3,
        "{:?}",
        expected["usr/bin/a"]
    );
    assert_eq!(expected["usr/bin/tagged"].xattrs.len(), 1);
    for (what, reference) in [("original", &original), ("refactored", &refactored)] {
        let m = Mount::new(
            reference,
            &tmp.path().join(format!("mnt-{what}")),
            &tmp.path().join("cache"),
            &[],
        );
        let got = tree::snapshot(&m.point).unwrap();
        assert_same(&expected, &got, &format!("{what} special image"));
        let meta = std::fs::symlink_metadata(m.point.join("usr/bin/a")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.nlink(), 3);
        assert_eq!(
            meta.ino(),
            std::fs::metadata(m.point.join("usr/bin/c")).unwrap().ino()
        );
    }
}
