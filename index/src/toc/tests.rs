#![allow(clippy::unwrap_used)]

use std::io::Read;

use proptest::prelude::*;

use super::*;

const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/thirdparty.estargz.tar.gz");

fn read_fixture() -> TocTail {
    match Toc::read_from_blob_tail(FIXTURE, FIXTURE.len() as u64).unwrap() {
        TailRead::Toc(t) => t,
        TailRead::NeedTail(n) => panic!("whole blob given but {n} bytes asked"),
    }
}

fn chunk_bytes(blob: &[u8], c: &TocChunk) -> Vec<u8> {
    let member = &blob[c.offset as usize..c.compressed_end as usize];
    let mut gz = flate2::read::GzDecoder::new(member);
    let mut out = vec![0; (c.inner_offset + c.chunk_size) as usize];
    gz.read_exact(&mut out).unwrap();
    out.split_off(c.inner_offset as usize)
}

#[test]
fn thirdparty_fixture() {
    let tail = read_fixture();
    assert_eq!(tail.footer_size, FOOTER_SIZE);
    assert_eq!(
        parse_footer(&FIXTURE[FIXTURE.len() - 51..]).unwrap(),
        tail.toc_offset
    );
    let layer = tail
        .toc
        .to_layer(FIXTURE.len() as u64, Some(tail.toc_offset))
        .unwrap();

    // Every tar entry of the blob (read as plain tar.gz) is in the layer
    // with the same metadata, and every chunk decompresses alone.
    let mut tar_files = BTreeMap::new();
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(FIXTURE));
    let mut names = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        names.push(name.clone());
        tar_files.insert(name.trim_end_matches('/').to_string(), data);
    }
    assert_eq!(names.last().map(String::as_str), Some(TOC_TAR_NAME));
    assert_eq!(
        names.first().map(String::as_str),
        Some(NO_PREFETCH_LANDMARK)
    );
    assert_eq!(layer.entries.len(), names.len() - 2);

    let by_path: BTreeMap<&str, &(Entry, Vec<TocChunk>)> = layer
        .entries
        .iter()
        .map(|x| (x.0.path.as_str(), x))
        .collect();
    let (busybox, chunks) = by_path["bin/busybox"];
    assert_eq!(busybox.kind, EntryKind::File);
    assert_eq!(busybox.mode, 0o755);
    assert_eq!(busybox.mtime, 1566297043);
    assert_eq!(busybox.size, 5000);
    assert_eq!(chunks.len(), 3);
    assert_eq!(
        chunks.iter().map(|c| c.chunk_size).collect::<Vec<_>>(),
        [2048, 2048, 904]
    );
    let (exact, chunks) = by_path["bin/exact"];
    assert_eq!((exact.size, chunks.len()), (2048, 1));
    assert_eq!(by_path["bin"].0.mode, 0o755);
    assert_eq!(by_path["bin"].0.kind, EntryKind::Dir);
    assert_eq!(by_path["bin/su"].0.mode, 0o4755);
    assert_eq!(by_path["bin/sh"].0.link, "busybox");
    assert_eq!(by_path["bin/ash"].0.kind, EntryKind::Hardlink);
    assert_eq!(by_path["bin/ash"].0.link, "bin/busybox");
    let null = &by_path["dev/null"].0;
    assert_eq!(
        (null.kind, null.dev_major, null.dev_minor),
        (EntryKind::CharDev, 1, 3)
    );
    let sda = &by_path["dev/sda"].0;
    assert_eq!(
        (sda.kind, sda.dev_major, sda.gid),
        (EntryKind::BlockDev, 8, 6)
    );
    assert_eq!(by_path["dev/initctl"].0.kind, EntryKind::Fifo);
    assert_eq!(
        by_path["etc/xattr.conf"].0.xattrs["user.comment"],
        b"made by make_estargz.py"
    );
    let long = format!("etc/{}", "l".repeat(120));
    assert_eq!(by_path[long.as_str()].0.size, 4);
    let profile = &by_path["home/user/.profile"].0;
    assert_eq!((profile.uid, profile.gid), (1000, 1000));
    assert_eq!(by_path["bin/empty"].0.digest, Some(Digest::of(b"")));

    for (entry, chunks) in &layer.entries {
        if entry.kind != EntryKind::File {
            continue;
        }
        let data = &tar_files[&entry.path];
        assert_eq!(Some(Digest::of(data)), entry.digest, "{}", entry.path);
        for c in chunks {
            let got = chunk_bytes(FIXTURE, c);
            let want = &data[c.chunk_offset as usize..(c.chunk_offset + c.chunk_size) as usize];
            assert_eq!(got, want, "{} at {}", entry.path, c.chunk_offset);
            assert_eq!(c.chunk_digest, Some(Digest::of(want)));
        }
    }
}

