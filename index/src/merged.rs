//! The merged view of a layer stack under the OCI layer rules.
//!
//! Layers apply bottom (index 0) to top: an upper entry replaces a lower one
//! at the same path (a non-directory over a directory removes the subtree; a
//! directory over a directory keeps the children), `DIR/.wh.NAME` deletes
//! NAME from the layers below, `DIR/.wh..wh..opq` hides everything the
//! layers below had in DIR. Hard links are tracked as inodes, so a link
//! keeps its content when an upper layer deletes the path it was linked to,
//! and every hard-link group comes out in one canonical form: the smallest
//! path is the `File`, the others are `Hardlink`s to it with the same
//! metadata. Two views of the same tree then compare equal whatever order
//! the tars stored them in.

use std::collections::BTreeMap;

use crate::{Entry, EntryKind, Error, LayerIndex, Result};

/// An entry of the merged view and where its content lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedEntry {
    /// The entry as the merged view shows it.
    pub entry: Entry,
    /// Index of the layer (bottom = 0) whose tar holds the content.
    pub layer: usize,
    /// Offset of the content in that layer's uncompressed tar.
    pub data_offset: u64,
}

/// The merged view of an image: every path and its entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergedView {
    entries: BTreeMap<String, MergedEntry>,
}

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

/// A path of the view while it is being built: a regular file (an inode,
/// possibly shared by hard links) or anything else.
enum Node {
    Inode(usize),
    Other(MergedEntry),
}

/// The view under construction.
#[derive(Default)]
struct Builder {
    nodes: BTreeMap<String, Node>,
    inodes: Vec<MergedEntry>,
}

