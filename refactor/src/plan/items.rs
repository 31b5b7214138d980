//! An image's merged view as the planner sees it: content items (a regular
//! file with its hard links, never split) and top entries (directories,
//! symlinks, special files), plus how entries compare.

use std::collections::HashMap;

use breakfs_index::{Entry, EntryKind};

use super::types::PlanImage;
use crate::{Error, Result};

/// Files that eStargz adds to a layer and that no merged view holds.
const LANDMARKS: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// Whether `path` is one of the [`LANDMARKS`].
pub(super) fn is_landmark(path: &str) -> bool {
    LANDMARKS.contains(&path)
}

/// Whether an entry of this kind goes into content layers (not the top layer).
pub(super) fn is_content(kind: EntryKind) -> bool {
    matches!(kind, EntryKind::File | EntryKind::Hardlink)
}

/// Whether two entries count as the same: hard links by path and target
/// (their metadata is the primary's, which is compared on its own), the
/// rest by every field, or every field but mtime when relaxed.
pub(super) fn same(a: &Entry, b: &Entry, relax: bool) -> bool {
    if a.kind == EntryKind::Hardlink || b.kind == EntryKind::Hardlink {
        return a.kind == b.kind && a.path == b.path && a.link == b.link;
    }
    if relax {
        a.eq_ignoring_mtime(b)
    } else {
        a == b
    }
}

/// Bytes of regular files in a list of entries (hard links not counted,
/// nor the eStargz TOC and landmarks, which no image's view holds).
pub(super) fn file_bytes_of(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && !is_landmark(&e.path))
        .map(|e| e.size)
        .sum()
}

/// A regular file with its hard links: the unit that cannot be split.
#[derive(Clone, Debug)]
pub(super) struct Item {
    /// The primary (a `File`) first, then its hard links in path order.
    pub(super) entries: Vec<Entry>,
    pub(super) bytes: u64,
    /// The layer of the original image the primary came from.
    pub(super) layer: usize,
}

/// An image's merged view sorted into content items and top entries.
pub(super) struct Prepared {
    pub(super) items: Vec<Item>,
    pub(super) others: Vec<Entry>,
    pub(super) item_of: HashMap<String, usize>,
    pub(super) other_of: HashMap<String, usize>,
    pub(super) file_bytes: u64,
}

/// Sort an image's view into items and top entries; a hard link must
/// point at a regular file of the view.
pub(super) fn prepare(img: &PlanImage) -> Result<Prepared> {
    let mut items: Vec<Item> = Vec::new();
    let mut others = Vec::new();
    let mut item_of = HashMap::new();
    let mut other_of = HashMap::new();
    let mut links = Vec::new();
    for me in img.view.iter() {
        let e = &me.entry;
        match e.kind {
            EntryKind::File => {
                item_of.insert(e.path.clone(), items.len());
                items.push(Item {
                    entries: vec![e.clone()],
                    bytes: e.size,
                    layer: me.layer,
                });
            }
            EntryKind::Hardlink => links.push(e.clone()),
            _ => {
                other_of.insert(e.path.clone(), others.len());
                others.push(e.clone());
            }
        }
    }
    for l in links {
        let Some(&n) = item_of.get(&l.link) else {
            return Err(Error::PlanInput {
                image: img.name.clone(),
                path: l.path.clone(),
                reason: format!(
                    "hard link to {:?}, which is not a regular file of the view",
                    l.link
                ),
            });
        };
        item_of.insert(l.path.clone(), n);
        items[n].entries.push(l);
    }
    let file_bytes = items.iter().map(|i| i.bytes).sum();
    Ok(Prepared {
        items,
        others,
        item_of,
        other_of,
        file_bytes,
    })
}

/// The directory part of `path` (`""` at the root).
pub(super) fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}
