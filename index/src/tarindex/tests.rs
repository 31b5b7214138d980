#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tar::{Builder, EntryType, Header};

use super::testtar::{append, append_raw_name, tar_of};
use super::*;

fn file(path: &str, mode: u32) -> Entry {
    let mut e = Entry::new(path, EntryKind::File);
    e.mode = mode;
    e
}

fn read(bytes: &[u8]) -> Result<LayerIndex> {
    LayerIndex::read(bytes, "layer test")
}

fn bad_reason(r: Result<LayerIndex>) -> (String, String) {
    match r {
        Err(Error::BadEntry { path, reason }) => (path, reason),
        other => panic!("expected BadEntry, got {other:?}"),
    }
}

#[test]
fn a_layer_of_too_many_entries_is_refused_naming_the_cap_and_the_fix() {
    let entries: Vec<(Entry, Vec<u8>)> = (0..5)
        .map(|i| (file(&format!("f{i}"), 0o644), vec![b'x'; i]))
        .collect();
    let tar = tar_of(&entries);
    assert_eq!(
        LayerIndex::read_at_most(&tar[..], "layer test", 5)
            .unwrap()
            .entries
            .len(),
        5
    );
    // The root entry does not count.
    let mut rooted = vec![(Entry::new("./", EntryKind::Dir), vec![])];
    rooted.extend(entries.iter().cloned());
    assert!(LayerIndex::read_at_most(&tar_of(&rooted)[..], "layer test", 5).is_ok());
    let err = LayerIndex::read_at_most(&tar[..], "layer test", 4).unwrap_err();
    let err = crate::Causes(&err).to_string();
    assert!(err.starts_with("layer test: "), "{err}");
    assert!(err.contains("more than 4 entries"), "{err}");
    assert!(err.contains("split the layer"), "{err}");
}

#[test]
fn reads_metadata_digests_offsets_and_diff_id() {
    let mut d = Entry::new("./etc/", EntryKind::Dir);
    d.mode = 0o755;
    d.mtime = 1_700_000_000;
    let mut f = file("./etc/passwd", 0o4755);
    f.uid = 1000;
    f.gid = 100;
    f.mtime = 1_600_000_000;
    let mut s = Entry::new("etc/link", EntryKind::Symlink);
    s.link = "../usr/share/x".to_string();
    s.mode = 0o777;
    let mut h = Entry::new("etc/hard", EntryKind::Hardlink);
    h.link = "./etc/passwd".to_string();
    let mut c = Entry::new("dev/null", EntryKind::CharDev);
    c.dev_major = 1;
    c.dev_minor = 3;
    c.mode = 0o666;
    let mut bl = Entry::new("dev/sda", EntryKind::BlockDev);
    bl.dev_major = 8;
    bl.dev_minor = 0;
    let p = Entry::new("run/fifo", EntryKind::Fifo);
    let root = Entry::new("./", EntryKind::Dir);
    let tar = tar_of(&[
        (root, vec![]),
        (d, vec![]),
        (f, b"root:x:0:0\n".to_vec()),
        (s, vec![]),
        (h, vec![]),
        (c, vec![]),
        (bl, vec![]),
        (p, vec![]),
    ]);
    let idx = read(&tar).unwrap();
    assert_eq!(idx.diff_id, Digest::of(&tar));
    assert_eq!(idx.tar_size, tar.len() as u64);
    let paths: Vec<&str> = idx.entries.iter().map(|e| e.entry.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "etc",
            "etc/passwd",
            "etc/link",
            "etc/hard",
            "dev/null",
            "dev/sda",
            "run/fifo"
        ]
    );
    let dir = &idx.entries[0].entry;
    assert_eq!(
        (dir.kind, dir.mode, dir.mtime),
        (EntryKind::Dir, 0o755, 1_700_000_000)
    );
    let pw = &idx.entries[1];
    assert_eq!(pw.entry.mode, 0o4755);
    assert_eq!((pw.entry.uid, pw.entry.gid), (1000, 100));
    assert_eq!(pw.entry.size, 11);
    assert_eq!(pw.entry.digest, Some(Digest::of(b"root:x:0:0\n")));
    let off = pw.data_offset as usize;
    assert_eq!(&tar[off..off + 11], b"root:x:0:0\n");
    assert_eq!(idx.entries[2].entry.link, "../usr/share/x");
    assert_eq!(idx.entries[3].entry.kind, EntryKind::Hardlink);
    assert_eq!(idx.entries[3].entry.link, "etc/passwd");
    assert_eq!(idx.entries[3].entry.digest, None);
    let null = &idx.entries[4].entry;
    assert_eq!(
        (null.kind, null.dev_major, null.dev_minor),
        (EntryKind::CharDev, 1, 3)
    );
    let sda = &idx.entries[5].entry;
    assert_eq!(
        (sda.kind, sda.dev_major, sda.dev_minor),
        (EntryKind::BlockDev, 8, 0)
    );
    assert_eq!(idx.entries[6].entry.kind, EntryKind::Fifo);
}

