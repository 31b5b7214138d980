//! What the snapshotter tells `/metrics`: its snapshots by kind (remote
//! layers apart), and how containerd's layer prepares went: served lazily,
//! or the ordinary path, with the reason a lazy layer fell back.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::meta::Kind;
use super::store::Snapshots;
use crate::metrics::PromText;

/// Why a layer whose labels asked for it was not served lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fallback {
    /// The image could not be resolved at prepare time.
    Unresolved,
    /// The layer has no TOC (plain gzip).
    NoToc,
    /// Its TOC was refused (hostile or unusable).
    TocRefused,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Fallback::Unresolved => "unresolved",
            Fallback::NoToc => "no_toc",
            Fallback::TocRefused => "toc_refused",
        }
    }
}

/// The snapshotter's counters, kept in the node's service so `/metrics`
/// reads them with the rest.
#[derive(Default)]
pub(crate) struct SnapshotStats {
    snaps: OnceLock<Arc<Snapshots>>,
    lazy: AtomicU64,
    ordinary: AtomicU64,
    fallbacks: Mutex<BTreeMap<Fallback, u64>>,
}

impl SnapshotStats {
    /// Count the snapshots of `snaps` from now on.
    pub(crate) fn attach(&self, snaps: Arc<Snapshots>) {
        let _ = self.snaps.set(snaps);
    }

    /// The snapshots counted, if a snapshotter runs.
    pub(crate) fn snapshots(&self) -> Option<&Arc<Snapshots>> {
        self.snaps.get()
    }

    /// A layer prepare served lazily.
    pub(crate) fn lazy(&self) {
        self.lazy.fetch_add(1, Ordering::Relaxed);
    }

    /// A layer prepare left to containerd (`why`, if its labels asked
    /// for a lazy layer).
    pub(crate) fn ordinary(&self, why: Option<Fallback>) {
        self.ordinary.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = why {
            *self.fallbacks.lock().entry(f).or_default() += 1;
        }
    }

    /// Its families, if a snapshotter runs.
    pub(crate) fn metrics(&self, p: &mut PromText) {
        let Some(snaps) = self.snaps.get() else {
            return;
        };
        let mut by_kind: BTreeMap<(&str, bool), u64> = BTreeMap::new();
        for kind in ["view", "active", "committed"] {
            for remote in [false, true] {
                by_kind.insert((kind, remote), 0);
            }
        }
        for (_, s) in snaps.list(&[]) {
            let kind = match s.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            };
            *by_kind.entry((kind, s.remote.is_some())).or_default() += 1;
        }
        p.family(
            "breakfs_snapshots",
            "gauge",
            "containerd snapshots the node holds, by kind; remote=\"true\" for lazy layers.",
        );
        for ((kind, remote), n) in by_kind {
            let remote = if remote { "true" } else { "false" };
            p.sample(
                "breakfs_snapshots",
                &[("kind", kind), ("remote", remote)],
                n as f64,
            );
        }
        p.family(
            "breakfs_snapshot_layer_prepares_total",
            "counter",
            "Layer prepares from containerd: served lazily, or unpacked by containerd (ordinary).",
        );
        for (path, n) in [("lazy", &self.lazy), ("ordinary", &self.ordinary)] {
            p.sample(
                "breakfs_snapshot_layer_prepares_total",
                &[("path", path)],
                n.load(Ordering::Relaxed) as f64,
            );
        }
        p.family(
            "breakfs_snapshot_lazy_fallbacks_total",
            "counter",
            "Layers whose labels asked to be served lazily that took the ordinary path, by reason.",
        );
        let fallbacks = self.fallbacks.lock().clone();
        for f in [Fallback::Unresolved, Fallback::NoToc, Fallback::TocRefused] {
            let n = fallbacks.get(&f).copied().unwrap_or(0);
            p.sample(
                "breakfs_snapshot_lazy_fallbacks_total",
                &[("reason", f.label())],
                n as f64,
            );
        }
    }
}
