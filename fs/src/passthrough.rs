//! FUSE passthrough (Linux 6.9+) for hydrated files, when asked for
//! (`BREAKFS_PASSTHROUGH=1`; off by default: see `ENV` and docs/reads.md).
//!
//! When a file's bytes are all in the content store, `open` hands the
//! kernel a *backing file* holding exactly them, and the kernel reads it
//! itself from then on: no request reaches this process, and the page
//! cache is the backing file's. A file of one chunk is backed by its chunk
//! file; a bigger one by a copy of its chunks laid end to end, written
//! once (verified against the file's digest) into the store's chunks,
//! keyed by that digest (see docs/reads.md for the disk this costs). Any
//! other open (a file not hydrated, a kernel or mount without passthrough,
//! a backing file that cannot be opened) is served by the daemon as before.
//!
//! The kernel's rule, per inode: while it is open through a backing file
//! every open must name that same backing file, and while it is open
//! through the daemon (page-cache mode) no open may name one; a breach
//! fails the opener's `open` with `EIO`. So an inode's backing id, once
//! registered, is kept and used for every later open (until the session
//! ends: the kernel drops its ids with the connection), and an inode gets
//! one only while no daemon-served open of it is live (counted from `open`
//! to `release`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use breakfs_fetch::ContentStore;
use breakfs_index::{EntryKind, HashingWriter};
use fuser::{FileHandle, FopenFlags, ReplyOpen};
use parking_lot::Mutex;

use crate::tree::{Node, Tree};

/// The file handle of an open served by the daemon.
pub(crate) const FH_DAEMON: u64 = 0;
/// The file handle of an open passed through to a backing file.
pub(crate) const FH_PASSTHROUGH: u64 = 1;

/// `BREAKFS_PASSTHROUGH=1` turns passthrough on. It is off by default: it
/// needs an `open` request per file opened (and a `release` per close),
/// where a mount without it asks the kernel for zero-message opens and
/// serves a warm read of many small files from the page cache with no
/// request at all; measured, passthrough makes a warm walk of a hydrated
/// image 3 to 10 times the time of a local directory's, and is ahead cold
/// only where the bytes are in big files (docs/reads.md). A mount with it on also counts as one level of
/// stacking, so overlayfs over overlayfs over it goes over the kernel's
/// limit of two.
const ENV: &str = "BREAKFS_PASSTHROUGH";

/// Passthrough state of one mount.
pub(crate) struct Passthrough {
    /// Asked for (a mount whose session one process serves throughout).
    wanted: bool,
    /// The kernel agreed at INIT: every open goes through [`Passthrough::open`].
    negotiated: AtomicBool,
    /// Negotiated, and backing files register (until one fails to).
    active: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Inode → its backing id on this connection, kept for the session.
    backing: HashMap<u64, u32>,
    /// Inodes open through the daemon now, and how many times.
    daemon_opens: HashMap<u64, u32>,
    /// Multi-chunk inodes whose whole-file copy checked out this session.
    whole: HashSet<u64>,
    /// Multi-chunk inodes whose whole-file copy is being written.
    writing: HashSet<u64>,
    /// Multi-chunk inodes whose chunks do not make their file's digest:
    /// read through the daemon only (which serves the chunks).
    refused: HashSet<u64>,
}

/// How an open is to be answered.
enum Answer {
    Backing(u32),
    /// Served by the daemon; `write_whole`: write the file's whole-file
    /// copy now (asked for by this open first).
    Daemon {
        write_whole: bool,
    },
}

