#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use breakfs_index::{TailRead, TocChunk, parse_footer};

use super::ustar::pax_record;
use super::*;

struct MemSource(HashMap<String, Vec<u8>>);

impl ContentSource for MemSource {
    fn read_at(&self, entry: &Entry, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self
            .0
            .get(&entry.path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        let start = offset as usize;
        let end = start + buf.len();
        if end > data.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short"));
        }
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }
}

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn fixture() -> (Vec<Entry>, MemSource) {
    let mut entries = Vec::new();
    let mut files = HashMap::new();
    let e = |path: &str, kind: EntryKind, mode: u32| {
        let mut x = Entry::new(path, kind);
        x.mode = mode;
        x.mtime = 1_700_000_000;
        x
    };
    let mut file = |entries: &mut Vec<Entry>, mut x: Entry, data: Vec<u8>| {
        x.size = data.len() as u64;
        x.digest = Some(Digest::of(&data));
        files.insert(x.path.clone(), data);
        entries.push(x);
    };
    entries.push(e("a", EntryKind::Dir, 0o755));
    file(
        &mut entries,
        e("a/empty", EntryKind::File, 0o644),
        Vec::new(),
    );
    file(
        &mut entries,
        e("a/small", EntryKind::File, 0o644),
        b"hello".to_vec(),
    );
    file(
        &mut entries,
        e("a/big", EntryKind::File, 0o600),
        pseudo(5000, 1),
    );
    file(
        &mut entries,
        e("a/exact", EntryKind::File, 0o644),
        pseudo(2048, 2),
    );
    file(
        &mut entries,
        e("a/suid", EntryKind::File, 0o4755),
        b"#!/bin/sh\n".to_vec(),
    );
    let mut x = e("a/link", EntryKind::Symlink, 0o777);
    x.link = "small".into();
    entries.push(x);
    let mut x = e("a/hard", EntryKind::Hardlink, 0o644);
    x.link = "a/small".into();
    entries.push(x);
    entries.push(e("dev", EntryKind::Dir, 0o755));
    let mut x = e("dev/null", EntryKind::CharDev, 0o666);
    (x.dev_major, x.dev_minor) = (1, 3);
    entries.push(x);
    let mut x = e("dev/sda", EntryKind::BlockDev, 0o660);
    (x.dev_major, x.dev_minor, x.gid) = (8, 0, 6);
    entries.push(x);
    entries.push(e("dev/fifo", EntryKind::Fifo, 0o600));
    let long = format!("a/{}", "x".repeat(150));
    let mut x = e(&long, EntryKind::File, 0o640);
    x.uid = 3_000_000;
    x.gid = 1000;
    x.xattrs.insert("user.foo".into(), b"bar".to_vec());
    x.xattrs
        .insert("security.capability".into(), vec![1, 0, 0, 2, 255]);
    file(&mut entries, x, b"long".to_vec());
    let mut x = e("a/longlink", EntryKind::Symlink, 0o777);
    x.link = "t".repeat(200);
    entries.push(x);
    (entries, MemSource(files))
}

fn write(
    entries: &[Entry],
    src: &MemSource,
    opts: &WriterOptions,
    batch: usize,
) -> (Vec<u8>, WrittenLayer) {
    let mut blob = Vec::new();
    let w = write_layer_batched(&mut blob, entries, src, opts, batch).unwrap();
    (blob, w)
}

fn small_chunks() -> WriterOptions {
    WriterOptions {
        chunk_size: 1024,
        ..WriterOptions::default()
    }
}

/// Tar names in order, the raw tar, and path → (metadata, content).
type TarView = (Vec<String>, Vec<u8>, BTreeMap<String, (Entry, Vec<u8>)>);

