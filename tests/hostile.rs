//! Hostile images (issue 7, item 2), each through `breakfs refactor`,
//! `breakfs mount` (a real FUSE mount) and `breakfs pull --extract`. Each
//! command must refuse the image with an error naming the entry and why,
//! or contain it (OCI semantics, the same tree from every command); none
//! may write outside its own directories (a canary directory beside them
//! stays as it was); and peak memory stays under a stated bound: GNU
//! time's maximum RSS of refactor and pull, VmHWM of the mount process.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use breakfs_index::{TocEntry, TocEntryType};

use crate::mount::{Mount, run_dir};
use crate::support::images::{
    Layer, T, digest, estargz_layer, stream_layer, tar_entries, tar_of, write_image, write_manifest,
};
use crate::support::tree;

/// A case's directories: the source layout (`src`), a canary directory
/// holding one file, and everything the commands write (`out`). Every
/// hostile path aims at the canary from the output directories.
pub(crate) struct Sandbox {
    tmp: tempfile::TempDir,
}

const CANARY_FILE: &[u8] = b"canary\n";

impl Sandbox {
    pub(crate) fn new() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("canary")).unwrap();
        std::fs::create_dir_all(tmp.path().join("out")).unwrap();
        std::fs::write(tmp.path().join("canary/target"), CANARY_FILE).unwrap();
        Sandbox { tmp }
    }

    pub(crate) fn layout(&self) -> PathBuf {
        self.tmp.path().join("src")
    }

    pub(crate) fn canary(&self) -> PathBuf {
        self.tmp.path().join("canary")
    }

    pub(crate) fn image(&self, tag: &str, layers: Vec<Layer>) {
        write_image(&self.layout(), tag, &layers);
    }

    pub(crate) fn reference(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.layout().display())
    }

    pub(crate) fn out(&self, name: &str) -> PathBuf {
        self.tmp.path().join("out").join(name)
    }

    /// `breakfs refactor` of `tag` into a layout of its own.
    pub(crate) fn refactor(&self, tag: &str) -> Run {
        let dest = self.out(&format!("dest-{tag}"));
        let run = timed(
            &format!("refactor {tag}"),
            Command::new(env!("CARGO_BIN_EXE_breakfs"))
                .args(["refactor", "--work-dir"])
                .arg(self.out(&format!("work-{tag}")))
                .arg("--to")
                .arg(format!("oci:{}", dest.display()))
                .arg(self.reference(tag)),
        );
        if !run.out.status.success() {
            assert!(
                !dest.join("index.json").exists(),
                "a failed refactor of {tag} left an image in its destination"
            );
        }
        run
    }

    /// The refactored image of `tag` (after [`Sandbox::refactor`]).
    pub(crate) fn refactored(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.out(&format!("dest-{tag}")).display())
    }

    /// `breakfs pull --extract` of `reference` into `out/x-NAME`.
    pub(crate) fn pull(&self, name: &str, reference: &str) -> Run {
        timed(
            &format!("pull {name}"),
            Command::new(env!("CARGO_BIN_EXE_breakfs"))
                .args(["pull", "--cache"])
                .arg(self.out(&format!("cache-pull-{name}")))
                .arg("--extract")
                .arg(self.extracted(name))
                .arg(reference),
        )
    }

    pub(crate) fn extracted(&self, name: &str) -> PathBuf {
        self.out(&format!("x-{name}"))
    }

    pub(crate) fn mount_args(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.out(&format!("mnt-{name}")),
            self.out(&format!("cache-mount-{name}")),
        )
    }

    /// A standalone mount of `reference`; it must come up.
    pub(crate) fn mount(&self, name: &str, reference: &str) -> Mount {
        let (point, cache) = self.mount_args(name);
        Mount::new(reference, &point, &cache, &["--standalone"])
    }

    /// A standalone mount of `reference`; it must fail with every needle
    /// in its message and leave nothing mounted.
    pub(crate) fn mount_refused(&self, name: &str, reference: &str, needles: &[&str]) {
        let (point, cache) = self.mount_args(name);
        let out = Mount::try_new(reference, &point, &cache, &["--standalone"]);
        let run = Run {
            what: format!("mount {name}"),
            out,
            peak_mib: 0,
        };
        run.refused(needles);
        assert!(!breakfs_fs::is_mountpoint(&point.canonicalize().unwrap()));
    }

    /// `tag` of the source layout refused by all three commands, each
    /// naming the image and saying every one of `needles`.
    pub(crate) fn refused_everywhere(&self, tag: &str, needles: &[&str]) {
        let reference = self.reference(tag);
        let needles = [needles, &[reference.as_str()]].concat();
        self.refactor(tag).refused(&needles);
        self.refused_lazily(tag, &needles);
    }

    /// `tag` refused by mount and pull, which read its (lying) TOC.
    pub(crate) fn refused_lazily(&self, tag: &str, needles: &[&str]) {
        let reference = self.reference(tag);
        let needles = [needles, &[reference.as_str()]].concat();
        self.mount_refused(tag, &reference, &needles);
        self.pull(tag, &reference).refused(&needles);
    }

    /// Nothing was written outside `src` and `out`: the canary holds its
    /// one file, unchanged and with no other link to it.
    pub(crate) fn assert_contained(&self) {
        use std::os::unix::fs::MetadataExt;
        let names = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&self.canary()), ["target"], "the canary was written");
        let target = self.canary().join("target");
        assert_eq!(std::fs::read(&target).unwrap(), CANARY_FILE);
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert_eq!(
            (meta.nlink(), meta.mode() & 0o7777),
            (1, 0o644),
            "the canary file was linked or changed"
        );
        assert_eq!(names(self.tmp.path()), ["canary", "out", "src"]);
    }
}

