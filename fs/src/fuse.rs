//! The FUSE filesystem: metadata from the in-memory [`Tree`], file content
//! from the content store, missing chunks fetched at top priority while the
//! reader waits (bounded by the fetch deadline, then `EIO`).

use parking_lot::Mutex;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use breakfs_fetch::{Fetcher, Priority};
use breakfs_index::EntryKind;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use serde::Serialize;

use crate::passthrough::{FH_DAEMON, Passthrough};
use crate::push::Push;
use crate::tree::{Node, Tree, read_from_store};

/// How long the kernel may cache entries and attributes: an image never changes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Read counters of a mount.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Bytes returned to readers.
    pub bytes_read: AtomicU64,
    /// Reads that had all their chunks already.
    pub reads_local: AtomicU64,
    /// Reads that waited for a fetch.
    pub reads_waited: AtomicU64,
    /// Reads that failed with `EIO`.
    pub reads_failed: AtomicU64,
    /// Opens passed through to a backing file (their reads never come here).
    pub passthrough_opens: AtomicU64,
    /// Files pushed whole into the kernel's page cache (see [`crate::push`]).
    pub pushed_files: AtomicU64,
    /// Bytes pushed into the kernel's page cache.
    pub pushed_bytes: AtomicU64,
    /// Pushes let go: the kernel did not know the inode.
    pub pushes_missed: AtomicU64,
}

/// A snapshot of [`ReadStats`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ReadCounts {
    /// Bytes returned to readers.
    pub bytes_read: u64,
    /// Reads served from the store at once.
    pub reads_local: u64,
    /// Reads that waited for a fetch.
    pub reads_waited: u64,
    /// Reads that failed with `EIO`.
    pub reads_failed: u64,
    /// Opens passed through to a backing file (their reads never come here).
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Files pushed whole into the kernel's page cache ahead of a reader.
    #[serde(default)]
    pub pushed_files: u64,
    /// Bytes pushed into the kernel's page cache.
    #[serde(default)]
    pub pushed_bytes: u64,
    /// Pushes let go: the kernel did not know the inode.
    #[serde(default)]
    pub pushes_missed: u64,
}

impl ReadStats {
    /// The counters now.
    pub fn snapshot(&self) -> ReadCounts {
        ReadCounts {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            reads_local: self.reads_local.load(Ordering::Relaxed),
            reads_waited: self.reads_waited.load(Ordering::Relaxed),
            reads_failed: self.reads_failed.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
            pushed_files: self.pushed_files.load(Ordering::Relaxed),
            pushed_bytes: self.pushed_bytes.load(Ordering::Relaxed),
            pushes_missed: self.pushes_missed.load(Ordering::Relaxed),
        }
    }
}

/// The filesystem served to the kernel.
pub struct ImageFs {
    tree: Arc<Tree>,
    fetcher: Fetcher,
    rt: tokio::runtime::Handle,
    stats: Arc<ReadStats>,
    /// Open chunk files of recently read inodes (bounded).
    open_files: Mutex<OpenFiles>,
    /// The kernel does without open/release (zero-message opens): decided
    /// at INIT, shared so that the mount can hand the decision on with its
    /// connection (a session that takes the connection over sees no INIT).
    no_open: Arc<AtomicBool>,
    /// The kernel does without opendir/releasedir.
    no_opendir: AtomicBool,
    /// Opens of hydrated files passed through to their backing files.
    passthrough: Arc<Passthrough>,
    /// Dependency-aware prefetch, if on.
    deps: Option<Arc<crate::deps::DepPrefetch>>,
    /// Records the first reads of chunks, if on (learned access profiles).
    recorder: Option<Arc<crate::profile::Recorder>>,
    /// Pushes listed files into the kernel's page cache ahead of a reader.
    push: Arc<Push>,
}

impl Drop for ImageFs {
    fn drop(&mut self) {
        self.push.close();
    }
}

/// Files up to this size are fetched whole once a read misses.
const READ_AHEAD_FILE: u64 = 16 << 20;
/// Chunks fetched ahead of a missed read in bigger files.
const READ_AHEAD_CHUNKS: usize = 2;