/// What a plain tar reader sees.
fn read_tar(blob: &[u8]) -> TarView {
    let mut raw = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut raw)
        .unwrap();
    let mut ar = tar::Archive::new(&raw[..]);
    let mut names = Vec::new();
    let mut map = BTreeMap::new();
    for t in ar.entries().unwrap() {
        let mut t = t.unwrap();
        let name = String::from_utf8(t.path_bytes().into_owned()).unwrap();
        names.push(name.clone());
        let h = t.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Regular => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::CharDev,
            tar::EntryType::Block => EntryKind::BlockDev,
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => panic!("unexpected {other:?}"),
        };
        let path = name.trim_end_matches('/').to_string();
        let mut x = Entry::new(path.clone(), kind);
        x.mode = h.mode().unwrap();
        x.uid = h.uid().unwrap() as u32;
        x.gid = h.gid().unwrap() as u32;
        x.mtime = h.mtime().unwrap() as i64;
        if let Some(pax) = t.pax_extensions().unwrap() {
            for p in pax {
                let p = p.unwrap();
                let k = p.key().unwrap().to_string();
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    x.xattrs.insert(name.to_string(), p.value_bytes().to_vec());
                } else if k == "uid" {
                    x.uid = p.value().unwrap().parse().unwrap();
                }
            }
        }
        if let Some(l) = t.link_name_bytes() {
            x.link = String::from_utf8(l.into_owned()).unwrap();
        }
        if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
            x.dev_major = h.device_major().unwrap().unwrap();
            x.dev_minor = h.device_minor().unwrap().unwrap();
        }
        let mut data = Vec::new();
        t.read_to_end(&mut data).unwrap();
        if kind == EntryKind::File {
            x.size = data.len() as u64;
            x.digest = Some(Digest::of(&data));
        }
        map.insert(path, (x, data));
    }
    (names, raw, map)
}

fn chunk_bytes(blob: &[u8], c: &TocChunk) -> Vec<u8> {
    let member = &blob[c.offset as usize..c.compressed_end as usize];
    let mut gz = flate2::read::GzDecoder::new(member);
    let mut all = Vec::new();
    gz.read_to_end(&mut all).unwrap();
    all[c.inner_offset as usize..(c.inner_offset + c.chunk_size) as usize].to_vec()
}

#[test]
fn headers_of_many_empty_entries_are_cut_into_bounded_members() {
    // 5,000 headers with no content between them: several members of
    // at most MAX_HEADER_BYTES each (and one small batch at a time),
    // not one member holding all of them; every entry still reads.
    let mut entries = vec![Entry::new("d", EntryKind::Dir)];
    for i in 0..5000 {
        let mut x = Entry::new(format!("d/{i}"), EntryKind::File);
        x.digest = Some(Digest::of(b""));
        entries.push(x);
    }
    let (blob, w) = write(
        &entries,
        &MemSource(HashMap::new()),
        &WriterOptions::default(),
        1,
    );
    let (names, raw, _) = read_tar(&blob);
    assert_eq!(names.len(), entries.len() + 2);
    assert_eq!(w.diff_id, Digest::of(&raw));
    let mut sizes = Vec::new();
    let mut rest = &blob[..];
    while !rest.is_empty() {
        let mut gz = flate2::bufread::GzDecoder::new(rest);
        sizes.push(std::io::copy(&mut gz, &mut std::io::sink()).unwrap());
        rest = gz.into_inner();
    }
    // The last two members are the TOC and the footer.
    let headers = &sizes[..sizes.len() - 2];
    assert!(headers.len() >= 5000 * 512 / MAX_HEADER_BYTES, "{sizes:?}");
    assert!(
        headers
            .iter()
            .all(|&n| n <= (MAX_HEADER_BYTES + 512) as u64),
        "{sizes:?}"
    );
}

