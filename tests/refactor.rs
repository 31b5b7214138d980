//! `breakfs refactor` on realistic images built from Debian packages:
//! exact merged views, sharing close to the bound, joint redundancy near
//! the floor, and interop with skopeo, umoci and containerd.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use breakfs_fetch::ClientOptions;
use breakfs_index::{ImageRef, MergedView};
use breakfs_refactor::{ImageReport, NoProgress, RefactorOptions, load_image, refactor};

use crate::support::containerd::TestContainerd;
use crate::support::corpus::{self, CorpusImage, TEST_FAMILIES};
use crate::support::measure::{ADDED, distinct_layers, options, redundancy};
use crate::support::registry::TestRegistry;
use crate::support::tree::{self, CompareOptions};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn corpus() -> Vec<CorpusImage> {
    corpus::build_families(TEST_FAMILIES).unwrap()
}

fn find<'a>(images: &'a [CorpusImage], family: &str, tag: &str) -> &'a CorpusImage {
    images
        .iter()
        .find(|i| i.family == family && i.tag == tag)
        .unwrap()
}

fn view_of(reference: &str, work: &Path) -> MergedView {
    let r = ImageRef::parse(reference).unwrap();
    let mut v = rt()
        .block_on(load_image(&r, &options(work, false, false), &NoProgress))
        .unwrap()
        .view;
    for p in ADDED {
        v.remove(p);
    }
    v
}

/// The refactored image's merged view equals the original's.
fn assert_same_view(original: &str, refactored: &str, work: &Path, ignore_mtime: bool) -> usize {
    let a = view_of(original, work);
    let b = view_of(refactored, work);
    let diff = a.diff(&b, ignore_mtime);
    assert!(
        diff.is_empty(),
        "{refactored} differs from {original}: {} differences, first: {:?}",
        diff.len(),
        &diff[..diff.len().min(10)]
    );
    if ignore_mtime {
        a.diff(&b, false).len()
    } else {
        0
    }
}

fn run(sources: &[&str], dest: &str, opts: &RefactorOptions) -> Vec<ImageReport> {
    let srcs: Vec<ImageRef> = sources
        .iter()
        .map(|s| ImageRef::parse(s).unwrap())
        .collect();
    let dest = ImageRef::parse(dest).unwrap();
    rt().block_on(refactor(&srcs, &dest, opts, &NoProgress))
        .unwrap()
}

fn pairs(relax: bool) {
    let images = corpus();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let opts = options(&work, false, relax);
    for family in TEST_FAMILIES {
        let v1 = find(&images, family, "v1");
        for next in ["point", "v2"] {
            let n = find(&images, family, next);
            let dest = tmp.path().join(format!("{family}-{next}"));
            let to = format!("oci:{}", dest.display());
            let r1 = run(&[&v1.reference], &to, &opts);
            let r2 = run(&[&n.reference], &to, &opts);
            let (a, b) = (&r1[0], &r2[0]);
            eprintln!(
                "{family} v1→{next} relax={relax}: share {:.3} bound {:.3} layers {} size× v1 {:.3} {next} {:.3} mtimes {}",
                b.share(),
                b.bound(),
                b.layers,
                a.compressed_bytes as f64 / a.original_compressed_bytes as f64,
                b.compressed_bytes as f64 / b.original_compressed_bytes as f64,
                b.mtime_changes,
            );
            assert!(
                b.share() >= 0.9 * b.bound(),
                "{family} v1→{next}: share {:.3} < 0.9 × bound {:.3}",
                b.share(),
                b.bound()
            );
            assert!(b.layers <= 48 && a.layers <= 48);
            for r in [a, b] {
                assert!(
                    r.compressed_bytes as f64 <= 1.10 * r.original_compressed_bytes as f64,
                    "{}: compressed {} > 1.10 × original {}",
                    r.dest,
                    r.compressed_bytes,
                    r.original_compressed_bytes
                );
            }
            // Entry by entry, both images equal their originals; with
            // --relax-mtime only mtimes differ, and no more than reported.
            let changed = assert_same_view(&v1.reference, &format!("{to}:v1"), &work, relax);
            assert_eq!(changed, 0, "v1 is the first published image");
            let changed = assert_same_view(&n.reference, &format!("{to}:{next}"), &work, relax);
            assert!(
                changed <= b.mtime_changes,
                "{changed} mtimes differ but {} were reported",
                b.mtime_changes
            );
        }
    }
}

