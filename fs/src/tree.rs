//! The mounted tree: the merged view of an image turned into inodes, each
//! regular file with the chunks that make up its content.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use breakfs_fetch::{ChunkLoc, ContentStore, Fetcher, Priority};
use breakfs_index::{Digest, Entry, EntryKind, LayerEntry, LayerIndex, MergedView};

use crate::Result;

/// One piece of a regular file's content.
#[derive(Debug)]
pub struct FileChunk {
    /// Offset in the file.
    pub file_offset: u64,
    /// Length.
    pub size: u64,
    /// sha256 of the bytes: the chunk's key in the content store.
    pub digest: Digest,
    /// Where to fetch it from; `None` for content of a layer fetched whole
    /// (in the store once the layer was indexed).
    pub loc: Option<ChunkLoc>,
    present: AtomicBool,
}

impl FileChunk {
    /// A chunk of a file.
    pub fn new(file_offset: u64, size: u64, digest: Digest, loc: Option<ChunkLoc>) -> FileChunk {
        FileChunk {
            file_offset,
            size,
            digest,
            loc,
            present: AtomicBool::new(false),
        }
    }

    /// Whether the store holds it (remembered once seen).
    pub fn is_present(&self, store: &ContentStore) -> bool {
        if self.present.load(Ordering::Relaxed) {
            return true;
        }
        let here = store.has_chunk(&self.digest);
        if here {
            self.present.store(true, Ordering::Relaxed);
        }
        here
    }

    /// Forget that the store held it (it was evicted).
    pub fn forget(&self) {
        self.present.store(false, Ordering::Relaxed);
    }

    /// Remember that the store holds it.
    pub fn mark_present(&self) {
        self.present.store(true, Ordering::Relaxed);
    }

    /// Make sure the store holds it, fetching it at `prio` (waiting at most
    /// `deadline`). A chunk of a layer fetched whole has nowhere to come
    /// from once it is gone from the store.
    pub async fn fetch(
        &self,
        fetcher: &Fetcher,
        prio: Priority,
        deadline: Option<std::time::Duration>,
    ) -> std::result::Result<(), breakfs_fetch::Error> {
        if self.is_present(fetcher.store()) {
            return Ok(());
        }
        match &self.loc {
            Some(loc) => {
                fetcher.ensure(loc, prio, deadline).await?;
                self.mark_present();
                Ok(())
            }
            None => Err(breakfs_fetch::Error::Unavailable {
                what: format!("chunk {} of a whole layer", self.digest),
                reason: "it is no longer in the content store".into(),
            }),
        }
    }
}

/// `size` bytes at `offset` of file `node`, read from its chunks in the
/// store (which must hold them); `files` caches the opened chunk files,
/// one slot per chunk.
pub fn read_from_store(
    store: &ContentStore,
    node: &Node,
    files: &[std::sync::OnceLock<std::fs::File>],
    offset: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let end = offset.saturating_add(size).min(node.entry.size);
    let mut out = vec![0u8; end.saturating_sub(offset) as usize];
    let first = node
        .chunks
        .partition_point(|c| c.file_offset + c.size <= offset);
    for (i, c) in node.chunks.iter().enumerate().skip(first) {
        if c.file_offset >= end {
            break;
        }
        let slot = files
            .get(i)
            .ok_or_else(|| std::io::Error::other("no file slot for a chunk"))?;
        let file = match slot.get() {
            Some(f) => f,
            None => {
                let _ = slot.set(std::fs::File::open(store.chunk_path(&c.digest))?);
                slot.get()
                    .ok_or_else(|| std::io::Error::other("chunk file"))?
            }
        };
        let lo = offset.max(c.file_offset);
        let hi = end.min(c.file_offset + c.size);
        file.read_exact_at(
            &mut out[(lo - offset) as usize..(hi - offset) as usize],
            lo - c.file_offset,
        )?;
    }
    Ok(out)
}

/// An entry of one layer with its content chunks (empty unless a non-empty
/// regular file).
pub type LayerFile = (Entry, Vec<FileChunk>);

/// One inode of the tree.
#[derive(Debug)]
pub struct Node {
    /// Metadata (path relative to the root, "" for the root itself).
    pub entry: Entry,
    /// Parent inode (the root is its own parent).
    pub parent: u64,
    /// Directory children by name, sorted.
    pub children: Vec<(String, u64)>,
    /// Link count.
    pub nlink: u32,
    /// Content of a regular file, in file order.
    pub chunks: Vec<FileChunk>,
}

/// The whole tree, inode `n` at index `n - 1`; inode 1 is the root.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    file_bytes: u64,
    paths: usize,
}

/// The root inode number.
pub const ROOT: u64 = 1;