#[test]
fn whiteouts_are_kept_as_entries() {
    let tar = tar_of(&[
        (file("a/.wh.b", 0), vec![]),
        (file("a/.wh..wh..opq", 0), vec![]),
    ]);
    let idx = read(&tar).unwrap();
    let paths: Vec<&str> = idx.entries.iter().map(|e| e.entry.path.as_str()).collect();
    assert_eq!(paths, ["a/.wh.b", "a/.wh..wh..opq"]);
}

#[test]
fn long_names_and_links_via_gnu_and_ustar_prefix() {
    let long = format!("{}/{}", "d".repeat(80), "f".repeat(90));
    let mut l = Entry::new(format!("{}/sym", "s".repeat(120)), EntryKind::Symlink);
    l.link = "t".repeat(200);
    let mut h = Entry::new(format!("{}/hard", "h".repeat(120)), EntryKind::Hardlink);
    h.link = long.clone();
    let mut b = Builder::new(Vec::new());
    append(&mut b, &file(&long, 0o644), b"x");
    append(&mut b, &l, b"");
    append(&mut b, &h, b"");
    // ustar: 150-byte path split into prefix and name.
    let ustar_path = format!("{}/{}", "p".repeat(100), "n".repeat(49));
    let mut uh = Header::new_ustar();
    uh.set_path(&ustar_path).unwrap();
    uh.set_size(2);
    uh.set_mode(0o600);
    uh.set_cksum();
    b.append(&uh, &b"hi"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let idx = read(&tar).unwrap();
    assert_eq!(idx.entries[0].entry.path, long);
    assert_eq!(idx.entries[1].entry.link, "t".repeat(200));
    assert_eq!(idx.entries[2].entry.link, long);
    assert_eq!(idx.entries[3].entry.path, ustar_path);
    assert_eq!(idx.entries[3].entry.mode, 0o600);
    assert_eq!(idx.entries[3].entry.digest, Some(Digest::of(b"hi")));
}

#[test]
fn pax_path_linkpath_mtime_size_and_xattrs() {
    let mut b = Builder::new(Vec::new());
    let long = "x".repeat(300);
    b.append_pax_extensions([
        ("path", long.as_bytes()),
        ("mtime", &b"1700000000.75"[..]),
        ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
        ("SCHILY.xattr.user.empty", &b""[..]),
        ("LIBARCHIVE.xattr.user.a%3Db", &b"dmFs"[..]),
        ("uid", &b"4000000000"[..]),
        ("size", &b"3"[..]),
    ])
    .unwrap();
    let mut h = Header::new_ustar();
    h.set_path("short").unwrap();
    h.set_size(0);
    h.set_mtime(5);
    h.set_cksum();
    b.append(&h, &b"abc"[..]).unwrap();
    b.append_pax_extensions([("linkpath", "y".repeat(200).as_bytes()), ("mtime", b"-3.5")])
        .unwrap();
    let mut s = Header::new_ustar();
    s.set_path("sym").unwrap();
    s.set_entry_type(EntryType::Symlink);
    s.set_size(0);
    s.set_cksum();
    b.append(&s, &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let idx = read(&tar).unwrap();
    let e = &idx.entries[0].entry;
    assert_eq!(e.path, long);
    assert_eq!(e.mtime, 1_700_000_000);
    assert_eq!(e.uid, 4_000_000_000);
    assert_eq!(e.digest, Some(Digest::of(b"abc")));
    let mut want = BTreeMap::new();
    want.insert(
        "security.capability".to_string(),
        b"\x01\x00\x00\x02".to_vec(),
    );
    want.insert("user.empty".to_string(), Vec::new());
    want.insert("user.a=b".to_string(), b"val".to_vec());
    assert_eq!(e.xattrs, want);
    assert_eq!(idx.entries[1].entry.link, "y".repeat(200));
    assert_eq!(idx.entries[1].entry.mtime, -4);
}

#[test]
fn rejects_dotdot_and_absolute_paths() {
    for name in [&b"a/../../etc/passwd"[..], b"../x", b"a/.."] {
        let mut b = Builder::new(Vec::new());
        append_raw_name(&mut b, name, EntryType::Regular, b"");
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path.as_bytes(), name);
        assert!(reason.contains("`..`"), "{reason}");
        assert!(reason.contains("layer test"), "{reason}");
    }
    let mut b = Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_path_absolute("/etc/shadow").unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert_eq!(path, "/etc/shadow");
    assert!(reason.contains("absolute"), "{reason}");
    // The lone root is fine and skipped.
    let mut b = Builder::new(Vec::new());
    append_raw_name(&mut b, b"/", EntryType::Directory, b"");
    append_raw_name(&mut b, b"./", EntryType::Directory, b"");
    assert!(read(&b.into_inner().unwrap()).unwrap().entries.is_empty());
}

#[test]
fn rejects_bad_hardlink_targets() {
    for target in ["../etc/shadow", "/etc/shadow", "a/../../b"] {
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Link);
        h.set_path("x").unwrap();
        h.set_link_name_literal(target).unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path, "x");
        assert!(reason.contains("hard link target"), "{reason}");
    }
}