#[test]
fn short_tail_asks_for_more() {
    let size = FIXTURE.len() as u64;
    let tail = read_fixture();
    let need = size - tail.toc_offset;
    let r = Toc::read_from_blob_tail(&FIXTURE[FIXTURE.len() - 10..], size).unwrap();
    assert_eq!(r, TailRead::NeedTail(FOOTER_SIZE));
    let r = Toc::read_from_blob_tail(&FIXTURE[FIXTURE.len() - 60..], size).unwrap();
    assert_eq!(r, TailRead::NeedTail(need));
    let r = Toc::read_from_blob_tail(&FIXTURE[(size - need) as usize..], size).unwrap();
    assert_eq!(r, TailRead::Toc(tail.clone()));
    let json = toc_json_from_member(&FIXTURE[tail.toc_offset as usize..]).unwrap();
    assert_eq!(Digest::of(&json), tail.toc_digest);
    assert_eq!(
        Toc::from_toc_member(&FIXTURE[tail.toc_offset as usize..]).unwrap(),
        tail.toc
    );
}

#[test]
fn footer_layout() {
    let f = footer(0x1234);
    assert_eq!(f.len() as u64, FOOTER_SIZE);
    // A valid, empty gzip member.
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&f[..])
        .read_to_end(&mut out)
        .unwrap();
    assert!(out.is_empty());
    assert_eq!(&f[16..38], b"0000000000001234STARGZ");
    assert_eq!(parse_footer(&f).unwrap(), 0x1234);
}

#[test]
fn legacy_footer() {
    let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
    f.extend_from_slice(b"00000000000000abSTARGZ");
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len() as u64, LEGACY_FOOTER_SIZE);
    assert_eq!(parse_footer_sized(&f).unwrap(), (0xab, LEGACY_FOOTER_SIZE));
}

#[test]
fn corrupt_footer() {
    let mut f = footer(77);
    f[33] = b'X'; // inside "STARGZ"
    let err = parse_footer(&f).unwrap_err().to_string();
    assert!(err.contains("STARGZ"), "{err}");
    let mut f = footer(77);
    f[12] = b'E';
    assert!(parse_footer(&f).is_err());
    assert!(parse_footer(&[0u8; 51]).is_err());
    assert!(parse_footer(b"short").is_err());
}

#[test]
fn toc_offset_beyond_blob() {
    let f = footer(1 << 40);
    let err = Toc::read_from_blob_tail(&f, 51).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
}

fn reg(name: &str, size: u64, offset: u64) -> TocEntry {
    let mut e = TocEntry::new(name, TocEntryType::Reg);
    e.size = size;
    e.offset = offset;
    e
}

#[test]
fn chunk_outside_blob() {
    let toc = Toc {
        version: 1,
        entries: vec![reg("a", 10, 5000)],
    };
    let err = toc.to_layer(1000, None).unwrap_err().to_string();
    assert!(err.contains("\"a\"") && err.contains("outside"), "{err}");
    assert!(toc.to_layer(6000, None).is_ok());
}

