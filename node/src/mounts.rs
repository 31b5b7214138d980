//! The mounts a node daemon serves: mounting an image through the node's
//! fetch chain (its layers pinned live in the budget), unmounting one, the
//! status records written each second, and the mounts' metrics.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use breakfs_fs::{MountOptions, Mounted, StatusRecord};
use breakfs_index::{Digest, ImageRef};

use crate::control::MountRequest;
use crate::lifecycle::{end_session, mount_and_probe, unmount_path};
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
}

/// The mounts by mountpoint, and how clients reach their daemon.
pub(crate) struct MountTable {
    mounts: Mutex<BTreeMap<PathBuf, NodeMount>>,
    /// How clients reach the control API (`unix:PATH`).
    control: String,
}

impl MountTable {
    /// No mounts yet; clients reach the daemon at `control`.
    pub(crate) fn new(control: String) -> MountTable {
        MountTable {
            mounts: Mutex::new(BTreeMap::new()),
            control,
        }
    }

    /// Whether the daemon serves a mount at `abs` (canonical).
    pub(crate) fn serves(&self, abs: &Path) -> bool {
        self.mounts.lock().contains_key(abs)
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
        let opened =
            breakfs_fs::open_image_on(&reference, &self.client, &self.fetcher, &self.cloud).await?;
        let opts = MountOptions {
            hydrate: req.hydrate,
            threads: req.threads.unwrap_or(4),
            dependency_prefetch: req.dependency_prefetch,
        };
        self.serve_opened(opened, abs, &opts, &req.image).await
    }

    /// Serve `opened` (the image `image`) at the checked, absolute `abs`
    /// as one of the daemon's mounts: its layers pinned live in the
    /// budget, its status record written each second, unmounted with the
    /// others (the control API's mounts and the snapshotter's lazy layers).
    pub(crate) async fn serve_opened(
        &self,
        opened: breakfs_fs::OpenedImage,
        abs: PathBuf,
        opts: &MountOptions,
        image: &str,
    ) -> Result<StatusRecord> {
        let layers: Vec<(Digest, bool)> = opened
            .image
            .layers()
            .iter()
            .zip(&opened.layers)
            .map(|(d, m)| (d.digest.clone(), *m == breakfs_fs::LayerMode::Whole))
            .collect();
        if let Some(b) = self.store.budget() {
            b.touch(layers.iter().map(|(d, _)| d));
            b.live(layers.iter().map(|(d, w)| (d, *w)), 1);
        }
        let control = Some(self.mounts.control.clone());
        let (mounted, rec) = match mount_and_probe(opened, &abs, opts, control).await {
            Ok(m) => m,
            Err(e) => {
                if let Some(b) = self.store.budget() {
                    b.live(layers.iter().map(|(d, w)| (d, *w)), -1);
                }
                return Err(e);
            }
        };
        eprintln!("breakfs node: mounted {image} at {}", abs.display());
        self.mounts.mounts.lock().insert(
            abs,
            NodeMount {
                m: mounted,
                layers,
                reads_seen: AtomicU64::new(0),
            },
        );
        Ok(rec)
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
    /// that the path is free for a restart.
    pub(crate) fn unmount_all(&self) {
        let all = std::mem::take(&mut *self.mounts.mounts.lock());
        for (abs, m) in all {
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