#[test]
fn rejects_unknown_entry_types() {
    let mut b = Builder::new(Vec::new());
    append_raw_name(&mut b, b"sparse", EntryType::new(b'S'), b"");
    let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert_eq!(path, "sparse");
    assert!(reason.contains("GNU sparse"), "{reason}");
    let mut b = Builder::new(Vec::new());
    append_raw_name(&mut b, b"odd", EntryType::new(b'V'), b"");
    let (_, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert!(reason.contains("'V'"), "{reason}");
}

#[test]
fn truncated_streams_are_io_errors_naming_the_layer() {
    let tar = tar_of(&[
        (file("a", 0o644), vec![7u8; 1000]),
        (file("b", 0o644), vec![8u8; 10]),
    ]);
    // Cut inside content, inside a header, at a header boundary (no
    // end marker), and mid-padding.
    for cut in [700, 1600, 2560, 2100, 1, 0] {
        match LayerIndex::read(&tar[..cut], "layer sha256:abc of oci:/x:v1") {
            Err(Error::Io { what, .. }) => assert!(what.contains("oci:/x:v1"), "{what}"),
            other => panic!("cut {cut}: expected an Io error, got {other:?}"),
        }
    }
    // One zero block is enough of an end marker; the full tar reads.
    assert!(read(&tar[..2560 + 512]).is_ok());
    assert_eq!(read(&tar).unwrap().entries.len(), 2);
}

#[test]
fn empty_layer() {
    let idx = read(&[0u8; 1024]).unwrap();
    assert!(idx.entries.is_empty());
    assert_eq!(idx.tar_size, 1024);
    assert_eq!(idx.diff_id, Digest::of(&[0u8; 1024]));
}

#[test]
fn binary_xattrs_base256_numbers_and_blank_fields() {
    let mut b = Builder::new(Vec::new());
    // A capability value with a newline byte in it.
    let cap = b"\x01\x00\x00\x02\x0a\x00\n\x00\x00\x00";
    b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
        .unwrap();
    let mut h = Header::new_gnu();
    h.set_path("bin/ping").unwrap();
    h.set_size(1);
    h.set_mode(0o755);
    // Larger than 7 octal digits: written in base-256.
    h.set_uid(3_000_000_000);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    // A ustar header whose numeric fields were left blank.
    let mut u = Header::new_ustar();
    u.set_path("blank").unwrap();
    u.set_size(0);
    u.set_cksum();
    b.append(&u, &b""[..]).unwrap();
    let idx = read(&b.into_inner().unwrap()).unwrap();
    let e = &idx.entries[0].entry;
    assert_eq!(e.xattrs["security.capability"], cap.to_vec());
    assert_eq!(e.uid, 3_000_000_000);
    let blank = &idx.entries[1].entry;
    assert_eq!((blank.mode, blank.uid, blank.mtime), (0, 0, 0));
}

#[test]
fn corrupt_header_and_pax_sparse_are_refused() {
    let mut tar = tar_of(&[(file("a", 0o644), b"abc".to_vec())]);
    tar[0] ^= 0x01;
    match read(&tar) {
        Err(Error::Io { source, .. }) => {
            assert!(source.to_string().contains("checksum"), "{source}")
        }
        other => panic!("expected Io, got {other:?}"),
    }
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("GNU.sparse.major", &b"1"[..]), ("GNU.sparse.minor", b"0")])
        .unwrap();
    append(&mut b, &file("big", 0o644), b"");
    let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert_eq!(path, "big");
    assert!(reason.contains("sparse"), "{reason}");
}

#[test]
fn huge_pax_size_on_a_non_file_is_refused() {
    // A directory whose PAX size is u64::MAX overflowed the skip over
    // its content and padding (a panic in debug builds, a wrong skip of
    // 0 bytes in release builds).
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("size", &b"18446744073709551615"[..])])
        .unwrap();
    append(&mut b, &Entry::new("d", EntryKind::Dir), b"");
    let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert_eq!(path, "d");
    assert!(reason.contains("larger than any tar stream"), "{reason}");
}

