//! The layer tar indexer and the merged view, fed layers as an image
//! would: the input is split into layers at `SEPARATOR`, each read as an
//! uncompressed tar stream, the stack merged under the OCI rules.
//!
//! Checked: indexed paths are normalised and every file's content lies
//! inside its stream; in the merged view every hard link points at a file
//! of the view and no entry sits below a non-directory.

#![no_main]

use breakfs_index::{EntryKind, LayerIndex, MergedView};
use libfuzzer_sys::fuzz_target;

mod common;
use common::check_path;

/// Splits the input into layers (bottom first).
const SEPARATOR: &[u8] = b"\n--breakfs-layer--\n";

fuzz_target!(|data: &[u8]| {
    let mut layers = Vec::new();
    for (i, part) in split(data).into_iter().enumerate().take(8) {
        match LayerIndex::read(part, &format!("fuzz layer {i}")) {
            Ok(index) => {
                check_layer(&index, part.len() as u64);
                layers.push(index);
            }
            Err(_) => return,
        }
    }
    if let Ok(view) = MergedView::build(&layers) {
        check_view(&view);
    }
});

fn split(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(at) = data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&data[..at]);
        data = &data[at + SEPARATOR.len()..];
    }
    out.push(data);
    out
}

fn check_layer(index: &LayerIndex, len: u64) {
    assert_eq!(index.tar_size, len, "tar size is not the stream's length");
    for le in &index.entries {
        let e = &le.entry;
        check_path(&e.path);
        if e.kind == EntryKind::Hardlink {
            check_path(&e.link);
        }
        assert!(e.mode <= 0o7777, "{}: mode {:o}", e.path, e.mode);
        if e.kind == EntryKind::File {
            assert!(e.digest.is_some(), "{}: file without a digest", e.path);
            let end = le.data_offset.checked_add(e.size);
            assert!(
                end.is_some_and(|end| end <= len),
                "{}: content outside the stream",
                e.path
            );
        }
    }
}

fn check_view(view: &MergedView) {
    for m in view.iter() {
        let e = &m.entry;
        check_path(&e.path);
        if e.kind == EntryKind::Hardlink {
            let target = view.get(&e.link).map(|t| t.entry.kind);
            assert_eq!(
                target,
                Some(EntryKind::File),
                "{}: dangling hard link",
                e.path
            );
        }
        for (i, _) in e.path.match_indices('/') {
            if let Some(parent) = view.get(&e.path[..i]) {
                assert_eq!(
                    parent.entry.kind,
                    EntryKind::Dir,
                    "{} sits below a non-directory",
                    e.path
                );
            }
        }
    }
    let groups = view.hardlink_groups();
    assert!(groups.iter().all(|g| g.len() >= 2));
    let _ = view.file_bytes();
    assert!(
        view.diff(view, false).is_empty(),
        "a view differs from itself"
    );
}