/// What one command did, with its peak memory.
pub(crate) struct Run {
    pub(crate) what: String,
    pub(crate) out: Output,
    /// Maximum resident set size, MiB (0 when not measured).
    pub(crate) peak_mib: u64,
}

impl Run {
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    /// The command failed, saying every one of `needles`.
    pub(crate) fn refused(&self, needles: &[&str]) -> String {
        let err = self.stderr();
        assert!(
            !self.out.status.success(),
            "{} succeeded: {}{err}",
            self.what,
            String::from_utf8_lossy(&self.out.stdout)
        );
        eprintln!("{} (peak RSS {} MiB): {err}", self.what, self.peak_mib);
        for n in needles {
            assert!(
                err.contains(n),
                "the error of {} does not say {n:?}: {err}",
                self.what
            );
        }
        err
    }

    /// The command succeeded within `mib` MiB.
    pub(crate) fn ok_within(&self, mib: u64) -> &Run {
        assert!(
            self.out.status.success(),
            "{} failed: {}{}",
            self.what,
            String::from_utf8_lossy(&self.out.stdout),
            self.stderr()
        );
        assert_peak(&self.what, self.peak_mib, mib);
        self
    }
}

fn assert_peak(what: &str, peak_mib: u64, bound_mib: u64) {
    eprintln!("hostile: {what}: peak RSS {peak_mib} MiB (bound {bound_mib} MiB)");
    assert!(
        peak_mib < bound_mib,
        "{what} took {peak_mib} MiB, more than {bound_mib} MiB"
    );
}

/// Run `cmd` under GNU time, which reports the child's maximum RSS.
pub(crate) fn timed(what: &str, cmd: &mut Command) -> Run {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .args(["-f", "%M", "-o"])
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env("BREAKFS_RUN_DIR", run_dir());
    let out = wrapped.output().unwrap();
    // A failing command adds a line before the figure.
    let kib: u64 = std::fs::read_to_string(report.path())
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RSS figure from GNU time for {what}"));
    Run {
        what: what.to_string(),
        out,
        peak_mib: kib / 1024,
    }
}

/// Peak RSS of a running process, MiB.
fn vm_hwm_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

