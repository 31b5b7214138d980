//! FUSE passthrough (asked for with `BREAKFS_PASSTHROUGH=1`): a hydrated
//! file's reads go from the kernel to its backing file in the store, never
//! to breakfs; a file not hydrated is read through breakfs as before;
//! overlayfs still stacks on the mount. Without it, a hydrated mount's
//! warm reads reach breakfs not at all (zero-message opens).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::mount::{Mount, breakfs, ok};
use crate::support::images::{Layer, T, noise, tar_of, write_image};

/// What asks `breakfs mount` for passthrough.
const PASSTHROUGH: (&str, &str) = ("BREAKFS_PASSTHROUGH", "1");

/// An image of one layer holding `entries`, refactored with 128 KiB chunks
/// into an OCI layout under `dir`: its reference.
pub(crate) fn refactored(dir: &Path, entries: &[T]) -> String {
    let layout = dir.join("layout");
    write_image(&layout, "v1", &[Layer::gzip(tar_of(entries))]);
    let image = format!("oci:{}:v1", dir.join("refactored").display());
    ok(breakfs()
        .args(["refactor", "--chunk-kib", "128", "--work-dir"])
        .arg(dir.join("work"))
        .args(["--to", &image])
        .arg(format!("oci:{}:v1", layout.display())));
    image
}

/// The mount's read counters, from a status record written after now.
pub(crate) fn counters(m: &Mount) -> serde_json::Value {
    m.fresh_status()["reads"].clone()
}

pub(crate) fn count(reads: &serde_json::Value, key: &str) -> u64 {
    reads[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {reads}"))
}

#[test]
fn hydrated_files_pass_through_and_others_are_read_by_breakfs() {
    let tmp = tempfile::tempdir().unwrap();
    // One file of one chunk, one of five (128 KiB chunks), one read lazily.
    let (small, big, lazy) = (noise(1, 100_000), noise(2, 600_000), noise(3, 50_000));
    let image = refactored(
        tmp.path(),
        &[
            T::Dir("data"),
            T::File("data/small", &small, 0o644),
            T::File("data/big", &big, 0o644),
            T::File("data/lazy", &lazy, 0o644),
        ],
    );

    // Hydrated: every open passes through, no read reaches breakfs.
    let mut m = Mount::with_env(
        &image,
        &tmp.path().join("mnt"),
        &tmp.path().join("c1"),
        &[],
        &[PASSTHROUGH],
    );
    m.wait_hydrated();
    assert_eq!(std::fs::read(m.point.join("data/small")).unwrap(), small);
    assert_eq!(std::fs::read(m.point.join("data/big")).unwrap(), big);
    // Through overlayfs on top (a container's rootfs) too.
    let merged = m.overlay(&tmp.path().join("ovl"));
    assert_eq!(std::fs::read(merged.join("data/lazy")).unwrap(), lazy);
    let reads = counters(&m);
    assert!(count(&reads, "passthrough_opens") >= 3, "{reads}");
    assert_eq!(count(&reads, "bytes_read"), 0, "{reads}");
    assert_eq!(
        count(&reads, "reads_local") + count(&reads, "reads_waited"),
        0,
        "{reads}"
    );

    // Not hydrated: read through breakfs, fetched on demand.
    let lazy_mount = Mount::with_env(
        &image,
        &tmp.path().join("mnt-lazy"),
        &tmp.path().join("c2"),
        &["--no-hydrate"],
        &[PASSTHROUGH],
    );
    let path = lazy_mount.point.join("data/lazy");
    assert_eq!(std::fs::read(&path).unwrap(), lazy);
    let reads = counters(&lazy_mount);
    assert_eq!(count(&reads, "passthrough_opens"), 0, "{reads}");
    assert_eq!(count(&reads, "bytes_read"), lazy.len() as u64, "{reads}");
    // Its chunk is here now: a later open passes through (once the kernel
    // has released the first one, which it does after close returns).
    wait_for_passthrough(&lazy_mount, &path, &lazy);
    let after = counters(&lazy_mount);
    assert_eq!(count(&after, "bytes_read"), lazy.len() as u64, "{after}");
}

/// Read `path` until an open of it passes through (within 30 s).
fn wait_for_passthrough(m: &Mount, path: &Path, want: &[u8]) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(std::fs::read(path).unwrap(), want);
        let reads = counters(m);
        if count(&reads, "passthrough_opens") > 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "{} never passed through: {reads}\nlog: {}",
            path.display(),
            m.log()
        );
    }
}

#[test]
fn by_default_a_hydrated_mount_reads_each_file_once_and_then_from_the_page_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, big) = (noise(4, 70_000), noise(5, 500_000));
    let image = refactored(
        tmp.path(),
        &[
            T::Dir("data"),
            T::File("data/small", &small, 0o644),
            T::File("data/big", &big, 0o644),
        ],
    );
    // Without pushes into the page cache (tests/push.rs), which would
    // serve the first reads too.
    let m = Mount::with_env(
        &image,
        &tmp.path().join("mnt"),
        &tmp.path().join("c"),
        &[],
        &[("BREAKFS_PUSH", "0")],
    );
    m.wait_hydrated();
    // Listed with their attributes (readdirplus), then read three times:
    // breakfs serves the first read of each, the kernel's page cache the
    // others (zero-message opens: no open, no release, no read).
    let names: Vec<_> = std::fs::read_dir(m.point.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2);
    for _ in 0..3 {
        assert_eq!(std::fs::read(m.point.join("data/small")).unwrap(), small);
        assert_eq!(std::fs::read(m.point.join("data/big")).unwrap(), big);
    }
    let reads = counters(&m);
    assert_eq!(count(&reads, "passthrough_opens"), 0, "{reads}");
    assert_eq!(
        count(&reads, "bytes_read"),
        (small.len() + big.len()) as u64,
        "{reads}"
    );
}
