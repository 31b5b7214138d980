//! `breakfs refactor --profile CMD`: the command runs once in the image
//! (a breakfs mount recording its reads, overlayfs, chroot) and the files
//! it reads are laid first in each layer, before the eStargz
//! `.prefetch.landmark`. Checked against what `strace` sees the same
//! command open in `umoci unpack` of the original; the merged view stays
//! exactly the original's; a fresh `breakfs mount` of the image, from a
//! real docker-registry behind a counting proxy, fetches the landmarked
//! regions at mount and the command then asks for (almost) nothing more.
//! A failing command or an image without a shell is a clear error, and
//! nothing is written.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use breakfs_index::{PREFETCH_LANDMARK, TailRead, Toc, TocEntryType};

use crate::mount::{Mount, assert_same, breakfs, corpus, ok, umoci_tree};
use crate::support::corpus::{CorpusImage, IMAGE_PATH};
use crate::support::images::{Layer, T, tar_of, write_image};
use crate::support::proxy::{CountingProxy, spans_cover};
use crate::support::registry::TestRegistry;
use crate::support::tree;

/// A layer of a refactored layout, as its TOC describes it.
struct LayerToc {
    digest: String,
    size: u64,
    /// Regular files (non-empty) whose content lies before the landmark.
    before: HashSet<String>,
    /// Regular files after it.
    after: HashSet<String>,
    /// Hard links, by path, to their targets.
    links: BTreeMap<String, String>,
    /// Compressed bytes from the first file's member to the landmark.
    region: Option<(u64, u64)>,
}

fn norm(name: &str) -> String {
    name.trim_start_matches("./").trim_matches('/').to_string()
}

/// The layers of `tag` in OCI layout `dir`, each TOC read from its blob.
fn layout_layers(dir: &Path, tag: &str) -> Vec<LayerToc> {
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = json(dir.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", dir.display()))
        .clone();
    let manifest = json(blob(desc["digest"].as_str().unwrap()));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().to_string();
            let bytes = std::fs::read(blob(&digest)).unwrap();
            let size = bytes.len() as u64;
            let TailRead::Toc(tail) = Toc::read_from_blob_tail(&bytes, size).unwrap() else {
                panic!("no TOC in the tail of {digest}");
            };
            let entries = &tail.toc.entries;
            let mark = entries
                .iter()
                .find(|e| e.name == PREFETCH_LANDMARK)
                .map(|e| e.offset);
            let mut t = LayerToc {
                digest,
                size,
                before: HashSet::new(),
                after: HashSet::new(),
                links: BTreeMap::new(),
                region: None,
            };
            for e in entries {
                match e.kind {
                    TocEntryType::Reg if e.size > 0 && !e.name.starts_with('.') => {
                        if mark.is_some_and(|m| e.offset < m) {
                            t.before.insert(norm(&e.name));
                        } else {
                            t.after.insert(norm(&e.name));
                        }
                    }
                    TocEntryType::Hardlink => {
                        t.links.insert(norm(&e.name), norm(&e.link_name));
                    }
                    _ => {}
                }
            }
            let first = entries
                .iter()
                .filter(|e| e.kind == TocEntryType::Reg && e.size > 0 && e.offset > 0)
                .map(|e| e.offset)
                .min();
            t.region = match (first, mark) {
                (Some(f), Some(m)) if f < m => Some((f, m)),
                _ => None,
            };
            t
        })
        .collect()
}

/// The regular, non-empty files of `rootfs` that `command` opens or
/// executes there, as `strace` sees them (paths resolved in the rootfs).
fn opened_files(rootfs: &Path, command: &[String]) -> Vec<String> {
    let log = rootfs.with_extension("strace");
    ok(Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=chroot,execve,open,openat"])
        .args(["-e", "status=successful", "-o"])
        .arg(&log)
        .arg("chroot")
        .arg(rootfs)
        .args(command)
        .env_clear()
        // The environment the recording gives: the image's (PATH), HOME.
        .env("PATH", IMAGE_PATH)
        .env("HOME", "/root"));
    let text = std::fs::read_to_string(&log).unwrap();
    let root = rootfs.canonicalize().unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        // chroot(1)'s own opens, before it enters the rootfs, are the host's.
        if line.contains("chroot(") {
            inside = true;
            continue;
        }
        let Some(path) = line.split('"').nth(1).filter(|_| inside) else {
            continue;
        };
        let Ok(real) = root.join(path.trim_start_matches('/')).canonicalize() else {
            continue;
        };
        let Ok(rel) = real.strip_prefix(&root) else {
            continue;
        };
        let rel = rel.to_string_lossy().into_owned();
        let is_file = std::fs::metadata(&real).is_ok_and(|m| m.is_file() && m.len() > 0);
        if is_file && !rel.starts_with("proc/") && !rel.starts_with("dev/") && !out.contains(&rel) {
            out.push(rel);
        }
    }
    assert!(inside, "strace saw no chroot: {text}");
    out
}

/// The image's command as one shell command line.
fn profile_arg(img: &CorpusImage) -> String {
    img.command
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `breakfs refactor --profile` of `img` into layout `out` (tag v1).
fn refactor_profiled(img: &CorpusImage, work: &Path, out: &Path) -> String {
    let o = breakfs()
        .args(["refactor", "--work-dir"])
        .arg(work)
        .args(["--profile", &profile_arg(img)])
        .arg("--to")
        .arg(format!("oci:{}:v1", out.display()))
        .arg(&img.reference)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "refactor --profile failed: {err}");
    err
}