#[test]
fn round_trip() {
    let (entries, src) = fixture();
    let (blob, w) = write(&entries, &src, &small_chunks(), BATCH_BYTES);

    // (a) any tar.gz reader sees every entry with its metadata and content.
    let (names, raw, tar) = read_tar(&blob);
    assert_eq!(
        names.first().map(String::as_str),
        Some(NO_PREFETCH_LANDMARK)
    );
    assert_eq!(names.last().map(String::as_str), Some(TOC_TAR_NAME));
    assert_eq!(names.len(), entries.len() + 2);
    assert_eq!(w.entries, entries.len() + 2);
    for e in &entries {
        let (got, data) = &tar[&e.path];
        assert_eq!(got, e, "{}", e.path);
        if e.is_file() {
            assert_eq!(data, &src.0[&e.path]);
        }
    }
    assert_eq!(tar[NO_PREFETCH_LANDMARK].1, [LANDMARK_CONTENT]);

    // Digests and sizes of the blob and the tar stream.
    assert_eq!(w.size, blob.len() as u64);
    assert_eq!(w.digest, Digest::of(&blob));
    assert_eq!(w.diff_id, Digest::of(&raw));
    assert_eq!(w.uncompressed_size, raw.len() as u64);

    // (b) footer → TOC → exactly the written entries.
    let toc_offset = parse_footer(&blob[blob.len() - 51..]).unwrap();
    let TailRead::Toc(tail) = Toc::read_from_blob_tail(&blob, blob.len() as u64).unwrap() else {
        panic!("whole blob given");
    };
    assert_eq!(tail.toc_offset, toc_offset);
    // The descriptor says the tail to read the TOC in one request.
    assert_eq!(w.toc_tail, blob.len() as u64 - toc_offset);
    assert_eq!(
        w.descriptor().annotations[breakfs_fetch::TOC_TAIL_HINT],
        w.toc_tail.to_string()
    );
    let layer = tail
        .toc
        .to_layer(blob.len() as u64, Some(toc_offset))
        .unwrap();
    let got: Vec<&Entry> = layer.entries.iter().map(|(e, _)| e).collect();
    let want: Vec<&Entry> = entries.iter().collect();
    assert_eq!(got, want);

    // (c) every chunk's member decompresses alone to the chunk's bytes.
    let mut chunked = 0;
    for (e, chunks) in &layer.entries {
        let data = src.0.get(&e.path);
        for c in chunks {
            let want =
                &data.unwrap()[c.chunk_offset as usize..(c.chunk_offset + c.chunk_size) as usize];
            assert_eq!(
                chunk_bytes(&blob, c),
                want,
                "{} at {}",
                e.path,
                c.chunk_offset
            );
            assert_eq!(c.chunk_digest.as_ref(), Some(&Digest::of(want)));
            assert!(c.chunk_size <= 1024);
        }
        if chunks.len() > 1 {
            chunked += 1;
        }
    }
    assert_eq!(chunked, 2, "a/big and a/exact are chunked");

    // (d) the TOC digest is the JSON's sha256, also in the descriptor.
    assert_eq!(w.toc_digest, tail.toc_digest);
    let d = w.descriptor();
    assert_eq!(d.media_type, media_types::OCI_LAYER_GZIP);
    assert_eq!(d.toc_digest(), Some(w.toc_digest.clone()));
    assert_eq!(
        d.annotations[annotations::UNCOMPRESSED_SIZE],
        raw.len().to_string()
    );
}

#[test]
fn batches_do_not_change_the_blob() {
    let (entries, src) = fixture();
    let (a, wa) = write(&entries, &src, &small_chunks(), BATCH_BYTES);
    let (b, wb) = write(&entries, &src, &small_chunks(), 700);
    assert_eq!(a, b);
    assert_eq!(wa, wb);
    let default = write(&entries, &src, &WriterOptions::default(), BATCH_BYTES).0;
    let (_, _, tar) = read_tar(&default);
    assert_eq!(tar["a/big"].1, src.0["a/big"]);
}

#[test]
fn threads_do_not_change_the_blob() {
    let (entries, src) = fixture();
    let many = write(&entries, &src, &small_chunks(), 700);
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let one = pool.install(|| write(&entries, &src, &small_chunks(), 700));
        assert_eq!(one, many, "{threads} thread(s)");
    }
}

#[test]
fn prefetch_order() {
    let (entries, src) = fixture();
    let opts = WriterOptions {
        prefetch: vec!["/a/hard".into(), "missing/file".into()],
        ..small_chunks()
    };
    let (blob, _) = write(&entries, &src, &opts, BATCH_BYTES);
    let (names, _, _) = read_tar(&blob);
    assert_eq!(
        &names[..5],
        ["a/", "a/small", "a/hard", PREFETCH_LANDMARK, "a/empty"]
    );
}

