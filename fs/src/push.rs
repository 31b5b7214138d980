//! Pushing hydrated files into the kernel's page cache ahead of a reader
//! (`FUSE_NOTIFY_STORE`), so that a cold walk's first reads send no
//! request at all (docs/reads.md).
//!
//! When the kernel asks for a page of a directory's listing
//! (`readdirplus`: its cache of that directory is cold), the regular files
//! that page lists, up to [`FILE_MAX`] each and with every chunk in the
//! store, are queued; a few threads read them from the store and hand
//! their bytes to the kernel, which puts them in the files' page cache. A
//! walker that opens what it lists then finds its pages there, while the
//! store is read on the other core. A file whose chunks are not all in the
//! store is never pushed (nothing is fetched or waited for here); a file
//! evicted from the store since is skipped; one the kernel already caches
//! gets the same bytes again; one the kernel no longer knows (`ENOENT`) is
//! tried once more, then let go.
//!
//! A file whose first read reached breakfs before its push began (the
//! reader overtook the pushing threads) is skipped, so that they catch up.
//!
//! Bounds: [`QUEUE_MAX`] inodes waiting (past it, offers are dropped: a
//! push is a hint), [`THREADS`] threads each holding at most [`PIECE`]
//! bytes. A notification the kernel refuses otherwise (an old or odd
//! kernel) turns pushing off for the mount, logged once; reads are then
//! served as before. `BREAKFS_PUSH=0` in the mounting process's
//! environment turns it off from the start.