#[test]
fn incremental_pairs_are_exact_and_share_close_to_the_bound() {
    pairs(false);
}

#[test]
fn incremental_pairs_with_relaxed_mtimes() {
    pairs(true);
}

fn joint(relax: bool) {
    let images = corpus();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let dest = tmp.path().join("joint");
    let to = format!("oci:{}", dest.display());
    let sources: Vec<&str> = images.iter().map(|i| i.reference.as_str()).collect();
    let reports = run(&sources, &to, &options(&work, true, relax));
    assert_eq!(reports.len(), images.len());
    let views: Vec<MergedView> = images
        .iter()
        .map(|i| view_of(&i.reference, &work))
        .collect();
    let originals: Vec<String> = images.iter().map(|i| i.reference.clone()).collect();
    let outputs: Vec<String> = reports.iter().map(|r| r.dest.clone()).collect();
    let before = redundancy(&views, &distinct_layers(&originals, &work), relax);
    let after = redundancy(&views, &distinct_layers(&outputs, &work), relax);
    let floor = before.distinct_entries - before.distinct_content;
    let red_before = before.stored - before.distinct_content;
    let red_after = after.stored - after.distinct_content;
    eprintln!(
        "joint relax={relax}: redundant bytes before {red_before}, after {red_after}, floor {floor}, reduction {:.2}x",
        red_before as f64 / red_after.max(1) as f64
    );
    assert!(
        red_after as f64 <= 1.25 * floor as f64,
        "joint redundant bytes {red_after} > 1.25 × floor {floor}"
    );
    let compressed_before: u64 = reports.iter().map(|r| r.original_compressed_bytes).sum();
    let stored_after: u64 = {
        let mut seen = HashSet::new();
        let rt = rt();
        let mut total = 0;
        for o in &outputs {
            let r = ImageRef::parse(o).unwrap();
            let s = rt
                .block_on(breakfs_fetch::Store::open(&r, &ClientOptions::default()))
                .unwrap();
            for l in rt.block_on(s.resolve(&r)).unwrap().layers() {
                if seen.insert(l.digest.clone()) {
                    total += l.size;
                }
            }
        }
        total
    };
    eprintln!("joint: compressed bytes of all images {compressed_before} → stored {stored_after}");
    assert!(stored_after < compressed_before);
    let mut changed = 0;
    for (i, r) in reports.iter().enumerate() {
        changed += assert_same_view(&images[i].reference, &r.dest, &work, relax);
        assert!(r.layers <= 48);
    }
    let reported: usize = reports.iter().map(|r| r.mtime_changes).sum();
    assert!(
        changed <= reported,
        "{changed} mtimes differ, {reported} reported"
    );
}

#[test]
fn joint_refactoring_is_near_the_floor() {
    joint(false);
}

#[test]
fn joint_refactoring_with_relaxed_mtimes() {
    joint(true);
}

/// Run a command, require success, return its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn breakfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_breakfs"))
}

fn unpack(layout_ref: &str, out: &Path) -> BTreeMap<String, tree::Node> {
    let image = layout_ref.strip_prefix("oci:").unwrap();
    let st = Command::new("umoci")
        .args(["unpack", "--image", image])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci unpack {image}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    tree::snapshot(&out.join("rootfs")).unwrap()
}