impl Tree {
    /// Merge the layers (bottom first) under the OCI rules and number the
    /// result: inode numbers follow path order, so they are stable for an
    /// image; hard links share their primary's inode.
    pub fn build(layers: Vec<Vec<LayerFile>>) -> Result<Tree> {
        // The merged view works on tar entries: an entry's position in its
        // layer stands in for the data offset, to find its chunks after.
        let indexes: Vec<LayerIndex> = layers
            .iter()
            .map(|files| LayerIndex {
                entries: files
                    .iter()
                    .enumerate()
                    .map(|(i, (entry, _))| LayerEntry {
                        entry: entry.clone(),
                        data_offset: i as u64,
                    })
                    .collect(),
                diff_id: Digest::of(b""),
                tar_size: 0,
            })
            .collect();
        let view = MergedView::build(&indexes)?;
        // A big image has a million entries: hold as few copies as we can.
        drop(indexes);
        let mut layers: Vec<Vec<Option<LayerFile>>> = layers
            .into_iter()
            .map(|l| l.into_iter().map(Some).collect())
            .collect();

        let mut root = Entry::new("", EntryKind::Dir);
        root.mode = 0o755;
        let mut tree = Tree {
            nodes: vec![Node {
                entry: root,
                parent: ROOT,
                children: Vec::new(),
                nlink: 2,
                chunks: Vec::new(),
            }],
            file_bytes: 0,
            paths: 0,
        };
        let mut by_path: BTreeMap<String, u64> = BTreeMap::new();
        by_path.insert(String::new(), ROOT);
        for m in view.into_entries() {
            let path = m.entry.path.clone();
            let (dir, name) = match path.rsplit_once('/') {
                Some((d, n)) => (d.to_string(), n.to_string()),
                None => (String::new(), path.clone()),
            };
            let parent = tree.ensure_dir(&mut by_path, &dir);
            tree.paths += 1;
            if m.entry.kind == EntryKind::Hardlink {
                let Some(&target) = by_path.get(&m.entry.link) else {
                    continue;
                };
                tree.nodes[(target - 1) as usize].nlink += 1;
                tree.nodes[(parent - 1) as usize]
                    .children
                    .push((name, target));
                by_path.insert(path, target);
                continue;
            }
            if let Some(&existing) = by_path.get(&path) {
                // A directory made up for a child that sorted first
                // cannot happen (parents sort first); keep the entry's metadata.
                tree.nodes[(existing - 1) as usize].entry = m.entry;
                continue;
            }
            let chunks = if m.entry.kind == EntryKind::File {
                layers
                    .get_mut(m.layer)
                    .and_then(|l| l.get_mut(m.data_offset as usize))
                    .and_then(Option::take)
                    .map(|(_, c)| c)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if m.entry.kind == EntryKind::File {
                tree.file_bytes += m.entry.size;
            }
            let ino = tree.push(m.entry, parent, chunks);
            tree.nodes[(parent - 1) as usize].children.push((name, ino));
            by_path.insert(path, ino);
        }
        for n in &mut tree.nodes {
            n.children.sort();
        }
        let subdirs: Vec<(usize, u32)> = tree
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let dirs = n
                    .children
                    .iter()
                    .filter(|(_, c)| tree.nodes[(*c - 1) as usize].entry.kind == EntryKind::Dir)
                    .count() as u32;
                (i, dirs)
            })
            .collect();
        for (i, dirs) in subdirs {
            if tree.nodes[i].entry.kind == EntryKind::Dir {
                tree.nodes[i].nlink = 2 + dirs;
            }
        }
        Ok(tree)
    }

    /// One layer alone in overlayfs' own form, to be one lower dir of an
    /// overlay (the layers' rules are then overlayfs' to apply):
    /// `DIR/.wh.NAME` becomes a character device 0/0 at `DIR/NAME` (a
    /// whiteout), `DIR/.wh..wh..opq` the xattr [`OVERLAY_OPAQUE`] = `y` on
    /// `DIR` (an opaque directory). `trusted.overlay.*` xattrs the layer
    /// carries itself are dropped: they would steer overlayfs.
    pub fn build_overlay_layer(files: Vec<LayerFile>) -> Result<Tree> {
        Tree::build(vec![overlay_form(files)?])
    }

    fn push(&mut self, entry: Entry, parent: u64, chunks: Vec<FileChunk>) -> u64 {
        let nlink = if entry.kind == EntryKind::Dir { 2 } else { 1 };
        self.nodes.push(Node {
            entry,
            parent,
            children: Vec::new(),
            nlink,
            chunks,
        });
        self.nodes.len() as u64
    }

    /// The inode of directory `dir`, made up (0755, root-owned) if the
    /// image has children under it but no entry for it.
    fn ensure_dir(&mut self, by_path: &mut BTreeMap<String, u64>, dir: &str) -> u64 {
        if let Some(&ino) = by_path.get(dir) {
            return ino;
        }
        let (up, name) = match dir.rsplit_once('/') {
            Some((d, n)) => (d.to_string(), n.to_string()),
            None => (String::new(), dir.to_string()),
        };
        let parent = self.ensure_dir(by_path, &up);
        let mut e = Entry::new(dir, EntryKind::Dir);
        e.mode = 0o755;
        let ino = self.push(e, parent, Vec::new());
        self.nodes[(parent - 1) as usize].children.push((name, ino));
        by_path.insert(dir.to_string(), ino);
        ino
    }

    /// The node of inode `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let p = self.node(parent)?;
        p.children
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name))
            .ok()
            .map(|i| p.children[i].1)
    }

    /// The inode at `path` (absolute or relative to directory `from`),
    /// following symlinks inside the image (the last one too), at most 40.
    pub fn resolve(&self, from: u64, path: &str) -> Option<u64> {
        let mut pending: Vec<String> = Vec::new();
        let mut dir = if path.starts_with('/') { ROOT } else { from };
        push_components(&mut pending, path);
        let mut links = 0;
        while let Some(part) = pending.pop() {
            let cur = match part.as_str() {
                "" | "." => continue,
                ".." => {
                    dir = self.node(dir)?.parent;
                    continue;
                }
                name => self.lookup(dir, name.as_bytes())?,
            };
            let n = self.node(cur)?;
            if n.entry.kind == EntryKind::Symlink {
                links += 1;
                if links > 40 {
                    return None;
                }
                if n.entry.link.starts_with('/') {
                    dir = ROOT;
                }
                push_components(&mut pending, &n.entry.link);
                continue;
            }
            if pending.is_empty() {
                return Some(cur);
            }
            if n.entry.kind != EntryKind::Dir {
                return None;
            }
            dir = cur;
        }
        Some(dir)
    }

    /// All inodes with their numbers.
    pub fn nodes(&self) -> impl Iterator<Item = (u64, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i as u64 + 1, n))
    }

    /// Number of inodes.
    pub fn inodes(&self) -> usize {
        self.nodes.len()
    }

    /// Number of paths (hard links counted each).
    pub fn paths(&self) -> usize {
        self.paths
    }

    /// Content bytes of regular files (each inode once).
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Every distinct chunk that can be fetched, in inode order, with
    /// duplicates (same digest) left out.
    pub fn fetchable_chunks(&self) -> Vec<&FileChunk> {
        let mut seen = std::collections::HashSet::new();
        self.nodes
            .iter()
            .flat_map(|n| n.chunks.iter())
            .filter(|c| seen.insert(&c.digest))
            .collect()
    }
}

