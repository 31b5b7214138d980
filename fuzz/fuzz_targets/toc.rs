//! The eStargz footer and TOC parsers, fed as a layer would feed them.
//!
//! The input is used three ways: as the tail of a blob of its own size
//! (footer, TOC gzip member, TOC JSON, then the chunk map), as a bare
//! footer, and as TOC JSON. A TOC that parses must survive a JSON round
//! trip, and one that converts must give a chunk map a lazy reader can
//! trust: normalised paths, chunks inside the payload covering each file.

#![no_main]

use breakfs_index::{EntryKind, TailRead, Toc, TocLayer, parse_footer_sized};
use libfuzzer_sys::fuzz_target;

mod common;
use common::check_path;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(TailRead::Toc(tail)) = Toc::read_from_blob_tail(data, size) {
        assert!(tail.toc_offset < size, "TOC offset past the blob");
        assert!(tail.footer_size == 51 || tail.footer_size == 47);
        check_toc(&tail.toc, size, Some(tail.toc_offset));
    }
    if let Ok((offset, footer)) = parse_footer_sized(data) {
        assert!(footer == 51 || footer == 47);
        let again = parse_footer_sized(&breakfs_index::footer(offset)).ok();
        assert_eq!(again, Some((offset, 51)), "footer does not round-trip");
    }
    if let Ok(toc) = Toc::parse(data) {
        check_toc(&toc, 1 << 40, None);
        check_toc(&toc, size, Some(size / 2));
    }
});

fn check_toc(toc: &Toc, blob_size: u64, toc_offset: Option<u64>) {
    let json = toc.to_json();
    match Toc::parse(&json) {
        Ok(again) => assert_eq!(&again, toc, "TOC JSON does not round-trip"),
        Err(e) => panic!("a parsed TOC does not parse again: {e}"),
    }
    if let Ok(layer) = toc.to_layer(blob_size, toc_offset) {
        check_layer(&layer, toc_offset.unwrap_or(blob_size).min(blob_size));
    }
}

fn check_layer(layer: &TocLayer, data_end: u64) {
    for (entry, chunks) in &layer.entries {
        check_path(&entry.path);
        if entry.kind == EntryKind::Hardlink {
            check_path(&entry.link);
        }
        assert!(
            entry.mode <= 0o7777,
            "{}: mode {:o}",
            entry.path,
            entry.mode
        );
        if entry.kind != EntryKind::File {
            assert!(chunks.is_empty(), "{}: chunks on a non-file", entry.path);
            continue;
        }
        let mut at = 0u64;
        for c in chunks {
            assert_eq!(c.chunk_offset, at, "{}: chunks out of order", entry.path);
            assert!(
                c.offset < data_end,
                "{}: chunk outside the payload",
                entry.path
            );
            assert!(
                c.compressed_end >= c.offset,
                "{}: chunk ends first",
                entry.path
            );
            at += c.chunk_size;
        }
        assert_eq!(
            at, entry.size,
            "{}: chunks do not cover the file",
            entry.path
        );
    }
}
