//! Mounting an opened image: checks on the mountpoint, the FUSE session,
//! background hydration, and the status record `breakfs status` reads.
//! A mount's FUSE connection can outlive the process serving it: one made
//! by [`mount_resumable`] hands out its `/dev/fuse` descriptor, and
//! [`resume`] serves such a connection in a later process (see
//! docs/restarts.md).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use breakfs_fetch::{FetchStats, Fetcher, Priority};
use breakfs_index::Descriptor;
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::fuse::{ImageFs, ReadCounts, ReadStats, now_secs};
use crate::image::{LayerMode, OpenedImage};
use crate::passthrough::Passthrough;
use crate::profile::Recorder;
use crate::push::Push;
use crate::tree::Tree;
use crate::{Error, Result};

/// How a mount behaves.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Fetch the whole image in the background after mounting.
    pub hydrate: bool,
    /// FUSE request threads.
    pub threads: usize,
    /// Fetch a program's interpreter and libraries when it is first read.
    pub dependency_prefetch: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            hydrate: true,
            threads: 4,
            dependency_prefetch: true,
        }
    }
}

/// Progress of background hydration.
#[derive(Debug, Default)]
pub struct Hydration {
    /// Content bytes of all distinct chunks.
    pub total_bytes: AtomicU64,
    /// Of those, bytes in the store.
    pub present_bytes: AtomicU64,
    /// Every chunk is in the store.
    pub done: AtomicBool,
}

/// A live mount; dropping it unmounts (but for a resumed one: see [`resume`]).
pub struct Mounted {
    session: Option<BackgroundSession>,
    /// Its session took over a connection another process initialized:
    /// fuser holds no mount to undo, so unmounting goes by path.
    resumed: bool,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The image's tree.
    pub tree: Arc<Tree>,
    /// The fetcher serving it.
    pub fetcher: Fetcher,
    /// Read counters.
    pub reads: Arc<ReadStats>,
    /// Hydration progress.
    pub hydration: Arc<Hydration>,
    /// The first reads of its chunks (`None` for a resumed mount, whose
    /// reads are no start-up).
    pub recorder: Option<Arc<Recorder>>,
    /// What `breakfs status` shows, less the counters.
    pub info: StatusRecord,
    /// Its layers, counted live in the budget until the session ends.
    _pin: Option<breakfs_fetch::budget::LivePin>,
}

/// What a mount reports about itself (JSON in the status file).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The node daemon serving the mount (`unix:PATH` or `http://...`), if
    /// a daemon serves it rather than a mount process of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The image reference.
    pub image: String,
    /// The manifest digest.
    pub manifest: String,
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// The content store.
    pub cache: PathBuf,
    /// The mount process.
    pub pid: u32,
    /// When it was mounted (seconds since the epoch).
    pub started: u64,
    /// When this record was written.
    pub updated: u64,
    /// Paths in the tree.
    pub paths: usize,
    /// Content bytes of the image's files.
    pub file_bytes: u64,
    /// Layers served lazily (eStargz) and whole.
    pub lazy_layers: usize,
    /// Layers fetched whole.
    pub whole_layers: usize,
    /// Lazy layers whose eStargz prefetch landmark marks a region fetched
    /// at mount.
    #[serde(default)]
    pub landmarked_layers: usize,
    /// Distinct chunk bytes in the store.
    pub hydrated_bytes: u64,
    /// Distinct chunk bytes of the image.
    pub chunk_bytes: u64,
    /// Whether every chunk is in the store.
    pub hydrated: bool,
    /// Read counters.
    pub reads: ReadCounts,
    /// Fetch counters, by source.
    pub fetch: FetchStats,
}