/// The xattr that makes a directory of a lower layer opaque to overlayfs.
pub const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";

/// `files` (one layer) with OCI whiteouts turned into overlayfs' form
/// ([`Tree::build_overlay_layer`]).
fn overlay_form(files: Vec<LayerFile>) -> Result<Vec<LayerFile>> {
    let bad = |path: &str, reason: &str| crate::Error::BadImage {
        what: format!("layer entry {path:?}"),
        reason: reason.to_string(),
    };
    let mut out = Vec::with_capacity(files.len());
    let mut opaque = std::collections::BTreeSet::new();
    for (mut e, chunks) in files {
        e.xattrs.retain(|k, _| !k.starts_with("trusted.overlay."));
        let (dir, name) = match e.path.rsplit_once('/') {
            Some((d, n)) => (d.to_string(), n.to_string()),
            None => (String::new(), e.path.clone()),
        };
        if name == ".wh..wh..opq" {
            if dir.is_empty() {
                return Err(bad(
                    &e.path,
                    "an opaque root directory: overlayfs cannot take it from a lower layer",
                ));
            }
            opaque.insert(dir);
            continue;
        }
        if name.starts_with(".wh..wh.") {
            // aufs bookkeeping (.wh..wh.plnk): no meaning to overlayfs.
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            if target.is_empty() || target == "." || target == ".." {
                return Err(bad(&e.path, "a whiteout of an invalid name"));
            }
            let path = if dir.is_empty() {
                target.to_string()
            } else {
                format!("{dir}/{target}")
            };
            let mut w = Entry::new(path, EntryKind::CharDev);
            w.mtime = e.mtime;
            out.push((w, Vec::new()));
            continue;
        }
        out.push((e, chunks));
    }
    for dir in opaque {
        let y = b"y".to_vec();
        match out
            .iter_mut()
            .find(|(e, _)| e.path == dir && e.kind == EntryKind::Dir)
        {
            Some((e, _)) => {
                e.xattrs.insert(OVERLAY_OPAQUE.to_string(), y);
            }
            None => {
                let mut e = Entry::new(dir, EntryKind::Dir);
                e.mode = 0o755;
                e.xattrs.insert(OVERLAY_OPAQUE.to_string(), y);
                out.push((e, Vec::new()));
            }
        }
    }
    Ok(out)
}