#[test]
fn refactor_profile_lays_the_commands_files_before_the_landmark() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let out = tmp.path().join("out");
    let said = refactor_profiled(img, &work, &out);
    assert!(said.contains("--profile"), "no word on the profile: {said}");
    let layers = layout_layers(&out, "v1");

    // What the command opens in the original, by strace: each file lies
    // before the landmark of its layer (a hard link: its target).
    let original = umoci_tree(img, &tmp.path().join("umoci"));
    let opened = opened_files(&tmp.path().join("umoci/rootfs"), &img.command);
    assert!(!opened.is_empty());
    let mut missed = Vec::new();
    for f in &opened {
        let placed = layers.iter().any(|l| {
            let f = l.links.get(f).unwrap_or(f);
            l.before.contains(f)
        });
        if !placed {
            let anywhere = layers
                .iter()
                .any(|l| l.after.contains(f) || l.links.contains_key(f));
            assert!(anywhere, "{f} is in no layer's TOC");
            missed.push(f.clone());
        }
    }
    eprintln!(
        "{} files opened by {:?}; {} not before a landmark: {missed:?}",
        opened.len(),
        img.command,
        missed.len()
    );
    assert!(
        missed.is_empty(),
        "files the command opens lie after the landmark: {missed:?}"
    );
    // The rest of each layer comes after it; layers holding none of the
    // command's files have no region.
    for l in &layers {
        assert_eq!(
            l.region.is_some(),
            !l.before.is_empty(),
            "layer {}",
            l.digest
        );
        assert!(l.before.is_disjoint(&l.after));
    }
    assert!(layers.iter().any(|l| l.region.is_some()));

    // The merged view is the original's, exactly.
    let got = umoci_tree_of_layout(&out, &tmp.path().join("umoci-profiled"));
    assert_same(&original, &got, "refactor --profile");

    // The same input and command: the same layers (the config's history
    // names the destination).
    let again = tmp.path().join("again");
    refactor_profiled(img, &work, &again);
    let digests = |ls: &[LayerToc]| ls.iter().map(|l| l.digest.clone()).collect::<Vec<_>>();
    assert_eq!(
        digests(&layout_layers(&again, "v1")),
        digests(&layers),
        "not deterministic"
    );

    // A fresh mount from a registry: the landmarked regions at mount, in
    // few requests; the command then asks for (almost) nothing more.
    let reg = TestRegistry::start();
    let proxy = CountingProxy::start(&reg.host());
    ok(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", out.display()))
        .arg(reg.reference(&format!("profiled/{}:v1", img.family))));
    proxy.reset();
    let m = Mount::new(
        &format!("docker://{}/profiled/{}:v1", proxy.host(), img.family),
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &["--standalone", "--no-hydrate"],
    );
    let with_region: Vec<&LayerToc> = layers.iter().filter(|l| l.region.is_some()).collect();
    assert_eq!(
        m.status()["landmarked_layers"].as_u64(),
        Some(with_region.len() as u64),
        "{}",
        m.log()
    );
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = proxy.ranges_by_blob();
        let missing = with_region
            .iter()
            .filter(|l| !covers(seen.get(&l.digest).map_or(&[][..], Vec::as_slice), l))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{missing} landmarked regions not fetched at mount: {:?}\n{}",
            proxy.requests_with_ranges(),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let at_mount = proxy.blob_range_requests();
    let mut run = Command::new("chroot");
    run.arg(&m.point)
        .args(&img.command)
        .env_clear()
        .env("PATH", IMAGE_PATH);
    ok(&mut run);
    let during = proxy.blob_range_requests() - at_mount;
    eprintln!("the command after the mount's region fetch: {during} range requests");
    assert!(
        during <= 2,
        "the command made {during} range requests: {:?}",
        proxy.requests_with_ranges()
    );
    assert_eq!(m.status()["reads"]["reads_failed"], 0);
}

fn umoci_tree_of_layout(layout: &Path, out: &Path) -> BTreeMap<String, tree::Node> {
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(out));
    tree::snapshot(&out.join("rootfs")).unwrap()
}

/// Whether `spans` cover layer `l`'s landmarked region.
fn covers(spans: &[(u64, u64)], l: &LayerToc) -> bool {
    let Some((start, end)) = l.region else {
        return true;
    };
    let spans: Vec<(u64, u64)> = spans.iter().copied().filter(|s| s.1 <= l.size).collect();
    spans_cover(&spans, (start, end))
}

#[test]
fn refactor_profile_refuses_a_failing_command_or_an_image_without_a_shell() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let refactor = |cmd: &str, src: &str, to: &Path| {
        breakfs()
            .args(["refactor", "--work-dir"])
            .arg(tmp.path().join("work"))
            .args(["--profile", cmd, "--to"])
            .arg(format!("oci:{}:v1", to.display()))
            .arg(src)
            .output()
            .unwrap()
    };
    let out = tmp.path().join("failing");
    let o = refactor("ls /no/such/dir", &img.reference, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--profile command") && err.contains("failed") && err.contains("/no/such/dir"),
        "{err}"
    );
    assert!(!out.join("index.json").exists(), "an image was written");

    // An image of one static file: no /bin/sh.
    let bare = tmp.path().join("bare");
    write_image(
        &bare,
        "v1",
        &[Layer::gzip(tar_of(&[
            T::Dir("app"),
            T::File("app/data", b"not a program", 0o644),
        ]))],
    );
    let out = tmp.path().join("bare-out");
    let o = refactor("true", &format!("oci:{}:v1", bare.display()), &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no /bin/sh"), "{err}");
    assert!(!out.join("index.json").exists(), "an image was written");
}