/// Check that `mountpoint` can take a mount: an existing, empty-or-not
/// directory that is not already a mountpoint.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let err = |reason: String| Error::Mountpoint {
        mountpoint: mountpoint.to_path_buf(),
        reason,
    };
    if mountpoint.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(err(
            "the path holds a NUL byte, which no path can hold".into()
        ));
    }
    let meta = std::fs::metadata(mountpoint).map_err(|e| {
        if e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32) {
            // A FUSE mount whose process was killed answers nothing.
            return err(format!(
                "a mount whose process died is still there ({e}); \
                 `breakfs umount {}` detaches it",
                mountpoint.display()
            ));
        }
        err(format!(
            "{e}; create the directory first (mkdir -p {})",
            mountpoint.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(err("it is not a directory".into()));
    }
    let abs = mountpoint
        .canonicalize()
        .map_err(|e| err(format!("cannot resolve it: {e}")))?;
    if let Some((fstype, device)) = mount_type(&abs) {
        // Only a breakfs mount is breakfs' to unmount; anything else is
        // left alone, and the advice must not point at it.
        return Err(err(if is_breakfs_type(&fstype, &device) {
            format!(
                "breakfs' mount of {} is already mounted there; unmount it first \
                 (breakfs umount {})",
                device.trim_start_matches("breakfs:"),
                abs.display()
            )
        } else {
            format!(
                "{device} ({fstype}) is already mounted there; breakfs mounts only where \
                 nothing is mounted (give another directory)"
            )
        }));
    }
    Ok(abs)
}

/// Whether `abs` (canonical) is a mountpoint, per /proc/self/mountinfo.
pub fn is_mountpoint(abs: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = abs.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape_mountinfo(m) == want)
    })
}

/// The file-system type and source of the topmost mount at `abs`
/// (canonical), per /proc/self/mountinfo; `None` if nothing is mounted.
pub fn mount_type(abs: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = abs.to_string_lossy();
    // Later lines are mounted later: the last match is on top.
    info.lines()
        .rev()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape_mountinfo(m) == want)
        })
        .filter_map(|l| {
            // After the optional fields: " - FSTYPE SOURCE SUPER_OPTIONS".
            let (_, tail) = l.split_once(" - ")?;
            let mut f = tail.split(' ');
            Some((unescape_mountinfo(f.next()?), unescape_mountinfo(f.next()?)))
        })
        .next()
}

/// Whether a mount of `fstype` from `device` (see [`mount_type`]) is one
/// breakfs made: FUSE with its subtype, or its `breakfs:REF` source.
pub fn is_breakfs_type(fstype: &str, device: &str) -> bool {
    fstype == "fuse.breakfs" || (fstype.starts_with("fuse") && device.starts_with("breakfs:"))
}

