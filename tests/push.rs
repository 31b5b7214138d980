//! Pushing hydrated files into the kernel's page cache (`FUSE_NOTIFY_STORE`,
//! fs/src/push.rs): a listing of a directory whose files are in the store
//! puts their bytes in the page cache ahead of the reader, so that their
//! first reads reach breakfs not at all and read the original bytes; a file
//! not all in the store is never pushed, nor fetched for a push.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::mount::{Mount, hex_sha256};
use crate::passthrough::{count, counters, refactored};
use crate::support::images::{T, noise};

/// Small files of varied sizes (one to several 128 KiB chunks), named so
/// that `data/zz` is listed last.
fn small_files() -> Vec<(String, Vec<u8>)> {
    (0..30u64)
        .map(|i| {
            let size = 1 + (i as usize * 37_123) % 400_000;
            (format!("data/f{i:02}"), noise(100 + i, size))
        })
        .chain([("data/zz".to_string(), noise(99, 20_000))])
        .collect()
}

/// An image of `files`, a 5 MB file beyond the push's size cap, and a
/// subdirectory.
fn image(dir: &Path, files: &[(String, Vec<u8>)], big: &[u8], inner: &[u8]) -> String {
    let mut entries = vec![T::Dir("data"), T::Dir("data/sub")];
    entries.extend(files.iter().map(|(p, b)| T::File(p, b, 0o644)));
    entries.push(T::File("data/big", big, 0o644));
    entries.push(T::File("data/sub/inner", inner, 0o644));
    refactored(dir, &entries)
}

/// Wait until `done` holds of the mount's read counters (within 60 s).
fn wait_counters(m: &Mount, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let reads = counters(m);
        if done(&reads) {
            return;
        }
        assert!(Instant::now() < until, "{what}: {reads}\nlog: {}", m.log());
    }
}

#[test]
fn a_listed_hydrated_directory_is_read_from_pushed_pages_and_reads_the_original_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let files = small_files();
    let (big, inner) = (noise(7, 5_000_000), noise(8, 60_000));
    let image = image(tmp.path(), &files, &big, &inner);
    let m = Mount::new(&image, &tmp.path().join("mnt"), &tmp.path().join("c"), &[]);
    m.wait_hydrated();
    // Hydrated, and nothing of `data` read or listed yet: its listing
    // pushes its small files (not the big one: past the cap).
    let names = std::fs::read_dir(m.point.join("data")).unwrap().count();
    assert_eq!(names, files.len() + 2);
    let n = files.len() as u64;
    wait_counters(&m, "the listed files were not all pushed", |r| {
        count(r, "pushed_files") + count(r, "pushes_missed") >= n
    });
    // Read every file: the original bytes, and breakfs serves only what
    // was not pushed (the big file; a push the kernel missed).
    for (p, want) in &files {
        assert!(std::fs::read(m.point.join(p)).unwrap() == *want, "{p}");
    }
    assert!(std::fs::read(m.point.join("data/big")).unwrap() == big);
    let reads = counters(&m);
    let small: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(count(&reads, "pushed_files") > 0, "{reads}");
    assert_eq!(
        count(&reads, "pushed_files") + count(&reads, "pushes_missed"),
        n,
        "{reads}"
    );
    // breakfs served what was not pushed, and of what was, at most a few
    // pages again: the kernel may drop a pushed page before it is read
    // (clean page cache; once in a full suite run, 3 pages of 31 files),
    // and a read of it then comes here, for the same bytes.
    let pushed = count(&reads, "pushed_bytes");
    let not_pushed = small - pushed + big.len() as u64;
    let served = count(&reads, "bytes_read");
    assert!(served >= not_pushed, "{reads}");
    assert!(served - not_pushed <= pushed / 10, "{reads}");
    // A walk listing and reading at once (a push racing the read) reads
    // the original bytes too.
    assert!(std::fs::read(m.point.join("data/sub/inner")).unwrap() == inner);
}

#[test]
fn a_file_not_in_the_store_is_never_pushed_nor_fetched_for_a_push() {
    let tmp = tempfile::tempdir().unwrap();
    let files = small_files();
    let (big, inner) = (noise(9, 5_000_000), noise(10, 60_000));
    let image = image(tmp.path(), &files, &big, &inner);
    let cache = tmp.path().join("c");
    let m = Mount::new(&image, &tmp.path().join("mnt"), &cache, &["--no-hydrate"]);
    // One file read (so in the store), then the directory listed.
    let (zz, zz_bytes) = files.last().unwrap();
    assert!(std::fs::read(m.point.join(zz)).unwrap() == *zz_bytes);
    let chunk = |b: &[u8]| cache.join("chunks/sha256").join(hex_sha256(b));
    let absent: Vec<&(String, Vec<u8>)> = files
        .iter()
        .filter(|(_, b)| b.len() <= 128 * 1024 && !chunk(b).exists())
        .collect();
    assert!(absent.len() > 10, "{} files absent", absent.len());
    std::fs::read_dir(m.point.join("data")).unwrap().count();
    // `zz` is listed last: once it is pushed, every file listed before it
    // has been looked at.
    wait_counters(&m, "the file in the store was not pushed", |r| {
        count(r, "pushed_files") + count(r, "pushes_missed") >= 1
    });
    let reads = counters(&m);
    assert!(count(&reads, "pushed_files") <= 1, "{reads}");
    assert!(
        count(&reads, "pushed_bytes") <= zz_bytes.len() as u64,
        "{reads}"
    );
    // Nothing absent was fetched for a push ...
    for (p, b) in &absent {
        assert!(!chunk(b).exists(), "{p} was fetched");
    }
    // ... and a read of one is served by breakfs, fetched on demand.
    let (p, want) = absent[0];
    let before = count(&reads, "reads_waited");
    assert!(std::fs::read(m.point.join(p)).unwrap() == *want);
    assert!(count(&counters(&m), "reads_waited") > before);
}