/// Push the components of `path` so that they pop in order.
fn push_components(stack: &mut Vec<String>, path: &str) {
    for part in path.split('/').rev() {
        stack.push(part.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, body: &[u8]) -> LayerFile {
        let mut e = Entry::new(path, EntryKind::File);
        e.size = body.len() as u64;
        e.digest = Some(Digest::of(body));
        e.mode = 0o644;
        let chunks = vec![FileChunk::new(0, e.size, Digest::of(body), None)];
        (e, chunks)
    }

    fn dir(path: &str) -> LayerFile {
        let mut e = Entry::new(path, EntryKind::Dir);
        e.mode = 0o755;
        (e, vec![])
    }

    #[test]
    fn layers_merge_and_hardlinks_share_an_inode() {
        let mut link = Entry::new("usr/bin/b", EntryKind::Hardlink);
        link.link = "usr/bin/a".into();
        let bottom = vec![
            dir("usr"),
            file("usr/bin/a", b"aaa"),
            (link, vec![]),
            file("etc/x", b"old"),
        ];
        let top = vec![
            file("etc/x", b"new"),
            file("etc/.wh.gone", b""),
            file("opt/deep/f", b"f"),
        ];
        let t = Tree::build(vec![bottom, top]).unwrap();
        let usr = t.lookup(ROOT, b"usr").unwrap();
        let bin = t.lookup(usr, b"bin").unwrap();
        let a = t.lookup(bin, b"a").unwrap();
        let b = t.lookup(bin, b"b").unwrap();
        assert_eq!(a, b);
        assert_eq!(t.node(a).unwrap().nlink, 2);
        let etc = t.lookup(ROOT, b"etc").unwrap();
        let x = t.node(t.lookup(etc, b"x").unwrap()).unwrap();
        assert_eq!(x.chunks[0].digest, Digest::of(b"new"));
        assert!(t.lookup(etc, b".wh.gone").is_none());
        // Made-up parents: opt and opt/deep.
        let opt = t.lookup(ROOT, b"opt").unwrap();
        assert_eq!(t.node(opt).unwrap().entry.kind, EntryKind::Dir);
        assert_eq!(t.node(ROOT).unwrap().nlink, 2 + 3);
        assert_eq!(t.resolve(ROOT, "/usr/bin/b"), Some(a));
        assert_eq!(t.resolve(bin, "../../etc/x"), t.lookup(etc, b"x"));
        assert_eq!(t.resolve(ROOT, "/usr/nothing"), None);
        assert_eq!(t.file_bytes(), 3 + 3 + 1);
    }

    /// A layer alone in overlayfs' form: whiteouts are character devices
    /// 0/0, an opaque marker is the xattr on its directory (made up when
    /// the layer has no entry for it), the layer's own overlay xattrs go.
    #[test]
    fn a_layer_in_overlay_form_carries_whiteouts_as_overlayfs_does() {
        let mut steer = dir("etc");
        steer
            .0
            .xattrs
            .insert("trusted.overlay.redirect".into(), b"/x".to_vec());
        steer.0.xattrs.insert("user.kept".into(), b"1".to_vec());
        let layer = vec![
            steer,
            file("etc/.wh.gone", b""),
            file("etc/.wh..wh..opq", b""),
            file("var/lib/.wh..wh..opq", b""),
            file("etc/.wh..wh.plnk", b""),
            file("etc/new", b"new"),
        ];
        let t = Tree::build_overlay_layer(layer).unwrap();
        let etc = t.lookup(ROOT, b"etc").unwrap();
        let etc_n = t.node(etc).unwrap();
        assert_eq!(
            etc_n.entry.xattrs.get(OVERLAY_OPAQUE).map(Vec::as_slice),
            Some(&b"y"[..])
        );
        assert!(!etc_n.entry.xattrs.contains_key("trusted.overlay.redirect"));
        assert!(etc_n.entry.xattrs.contains_key("user.kept"));
        let gone = t.node(t.lookup(etc, b"gone").unwrap()).unwrap();
        assert_eq!(gone.entry.kind, EntryKind::CharDev);
        assert_eq!((gone.entry.dev_major, gone.entry.dev_minor), (0, 0));
        let names: Vec<&str> = etc_n.children.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["gone", "new"]);
        let lib = t.resolve(ROOT, "/var/lib").unwrap();
        assert!(
            t.node(lib)
                .unwrap()
                .entry
                .xattrs
                .contains_key(OVERLAY_OPAQUE)
        );
        assert!(Tree::build_overlay_layer(vec![file(".wh..wh..opq", b"")]).is_err());
        assert!(Tree::build_overlay_layer(vec![file("a/.wh.", b"")]).is_err());
    }
}