fn unescape_mountinfo(s: &str) -> String {
    // Spaces, tabs, newlines and backslashes come as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mount's FUSE connection as another process needs it to serve the
/// mount on ([`resume`]): the `/dev/fuse` descriptor, and what the
/// connection's INIT decided that the filesystem must know.
#[derive(Debug)]
pub struct FuseConnection {
    /// The `/dev/fuse` descriptor (a duplicate: the same connection).
    pub fd: OwnedFd,
    /// The kernel was told to do without opens.
    pub no_open: bool,
}

/// Mount `opened` on `mountpoint` (checked first) and start hydration.
/// Must run inside a tokio runtime.
pub fn mount(opened: OpenedImage, mountpoint: &Path, opts: &MountOptions) -> Result<Mounted> {
    let abs = check_mountpoint(mountpoint)?;
    let reads = Arc::new(ReadStats::default());
    let recorder = Arc::new(Recorder::new(&opened.tree));
    let fs = image_fs(&opened, opts, reads.clone(), false).with_recorder(Some(recorder.clone()));
    let passthrough = fs.passthrough();
    let push = fs.push();
    let session = Session::new(fs, &abs, &fuse_config(&opened, opts, false))
        .map_err(|e| mount_failed(&abs, e))?;
    connect_push(&push, session.as_fd());
    let session = session.spawn().map_err(|e| mount_failed(&abs, e))?;
    let mut m = serving(opened, abs, opts, session, reads, passthrough, false);
    m.recorder = Some(recorder);
    Ok(m)
}

/// [`mount`], handing out the mount's FUSE connection besides: a process
/// that holds the descriptor keeps the connection, and the requests on it,
/// alive when this process ends, for a later one to [`resume`] serving.
/// All the session's threads read the one descriptor (no cloned ones: the
/// kernel fails the requests a cloned descriptor had taken when it closes,
/// where those on a descriptor still held elsewhere wait to be resent).
pub fn mount_resumable(
    opened: OpenedImage,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(Mounted, FuseConnection)> {
    let abs = check_mountpoint(mountpoint)?;
    let reads = Arc::new(ReadStats::default());
    let recorder = Arc::new(Recorder::new(&opened.tree));
    let fs = image_fs(&opened, opts, reads.clone(), true).with_recorder(Some(recorder.clone()));
    let passthrough = fs.passthrough();
    let no_open = fs.no_open_flag();
    let push = fs.push();
    let session = Session::new(fs, &abs, &fuse_config(&opened, opts, true))
        .map_err(|e| mount_failed(&abs, e))?;
    connect_push(&push, session.as_fd());
    // INIT is done: the decisions are made and the descriptor is live.
    let fd = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("duplicating the FUSE descriptor", e))?;
    let conn = FuseConnection {
        fd,
        no_open: no_open.load(Ordering::Relaxed),
    };
    let session = session.spawn().map_err(|e| mount_failed(&abs, e))?;
    let mut m = serving(opened, abs, opts, session, reads, passthrough, false);
    m.recorder = Some(recorder);
    Ok((m, conn))
}

/// Serve `conn`, the live connection of a mount at `mountpoint` that an
/// earlier process made with [`mount_resumable`], over `opened`, the same
/// image opened again (its inode numbers are the same: the kernel holds
/// them). The kernel first resends the requests the earlier process took
/// and never answered (`FUSE_NOTIFY_RESEND`, Linux 6.9), so a reader
/// waiting on one when that process died gets its answer from this one.
/// The mount itself is the kernel's: dropping the result unmounts nothing.
/// Must run inside a tokio runtime.
pub fn resume(
    opened: OpenedImage,
    conn: FuseConnection,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mounted> {
    let abs = mountpoint.to_path_buf();
    let reads = Arc::new(ReadStats::default());
    let fs = image_fs(&opened, opts, reads.clone(), true).with_no_open(conn.no_open);
    let passthrough = fs.passthrough();
    connect_push(&fs.push(), conn.fd.as_fd());
    if let Err(e) = resend(&conn.fd) {
        tracing::warn!(
            "asking the kernel to resend the requests of {}'s previous server: {e}; \
             a reader waiting on one of them when it stopped stays waiting (Linux 6.9 \
             or later resends)",
            abs.display()
        );
    }
    let session = Session::from_initialized_fd(
        fs,
        conn.fd,
        SessionACL::All,
        fuse_config(&opened, opts, true),
    )
    .spawn()
    .map_err(|e| mount_failed(&abs, e))?;
    Ok(serving(
        opened,
        abs,
        opts,
        session,
        reads,
        passthrough,
        true,
    ))
}

/// `FUSE_NOTIFY_RESEND`: the kernel puts every request it sent on the
/// connection and has no answer for back in the queue, to be read again.
fn resend(fd: &OwnedFd) -> nix::Result<usize> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { len: u32, error: i32, unique: u64 }: a
    // notification carries its code as the error, unique 0, and this one
    // no payload.
    let mut msg = [0u8; 16];
    msg[..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    nix::unistd::write(fd, &msg)
}

/// Give the mount's page-cache pushing its own descriptor of the
/// connection; without one (no descriptor to spare) it pushes nothing.
fn connect_push(push: &Push, fd: BorrowedFd<'_>) {
    match fd.try_clone_to_owned() {
        Ok(fd) => push.connect(fd),
        Err(e) => tracing::warn!("no descriptor for page-cache pushes: {e}"),
    }
}

fn mount_failed(abs: &Path, e: std::io::Error) -> Error {
    Error::Mountpoint {
        mountpoint: abs.to_path_buf(),
        reason: format!("the FUSE mount failed: {e} (is /dev/fuse there, and are you root?)"),
    }
}

/// The filesystem of a mount; a `resumable` one gets no passthrough: a
/// later process serving its connection would not know the backing ids
/// the kernel holds (see docs/reads.md).
fn image_fs(
    opened: &OpenedImage,
    opts: &MountOptions,
    reads: Arc<ReadStats>,
    resumable: bool,
) -> ImageFs {
    ImageFs::new(
        opened.tree.clone(),
        opened.fetcher.clone(),
        tokio::runtime::Handle::current(),
        reads,
    )
    .with_dependency_prefetch(opts.dependency_prefetch)
    .with_passthrough(!resumable)
}

fn fuse_config(opened: &OpenedImage, opts: &MountOptions, resumable: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("breakfs:{}", opened.image.reference)),
        MountOption::Subtype("breakfs".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::Exec,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = !resumable;
    config
}

/// The mount served by `session`: start hydration, make the status record.
fn serving(
    opened: OpenedImage,
    abs: PathBuf,
    opts: &MountOptions,
    session: BackgroundSession,
    reads: Arc<ReadStats>,
    passthrough: Arc<Passthrough>,
    resumed: bool,
) -> Mounted {
    let hydration = Arc::new(Hydration::default());
    let chunk_bytes: u64 = opened.tree.fetchable_chunks().iter().map(|c| c.size).sum();
    hydration.total_bytes.store(chunk_bytes, Ordering::Relaxed);
    let store = opened.fetcher.store().clone();
    let info = StatusRecord {
        image: opened.image.reference.to_string(),
        manifest: opened.image.manifest_digest.to_string(),
        mountpoint: abs.clone(),
        cache: store.root().to_path_buf(),
        pid: std::process::id(),
        started: now_secs(),
        paths: opened.tree.paths(),
        file_bytes: opened.tree.file_bytes(),
        lazy_layers: opened
            .layers
            .iter()
            .filter(|m| **m == LayerMode::Lazy)
            .count(),
        whole_layers: opened
            .layers
            .iter()
            .filter(|m| **m == LayerMode::Whole)
            .count(),
        landmarked_layers: opened.regions.len(),
        chunk_bytes,
        ..StatusRecord::default()
    };
    let tree = opened.tree.clone();
    let fetcher = opened.fetcher.clone();
    // The files an eStargz layer's landmark puts first, at once.
    fetcher.spawn_regions(opened.regions.clone());
    {
        let (tree, fetcher, hydration) = (tree.clone(), fetcher.clone(), hydration.clone());
        let enabled = opts.hydrate;
        let lazy: Vec<Descriptor> = opened
            .image
            .layers()
            .iter()
            .zip(&opened.layers)
            .filter(|(_, m)| **m == LayerMode::Lazy)
            .map(|(d, _)| d.clone())
            .collect();
        tokio::spawn(
            async move { hydrate(tree, fetcher, hydration, enabled, lazy, passthrough).await },
        );
    }
    Mounted {
        session: Some(session),
        resumed,
        mountpoint: abs,
        tree,
        fetcher,
        reads,
        hydration,
        recorder: None,
        info,
        _pin: opened.pin,
    }
}

/// Fetch every chunk not in the store at background priority, retrying
/// failures until all are there; with `enabled` false only count. A node
/// (which keeps ranges for peers) then makes each lazy layer a whole blob.
async fn hydrate(
    tree: Arc<Tree>,
    fetcher: Fetcher,
    h: Arc<Hydration>,
    enabled: bool,
    lazy: Vec<Descriptor>,
    passthrough: Arc<Passthrough>,
) {
    let store = fetcher.store().clone();
    loop {
        let chunks = tree.fetchable_chunks();
        let present: u64 = chunks
            .iter()
            .filter(|c| c.is_present(&store))
            .map(|c| c.size)
            .sum();
        h.present_bytes.store(present, Ordering::Relaxed);
        let missing: Vec<_> = chunks
            .into_iter()
            .filter(|c| !c.is_present(&store) && c.loc.is_some())
            .collect();
        if missing.is_empty() {
            // Big files' backing files before "hydrated": reads after it
            // pass through from their first open.
            let (t, s) = (tree.clone(), store.clone());
            let _ = tokio::task::spawn_blocking(move || passthrough.write_all_whole(&t, &s)).await;
            h.done.store(true, Ordering::Relaxed);
            if enabled && fetcher.options().keep_ranges {
                for desc in &lazy {
                    if let Err(e) = fetcher.complete_layer(desc).await {
                        tracing::warn!(layer = %desc.digest, "keeping the whole layer failed: {e}", e = breakfs_index::Causes(&e));
                    }
                }
            }
            return;
        }
        if !enabled {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let mut waits: futures::stream::FuturesUnordered<_> = missing
            .iter()
            .filter_map(|c| c.loc.as_ref().map(|loc| (c, loc)))
            .map(|(c, loc)| {
                let fetcher = &fetcher;
                async move {
                    let r = fetcher.ensure(loc, Priority::Background, None).await;
                    (c, r)
                }
            })
            .collect();
        let mut failed = 0usize;
        while let Some((c, r)) = waits.next().await {
            match r {
                Ok(()) => {
                    c.mark_present();
                    h.present_bytes.fetch_add(c.size, Ordering::Relaxed);
                }
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            tracing::warn!("hydration: {failed} chunks failed, retrying in 5 s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

impl Mounted {
    /// The status record with current counters.
    pub fn status(&self) -> StatusRecord {
        let mut s = self.info.clone();
        s.updated = now_secs();
        s.hydrated_bytes = self.hydration.present_bytes.load(Ordering::Relaxed);
        s.hydrated = self.hydration.done.load(Ordering::Relaxed);
        s.reads = self.reads.snapshot();
        s.fetch = self.fetcher.stats();
        s
    }

    /// Wait until the kernel ends the session: after the mountpoint was
    /// unmounted, that is when the last user of the filesystem (an overlay
    /// that has it as a lower layer, a lazily detached reader) lets go.
    pub fn wait(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.join().map_err(|e| Error::Mountpoint {
                mountpoint: self.mountpoint.clone(),
                reason: format!("the FUSE session ended with an error: {e}"),
            })?;
        }
        Ok(())
    }

    /// Whether the FUSE session has ended while this mount was still
    /// meant to serve (nobody unmounted it through this handle): then the
    /// reason, once (the kernel aborted the connection, or its request
    /// threads stopped on an error). Readers get `ENOTCONN` from then on.
    pub fn ended(&mut self) -> Option<String> {
        if !self.session.as_ref()?.guard.is_finished() {
            return None;
        }
        let s = self.session.take()?;
        Some(match s.join() {
            Ok(()) => "the kernel ended the session (unmounted or aborted from outside)".into(),
            Err(e) => format!("the session stopped: {e}"),
        })
    }

    /// Let the process end without unmounting: the mount's connection
    /// lives on where its descriptor is held ([`mount_resumable`]), for a
    /// later process to [`resume`].
    pub fn leave(mut self) {
        if let Some(s) = self.session.take() {
            // Dropping it would unmount; the process is ending anyway.
            std::mem::forget(s);
        }
    }

    /// Unmount (also done on drop, but for a resumed mount).
    pub fn unmount(mut self) -> Result<()> {
        if self.resumed
            && self.session.is_some()
            && let Err(e) = nix::mount::umount(&self.mountpoint)
            && e != nix::errno::Errno::EINVAL
        {
            // EINVAL: not mounted (any more); the session ends by itself.
            return Err(Error::Mountpoint {
                mountpoint: self.mountpoint.clone(),
                reason: format!("unmounting failed: {e}"),
            });
        }
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(|e| Error::Mountpoint {
                mountpoint: self.mountpoint.clone(),
                reason: format!("unmounting failed: {e}"),
            })?;
        }
        Ok(())
    }
}

/// Where the status record of the mount at `mountpoint` (canonical) lives.
pub fn status_path(mountpoint: &Path) -> PathBuf {
    let key = breakfs_index::Digest::of(mountpoint.to_string_lossy().as_bytes());
    status_dir().join(format!("{}.json", &key.hex()[..16]))
}

/// The directory of status records (`$BREAKFS_RUN_DIR`, else `/run/breakfs/mounts`).
pub fn status_dir() -> PathBuf {
    std::env::var_os("BREAKFS_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/breakfs/mounts"))
}

/// Write a status record atomically.
pub fn write_status(rec: &StatusRecord) -> Result<()> {
    let path = status_path(&rec.mountpoint);
    let dir = status_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let json = serde_json::to_vec_pretty(rec).map_err(|e| Error::BadImage {
        what: "status record".into(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, json).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The status record of the mount at `mountpoint`.
pub fn read_status(mountpoint: &Path) -> Result<StatusRecord> {
    let abs = mountpoint
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", mountpoint.display()), e))?;
    let path = status_path(&abs);
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::io(
            format!(
                "{} is not a breakfs mount of this machine (its status record {} is missing)",
                abs.display(),
                path.display()
            ),
            e,
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadImage {
        what: format!("status record {}", path.display()),
        reason: e.to_string(),
    })
}

/// Remove the status record of a mount.
pub fn remove_status(mountpoint: &Path) {
    let _ = std::fs::remove_file(status_path(mountpoint));
}