/// Most inodes whose chunk files stay open at once.
const OPEN_FILES: usize = 1024;
/// Most chunk files they may hold open in all (one descriptor each): 1,024
/// files of 4 MiB chunks could otherwise hold a descriptor per chunk of
/// gigabytes of files.
const OPEN_CHUNK_FILES: usize = 4096;

struct OpenFile {
    ino: u64,
    files: Vec<std::sync::OnceLock<File>>,
}

/// The chunk files of recently read inodes, within [`OPEN_FILES`] inodes
/// and [`OPEN_CHUNK_FILES`] chunk slots: past either, all are let go (reads
/// in flight keep theirs until they end).
#[derive(Default)]
struct OpenFiles {
    files: std::collections::HashMap<u64, Arc<OpenFile>>,
    /// Chunk slots of `files`, each holding a descriptor once read.
    slots: usize,
}

impl OpenFiles {
    /// The chunk files of inode `ino`, which has `chunks` chunks.
    fn get(&mut self, ino: u64, chunks: usize) -> Arc<OpenFile> {
        if let Some(of) = self.files.get(&ino) {
            return of.clone();
        }
        if self.files.len() >= OPEN_FILES || self.slots + chunks > OPEN_CHUNK_FILES {
            self.files.clear();
            self.slots = 0;
        }
        let of = Arc::new(OpenFile {
            ino,
            files: (0..chunks).map(|_| std::sync::OnceLock::new()).collect(),
        });
        self.files.insert(ino, of.clone());
        self.slots += chunks;
        of
    }
}

impl ImageFs {
    /// A filesystem over `tree`, fetching with `fetcher` on runtime `rt`.
    pub fn new(
        tree: Arc<Tree>,
        fetcher: Fetcher,
        rt: tokio::runtime::Handle,
        stats: Arc<ReadStats>,
    ) -> ImageFs {
        ImageFs {
            push: Arc::new(Push::new(tree.clone(), fetcher.clone(), stats.clone())),
            tree,
            fetcher,
            rt,
            stats,
            open_files: Mutex::new(Default::default()),
            no_open: Arc::new(AtomicBool::new(false)),
            no_opendir: AtomicBool::new(false),
            passthrough: Arc::new(Passthrough::new(false)),
            deps: None,
            recorder: None,
        }
    }

    /// Ask the kernel for FUSE passthrough at INIT (a mount whose session
    /// one process serves throughout; see [`crate::passthrough`]).
    pub(crate) fn with_passthrough(mut self, wanted: bool) -> ImageFs {
        self.passthrough = Arc::new(Passthrough::new(wanted));
        self
    }

    /// The mount's passthrough state (hydration writes whole-file copies
    /// through it).
    pub(crate) fn passthrough(&self) -> Arc<Passthrough> {
        self.passthrough.clone()
    }

    /// The mount's page-cache pushing (it needs the connection's descriptor).
    pub(crate) fn push(&self) -> Arc<Push> {
        self.push.clone()
    }

    /// Record first reads with `recorder` (see [`crate::profile`]).
    pub fn with_recorder(mut self, recorder: Option<Arc<crate::profile::Recorder>>) -> ImageFs {
        self.recorder = recorder;
        self
    }

    /// Also fetch what programs will load next when they are first read
    /// (see [`crate::deps`]).
    pub fn with_dependency_prefetch(mut self, on: bool) -> ImageFs {
        self.deps = on.then(Default::default);
        self
    }

    /// Whether the kernel was told to do without opens (set by INIT, or by
    /// [`ImageFs::with_no_open`] for a connection initialized before).
    pub(crate) fn no_open_flag(&self) -> Arc<AtomicBool> {
        self.no_open.clone()
    }

    /// What an earlier session's INIT decided about opens.
    pub(crate) fn with_no_open(self, no_open: bool) -> ImageFs {
        self.no_open.store(no_open, Ordering::Relaxed);
        self.no_opendir.store(no_open, Ordering::Relaxed);
        self
    }

    /// The chunk files of inode `ino` (opened lazily, kept for later reads).
    fn open_file(&self, ino: u64, chunks: usize) -> Arc<OpenFile> {
        self.open_files.lock().get(ino, chunks)
    }