#[test]
fn payloads_sharing_a_member_end_where_the_member_ends() {
    // a and b share the member at 100 (b at inner offset 1024), c has the
    // member at 300, d and e share the one at 500 up to the TOC at 900.
    let mut b = reg("b", 20, 100);
    b.inner_offset = 1024;
    let mut e = reg("e", 5, 500);
    e.inner_offset = 512;
    let toc = Toc {
        version: 1,
        entries: vec![
            reg("a", 10, 100),
            b,
            TocEntry::new("dir", TocEntryType::Dir),
            reg("c", 30, 300),
            reg("d", 40, 500),
            e,
        ],
    };
    let layer = toc.to_layer(1000, Some(900)).unwrap();
    let spans: Vec<(&str, u64, u64, u64)> = layer
        .entries
        .iter()
        .filter_map(|(en, cs)| {
            let c = cs.first()?;
            Some((en.path.as_str(), c.offset, c.inner_offset, c.compressed_end))
        })
        .collect();
    assert_eq!(
        spans,
        [
            ("a", 100, 0, 300),
            ("b", 100, 1024, 300),
            ("c", 300, 0, 500),
            ("d", 500, 0, 900),
            ("e", 500, 512, 900),
        ]
    );
}

#[test]
fn chunks_must_cover_file() {
    let mut first = reg("f", 10, 100);
    first.chunk_size = 4;
    let mut gap = TocEntry::new("f", TocEntryType::Chunk);
    gap.offset = 200;
    gap.chunk_offset = 6;
    let toc = Toc {
        version: 1,
        entries: vec![first.clone(), gap],
    };
    let err = toc.to_layer(1000, None).unwrap_err().to_string();
    assert!(err.contains("\"f\"") && err.contains("in order"), "{err}");
    let toc = Toc {
        version: 1,
        entries: vec![first],
    };
    let err = toc.to_layer(1000, None).unwrap_err().to_string();
    assert!(err.contains("cover 4 bytes"), "{err}");
}