#[test]
fn rejects_paths_longer_than_path_max_with_a_short_message() {
    // A GNU long name 300,000 directories deep.
    let deep = format!("{}f", "d/".repeat(300_000));
    let mut b = Builder::new(Vec::new());
    append(&mut b, &file(&deep, 0o644), b"x");
    let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
    assert!(path.ends_with("… (600001 bytes)"), "{path}");
    assert!(reason.contains("PATH_MAX 4096"), "{reason}");
    // The longest path Linux can create is fine.
    let longest = format!("{}/f", "d".repeat(MAX_PATH - 2));
    let mut b = Builder::new(Vec::new());
    append(&mut b, &file(&longest, 0o644), b"x");
    assert_eq!(
        read(&b.into_inner().unwrap()).unwrap().entries[0]
            .entry
            .path,
        longest
    );
}

#[test]
fn normalises_paths() {
    assert_eq!(normalize("./a//b/./c/").unwrap(), Some("a/b/c".to_string()));
    assert_eq!(normalize("././").unwrap(), None);
    assert_eq!(normalize("/").unwrap(), None);
    assert!(normalize("/a").is_err());
    assert!(normalize("a/../b").is_err());
    assert_eq!(parse_pax_time("12"), Some(12));
    assert_eq!(parse_pax_time("12.999"), Some(12));
    assert_eq!(parse_pax_time("-1.5"), Some(-2));
    assert_eq!(parse_pax_time("x"), None);
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}",
        // Long components force GNU long names (> 100 bytes in total).
        "[a-z0-9_.-]{60,90}",
    ]
}

fn entry_strategy() -> impl Strategy<Value = (Entry, Vec<u8>)> {
    (
        prop::collection::vec(name(), 1..4),
        0u8..6,
        0u32..0o10000,
        0u32..2_000_000,
        0u32..2_000_000,
        0i64..8_000_000_000,
        prop::collection::btree_map(
            "user\\.[a-z]{1,10}",
            prop::collection::vec(any::<u8>(), 0..20),
            0..3,
        ),
        prop::collection::vec(any::<u8>(), 0..700),
        "(/|\\.\\./)?[a-z][a-z._-]{0,30}(/[a-z][a-z._-]{0,30}){0,5}",
        (0u32..4096, 0u32..4096),
    )
        .prop_map(
            |(parts, k, mode, uid, gid, mtime, xattrs, content, target, (maj, min))| {
                let kind = [
                    EntryKind::File,
                    EntryKind::Dir,
                    EntryKind::Symlink,
                    EntryKind::CharDev,
                    EntryKind::BlockDev,
                    EntryKind::Fifo,
                ][k as usize];
                let mut e = Entry::new(parts.join("/"), kind);
                e.mode = mode;
                e.uid = uid;
                e.gid = gid;
                e.mtime = mtime;
                e.xattrs = xattrs;
                let mut data = Vec::new();
                match kind {
                    EntryKind::File => {
                        e.size = content.len() as u64;
                        e.digest = Some(Digest::of(&content));
                        data = content;
                    }
                    EntryKind::Symlink => e.link = target,
                    EntryKind::CharDev | EntryKind::BlockDev => {
                        e.dev_major = maj;
                        e.dev_minor = min;
                    }
                    _ => {}
                }
                (e, data)
            },
        )
}

proptest! {
    /// Writing entries to a tar and reading it back gives the same
    /// entries, and every content offset points at the content.
    #[test]
    fn tar_round_trip(mut entries in prop::collection::vec(entry_strategy(), 0..12), link_to in prop::option::of(0usize..12)) {
        let target = link_to
            .and_then(|i| entries.get(i))
            .filter(|(e, _)| e.kind == EntryKind::File)
            .map(|(e, _)| e.path.clone());
        if let Some(target) = target {
            let mut h = Entry::new(format!("{target}-hl"), EntryKind::Hardlink);
            h.link = target;
            h.mode = 0o644;
            entries.push((h, Vec::new()));
        }
        let tar = tar_of(&entries);
        let idx = read(&tar).unwrap();
        prop_assert_eq!(idx.entries.len(), entries.len());
        for (got, (want, content)) in idx.entries.iter().zip(&entries) {
            prop_assert_eq!(&got.entry, want);
            let off = got.data_offset as usize;
            prop_assert_eq!(&tar[off..off + content.len()], &content[..]);
        }
        prop_assert_eq!(idx.diff_id, Digest::of(&tar));
        prop_assert_eq!(idx.tar_size, tar.len() as u64);
    }
}