#[test]
fn refactored_image_works_with_registry_skopeo_umoci_and_containerd() {
    let images = corpus();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let family = TEST_FAMILIES[0];
    let v1 = find(&images, family, "v1");
    let dest = format!("docker://{}/edge/{family}:v1", reg.host());
    let table = ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(tmp.path().join("work"))
        .args(["--to", &dest, &v1.reference]));
    assert!(table.contains("share"), "no table printed: {table}");

    let copied: PathBuf = tmp.path().join("copied");
    ok(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", &dest])
        .arg(format!("oci:{}:v1", copied.display())));
    let a = unpack(&v1.reference, &tmp.path().join("a"));
    let b = unpack(
        &format!("oci:{}:v1", copied.display()),
        &tmp.path().join("b"),
    );
    let diff = tree::compare(
        &a,
        &b,
        &CompareOptions {
            ignore_paths: ADDED.iter().map(|s| s.to_string()).collect(),
            ignore_root_mtime: true,
            ..CompareOptions::default()
        },
    );
    assert!(
        diff.is_empty(),
        "umoci trees differ: {:?}",
        &diff[..diff.len().min(10)]
    );

    let ctrd = TestContainerd::start().unwrap();
    let r = format!("{}/edge/{family}:v1", reg.host());
    ctrd.pull_plain_http(&r).unwrap();
    let args: Vec<&str> = v1.command.iter().map(String::as_str).collect();
    let out = ctrd.run(&r, &args).unwrap();
    assert!(
        out.status.success(),
        "ctr run {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inspect_shows_layers_tocs_and_sharing() {
    let images = corpus();
    let family = TEST_FAMILIES[0];
    let tmp = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}", tmp.path().join("out").display());
    for tag in ["v1", "point"] {
        ok(breakfs()
            .args(["refactor", "--work-dir"])
            .arg(tmp.path().join("work"))
            .args(["--to", &dest, &find(&images, family, tag).reference]));
    }
    let text = ok(breakfs().args(["inspect", &format!("{dest}:point")]));
    assert!(text.contains("manifest  sha256:"), "{text}");
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(rows.len() >= 2, "no layer rows: {text}");
    // Every refactored layer has a TOC and a positive entry count.
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols[5], "yes", "layer without TOC: {r}");
        assert!(cols[4].parse::<u64>().unwrap() > 0, "no entries: {r}");
    }
    // The point release shares layers with v1, and inspect says so.
    assert!(
        rows.iter().any(|r| r.ends_with("v1")),
        "no layer shared with v1: {text}"
    );
    // The original (plain gzip) image: no TOC, entries counted from the tar.
    let text = ok(breakfs().args(["inspect", &find(&images, family, "v1").reference]));
    assert!(text.lines().any(|l| l.contains(" no ")), "{text}");
}

#[test]
fn registry_to_registry_keeps_the_repository_path() {
    let images = corpus();
    let v1 = find(&images, TEST_FAMILIES[0], "v1");
    let (cloud, edge) = (TestRegistry::start(), TestRegistry::start());
    let src = format!("docker://{}/library/app:v1", cloud.host());
    ok(Command::new("skopeo").args(["copy", "--dest-tls-verify=false", &v1.reference, &src]));
    let tmp = tempfile::tempdir().unwrap();
    ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(tmp.path().join("work"))
        .args(["--to", &format!("docker://{}", edge.host()), &src]));
    // Same repository path and tag under the edge registry, and a standard image there.
    let inspected = ok(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{}/library/app:v1", edge.host())));
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert!(v["Layers"].as_array().unwrap().len() > 1);
}

/// The TOC of a layer blob in `reg`, as a layer with chunk maps.
fn toc_of(reg: &TestRegistry, digest: &str) -> (Vec<u8>, breakfs_index::TocLayer) {
    let blob = std::fs::read(reg.blob_data_path(&digest[7..])).unwrap();
    let size = blob.len() as u64;
    let breakfs_index::TailRead::Toc(tail) =
        breakfs_index::Toc::read_from_blob_tail(&blob, size).unwrap()
    else {
        panic!("the whole blob was given");
    };
    let layer = tail.toc.to_layer(size, Some(tail.toc_offset)).unwrap();
    (blob, layer)
}