#[test]
fn rejects_bad_names() {
    for name in ["../etc/passwd", "a/../../b", "/abs"] {
        let toc = Toc {
            version: 1,
            entries: vec![TocEntry::new(name, TocEntryType::Dir)],
        };
        let err = toc.to_layer(100, None).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
    let toc = Toc {
        version: 1,
        entries: vec![
            TocEntry::new("./", TocEntryType::Dir),
            TocEntry::new("./a/b/", TocEntryType::Dir),
        ],
    };
    let layer = toc.to_layer(100, None).unwrap();
    assert_eq!(layer.entries.len(), 1);
    assert_eq!(layer.entries[0].0.path, "a/b");
}

#[test]
fn rejects_deep_names_and_bad_link_targets_naming_the_entry() {
    let deep = format!("{}f", "d/".repeat(100_000));
    let toc = Toc {
        version: 1,
        entries: vec![TocEntry::new(deep, TocEntryType::Dir)],
    };
    let err = toc.to_layer(100, None).unwrap_err().to_string();
    assert!(
        err.contains("PATH_MAX") && err.contains("(200001 bytes)"),
        "{err}"
    );
    assert!(err.len() < 400, "the message repeats the whole path: {err}");
    let mut link = TocEntry::new("x", TocEntryType::Hardlink);
    link.link_name = "../../etc/shadow".into();
    let toc = Toc {
        version: 1,
        entries: vec![link],
    };
    let err = toc.to_layer(100, None).unwrap_err().to_string();
    assert!(err.contains("entry \"x\": hard link target"), "{err}");
}

#[test]
fn a_toc_member_lying_about_its_size_is_refused() {
    // A TOC entry declaring 1 GiB over a few bytes: an error, with no
    // buffer of the declared size.
    let mut h = tar::Header::new_gnu();
    h.set_path(TOC_TAR_NAME).unwrap();
    h.set_size(1 << 30);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[b' '; 512]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let member = gz.finish().unwrap();
    let err = toc_json_from_member(&member).unwrap_err().to_string();
    assert!(err.contains("TOC"), "{err}");
}

#[test]
fn parse_ignores_unknown_fields_and_checks_version() {
    let json = br#"{"version":1,"entries":[{"name":"a","type":"dir","NumLink":3,"mode":16877}]}"#;
    let toc = Toc::parse(json).unwrap();
    assert_eq!(toc.entries[0].mode, 0o40755);
    assert!(Toc::parse(br#"{"version":2,"entries":[]}"#).is_err());
    assert!(Toc::parse(br#"{"version":1,"entries":[{"name":"a","type":"sock"}]}"#).is_err());
}

fn entry_strategy() -> impl Strategy<Value = TocEntry> {
    (
        "[a-z./]{1,20}",
        prop_oneof![
            Just(TocEntryType::Dir),
            Just(TocEntryType::Reg),
            Just(TocEntryType::Symlink),
            Just(TocEntryType::Chunk),
            Just(TocEntryType::Char),
        ],
        any::<u64>(),
        any::<i64>(),
        any::<u32>(),
        proptest::collection::btree_map("[a-z.]{1,8}", any::<Vec<u8>>(), 0..3),
        any::<u64>(),
        "[ -~]{0,10}",
    )
        .prop_map(|(name, kind, size, mode, uid, xattrs, offset, link)| {
            let mut e = TocEntry::new(name, kind);
            e.size = size;
            e.mode = mode;
            e.uid = uid;
            e.gid = uid / 3;
            e.xattrs = xattrs;
            e.offset = offset;
            e.chunk_offset = offset / 2;
            e.chunk_size = size / 3;
            e.inner_offset = offset % 7;
            e.link_name = link;
            e.modtime = format_modtime((uid as i64) * 1000);
            e.digest = Digest::of(name_bytes(&e)).to_string();
            e
        })
}

fn name_bytes(e: &TocEntry) -> &[u8] {
    e.name.as_bytes()
}

proptest! {
    #[test]
    fn footer_round_trip(off in any::<u64>()) {
        let f = footer(off);
        prop_assert_eq!(f.len() as u64, FOOTER_SIZE);
        prop_assert_eq!(parse_footer(&f).unwrap(), off);
        let mut longer = vec![7u8; 100];
        longer.extend_from_slice(&f);
        prop_assert_eq!(parse_footer_sized(&longer).unwrap(), (off, FOOTER_SIZE));
    }

    #[test]
    fn toc_json_round_trip(entries in proptest::collection::vec(entry_strategy(), 0..8)) {
        let toc = Toc { version: 1, entries };
        let json = toc.to_json();
        prop_assert_eq!(Toc::parse(&json).unwrap(), toc);
    }

    #[test]
    fn modtime_round_trip(secs in -10_000_000_000i64..100_000_000_000i64) {
        let s = format_modtime(secs);
        prop_assert_eq!(parse_modtime("x", &s).unwrap(), secs);
    }
}

#[test]
fn the_prefetch_landmark_ends_the_prefetch_region_and_is_no_entry() {
    let mut landmark = reg(PREFETCH_LANDMARK, 1, 300);
    landmark.digest = String::new();
    let toc = Toc {
        version: 1,
        entries: vec![reg("a", 10, 100), landmark, reg("b", 10, 400)],
    };
    let layer = toc.to_layer(1000, None).unwrap();
    assert_eq!(layer.prefetch_end, Some(300));
    let paths: Vec<&str> = layer.entries.iter().map(|(e, _)| e.path.as_str()).collect();
    assert_eq!(paths, ["a", "b"]);
    // The other landmark says no file is prioritized.
    let toc = Toc {
        version: 1,
        entries: vec![reg(NO_PREFETCH_LANDMARK, 1, 100), reg("a", 10, 200)],
    };
    let layer = toc.to_layer(1000, None).unwrap();
    assert_eq!(layer.prefetch_end, None);
    assert_eq!(layer.entries.len(), 1);
}