/// A raw tar header of a regular file declaring `size` bytes.
pub(crate) fn file_header(path: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// The blob digest's first characters, as error messages show it.
pub(crate) fn short(layer: &Layer) -> String {
    digest(&layer.blob)[..19].to_string()
}

#[test]
fn dotdot_paths_are_refused() {
    let s = Sandbox::new();
    let evil = "../../canary/evil";
    let layer = Layer::gzip(tar_of(&[T::Dir("etc/"), T::File(evil, b"x", 0o644)]));
    let d = short(&layer);
    s.image("tar", vec![layer]);
    s.image(
        "toc",
        vec![estargz_layer(&[("a", b"aaaa")], |toc| {
            toc.entries[0].name = evil.into();
        })],
    );
    s.refused_everywhere("tar", &[&d, evil, "`..`"]);
    s.refused_lazily("toc", &[evil, "`..`"]);
    // Refactoring reads the tar stream, which is clean.
    s.refactor("toc").ok_within(128);
    s.assert_contained();
}

#[test]
fn absolute_paths_are_refused() {
    let s = Sandbox::new();
    let evil = format!("{}/evil", s.canary().display());
    let layer = Layer::gzip(tar_of(&[T::File(&evil, b"x", 0o644)]));
    let d = short(&layer);
    s.image("tar", vec![layer]);
    s.image(
        "toc",
        vec![estargz_layer(&[("a", b"aaaa")], |toc| {
            toc.entries[0].name.clone_from(&evil);
        })],
    );
    s.refused_everywhere("tar", &[&d, &evil, "absolute"]);
    s.refused_lazily("toc", &[&evil, "absolute"]);
    s.assert_contained();
}

#[test]
fn paths_through_symlinks_are_refused() {
    let s = Sandbox::new();
    let canary = s.canary().display().to_string();
    let link = Layer::gzip(tar_of(&[T::Symlink("lib", &canary)]));
    // Through a symlink of a lower layer, of the same layer (relative),
    // and a whiteout that would delete the canary's file.
    s.image(
        "lower",
        vec![
            link,
            Layer::gzip(tar_of(&[T::File("lib/evil", b"x", 0o644)])),
        ],
    );
    s.image(
        "same",
        vec![Layer::gzip(tar_of(&[
            T::Symlink("lib", "../../canary"),
            T::Dir("lib/sub/"),
            T::File("lib/sub/evil", b"x", 0o644),
        ]))],
    );
    s.image(
        "whiteout",
        vec![
            Layer::gzip(tar_of(&[T::Symlink("lib", &canary)])),
            Layer::gzip(tar_of(&[T::File("lib/.wh.target", b"", 0o644)])),
        ],
    );
    s.image(
        "toc",
        vec![estargz_layer(&[("lib/evil", b"aaaa")], |toc| {
            let mut l = TocEntry::new("lib", TocEntryType::Symlink);
            l.link_name.clone_from(&canary);
            toc.entries.insert(0, l);
        })],
    );
    s.refused_everywhere("lower", &["lib/evil", "symlink lib"]);
    s.refused_everywhere("same", &["lib/sub", "symlink lib"]);
    s.refused_everywhere("whiteout", &["lib/.wh.target", "symlink lib"]);
    s.refused_lazily("toc", &["lib/evil", "symlink lib"]);
    s.assert_contained();
}

#[test]
fn hard_links_out_of_the_image_are_refused() {
    let s = Sandbox::new();
    let canary = s.canary().display().to_string();
    let absolute = format!("{canary}/target");
    s.image(
        "dotdot",
        vec![Layer::gzip(tar_of(&[T::Hardlink(
            "x",
            "../../canary/target",
        )]))],
    );
    s.image(
        "absolute",
        vec![Layer::gzip(tar_of(&[T::Hardlink("x", &absolute)]))],
    );
    s.image(
        "missing",
        vec![Layer::gzip(tar_of(&[T::Hardlink("x", "etc/nothing")]))],
    );
    s.image(
        "via-symlink",
        vec![Layer::gzip(tar_of(&[
            T::Symlink("lib", &canary),
            T::Hardlink("x", "lib/target"),
        ]))],
    );
    s.image(
        "toc",
        vec![estargz_layer(&[("a", b"aaaa")], |toc| {
            let mut l = TocEntry::new("x", TocEntryType::Hardlink);
            l.link_name = "../../canary/target".into();
            toc.entries.push(l);
        })],
    );
    s.refused_everywhere("dotdot", &["\"x\"", "hard link target", "`..`"]);
    s.refused_everywhere("absolute", &["\"x\"", "hard link target", "absolute"]);
    s.refused_everywhere("missing", &["x", "etc/nothing", "does not exist"]);
    s.refused_everywhere("via-symlink", &["x", "lib/target", "does not exist"]);
    s.refused_lazily("toc", &["\"x\"", "`..`"]);
    s.assert_contained();
}

#[test]
fn giant_declared_sizes_are_refused_or_contained() {
    let s = Sandbox::new();
    // A tar header declaring 1 TiB, and a PAX size of 2^62, over a short
    // stream.
    let mut tar = file_header("big", 1 << 40);
    tar.extend_from_slice(&[7u8; 512]);
    let layer = Layer::gzip(tar);
    let d = short(&layer);
    s.image("tar", vec![layer]);
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("size", &b"4611686018427387904"[..])])
        .unwrap();
    let mut pax = b.into_inner().unwrap();
    pax.truncate(pax.len() - 1024);
    pax.extend_from_slice(&file_header("pax", 1));
    pax.extend_from_slice(&[7u8; 512]);
    s.image("pax", vec![Layer::gzip(pax)]);
    for (tag, needles) in [
        ("tar", vec![d.as_str(), "\"big\"", "1099511627776 bytes"]),
        ("pax", vec!["\"pax\"", "4611686018427387904 bytes"]),
    ] {
        s.refused_everywhere(tag, &needles);
    }

    // A TOC declaring files of 2^50 and 2^63 bytes, each one chunk of a
    // tiny gzip member: chunks that big are not fetched alone, so the layer
    // is fetched whole and its tar stream's sizes are the truth.
    let files: [(&str, &[u8]); 3] = [("big", b"data"), ("huge", b"more"), ("small", b"ok")];
    s.image(
        "toc",
        vec![estargz_layer(&files, |toc| {
            toc.entries[0].size = 1 << 50;
            toc.entries[0].chunk_size = 1 << 50;
            toc.entries[1].size = 1 << 63;
            toc.entries[1].chunk_size = 1 << 63;
        })],
    );
    s.refactor("toc").ok_within(128);
    let m = s.mount("toc", &s.reference("toc"));
    assert_eq!(m.status()["whole_layers"], 1);
    for (name, body) in files {
        assert_eq!(std::fs::read(m.point.join(name)).unwrap(), body);
    }
    assert_peak("mount giant toc", vm_hwm_mib(m.pid()), 128);
    drop(m);
    s.pull("toc", &s.reference("toc")).ok_within(128);
    for (name, body) in files {
        assert_eq!(std::fs::read(s.extracted("toc").join(name)).unwrap(), body);
    }
    s.assert_contained();
}