use std::collections::{HashSet, VecDeque};
use std::io::{IoSlice, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use breakfs_fetch::Fetcher;
use breakfs_index::EntryKind;
use nix::errno::Errno;
use parking_lot::{Condvar, Mutex};

use crate::fuse::ReadStats;
use crate::tree::{Node, Tree, read_from_store};

/// Files bigger than this are left to the reader (one request per MiB
/// read amortizes well on big files).
const FILE_MAX: u64 = 4 << 20;
/// Bytes of one notification (and of each thread's buffer).
const PIECE: u64 = 1 << 20;
/// Threads reading the store and notifying.
const THREADS: usize = 3;
/// Most inodes waiting to be pushed.
const QUEUE_MAX: usize = 8192;
/// What turns pushing off.
const ENV: &str = "BREAKFS_PUSH";

/// `FUSE_NOTIFY_STORE` (include/uapi/linux/fuse.h).
const FUSE_NOTIFY_STORE: i32 = 4;

/// One inode to push, and whether it is a second try.
#[derive(Clone, Copy)]
struct Job {
    ino: u64,
    retry: bool,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    started: bool,
}

/// The pushing side of a mount.
pub(crate) struct Push {
    tree: Arc<Tree>,
    fetcher: Fetcher,
    stats: Arc<ReadStats>,
    /// The connection's `/dev/fuse` descriptor (set once the session is
    /// made; nothing is pushed before).
    fd: OnceLock<std::fs::File>,
    /// Wanted (not turned off by the environment) and not failed.
    on: AtomicBool,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Files whose first read reached breakfs since they were last offered
    /// (the reader overtook the push: pushing them is work for nothing).
    read: Mutex<HashSet<u64>>,
}

impl Push {
    /// Pushing for a mount of `tree` over `store`, on unless `BREAKFS_PUSH=0`.
    pub(crate) fn new(tree: Arc<Tree>, fetcher: Fetcher, stats: Arc<ReadStats>) -> Push {
        let off = std::env::var(ENV).is_ok_and(|v| v == "0" || v == "off");
        Push {
            tree,
            fetcher,
            stats,
            fd: OnceLock::new(),
            on: AtomicBool::new(!off),
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            read: Mutex::new(HashSet::new()),
        }
    }

    /// The connection to notify on (a duplicate of the session's descriptor).
    pub(crate) fn connect(&self, fd: OwnedFd) {
        let _ = self.fd.set(std::fs::File::from(fd));
    }

    /// Stop: nothing more is pushed (passthrough serves reads from backing
    /// files, where pushed pages would only be a second copy).
    pub(crate) fn turn_off(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    fn active(&self) -> bool {
        self.on.load(Ordering::Relaxed) && self.fd.get().is_some()
    }

    /// Queue the files among `inos` worth pushing (regular, not empty, up
    /// to [`FILE_MAX`], every chunk in the store), starting the threads on
    /// the first call.
    pub(crate) fn offer(self: &Arc<Self>, inos: impl IntoIterator<Item = u64>) {
        if !self.active() {
            return;
        }
        let jobs: Vec<Job> = inos
            .into_iter()
            .filter(|&ino| self.tree.node(ino).is_some_and(|n| self.worth(n)))
            .map(|ino| Job { ino, retry: false })
            .collect();
        if jobs.is_empty() {
            return;
        }
        {
            // Listed again: their pages may be gone since they were read.
            let mut read = self.read.lock();
            for j in &jobs {
                read.remove(&j.ino);
            }
        }
        let mut q = self.queue.lock();
        if q.closed {
            return;
        }
        if !q.started {
            q.started = true;
            for i in 0..THREADS {
                let me = self.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("breakfs-push-{i}"))
                    .spawn(move || me.work());
                if let Err(e) = spawned {
                    tracing::warn!("starting a page-cache push thread: {e}");
                }
            }
        }
        let room = QUEUE_MAX.saturating_sub(q.jobs.len());
        q.jobs.extend(jobs.into_iter().take(room));
        self.ready.notify_all();
    }

    /// The first read of `ino` reached breakfs: a push of it would come
    /// too late.
    pub(crate) fn was_read(&self, ino: u64) {
        if !self.active() {
            return;
        }
        let mut read = self.read.lock();
        if read.len() >= QUEUE_MAX {
            read.clear();
        }
        read.insert(ino);
    }

    /// Whether `n` is a file to push: regular, not empty, small enough, and
    /// all in the store (as far as the tree knows: an eviction since shows
    /// when it is read, and the file is skipped).
    fn worth(&self, n: &Node) -> bool {
        matches!(n.entry.kind, EntryKind::File | EntryKind::Hardlink)
            && n.entry.size > 0
            && n.entry.size <= FILE_MAX
            && !n.chunks.is_empty()
            && n.chunks.iter().all(|c| c.is_present(self.fetcher.store()))
    }

    /// End the threads (the mount's session is over).
    pub(crate) fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        q.jobs.clear();
        self.ready.notify_all();
    }

    /// A thread: push queued files until closed.
    fn work(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock();
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(j) = q.jobs.pop_front() {
                        break j;
                    }
                    self.ready.wait(&mut q);
                }
            };
            if self.active() {
                self.push(job);
            }
        }
    }

    /// Read `job`'s file from the store and hand it to the kernel, a
    /// [`PIECE`] at a time.
    fn push(&self, job: Job) {
        let Some(n) = self.tree.node(job.ino) else {
            return;
        };
        if !self.worth(n) || self.read.lock().contains(&job.ino) {
            return;
        }
        let files: Vec<OnceLock<std::fs::File>> =
            n.chunks.iter().map(|_| OnceLock::new()).collect();
        let mut offset = 0;
        while offset < n.entry.size {
            // Evicted from the store (or unreadable): the reader's own
            // request finds out and fetches; nothing to do here.
            let Ok(bytes) = read_from_store(self.fetcher.store(), n, &files, offset, PIECE) else {
                return;
            };
            match self.notify_store(job.ino, offset, &bytes).map_err(errno) {
                Ok(()) => {}
                Err(Errno::ENOENT) => {
                    // The kernel does not know the inode (yet: the lister
                    // may not have linked its entries; or no more).
                    if !job.retry {
                        let mut q = self.queue.lock();
                        if !q.closed && q.jobs.len() < QUEUE_MAX {
                            q.jobs.push_back(Job { retry: true, ..job });
                        }
                    } else {
                        self.stats.pushes_missed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                // The connection is gone: the mount is ending.
                Err(Errno::ENODEV) => {
                    self.on.store(false, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    if self.on.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "the kernel refused a page-cache push (FUSE_NOTIFY_STORE): {e}; \
                             this mount's files are read through requests, as without it"
                        );
                    }
                    return;
                }
            }
            self.stats
                .pushed_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            offset += bytes.len() as u64;
            if bytes.is_empty() {
                break;
            }
        }
        self.stats.pushed_files.fetch_add(1, Ordering::Relaxed);
    }

    /// `FUSE_NOTIFY_STORE` of `data` at `offset` of inode `ino`: a
    /// `fuse_out_header` (length, the code as its error, unique 0), a
    /// `fuse_notify_store_out` (node id, offset, size, padding), the bytes.
    fn notify_store(&self, ino: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut fd = self.fd.get().ok_or(std::io::ErrorKind::NotConnected)?;
        let size = u32::try_from(data.len()).map_err(std::io::Error::other)?;
        let mut head = [0u8; 16 + 24];
        let len = head.len() + data.len();
        let len32 = u32::try_from(len).map_err(std::io::Error::other)?;
        head[0..4].copy_from_slice(&len32.to_ne_bytes());
        head[4..8].copy_from_slice(&FUSE_NOTIFY_STORE.to_ne_bytes());
        head[16..24].copy_from_slice(&ino.to_ne_bytes());
        head[24..32].copy_from_slice(&offset.to_ne_bytes());
        head[32..36].copy_from_slice(&size.to_ne_bytes());
        // The device takes a message whole, in one write.
        let written = fd.write_vectored(&[IoSlice::new(&head), IoSlice::new(data)])?;
        if written != len {
            return Err(std::io::Error::other("a short write of a notification"));
        }
        Ok(())
    }
}

/// The errno of `e` (`ENODEV` when it carries none: the descriptor is not
/// there to write on).
fn errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::ENODEV, Errno::from_raw)
}