    /// A read missed chunks of a file: ask for the file's other missing
    /// chunks too, at the same priority but without waiting, so a program
    /// that touches a big library in several places waits for one round
    /// trip, not one per place. Files bigger than [`READ_AHEAD_FILE`] get
    /// only the next [`READ_AHEAD_CHUNKS`] chunks.
    fn read_ahead(&self, n: &Node, missing: &[usize]) {
        let Some(&last) = missing.last() else { return };
        let store = self.fetcher.store();
        let wanted: Vec<_> = if n.entry.size <= READ_AHEAD_FILE {
            (0..n.chunks.len()).collect()
        } else {
            (last + 1..n.chunks.len().min(last + 1 + READ_AHEAD_CHUNKS)).collect()
        };
        let locs: Vec<_> = wanted
            .into_iter()
            .filter(|i| !missing.contains(i))
            .filter_map(|i| n.chunks.get(i))
            .filter(|c| !c.is_present(store))
            .filter_map(|c| c.loc.clone())
            .collect();
        for loc in locs {
            let fetcher = self.fetcher.clone();
            self.rt.spawn(async move {
                // Failures show when the chunk is read.
                let _ = fetcher.ensure(&loc, Priority::OnDemand, None).await;
            });
        }
    }

    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        attr(ino, n)
    }

    /// The entries of directory `ino` from listing offset `offset` on:
    /// (the next entry's offset, name, inode, its node), `.` and `..`
    /// first. None when `ino` is no node.
    fn dir_entries(
        &self,
        ino: u64,
        offset: u64,
    ) -> Option<impl Iterator<Item = (u64, &[u8], u64, Option<&Node>)>> {
        let n = self.tree.node(ino)?;
        let dots = [(&b"."[..], ino), (&b".."[..], n.parent)];
        Some(
            dots.into_iter()
                .chain(n.children.iter().map(|(name, i)| (name.as_bytes(), *i)))
                .enumerate()
                .skip(offset as usize)
                .map(|(k, (name, child))| ((k + 1) as u64, name, child, self.tree.node(child))),
        )
    }
}