#[test]
fn deep_directories_are_refused_or_bounded() {
    let s = Sandbox::new();
    // A path 200,000 directories deep with no entries for them.
    let deep = format!("{}f", "d/".repeat(200_000));
    s.image(
        "path",
        vec![Layer::gzip(tar_of(&[T::File(&deep, b"deep", 0o644)]))],
    );
    // 1,000 real nested directories: an odd but valid image.
    let mut dirs = Vec::new();
    let mut p = String::new();
    for _ in 0..1000 {
        p.push_str("d/");
        dirs.push(p.clone());
    }
    let file = format!("{p}f");
    let mut entries: Vec<T> = dirs.iter().map(|d| T::Dir(d)).collect();
    entries.push(T::File(&file, b"bottom", 0o644));
    s.image("tree", vec![Layer::gzip(tar_of(&entries))]);

    s.refused_everywhere("path", &["d/d/d/", "4096"]);

    s.refactor("tree").ok_within(128);
    let p = s.pull("tree", &s.reference("tree"));
    p.ok_within(128);
    assert_eq!(
        std::fs::read(s.extracted("tree").join(&file)).unwrap(),
        b"bottom"
    );
    for (name, reference) in [
        ("tree", s.reference("tree")),
        ("refactored", s.refactored("tree")),
    ] {
        let m = s.mount(name, &reference);
        assert_eq!(std::fs::read(m.point.join(&file)).unwrap(), b"bottom");
        assert_peak(&format!("mount {name} deep"), vm_hwm_mib(m.pid()), 128);
    }
    s.assert_contained();
}