#[test]
fn small_files_sharing_gzip_members_mount_byte_exact_and_a_corrupt_member_is_refused() {
    use crate::mount::Mount;
    use crate::support::images::{Layer, T, noise, tar_of, write_image};

    // 600 small source files (200 B to 12 KiB, text-like) around two big ones.
    let mut files: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| {
            let line = format!("def handler_{i}(request):\n    return {}\n", i * 7);
            (
                format!("app/m{i:03}.py"),
                line.repeat(4 + (i * 37) % 300).into_bytes(),
            )
        })
        .collect();
    files.insert(300, ("app/big.bin".into(), noise(1, 3 << 20)));
    files.push(("app/z.bin".into(), noise(2, 700 << 10)));
    let mut entries = vec![T::Dir("app")];
    entries.extend(files.iter().map(|(p, d)| T::File(p, d, 0o644)));
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_image(&src, "v1", &[Layer::gzip(tar_of(&entries))]);
    let reg = TestRegistry::start();
    let dest = reg.reference("grouped/app:v1");
    ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(tmp.path().join("work"))
        .args(["--to", &dest, &format!("oci:{}:v1", src.display())]));

    // The layer holding the files: small ones share members.
    let manifest =
        ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &dest]));
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let (digest, (blob, layer)) = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .map(|d| {
            let t = toc_of(&reg, &d);
            (d, t)
        })
        .max_by_key(|(_, (_, l))| l.entries.len())
        .unwrap();
    let chunk_of = |path: &str| {
        let (_, chunks) = layer.entries.iter().find(|(e, _)| e.path == path).unwrap();
        chunks[0].clone()
    };
    let shared = files
        .iter()
        .filter(|(p, _)| chunk_of(p).inner_offset > 0)
        .count();
    assert!(
        shared > 500,
        "only {shared} of 600 small files share a member"
    );
    // A member holding several small files, and a file of another member.
    let (victim, _) = files
        .iter()
        .find(|(p, _)| chunk_of(p).inner_offset > 0)
        .unwrap();
    let member = chunk_of(victim);
    let in_member: Vec<&String> = files
        .iter()
        .map(|(p, _)| p)
        .filter(|p| chunk_of(p).offset == member.offset)
        .collect();
    assert!(in_member.len() > 1);
    let (elsewhere, elsewhere_data) = files
        .iter()
        .rev()
        .find(|(p, d)| d.len() < 4096 && chunk_of(p).offset != member.offset)
        .unwrap();

    // Mounted lazily, every file reads back byte-exact.
    let m = Mount::new(
        &dest,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &["--no-hydrate", "--deadline", "10"],
    );
    for (p, data) in &files {
        assert_eq!(&std::fs::read(m.point.join(p)).unwrap(), data, "{p}");
    }
    drop(m);

    // Corrupt the shared member in the registry: a fresh mount refuses its
    // files (EIO, nothing unverified served) and still reads the others.
    let mut bad = blob.clone();
    let mid = ((member.offset + member.compressed_end) / 2) as usize;
    for b in &mut bad[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(reg.blob_data_path(&digest[7..]), bad).unwrap();
    let m = Mount::new(
        &dest,
        &tmp.path().join("mnt2"),
        &tmp.path().join("cache2"),
        &["--no-hydrate", "--deadline", "10"],
    );
    // (A file whose bytes inflate before the damage still checks out.)
    let content: BTreeMap<&String, &Vec<u8>> = files.iter().map(|(p, d)| (p, d)).collect();
    let mut refused = Vec::new();
    for p in &in_member {
        match std::fs::read(m.point.join(p)) {
            Ok(d) => assert_eq!(&d, content[p], "{p} was served wrong bytes"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(5), "{p}: {e}");
                refused.push(*p);
            }
        }
    }
    assert!(
        refused.contains(in_member.last().unwrap()),
        "the member's last file, after the damage, was served: refused {refused:?}"
    );
    assert_eq!(
        &std::fs::read(m.point.join(elsewhere)).unwrap(),
        elsewhere_data
    );
    assert!(m.log().contains(&digest), "the log does not name {digest}");
}
