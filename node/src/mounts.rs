//! The mounts a node daemon serves: mounting an image through the node's
//! fetch chain (its layers pinned live in the budget), unmounting one, the
//! status records written each second, and the mounts' metrics. With a
//! mount holder ([`crate::holder`]), every mount's FUSE connection is
//! handed to it, so that the mount outlives this process: a daemon stops
//! leaving its mounts to the holder, and a starting one takes them back
//! ([`NodeService::resume_held`]) and serves them on.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use breakfs_fs::{FuseConnection, MountOptions, Mounted, OpenedImage, StatusRecord};
use breakfs_index::{Digest, ImageRef, Reference};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::control::MountRequest;
use crate::holder::{HeldConnection, HolderClient};
use crate::lifecycle::{end_session, mount_and_probe, probe, unmount_path};
use crate::metrics::PromText;
use crate::server::NodeService;
use crate::{Error, Result};

/// A mount the daemon serves.
struct NodeMount {
    m: Mounted,
    /// Its layers, and whether each was indexed whole.
    layers: Vec<(Digest, bool)>,
    /// Bytes read as of the last status tick.
    reads_seen: AtomicU64,
    /// The holder keeps its connection: it outlives this process.
    held: bool,
}

/// The mounts by mountpoint, and how clients reach their daemon.
pub(crate) struct MountTable {
    mounts: Mutex<BTreeMap<PathBuf, NodeMount>>,
    /// How clients reach the control API (`unix:PATH`).
    control: String,
    /// The mount holder, when mounts outlive the daemon process.
    holder: OnceLock<HolderClient>,
    /// Mounts the holder gave back that are not served again yet.
    resuming: Mutex<BTreeSet<PathBuf>>,
}

/// What a daemon mount was made from: how a later daemon process opens the
/// same tree again (the same inode numbers: the kernel holds them) to
/// serve the mount's connection on. Every kind of daemon mount has its
/// variant here and its arm in [`Source::open`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Source {
    /// A whole image (`POST /mounts`): the reference as asked and the
    /// manifest digest it resolved to.
    Image {
        /// The reference as asked.
        image: String,
        /// The manifest it resolved to.
        manifest: String,
    },
    /// One layer of an image alone, in overlayfs' form (a lazy lower dir
    /// of the containerd snapshotter): the image pinned to its manifest.
    Layer {
        /// The image, by digest.
        image: String,
        /// The layer's digest.
        layer: String,
    },
}

impl Source {
    /// Open the tree again, exactly as it was mounted.
    async fn open(&self, svc: &NodeService) -> Result<OpenedImage> {
        match self {
            Source::Image { image, manifest } => {
                let mut reference = ImageRef::parse(image)?;
                let digest = Digest::parse(manifest)?;
                // A tag may have moved since: the manifest is what was mounted.
                if let ImageRef::Registry { reference: r, .. } = &mut reference {
                    *r = Reference::Digest(digest.clone());
                }
                let opened =
                    breakfs_fs::open_image_on(&reference, &svc.client, &svc.fetcher, &svc.cloud)
                        .await?;
                if opened.image.manifest_digest != digest {
                    return Err(Error::Control(format!(
                        "{image} is now {}, not {manifest} as mounted",
                        opened.image.manifest_digest
                    )));
                }
                Ok(opened)
            }
            Source::Layer { image, layer } => {
                let reference = ImageRef::parse(image)?;
                let layer = Digest::parse(layer)?;
                let resolved =
                    breakfs_fetch::resolve_image(&reference, &svc.client, &svc.fetcher, &svc.cloud)
                        .await?;
                breakfs_fs::open_layer(resolved, &layer, &svc.fetcher)
                    .await?
                    .ok_or_else(|| {
                        Error::Control(format!("layer {layer} of {image} has no TOC any more"))
                    })
            }
        }
    }