/// A path of the tree under `root`, its kind and content.
fn tree_of(root: &Path) -> BTreeMap<String, (tree::Kind, Option<String>)> {
    tree::snapshot(root)
        .unwrap()
        .into_iter()
        .filter(|(p, _)| !crate::support::measure::ADDED.contains(&p.as_str()))
        .map(|(p, n)| (p, (n.kind, n.sha256)))
        .collect()
}

#[test]
fn duplicate_entries_follow_the_last_one_everywhere() {
    let s = Sandbox::new();
    // A file twice, a hard link to the first copy, a directory replaced by
    // a file and a file by a directory with a child.
    s.image(
        "tar",
        vec![Layer::gzip(tar_of(&[
            T::File("a", b"first", 0o644),
            T::Hardlink("h", "a"),
            T::File("a", b"second", 0o600),
            T::Dir("d/"),
            T::File("d/x", b"x", 0o644),
            T::File("d", b"file over dir", 0o644),
            T::File("f", b"file", 0o644),
            T::Dir("f/"),
            T::File("f/y", b"y", 0o644),
        ]))],
    );
    s.image(
        "toc",
        vec![estargz_layer(&[("b", b"first"), ("b", b"second")], |_| {})],
    );
    let umoci = |tag: &str| {
        let out = s.out(&format!("umoci-{tag}"));
        crate::mount::ok(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{tag}", s.layout().display()))
                .arg(&out),
        );
        tree_of(&out.join("rootfs"))
    };
    for tag in ["tar", "toc"] {
        let want = umoci(tag);
        s.refactor(tag).ok_within(128);
        s.pull(tag, &s.reference(tag)).ok_within(128);
        assert_eq!(tree_of(&s.extracted(tag)), want, "pull of {tag}");
        for (name, reference) in [
            (tag.to_string(), s.reference(tag)),
            (format!("{tag}-refactored"), s.refactored(tag)),
        ] {
            let m = s.mount(&name, &reference);
            assert_eq!(tree_of(&m.point), want, "mount of {name}");
        }
    }
    let x = s.extracted("tar");
    assert_eq!(std::fs::read(x.join("a")).unwrap(), b"second");
    assert_eq!(std::fs::read(x.join("h")).unwrap(), b"first");
    assert_eq!(
        std::fs::read(s.extracted("toc").join("b")).unwrap(),
        b"second"
    );
    s.assert_contained();
}