impl Passthrough {
    /// Passthrough for a mount, if asked for in the environment; `wanted`
    /// false for one that another process may serve on (its backing ids
    /// would not be known there).
    pub(crate) fn new(wanted: bool) -> Passthrough {
        let on = std::env::var(ENV).is_ok_and(|v| v == "1" || v == "on");
        Passthrough {
            wanted: wanted && on,
            negotiated: AtomicBool::new(false),
            active: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    /// Whether to ask the kernel for passthrough at INIT.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted
    }

    /// The kernel agreed at INIT.
    pub(crate) fn activate(&self) {
        self.negotiated.store(true, Ordering::Relaxed);
        self.active.store(true, Ordering::Relaxed);
    }

    /// Whether the kernel agreed at INIT (opens then go through
    /// [`Passthrough::open`] even once backing files stop registering).
    pub(crate) fn negotiated(&self) -> bool {
        self.negotiated.load(Ordering::Relaxed)
    }

    /// Whether opens may pass through.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Answer the open of inode `ino`: through its backing file when it has
    /// one or can have one now, else served by the daemon (and, for a file
    /// whose chunks are all here, its whole-file copy written meanwhile on
    /// `rt`, for the next open). Whether it passed through.
    pub(crate) fn open(
        self: &Arc<Self>,
        ino: u64,
        tree: &Arc<Tree>,
        store: &Arc<ContentStore>,
        rt: &tokio::runtime::Handle,
        reply: ReplyOpen,
    ) -> bool {
        let Some(n) = tree.node(ino) else {
            reply.error(fuser::Errno::ENOENT);
            return false;
        };
        match self.decide(ino, n, store, &reply) {
            Answer::Backing(id) => {
                #[allow(unsafe_code)]
                // SAFETY: `id` was registered on this connection by
                // `open_backing` and stays registered (the module doc):
                // `into_raw` below takes it back before the wrapper could
                // close it on drop.
                let b = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), &b);
                let _ = b.into_raw();
                true
            }
            Answer::Daemon { write_whole } => {
                reply.opened(FileHandle(FH_DAEMON), FopenFlags::FOPEN_KEEP_CACHE);
                if write_whole {
                    let (pt, tree, store) = (self.clone(), tree.clone(), store.clone());
                    rt.spawn_blocking(move || pt.write_whole(&tree, &store, ino));
                }
                false
            }
        }
    }

    fn decide(&self, ino: u64, n: &Node, store: &ContentStore, reply: &ReplyOpen) -> Answer {
        let mut st = self.state.lock();
        if let Some(&id) = st.backing.get(&ino) {
            return Answer::Backing(id);
        }
        let mut write_whole = false;
        if self.active() && !st.daemon_opens.contains_key(&ino) && !st.refused.contains(&ino) {
            match backing(n, store, st.whole.contains(&ino)) {
                Backing::Here(path) => match File::open(&path) {
                    Ok(f) => match reply.open_backing(&f) {
                        Ok(b) => {
                            let id = b.into_raw();
                            st.backing.insert(ino, id);
                            return Answer::Backing(id);
                        }
                        Err(e) => {
                            // Not for this mount (the store on a stacked
                            // filesystem: ELOOP; no CAP_SYS_ADMIN: EPERM).
                            self.active.store(false, Ordering::Relaxed);
                            tracing::warn!(
                                "FUSE passthrough off for this mount: registering {} as a backing file failed: {e}; reads go through breakfs",
                                path.display()
                            );
                        }
                    },
                    // Evicted since: read (and fetched again) through the daemon.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        for c in &n.chunks {
                            c.forget();
                        }
                        st.whole.remove(&ino);
                    }
                    Err(e) => {
                        tracing::warn!(path = %n.entry.path, "opening its backing file {}: {e}", path.display())
                    }
                },
                // Marked here, written by the caller after the reply.
                Backing::Whole => write_whole = st.writing.insert(ino),
                Backing::No => {}
            }
        }
        *st.daemon_opens.entry(ino).or_default() += 1;
        Answer::Daemon { write_whole }
    }

    /// An open of `ino` with handle `fh` was released.
    pub(crate) fn released(&self, ino: u64, fh: u64) {
        if fh != FH_DAEMON {
            return;
        }
        let mut st = self.state.lock();
        if let Some(c) = st.daemon_opens.get_mut(&ino) {
            *c -= 1;
            if *c == 0 {
                st.daemon_opens.remove(&ino);
            }
        }
    }

    /// Write the whole-file copies of every multi-chunk file whose chunks
    /// are all here (after hydration: the next opens pass through).
    /// Blocking: call on a blocking thread.
    pub(crate) fn write_all_whole(&self, tree: &Tree, store: &ContentStore) {
        if !self.active() {
            return;
        }
        for ino in 1..=tree.inodes() as u64 {
            let Some(n) = tree.node(ino) else { continue };
            if n.chunks.len() < 2 || n.entry.kind != EntryKind::File {
                continue;
            }
            {
                let mut st = self.state.lock();
                if st.whole.contains(&ino) || st.refused.contains(&ino) || !st.writing.insert(ino) {
                    continue;
                }
            }
            self.write_whole(tree, store, ino);
        }
    }

    /// Write the whole-file copy of multi-chunk file `ino` (marked as
    /// being written), and remember it if it checks out.
    fn write_whole(&self, tree: &Tree, store: &ContentStore, ino: u64) {
        let checked = match tree.node(ino) {
            Some(n) if n.chunks.iter().all(|c| c.is_present(store)) => match whole_copy(store, n) {
                Ok(ok) => Some(ok),
                Err(e) => {
                    // Tried again at a later open.
                    tracing::warn!(path = %n.entry.path, "writing its whole-file copy for passthrough: {e}");
                    None
                }
            },
            _ => None,
        };
        let mut st = self.state.lock();
        st.writing.remove(&ino);
        match checked {
            Some(true) => st.whole.insert(ino),
            Some(false) => st.refused.insert(ino),
            None => false,
        };
    }
}