#[test]
fn profiled_files_lie_before_the_landmark_in_their_members() {
    // 200 small files and a big one; a profile names some of them, out
    // of path order, a directory and a path the layer lacks.
    let mut entries = vec![Entry::new("d", EntryKind::Dir)];
    let mut files = HashMap::new();
    for i in 0..200u64 {
        let data = format!("x = {i}\n").repeat(100 + i as usize).into_bytes();
        let mut x = Entry::new(format!("d/m{i}.py"), EntryKind::File);
        x.size = data.len() as u64;
        x.digest = Some(Digest::of(&data));
        files.insert(x.path.clone(), data);
        entries.push(x);
    }
    let data = pseudo(3 << 20, 9);
    let mut x = Entry::new("d/lib.so", EntryKind::File);
    x.size = data.len() as u64;
    x.digest = Some(Digest::of(&data));
    files.insert(x.path.clone(), data);
    entries.push(x);
    let src = MemSource(files);
    let profile: Vec<String> = [
        "d/m150.py",
        "d/lib.so",
        "d",
        "not/here",
        "d/m3.py",
        "d/m77.py",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let opts = WriterOptions {
        prefetch: profile.clone(),
        ..WriterOptions::default()
    };
    let (blob, w) = write(&entries, &src, &opts, BATCH_BYTES);
    let (names, _, _) = read_tar(&blob);
    assert_eq!(
        &names[..6],
        [
            "d/",
            "d/m150.py",
            "d/lib.so",
            "d/m3.py",
            "d/m77.py",
            PREFETCH_LANDMARK
        ]
    );
    // The mount's view: every profiled file's members end at or before
    // the landmark, every other file's start after it.
    let TailRead::Toc(tail) = Toc::read_from_blob_tail(&blob, blob.len() as u64).unwrap() else {
        panic!("whole blob given");
    };
    let layer = tail
        .toc
        .to_layer(blob.len() as u64, Some(tail.toc_offset))
        .unwrap();
    let end = layer.prefetch_end.unwrap();
    for (e, chunks) in &layer.entries {
        for c in chunks {
            if profile.contains(&e.path) {
                assert!(c.compressed_end <= end, "{}", e.path);
            } else {
                assert!(c.offset > end, "{}", e.path);
            }
        }
    }
    // The same input and profile: the same blob.
    let (again, w2) = write(&entries, &src, &opts, 4096);
    assert_eq!((again, w2), (blob, w));

    // A profile that names only directories here: no region.
    let opts = WriterOptions {
        prefetch: vec!["d".into(), "not/here".into()],
        ..WriterOptions::default()
    };
    let (blob, _) = write(&entries, &src, &opts, BATCH_BYTES);
    let (names, _, _) = read_tar(&blob);
    assert_eq!(&names[..2], ["d/", NO_PREFETCH_LANDMARK]);
}

#[test]
fn corrupt_source_is_named() {
    let (entries, mut src) = fixture();
    src.0.insert("a/big".into(), pseudo(5000, 99));
    let mut blob = Vec::new();
    let err = write_layer(&mut blob, &entries, &src, &small_chunks()).unwrap_err();
    assert!(
        matches!(&err, Error::ContentMismatch { path, .. } if path == "a/big"),
        "{err}"
    );
    let (entries, mut src) = fixture();
    src.0.insert("a/small".into(), b"hell".to_vec());
    let err = write_layer(&mut blob, &entries, &src, &small_chunks()).unwrap_err();
    assert!(
        matches!(&err, Error::ContentMismatch { path, .. } if path == "a/small"),
        "{err}"
    );
}

#[test]
fn rejects_bad_paths() {
    let src = MemSource(HashMap::new());
    for p in ["../x", "/abs", "a//b", TOC_TAR_NAME] {
        let entries = vec![Entry::new(p, EntryKind::Dir)];
        let err = write_layer(Vec::new(), &entries, &src, &WriterOptions::default()).unwrap_err();
        assert!(err.to_string().contains(p), "{err}");
    }
}

#[test]
fn pax_record_lengths() {
    for n in [0, 1, 80, 90, 95, 96, 97, 100, 990, 995, 1000] {
        let mut out = Vec::new();
        pax_record(&mut out, "path", &vec![b'x'; n]);
        let sp = out.iter().position(|&b| b == b' ').unwrap();
        let len: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
        assert_eq!(len, out.len(), "value of {n} bytes");
    }
}

/// Gzip members of a blob, as (offset, inflated size).
fn members(blob: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let at = (blob.len() - rest.len()) as u64;
        let mut gz = flate2::bufread::GzDecoder::new(rest);
        out.push((at, std::io::copy(&mut gz, &mut std::io::sink()).unwrap()));
        rest = gz.into_inner();
    }
    out
}