    /// What `breakfs status` calls it.
    fn name(&self) -> &str {
        match self {
            Source::Image { image, .. } | Source::Layer { image, .. } => image,
        }
    }
}

/// What the holder keeps with a mount's connection for the next daemon.
#[derive(Serialize, Deserialize)]
struct HeldMount {
    source: Source,
    hydrate: bool,
    threads: usize,
    dependency_prefetch: bool,
    /// What the connection's INIT decided.
    no_open: bool,
    /// When it was first mounted.
    started: u64,
}

impl MountTable {
    /// No mounts yet; clients reach the daemon at `control`.
    pub(crate) fn new(control: String) -> MountTable {
        MountTable {
            mounts: Mutex::new(BTreeMap::new()),
            control,
            holder: OnceLock::new(),
            resuming: Mutex::new(BTreeSet::new()),
        }
    }

    /// Hand every mount's connection to `holder` from now on.
    pub(crate) fn set_holder(&self, holder: HolderClient) {
        let _ = self.holder.set(holder);
    }

    /// Whether the daemon serves a mount at `abs` (canonical), or is about
    /// to serve it again (the holder kept it through a restart).
    pub(crate) fn serves(&self, abs: &Path) -> bool {
        self.mounts.lock().contains_key(abs) || self.resuming.lock().contains(abs)
    }

    /// The status records of all mounts.
    pub(crate) fn list(&self) -> Vec<StatusRecord> {
        self.mounts
            .lock()
            .values()
            .map(|m| self.record(&m.m))
            .collect()
    }

    fn record(&self, m: &Mounted) -> StatusRecord {
        let mut r = m.status();
        r.node = Some(self.control.clone());
        r
    }

    /// The mount count and each mount's hydration, for `GET /metrics`.
    pub(crate) fn metrics(&self, p: &mut PromText) {
        let recs: Vec<StatusRecord> = self.mounts.lock().values().map(|m| m.m.status()).collect();
        p.family("breakfs_mounts", "gauge", "Mounts this node serves.");
        p.sample("breakfs_mounts", &[], recs.len() as f64);
        p.family(
            "breakfs_mount_hydration_ratio",
            "gauge",
            "Share of a mount's file bytes held locally (1 = fully hydrated).",
        );
        for r in &recs {
            let ratio = if r.chunk_bytes == 0 {
                1.0
            } else {
                r.hydrated_bytes as f64 / r.chunk_bytes as f64
            };
            let mp = r.mountpoint.to_string_lossy();
            p.sample(
                "breakfs_mount_hydration_ratio",
                &[("mountpoint", &mp), ("image", &r.image)],
                ratio,
            );
        }
    }
}

impl NodeService {
    /// Mount `req.image` at `req.mountpoint` through the node's chain.
    pub(crate) async fn mount(&self, req: MountRequest) -> Result<StatusRecord> {
        if !req.mountpoint.is_absolute() {
            // It would resolve from the daemon's working directory, not the
            // caller's (`breakfs mount --node` sends absolute paths).
            return Err(breakfs_fs::Error::Mountpoint {
                mountpoint: req.mountpoint,
                reason: "a mount request needs an absolute path: the node daemon's working \
                         directory is not the caller's"
                    .into(),
            }
            .into());
        }
        let abs = breakfs_fs::check_mountpoint(&req.mountpoint)?;
        let reference = ImageRef::parse(&req.image)?;
        let began = std::time::Instant::now();
        let mut image =
            breakfs_fetch::resolve_image(&reference, &self.client, &self.fetcher, &self.cloud)
                .await?;
        let resolved = began.elapsed();
        // The profile is looked up meanwhile; its chunks are fetched layer
        // by layer as the TOCs come in.
        let prefetch = self.profile_prefetch(&image.manifest_digest);
        prefetch
            .hint_tocs(&mut image, crate::profile::TOC_HINT_WAIT)
            .await;
        let seen = |layer: &Digest, files: &[breakfs_fs::LayerFile]| prefetch.layer(layer, files);
        let opened = breakfs_fs::open_resolved(image, &self.fetcher, Some(&seen))
            .await
            .inspect_err(|_| prefetch.abort())?;
        let opened_in = began.elapsed();
        crate::profile::log_prefetch(prefetch, opened.image.manifest_digest.clone());
        let (image, tree) = (opened.image.manifest_digest.clone(), opened.tree.clone());
        let layers = opened.image.manifest.layers.clone();
        let opts = MountOptions {
            hydrate: req.hydrate,
            threads: req.threads.unwrap_or(4),
            dependency_prefetch: req.dependency_prefetch,
        };
        let source = Source::Image {
            image: opened.image.reference.to_string(),
            manifest: opened.image.manifest_digest.to_string(),
        };
        let rec = self.add_mount(abs.clone(), source, opened, opts).await?;
        tracing::info!(
            image = %req.image,
            "resolved in {resolved:?}, opened in {opened_in:?}, mounted in {:?}",
            began.elapsed()
        );
        if let Some(r) = self.recorder_of(&abs) {
            crate::profile::record(self.store.clone(), image, layers, tree, r);
        }
        eprintln!(
            "breakfs node: mounted {} at {}",
            req.image,
            rec.mountpoint.display()
        );
        Ok(rec)
    }