enum Backing {
    /// This file holds exactly the file's bytes.
    Here(PathBuf),
    /// Every chunk is here: a whole-file copy can be written.
    Whole,
    /// Not all here (or nothing to back).
    No,
}

/// Where `n`'s backing file is, if it has one now; `whole`: its whole-file
/// copy checked out in this session (against the chunks the daemon would
/// serve, so a TOC whose file digest lies about its chunks is never
/// passed through).
fn backing(n: &Node, store: &ContentStore, whole: bool) -> Backing {
    if n.entry.kind != EntryKind::File || n.entry.size == 0 {
        return Backing::No;
    }
    match (n.chunks.as_slice(), &n.entry.digest) {
        ([c], _) if c.file_offset == 0 && c.size == n.entry.size => {
            if c.is_present(store) {
                Backing::Here(store.chunk_path(&c.digest))
            } else {
                Backing::No
            }
        }
        ([_, _, ..], Some(d)) if whole => Backing::Here(store.chunk_path(d)),
        ([_, _, ..], Some(_)) if n.chunks.iter().all(|c| c.is_present(store)) => Backing::Whole,
        _ => Backing::No,
    }
}

/// Lay the chunks of `n` end to end into a temp file, check the result
/// against the file's digest, and keep it in the store's chunks under that
/// digest (counted in the budget; a copy already there is checked the
/// same way and kept). Whether it checked out.
fn whole_copy(store: &ContentStore, n: &Node) -> std::io::Result<bool> {
    let Some(want) = &n.entry.digest else {
        return Ok(false);
    };
    let mut pos = 0;
    for c in &n.chunks {
        if c.file_offset != pos {
            return Ok(false);
        }
        pos += c.size;
    }
    if pos != n.entry.size {
        return Ok(false);
    }
    let dest = store.chunk_path(want);
    let exists = dest.is_file();
    let temp = store.temp_path();
    let result = (|| -> std::io::Result<bool> {
        let mut out: HashingWriter<Box<dyn Write>> = HashingWriter::new(if exists {
            Box::new(std::io::sink())
        } else {
            Box::new(BufWriter::with_capacity(1 << 20, File::create(&temp)?))
        });
        for c in &n.chunks {
            let f = File::open(store.chunk_path(&c.digest))?;
            let copied = std::io::copy(&mut f.take(c.size), &mut out)?;
            if copied != c.size {
                return Ok(false);
            }
        }
        let (mut w, got, len) = out.finish();
        w.flush()?;
        drop(w);
        if &got != want || len != n.entry.size {
            tracing::warn!(
                path = %n.entry.path,
                "its chunks hash to {got}, its TOC entry says {want}: not passed through"
            );
            return Ok(false);
        }
        Ok(true)
    })();
    match result {
        Ok(true) if !exists => match store.commit_temp(&temp, &dest) {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                Err(std::io::Error::other(breakfs_index::Causes(&e).to_string()))
            }
        },
        r => {
            let _ = std::fs::remove_file(&temp);
            r
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use breakfs_index::{Digest, Entry};

    use super::*;
    use crate::tree::FileChunk;

    /// A file of `parts` as chunks in `store`, its entry's digest `digest`.
    fn file(store: &ContentStore, parts: &[&[u8]], digest: Digest) -> Node {
        let mut entry = Entry::new("f", EntryKind::File);
        entry.digest = Some(digest);
        let mut chunks = Vec::new();
        let mut off = 0;
        for p in parts {
            let d = Digest::of(p);
            store.put_chunk(&d, p).unwrap();
            let c = FileChunk::new(off, p.len() as u64, d, None);
            off += p.len() as u64;
            chunks.push(c);
        }
        entry.size = off;
        Node {
            entry,
            parent: 1,
            children: Vec::new(),
            nlink: 1,
            chunks,
        }
    }

    #[test]
    fn a_file_of_several_chunks_is_backed_by_its_checked_whole_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let parts: [&[u8]; 3] = [b"first ", b"second ", b"third"];
        let whole = Digest::of(b"first second third");
        let n = file(&store, &parts, whole.clone());
        assert!(matches!(backing(&n, &store, false), Backing::Whole));
        assert!(whole_copy(&store, &n).unwrap());
        assert_eq!(
            std::fs::read(store.chunk_path(&whole)).unwrap(),
            b"first second third"
        );
        match backing(&n, &store, true) {
            Backing::Here(p) => assert_eq!(p, store.chunk_path(&whole)),
            _ => panic!("no backing file once the copy checked out"),
        }
        // A copy already there is checked again, and kept.
        assert!(whole_copy(&store, &n).unwrap());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_toc_whose_file_digest_lies_about_its_chunks_gets_no_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        // The digest of other bytes the store holds: passing through to
        // them would serve what the daemon never would.
        let other = b"other bytes here..".to_vec();
        store.put_chunk(&Digest::of(&other), &other).unwrap();
        let n = file(
            &store,
            &[b"first ", b"second ", b"third"],
            Digest::of(&other),
        );
        assert!(!whole_copy(&store, &n).unwrap());
        assert!(matches!(backing(&n, &store, false), Backing::Whole));
        assert_eq!(
            std::fs::read(store.chunk_path(&Digest::of(&other))).unwrap(),
            other
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_file_of_one_chunk_is_backed_by_its_chunk_file_and_a_missing_one_by_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let n = file(&store, &[b"only chunk"], Digest::of(b"only chunk"));
        match backing(&n, &store, false) {
            Backing::Here(p) => assert_eq!(p, store.chunk_path(&Digest::of(b"only chunk"))),
            _ => panic!("a present one-chunk file has its chunk file"),
        }
        let mut absent = Entry::new("g", EntryKind::File);
        absent.size = 4;
        let missing = Node {
            entry: absent,
            parent: 1,
            children: Vec::new(),
            nlink: 1,
            chunks: vec![FileChunk::new(0, 4, Digest::of(b"gone"), None)],
        };
        assert!(matches!(backing(&missing, &store, false), Backing::No));
    }
}