#[test]
fn small_files_share_members_and_read_alone() {
    // 300 small files of 1–3 KiB, then a big one and more small ones.
    let mut entries = vec![Entry::new("d", EntryKind::Dir)];
    let mut files = HashMap::new();
    let mut add = |entries: &mut Vec<Entry>, path: String, data: Vec<u8>| {
        let mut x = Entry::new(path.clone(), EntryKind::File);
        x.mode = 0o644;
        x.size = data.len() as u64;
        x.digest = Some(Digest::of(&data));
        files.insert(path, data);
        entries.push(x);
    };
    for i in 0..300u64 {
        let text = format!("def f{i}():\n    return {i}\n").repeat(40 + (i as usize % 80));
        add(&mut entries, format!("d/m{i}.py"), text.into_bytes());
    }
    add(&mut entries, "d/big".into(), pseudo(300 << 10, 5));
    for i in 0..20u64 {
        add(&mut entries, format!("d/z{i}"), pseudo(100, i));
    }
    let src = MemSource(files);
    let opts = WriterOptions::default();
    let (blob, w) = write(&entries, &src, &opts, BATCH_BYTES);
    let single = WriterOptions {
        group_below: 0,
        ..WriterOptions::default()
    };
    let (apart, _) = write(&entries, &src, &single, BATCH_BYTES);

    // Fewer members and a smaller blob than a member per file.
    let (shared, own) = (members(&blob), members(&apart));
    assert!(
        shared.len() * 10 < own.len(),
        "{} vs {}",
        shared.len(),
        own.len()
    );
    assert!(
        blob.len() < apart.len(),
        "{} vs {}",
        blob.len(),
        apart.len()
    );
    // No shared member inflates past member_size (a header past it at
    // most); the big file's own member does, and no small file joins it.
    let over: Vec<_> = shared
        .iter()
        .filter(|&&(_, n)| n > opts.member_size + 512)
        .collect();
    assert_eq!(over, [&(over[0].0, (300 << 10) + 512)], "{shared:?}");

    // A plain tar reader sees the same entries either way (the TOCs differ).
    let (names, raw, mut tar) = read_tar(&blob);
    let (names_apart, _, mut tar_apart) = read_tar(&apart);
    assert_eq!(names, names_apart);
    tar.remove(TOC_TAR_NAME);
    tar_apart.remove(TOC_TAR_NAME);
    assert_eq!(tar, tar_apart);
    assert_eq!(w.diff_id, Digest::of(&raw));
    assert_eq!(names.len(), entries.len() + 2);
    for e in entries.iter().filter(|e| e.is_file()) {
        assert_eq!(tar[&e.path].1, src.0[&e.path], "{}", e.path);
    }

    // Every file reads alone from its member through the TOC.
    let TailRead::Toc(tail) = Toc::read_from_blob_tail(&blob, blob.len() as u64).unwrap() else {
        panic!("whole blob given");
    };
    let layer = tail
        .toc
        .to_layer(blob.len() as u64, Some(tail.toc_offset))
        .unwrap();
    let mut inner = 0;
    for (e, chunks) in &layer.entries {
        for c in chunks {
            let want = &src.0[&e.path][c.chunk_offset as usize..][..c.chunk_size as usize];
            assert_eq!(chunk_bytes(&blob, c), want, "{}", e.path);
            assert_eq!(c.chunk_digest.as_ref(), Some(&Digest::of(want)));
            assert!(c.inner_offset + c.chunk_size <= opts.member_size || c.inner_offset == 0);
            if c.inner_offset > 0 {
                inner += 1;
            }
        }
    }
    assert!(inner > 250, "{inner} files at an inner offset");

    // Deterministic, whatever the batches.
    let (again, w2) = write(&entries, &src, &opts, 4096);
    assert_eq!(again, blob);
    assert_eq!(w2, w);
}