    /// Mount `opened` (made from `source`) at `abs` (checked) and serve it
    /// as one of the daemon's mounts: its layers live in the budget, and
    /// with a holder its connection outlives this process. Every daemon
    /// mount comes through here.
    pub(crate) async fn add_mount(
        &self,
        abs: PathBuf,
        source: Source,
        opened: OpenedImage,
        opts: MountOptions,
    ) -> Result<StatusRecord> {
        let layers = layers_of(&opened);
        let control = Some(self.mounts.control.clone());
        let Some(holder) = self.mounts.holder.get() else {
            self.pin_live(&layers, 1);
            let (mounted, rec) = mount_and_probe(opened, &abs, &opts, control)
                .await
                .inspect_err(|_| self.pin_live(&layers, -1))?;
            self.insert(abs, mounted, layers, false);
            return Ok(rec);
        };
        // The mount and its FUSE handshake block: off the runtime's threads,
        // so that many mounts (an image's layers) are made side by side.
        let (mounted, conn) = {
            let (abs, opts) = (abs.clone(), opts.clone());
            tokio::task::spawn_blocking(move || breakfs_fs::mount_resumable(opened, &abs, &opts))
                .await
                .map_err(|e| Error::Control(format!("the mount task failed: {e}")))??
        };
        self.pin_live(&layers, 1);
        let (mounted, rec) = probe(mounted, &abs, control)
            .await
            .inspect_err(|_| self.pin_live(&layers, -1))?;
        let held = HeldMount {
            source,
            hydrate: opts.hydrate,
            threads: opts.threads,
            dependency_prefetch: opts.dependency_prefetch,
            no_open: conn.no_open,
            started: rec.started,
        };
        let held = match serde_json::to_value(&held) {
            Ok(meta) => holder.hold(&abs, meta, conn.fd.as_fd()),
            Err(e) => Err(Error::Control(format!("describing the mount: {e}"))),
        };
        if let Err(e) = &held {
            tracing::warn!(
                "{}: the mount at {} will not outlive this daemon",
                breakfs_index::Causes(e),
                abs.display()
            );
        }
        self.insert(abs, mounted, layers, held.is_ok());
        Ok(rec)
    }

    /// The first-read recorder of the mount at `abs`.
    fn recorder_of(&self, abs: &Path) -> Option<std::sync::Arc<breakfs_fs::profile::Recorder>> {
        self.mounts.mounts.lock().get(abs)?.m.recorder.clone()
    }