impl Builder {
    /// Refuse a path whose ancestors are symlinks or files. Nothing in the
    /// view ever sits below a non-directory (an entry over a directory
    /// removes its subtree), so the nearest ancestor in the view decides:
    /// one lookup for most paths, not one per level of a deep tree.
    fn check_parents(&self, path: &str) -> Result<()> {
        for (i, _) in path.rmatch_indices('/') {
            let parent = &path[..i];
            let kind = match self.nodes.get(parent) {
                None => continue,
                Some(Node::Inode(_)) => EntryKind::File,
                Some(Node::Other(m)) => m.entry.kind,
            };
            match kind {
                EntryKind::Dir => return Ok(()),
                EntryKind::Symlink => {
                    return Err(Error::BadEntry {
                        path: path.to_string(),
                        reason: format!(
                            "path goes through symlink {parent}: extracting it would write \
                             through the link, breakfs refuses such layers"
                        ),
                    });
                }
                _ => {
                    return Err(Error::BadEntry {
                        path: path.to_string(),
                        reason: format!("parent {parent} is not a directory in the layers below"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Remove everything strictly below `dir` (all of the view for "").
    fn remove_children(&mut self, dir: &str) {
        if dir.is_empty() {
            self.nodes.clear();
            return;
        }
        let prefix = format!("{dir}/");
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// Remove `path` and its subtree.
    fn remove_tree(&mut self, path: &str) {
        self.nodes.remove(path);
        self.remove_children(path);
    }

    /// Apply one layer's whiteouts to what the layers below left.
    fn apply_whiteouts(&mut self, layer: &LayerIndex) -> Result<()> {
        for le in &layer.entries {
            let path = &le.entry.path;
            let (dir, name) = split(path);
            if name == OPAQUE {
                self.check_parents(path)?;
                self.remove_children(dir);
            } else if name.starts_with(".wh..wh.") {
                // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): no meaning here.
            } else if let Some(target) = name.strip_prefix(WHITEOUT) {
                if target.is_empty() || target == "." || target == ".." {
                    return Err(Error::BadEntry {
                        path: path.clone(),
                        reason: "whiteout of an invalid name".to_string(),
                    });
                }
                self.check_parents(path)?;
                self.remove_tree(&join(dir, target));
            }
        }
        Ok(())
    }

    /// Apply one layer's ordinary entries, in tar order.
    fn apply_entries(&mut self, index: usize, layer: &LayerIndex) -> Result<()> {
        for le in &layer.entries {
            let entry = &le.entry;
            let path = entry.path.as_str();
            if split(path).1.starts_with(WHITEOUT) {
                continue;
            }
            self.check_parents(path)?;
            let here = MergedEntry {
                entry: entry.clone(),
                layer: index,
                data_offset: le.data_offset,
            };
            let node = match entry.kind {
                EntryKind::Dir => {
                    if !matches!(self.nodes.get(path), Some(Node::Other(m)) if m.entry.kind == EntryKind::Dir)
                    {
                        // A directory over a non-directory: the old entry has no children.
                        self.nodes.remove(path);
                    }
                    Node::Other(here)
                }
                EntryKind::File => {
                    self.remove_tree(path);
                    self.inodes.push(here);
                    Node::Inode(self.inodes.len() - 1)
                }
                EntryKind::Hardlink => {
                    let target = entry.link.as_str();
                    let id = match self.nodes.get(target) {
                        Some(Node::Inode(id)) => *id,
                        Some(Node::Other(m)) => {
                            return Err(Error::BadEntry {
                                path: path.to_string(),
                                reason: format!(
                                    "hard link to {target}, which is a {}: breakfs supports \
                                     hard links to regular files only",
                                    kind_name(m.entry.kind)
                                ),
                            });
                        }
                        None => {
                            return Err(Error::BadEntry {
                                path: path.to_string(),
                                reason: format!(
                                    "hard link to {target}, which does not exist in this \
                                     layer (before the link) or the layers below"
                                ),
                            });
                        }
                    };
                    self.remove_tree(path);
                    Node::Inode(id)
                }
                _ => {
                    self.remove_tree(path);
                    Node::Other(here)
                }
            };
            self.nodes.insert(path.to_string(), node);
        }
        Ok(())
    }

    /// The canonical view: hard-link groups named by their smallest path.
    fn finish(self) -> MergedView {
        let mut view = MergedView::default();
        let mut groups: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (path, node) in self.nodes {
            match node {
                Node::Other(mut m) => {
                    m.entry.path.clone_from(&path);
                    view.entries.insert(path, m);
                }
                // BTreeMap order: each group's paths arrive sorted.
                Node::Inode(id) => groups.entry(id).or_default().push(path),
            }
        }
        for (id, paths) in groups {
            let Some(inode) = self.inodes.get(id) else {
                continue;
            };
            let primary = paths[0].clone();
            for (i, path) in paths.into_iter().enumerate() {
                let mut m = inode.clone();
                m.entry.path.clone_from(&path);
                if i == 0 {
                    m.entry.kind = EntryKind::File;
                    m.entry.link.clear();
                } else {
                    m.entry.kind = EntryKind::Hardlink;
                    m.entry.link.clone_from(&primary);
                }
                view.entries.insert(path, m);
            }
        }
        view
    }
}

/// Split a normalised path into its directory ("" at the root) and name.
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "regular file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hard link",
        EntryKind::CharDev => "character device",
        EntryKind::BlockDev => "block device",
        EntryKind::Fifo => "fifo",
    }
}

impl MergedView {
    /// Merge `layers` (bottom first) under the OCI layer rules.
    pub fn build(layers: &[LayerIndex]) -> Result<MergedView> {
        let mut b = Builder::default();
        for (index, layer) in layers.iter().enumerate() {
            let in_layer = |e: Error| match e {
                Error::BadEntry { path, reason } => Error::BadEntry {
                    path,
                    reason: format!(
                        "{reason} (layer {} of {}, from the bottom)",
                        index + 1,
                        layers.len()
                    ),
                },
                other => other,
            };
            // Whiteouts hide what the layers below had, wherever they sit in
            // this layer's tar; this layer's own entries are not affected.
            b.apply_whiteouts(layer).map_err(in_layer)?;
            b.apply_entries(index, layer).map_err(in_layer)?;
        }
        Ok(b.finish())
    }

    /// A view of exactly these entries, keyed by `entry.path` (no layer
    /// rules, no canonical hard-link form is enforced).
    pub fn from_entries(entries: impl IntoIterator<Item = MergedEntry>) -> MergedView {
        let mut view = MergedView::default();
        for e in entries {
            view.insert(e);
        }
        view
    }

    /// Put `entry` at its path, returning what was there.
    pub fn insert(&mut self, entry: MergedEntry) -> Option<MergedEntry> {
        self.entries.insert(entry.entry.path.clone(), entry)
    }

    /// Remove the entry at `path` (not its children), returning it.
    pub fn remove(&mut self, path: &str) -> Option<MergedEntry> {
        self.entries.remove(path)
    }

    /// The entry at a normalised `path`.
    pub fn get(&self, path: &str) -> Option<&MergedEntry> {
        self.entries.get(path)
    }

    /// All entries in path order.
    pub fn iter(&self) -> impl Iterator<Item = &MergedEntry> {
        self.entries.values()
    }

    /// All entries in path order, taken out of the view.
    pub fn into_entries(self) -> impl Iterator<Item = MergedEntry> {
        self.entries.into_values()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the view has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Hard-link groups, each with its primary (the `File`) first and the
    /// links after it in path order; groups in primary order.
    pub fn hardlink_groups(&self) -> Vec<Vec<String>> {
        let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for m in self.entries.values() {
            if m.entry.kind == EntryKind::Hardlink {
                groups
                    .entry(m.entry.link.as_str())
                    .or_default()
                    .push(m.entry.path.clone());
            }
        }
        groups
            .into_iter()
            .map(|(primary, links)| {
                let mut group = vec![primary.to_string()];
                group.extend(links);
                group
            })
            .collect()
    }

    /// Total content bytes of regular files; hard links are not counted again.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|m| m.entry.kind == EntryKind::File)
            .map(|m| m.entry.size)
            .sum()
    }

    /// Human-readable differences between two views, one line per differing
    /// field (`usr/bin/x: mode 0755 vs 0700`, `etc/y: only in left`). Where
    /// the content sits (layer, offset) is not compared. Empty when the two
    /// views show the same tree.
    pub fn diff(&self, other: &MergedView, ignore_mtime: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut left = self.entries.iter().peekable();
        let mut right = other.entries.iter().peekable();
        loop {
            match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some((p, _)), None) => {
                    out.push(format!("{p}: only in left"));
                    left.next();
                }
                (None, Some((p, _))) => {
                    out.push(format!("{p}: only in right"));
                    right.next();
                }
                (Some((lp, l)), Some((rp, r))) => match lp.cmp(rp) {
                    std::cmp::Ordering::Less => {
                        out.push(format!("{lp}: only in left"));
                        left.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(format!("{rp}: only in right"));
                        right.next();
                    }
                    std::cmp::Ordering::Equal => {
                        diff_entry(lp, &l.entry, &r.entry, ignore_mtime, &mut out);
                        left.next();
                        right.next();
                    }
                },
            }
        }
        out
    }
}

fn diff_entry(path: &str, l: &Entry, r: &Entry, ignore_mtime: bool, out: &mut Vec<String>) {
    if l.kind != r.kind {
        out.push(format!(
            "{path}: kind {} vs {}",
            kind_name(l.kind),
            kind_name(r.kind)
        ));
    }
    if l.mode != r.mode {
        out.push(format!("{path}: mode {:04o} vs {:04o}", l.mode, r.mode));
    }
    if l.uid != r.uid {
        out.push(format!("{path}: uid {} vs {}", l.uid, r.uid));
    }
    if l.gid != r.gid {
        out.push(format!("{path}: gid {} vs {}", l.gid, r.gid));
    }
    if !ignore_mtime && l.mtime != r.mtime {
        out.push(format!("{path}: mtime {} vs {}", l.mtime, r.mtime));
    }
    if l.size != r.size {
        out.push(format!("{path}: size {} vs {}", l.size, r.size));
    }
    if l.digest != r.digest {
        let show = |d: &Option<crate::Digest>| match d {
            Some(d) => d.to_string(),
            None => "none".to_string(),
        };
        out.push(format!(
            "{path}: digest {} vs {}",
            show(&l.digest),
            show(&r.digest)
        ));
    }
    if l.link != r.link {
        out.push(format!("{path}: link {:?} vs {:?}", l.link, r.link));
    }
    if (l.dev_major, l.dev_minor) != (r.dev_major, r.dev_minor) {
        out.push(format!(
            "{path}: device {}:{} vs {}:{}",
            l.dev_major, l.dev_minor, r.dev_major, r.dev_minor
        ));
    }
    for (key, lv) in &l.xattrs {
        match r.xattrs.get(key) {
            None => out.push(format!("{path}: xattr {key} only in left")),
            Some(rv) if rv != lv => out.push(format!("{path}: xattr {key} {lv:?} vs {rv:?}")),
            Some(_) => {}
        }
    }
    for key in r.xattrs.keys() {
        if !l.xattrs.contains_key(key) {
            out.push(format!("{path}: xattr {key} only in right"));
        }
    }
}

#[cfg(test)]
mod tests;