/// The attributes of inode `ino`.
pub fn attr(ino: u64, n: &Node) -> FileAttr {
    let e = &n.entry;
    let kind = file_type(e.kind);
    let size = match e.kind {
        EntryKind::File => e.size,
        EntryKind::Symlink => e.link.len() as u64,
        EntryKind::Dir => 4096,
        _ => 0,
    };
    let mtime = if e.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(e.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
    };
    let rdev = match e.kind {
        EntryKind::CharDev | EntryKind::BlockDev => makedev(e.dev_major, e.dev_minor),
        _ => 0,
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: (e.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: e.uid,
        gid: e.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn makedev(major: u32, minor: u32) -> u32 {
    // The kernel's new_encode_dev, as FUSE carries a 32-bit rdev.
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn file_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::CharDev => FileType::CharDevice,
        EntryKind::BlockDev => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
    }
}

/// Read `size` bytes at `offset` of an open file from its chunks in the store.
/// The chunks of `n` overlapping `[offset, end)` the store lacks.
fn missing_in(n: &Node, store: &breakfs_fetch::ContentStore, offset: u64, end: u64) -> Vec<usize> {
    n.chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.file_offset < end && c.file_offset + c.size > offset)
        .filter(|(_, c)| !c.is_present(store))
        .map(|(i, _)| i)
        .collect()
}

/// Forget that the chunks of `n` overlapping `[offset, end)` are present.
fn forget_in(n: &Node, offset: u64, end: u64) {
    for c in &n.chunks {
        if c.file_offset < end && c.file_offset + c.size > offset {
            c.forget();
        }
    }
}

fn read_chunks(
    tree: &Tree,
    fetcher: &Fetcher,
    of: &OpenFile,
    offset: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    let node = tree.node(of.ino).ok_or(std::io::ErrorKind::NotFound)?;
    read_from_store(fetcher.store(), node, &of.files, offset, size)
}

impl fuser::Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(
            InitFlags::FUSE_MAX_PAGES
                | InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_ASYNC_READ,
        );
        // Listings carry attributes (`readdirplus`, always: not the
        // kernel's "auto" guess): no lookup per entry listed.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // Hydrated files read by the kernel from their backing files, when
        // asked for (see crate::passthrough): a stacking depth of 1 lets
        // overlayfs (a container's rootfs) still go on top (the kernel
        // allows 2 levels), and needs the store on an unstacked filesystem
        // (else registering fails: no passthrough).
        let passthrough = self.passthrough.wanted()
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
        if passthrough {
            self.passthrough.activate();
            // Reads go to backing files: pushed pages would be a second copy.
            self.push.turn_off();
        } else {
            let _ = config.set_max_stack_depth(0);
        }
        // An image never changes: with zero-message opens the kernel keeps
        // the page cache and sends no open/release per file, so a warm
        // read of a hydrated file reaches no daemon at all (with
        // passthrough every open would be a request). Passthrough needs
        // the opens.
        let no_open = !passthrough
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                .is_ok();
        let no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        self.no_open.store(no_open, Ordering::Relaxed);
        self.no_opendir.store(no_opendir, Ordering::Relaxed);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .tree
            .lookup(parent.0, name.as_bytes())
            .and_then(|ino| self.tree.node(ino).map(|n| (ino, n)))
        {
            Some((ino, n)) => reply.entry(&TTL, &self.attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.node(ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.node(ino.0) {
            Some(n) if n.entry.kind == EntryKind::Symlink => reply.data(n.entry.link.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(n) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.0 & 0o3 != 0 {
            return reply.error(Errno::EROFS);
        }
        if n.entry.kind == EntryKind::Dir {
            return reply.error(Errno::EISDIR);
        }
        if self.no_open.load(Ordering::Relaxed) {
            // Tells the kernel to stop sending opens (it keeps the cache).
            return reply.error(Errno::ENOSYS);
        }
        if self.passthrough.negotiated() {
            let store = self.fetcher.store();
            if self
                .passthrough
                .open(ino.0, &self.tree, store, &self.rt, reply)
            {
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                // Its reads never reach [`Filesystem::read`]: a recording
                // counts the open as a read of the whole file.
                if let Some(r) = &self.recorder {
                    r.note(ino.0, n, 0, n.entry.size);
                }
            }
            return;
        }
        reply.opened(FileHandle(FH_DAEMON), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.passthrough.negotiated() {
            self.passthrough.released(ino.0, fh.0);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let of = self.open_file(ino.0, n.chunks.len());
        if offset == 0 {
            self.push.was_read(ino.0);
        }
        if offset == 0
            && let Some(deps) = &self.deps
            && !deps.seen(ino.0)
        {
            crate::deps::spawn(
                &self.rt,
                self.tree.clone(),
                self.fetcher.clone(),
                deps.clone(),
                ino.0,
            );
        }
        let end = (offset + size as u64).min(n.entry.size);
        if offset >= end {
            return reply.data(&[]);
        }
        if let Some(r) = &self.recorder {
            r.note(ino.0, n, offset, end);
        }
        let store = self.fetcher.store();
        let missing = missing_in(n, store, offset, end);
        if missing.is_empty() {
            match read_chunks(&self.tree, &self.fetcher, &of, offset, size as u64) {
                Ok(b) => {
                    self.stats.reads_local.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_read
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    return reply.data(&b);
                }
                // Evicted since it was seen: fetch it again below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => forget_in(n, offset, end),
                Err(e) => {
                    self.stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %n.entry.path, "reading the store failed: {e}", e = breakfs_index::Causes(&e));
                    return reply.error(Errno::EIO);
                }
            }
        }
        self.stats.reads_waited.fetch_add(1, Ordering::Relaxed);
        // The chunks of the answer stay in the store until it is read,
        // whatever else is fetched meanwhile.
        let pin = store.pin_chunks(
            n.chunks
                .iter()
                .filter(|c| c.file_offset < end && c.file_offset + c.size > offset)
                .map(|c| c.digest.clone()),
        );
        self.read_ahead(n, &missing);
        let waiting = self.recorder.as_ref().map(|r| r.waiting());
        let tree = self.tree.clone();
        let fetcher = self.fetcher.clone();
        let stats = self.stats.clone();
        let ino = ino.0;
        self.rt.spawn(async move {
            let (_pin, _waiting) = (pin, waiting);
            let Some(n) = tree.node(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let deadline = fetcher.options().deadline;
            // A chunk that went away between a look and the read (before
            // the pin) is fetched again (a few rounds at most).
            for _round in 0..3 {
                let missing = missing_in(n, fetcher.store(), offset, end);
                let waits = missing.iter().map(|&i| {
                    let c = &n.chunks[i];
                    let fetcher = &fetcher;
                    async move { c.fetch(fetcher, Priority::OnDemand, Some(deadline)).await }
                });
                if let Err(e) = futures::future::try_join_all(waits).await {
                    stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %n.entry.path, "read failed: {e}", e = breakfs_index::Causes(&e));
                    return reply.error(Errno::EIO);
                }
                let (t, f, o) = (tree.clone(), fetcher.clone(), of.clone());
                let r = tokio::task::spawn_blocking(move || {
                    read_chunks(&t, &f, &o, offset, size as u64)
                })
                .await;
                match r {
                    Ok(Ok(b)) => {
                        stats
                            .bytes_read
                            .fetch_add(b.len() as u64, Ordering::Relaxed);
                        return reply.data(&b);
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                        forget_in(n, offset, end);
                    }
                    Ok(Err(e)) => {
                        stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("reading the store failed: {e}", e = breakfs_index::Causes(&e));
                        return reply.error(Errno::EIO);
                    }
                    Err(e) => {
                        stats.reads_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("read task failed: {e}", e = breakfs_index::Causes(&e));
                        return reply.error(Errno::EIO);
                    }
                }
            }
            stats.reads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(path = %n.entry.path, "its chunks kept being evicted while read");
            reply.error(Errno::EIO)
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only image; ENOSYS makes the kernel
        // stop sending flushes on close.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.node(ino.0) {
            Some(n)
                if n.entry.kind == EntryKind::Dir && self.no_opendir.load(Ordering::Relaxed) =>
            {
                reply.error(Errno::ENOSYS)
            }
            Some(n) if n.entry.kind == EntryKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.dir_entries(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        for (next, name, child, c) in entries {
            let kind = c
                .map(|c| file_type(c.entry.kind))
                .unwrap_or(FileType::Directory);
            if reply.add(INodeNo(child), next, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    /// A directory listing with each entry's attributes: the kernel links
    /// the entries as it lists them, so a walk that opens what it lists
    /// sends no lookup per entry (a cold walk's biggest share of requests).
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.dir_entries(ino.0, offset) else {
            return reply.error(Errno::ENOENT);
        };
        let mut listed = Vec::new();
        for (next, name, child, c) in entries {
            let Some(c) = c else { continue };
            if reply.add(
                INodeNo(child),
                next,
                OsStr::from_bytes(name),
                &TTL,
                &self.attr(child, c),
                Generation(0),
            ) {
                break;
            }
            if c.entry.kind != EntryKind::Dir {
                listed.push(child);
            }
        }
        reply.ok();
        // The kernel's cache of this directory was cold: so, likely, are
        // its files'. Push the hydrated ones ahead of the reader; not while
        // first reads are recorded (a read the page cache serves reaches
        // no recorder).
        if self.recorder.as_ref().is_none_or(|r| r.is_stopped()) {
            self.push.offer(listed);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.tree.file_bytes().div_ceil(4096);
        let files = self.tree.inodes() as u64;
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(value) = name.to_str().and_then(|k| n.entry.xattrs.get(k)) else {
            return reply.error(Errno::NO_XATTR);
        };
        if size == 0 {
            reply.size(value.len() as u32)
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(value)
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for k in n.entry.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if (size as usize) < list.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.tree.node(ino.0) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

/// The current time as seconds since the epoch (for status records).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_chunk_files_stay_within_their_bounds() {
        let mut open = OpenFiles::default();
        // Many files of many chunks: the descriptors they may hold stay
        // bounded (before, 1,024 files of 100 chunks could hold 102,400).
        for ino in 0..5_000u64 {
            open.get(ino, 100);
            assert!(open.slots <= OPEN_CHUNK_FILES, "{} slots", open.slots);
        }
        for ino in 0..5_000u64 {
            open.get(ino, 1);
            assert!(open.files.len() <= OPEN_FILES);
        }
        // A file read again gets the same slots while it is kept.
        let a = open.get(7, 3);
        assert!(Arc::ptr_eq(&a, &open.get(7, 3)));
        assert_eq!(a.files.len(), 3);
    }
}