    /// Count the layers of a mount as live (`delta` 1) in the budget, or
    /// give them back (-1: the mount failed).
    fn pin_live(&self, layers: &[(Digest, bool)], delta: i32) {
        if let Some(b) = self.store.budget() {
            if delta > 0 {
                b.touch(layers.iter().map(|(d, _)| d));
            }
            b.live(layers.iter().map(|(d, w)| (d, *w)), delta);
        }
    }

    fn insert(&self, abs: PathBuf, m: Mounted, layers: Vec<(Digest, bool)>, held: bool) {
        self.mounts.mounts.lock().insert(
            abs,
            NodeMount {
                m,
                layers,
                reads_seen: AtomicU64::new(0),
                held,
            },
        );
    }

    /// Serve the mounts the holder kept for this daemon (from a daemon
    /// process that stopped or died), each in the background: open its
    /// tree again, have the kernel resend what the dead process left
    /// unanswered, and serve on. Readers wait meanwhile (their requests
    /// queue in the kernel). A mount that cannot be opened again within
    /// `give_up` is unmounted, as the holder would without a daemon.
    pub(crate) fn resume_held(
        self: &std::sync::Arc<Self>,
        held: Vec<HeldConnection>,
        give_up: Duration,
        stop: CancellationToken,
    ) {
        for (abs, meta, fd) in held {
            // Served already as far as the snapshotter is concerned: the
            // kernel queues reads until the tree is open again.
            self.mounts.resuming.lock().insert(abs.clone());
            let svc = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = svc.resume_one(abs.clone(), meta, fd, give_up) => {}
                }
                svc.mounts.resuming.lock().remove(&abs);
            });
        }
    }

    async fn resume_one(
        &self,
        abs: PathBuf,
        meta: serde_json::Value,
        fd: OwnedFd,
        give_up: Duration,
    ) {
        let held: HeldMount = match serde_json::from_value(meta) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(
                    "the holder's record of {} is unreadable: {e}",
                    abs.display()
                );
                return self.abandon(&abs);
            }
        };
        let began = std::time::Instant::now();
        let opened = loop {
            match held.source.open(self).await {
                Ok(o) => break o,
                Err(e) if began.elapsed() < give_up => {
                    tracing::warn!(
                        "opening {} again to serve {}: {e}; retrying",
                        held.source.name(),
                        abs.display(),
                        e = breakfs_index::Causes(&e)
                    );
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    tracing::error!(
                        "giving up the mount at {}: {} cannot be opened again: {e}",
                        abs.display(),
                        held.source.name(),
                        e = breakfs_index::Causes(&e)
                    );
                    return self.abandon(&abs);
                }
            }
        };
        let layers = layers_of(&opened);
        let opts = MountOptions {
            hydrate: held.hydrate,
            threads: held.threads,
            dependency_prefetch: held.dependency_prefetch,
        };
        let conn = FuseConnection {
            fd,
            no_open: held.no_open,
        };
        let mut mounted = match breakfs_fs::resume(opened, conn, &abs, &opts) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(
                    "serving the held mount at {}: {e}",
                    abs.display(),
                    e = breakfs_index::Causes(&e)
                );
                return self.abandon(&abs);
            }
        };
        mounted.info.image = held.source.name().to_string();
        mounted.info.started = held.started;
        self.pin_live(&layers, 1);
        let mut rec = mounted.status();
        rec.node = Some(self.mounts.control.clone());
        if let Err(e) = breakfs_fs::write_status(&rec) {
            tracing::warn!(
                "writing the status record: {e}",
                e = breakfs_index::Causes(&e)
            );
        }
        eprintln!(
            "breakfs node: serving {} at {} again",
            held.source.name(),
            abs.display()
        );
        self.insert(abs, mounted, layers, true);
    }

    /// A held mount no daemon can serve: unmount it (lazily) and let the
    /// holder drop it, so that its readers fail rather than wait forever.
    fn abandon(&self, abs: &Path) {
        let _ = nix::mount::umount2(abs, nix::mount::MntFlags::MNT_DETACH);
        breakfs_fs::remove_status(abs);
        if let Some(h) = self.mounts.holder.get() {
            let _ = h.release(abs);
        }
    }

    /// Unmount the mount at `mountpoint`; a busy one stays served.
    pub(crate) async fn unmount(&self, mountpoint: &Path) -> Result<String> {
        let abs = mountpoint
            .canonicalize()
            .or_else(|_| std::path::absolute(mountpoint))
            .map_err(|e| Error::io(format!("resolving {}", mountpoint.display()), e))?;
        // Out of the map while it is unmounted: its session ends with the
        // unmount, which the status writer must not take for a failure.
        let Some(m) = self.mounts.mounts.lock().remove(&abs) else {
            return Err(Error::NotServed(abs));
        };
        if let Err(e) = unmount_path(&abs) {
            self.mounts.mounts.lock().insert(abs.clone(), m);
            return Err(e);
        }
        if m.held
            && let Some(h) = self.mounts.holder.get()
            && let Err(e) = h.release(&abs)
        {
            // It ends the connection's hold by itself: the kernel ends it.
            tracing::warn!("{e}", e = breakfs_index::Causes(&e));
        }
        // The mount no longer pins its layers (it still holds them while an
        // overlay keeps it, but it reads from the store then only).
        if let Some(b) = self.store.budget() {
            b.live(m.layers.iter().map(|(d, w)| (d, *w)), -1);
        }
        // An overlay may still hold it: serve until the kernel ends the session.
        let ending = end_session(m.m, &abs);
        tokio::spawn(async move {
            if let Err(e) = ending.finish().await {
                tracing::warn!(
                    "ending a mount's session: {e}",
                    e = breakfs_index::Causes(&e)
                );
            }
        });
        eprintln!("breakfs node: unmounted {}", abs.display());
        Ok(format!("unmounted {}", abs.display()))
    }

    /// Unmount every mount as the daemon stops: a busy one is detached, so
    /// that the path is free for a restart. A mount the holder keeps stays:
    /// the next daemon serves it on (its status record too).
    pub(crate) fn unmount_all(&self) {
        let all = std::mem::take(&mut *self.mounts.mounts.lock());
        for (abs, m) in all {
            if m.held {
                m.m.leave();
                continue;
            }
            breakfs_fs::remove_status(&abs);
            if unmount_path(&abs).is_err() {
                let _ = nix::mount::umount2(&abs, nix::mount::MntFlags::MNT_DETACH);
            }
            drop(m);
        }
    }

    /// Write every mount's status record (and log a mount that stopped
    /// serving); mounts being read keep their layers recent.
    pub(crate) fn write_statuses(&self) {
        for (at, m) in self.mounts.mounts.lock().iter_mut() {
            if let Some(why) = m.m.ended() {
                tracing::error!(
                    "the mount at {} stopped serving: {why}; its readers get ENOTCONN \
                     (unmount it and mount again)",
                    at.display()
                );
            }
        }
        let recs = self.mounts.list();
        if let Some(b) = self.store.budget() {
            for m in self.mounts.mounts.lock().values() {
                let read = m.m.reads.snapshot().bytes_read;
                if m.reads_seen.swap(read, Ordering::Relaxed) != read {
                    b.touch(m.layers.iter().map(|(d, _)| d));
                }
            }
        }
        for r in recs {
            if let Err(e) = breakfs_fs::write_status(&r) {
                tracing::warn!(
                    "writing the status record of {}: {e}",
                    r.mountpoint.display(),
                    e = breakfs_index::Causes(&e)
                );
            }
        }
    }
}

/// The layers of `opened`, and whether each was indexed whole.
fn layers_of(opened: &OpenedImage) -> Vec<(Digest, bool)> {
    opened
        .image
        .layers()
        .iter()
        .zip(&opened.layers)
        .map(|(d, m)| (d.digest.clone(), *m == breakfs_fs::LayerMode::Whole))
        .collect()
}