#[test]
fn a_toc_that_disagrees_with_the_tar_stream_is_refused_or_contained() {
    let s = Sandbox::new();
    // The TOC claims other bytes than the member holds.
    s.image(
        "content",
        vec![estargz_layer(&[("a", b"aaaa"), ("b", b"bbbb")], |toc| {
            toc.entries[0].digest = digest(b"evil");
            toc.entries[0].chunk_digest = digest(b"evil");
        })],
    );
    // The TOC is not the one the manifest's annotation names.
    let mut pinned = estargz_layer(&[("a", b"aaaa")], |_| {});
    pinned.annotations.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        digest(b"another toc"),
    );
    s.image("annotation", vec![pinned]);

    // Refactoring reads the tar stream: its output holds the stream's bytes.
    s.refactor("content").ok_within(128);
    let m = s.mount("content-refactored", &s.refactored("content"));
    assert_eq!(std::fs::read(m.point.join("a")).unwrap(), b"aaaa");
    drop(m);

    // Mount and pull check every byte against the TOC: the lie is EIO.
    let m = s.mount("content", &s.reference("content"));
    assert_eq!(std::fs::read(m.point.join("b")).unwrap(), b"bbbb");
    let err = std::fs::read(m.point.join("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(m.log().contains("digest mismatch"), "{}", m.log());
    drop(m);
    s.pull("content", &s.reference("content"))
        .refused(&["digest mismatch"]);

    s.refactor("annotation").ok_within(128);
    s.refused_lazily("annotation", &["TOC", &digest(b"another toc")]);
    s.assert_contained();
}

/// Bytes of zeros in the zip-bomb-like layer.
const BOMB: u64 = 256 << 20;
const STATUS: &str = "var/lib/dpkg/status";

#[test]
fn a_zip_bomb_layer_is_streamed_in_bounded_memory() {
    let s = Sandbox::new();
    // The zeros are the dpkg database, which refactoring reads.
    let layer = stream_layer(&s.layout(), 9, |w| {
        w.write_all(&file_header(STATUS, BOMB)).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..BOMB >> 20 {
            w.write_all(&zeros).unwrap();
        }
        w.write_all(&tar_entries(&[T::File("after", b"x", 0o644)]))
            .unwrap();
        w.write_all(&[0u8; 1024]).unwrap();
    });
    eprintln!(
        "zip bomb: {} bytes compressed, {BOMB} uncompressed",
        layer.size
    );
    write_manifest(&s.layout(), "bomb", &[layer]);
    s.refactor("bomb").ok_within(128);
    s.pull("bomb", &s.reference("bomb")).ok_within(128);
    assert_eq!(
        std::fs::metadata(s.extracted("bomb").join(STATUS))
            .unwrap()
            .len(),
        BOMB
    );
    let m = s.mount("bomb", &s.reference("bomb"));
    crate::mount::read_all(&m.point);
    assert_peak("mount bomb", vm_hwm_mib(m.pid()), 128);
    drop(m);
    s.assert_contained();
}

/// Entries in the many-entries layer: 50,000 in the suite, to keep it
/// fast; `BREAKFS_HOSTILE_ENTRIES=1000000` runs the million the README
/// gives figures for.
fn many() -> usize {
    std::env::var("BREAKFS_HOSTILE_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// Peak memory allowed for `n` entries: it grows with them (every entry is
/// held while a layer is indexed, planned and its TOC written), by 4 KiB
/// each at most, over a fixed 256 MiB.
fn many_bound_mib(n: usize) -> u64 {
    256 + (n as u64 * 4) / 1024
}

#[test]
fn many_tiny_entries_stay_within_memory_bounds() {
    let s = Sandbox::new();
    let (n, bound) = (many(), many_bound_mib(many()));
    let layer = stream_layer(&s.layout(), 1, |w| {
        for d in 0..n.div_ceil(1000) {
            let dir = format!("d{d:03}/");
            w.write_all(&tar_entries(&[T::Dir(&dir)])).unwrap();
            for f in 0..1000.min(n - d * 1000) {
                let path = format!("{dir}f{f:03}");
                w.write_all(&tar_entries(&[T::File(&path, b"", 0o644)]))
                    .unwrap();
            }
        }
        w.write_all(&[0u8; 1024]).unwrap();
    });
    write_manifest(&s.layout(), "many", &[layer]);
    s.refactor("many").ok_within(bound);
    s.pull("many", &s.reference("many")).ok_within(bound);
    let listed = |dir: &Path| std::fs::read_dir(dir.join("d000")).unwrap().count();
    assert_eq!(listed(&s.extracted("many")), n.min(1000));
    for (name, reference) in [
        ("many", s.reference("many")),
        ("refactored", s.refactored("many")),
    ] {
        let m = s.mount(name, &reference);
        assert_eq!(listed(&m.point), n.min(1000));
        assert_peak(&format!("mount {name}"), vm_hwm_mib(m.pid()), bound);
    }
    s.assert_contained();
}
