//! What `breakfs status` shows of the snapshotter: every snapshot the
//! daemon holds for containerd, its kind and parent, and for a lazy layer
//! its layer, image, how much of it the store holds (its hydration) and
//! whether its FUSE mount is up. Served as `GET /snapshots` on the
//! control API.

use std::fmt::Write as _;
use std::path::PathBuf;

use breakfs_fetch::Hydration;
use serde::{Deserialize, Serialize};

use crate::server::NodeService;

/// The snapshotter's snapshots, as `GET /snapshots` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotterStatus {
    /// Where the snapshots live (the proxy plugin's `exports.root`).
    pub root: PathBuf,
    /// Every snapshot, by key.
    pub snapshots: Vec<SnapshotStatus>,
}

/// One snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// The key the daemon holds it by (containerd's `NAMESPACE/ID/NAME`).
    pub key: String,
    /// The name containerd shows for it (`ctr snapshot ls`).
    pub name: String,
    /// `active`, `committed` or `view`.
    pub kind: String,
    /// The key of its parent ("" for none).
    pub parent: String,
    /// For a remote (lazy) layer: what it is and how much is here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyLayer>,
}

/// A snapshot served lazily from one image layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LazyLayer {
    /// The layer's digest.
    pub layer: String,
    /// The image, pinned by manifest digest.
    pub image: String,
    /// How much of the layer the store holds; `None` while its TOC is not
    /// in the store.
    pub hydration: Option<Hydration>,
    /// Whether the layer's FUSE mount is up (it is mounted when a
    /// container or view first needs it).
    pub mounted: bool,
}

/// The status of the snapshotter of `svc`, if one runs.
pub(crate) fn snapshotter_status(svc: &NodeService) -> Option<SnapshotterStatus> {
    let snaps = svc.snapshot_stats.snapshots()?;
    let snapshots = snaps
        .list(&[])
        .into_iter()
        .map(|(key, s)| {
            let lazy = s.remote.map(|r| {
                let dir = snaps.layer_dir(&r.layer);
                let mounted = dir.canonicalize().is_ok_and(|abs| svc.mounts.serves(&abs));
                LazyLayer {
                    layer: r.layer.to_string(),
                    image: r.image,
                    hydration: svc.store.hydration(&r.layer),
                    mounted,
                }
            });
            SnapshotStatus {
                name: containerd_name(&key).to_string(),
                key,
                kind: s.kind.name().to_string(),
                parent: s.parent,
                lazy,
            }
        })
        .collect();
    Some(SnapshotterStatus {
        root: snaps.root().to_path_buf(),
        snapshots,
    })
}

/// The name containerd gives snapshot `key`: its keys for a proxy
/// snapshotter are `NAMESPACE/ID/NAME`.
fn containerd_name(key: &str) -> &str {
    key.splitn(3, '/').nth(2).unwrap_or(key)
}

/// `held` of `total` in percent (all of nothing is 100).
pub(crate) fn percent(held: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        100.0 * held as f64 / total as f64
    }
}

/// `breakfs status`'s text for the snapshotter: a summary line, then
/// each snapshot with its kind, parent and, for a lazy layer, its layer,
/// image, hydration and mount.
pub fn snapshots_report(s: &SnapshotterStatus) -> String {
    let mut out = String::new();
    let count = |kind: &str| s.snapshots.iter().filter(|x| x.kind == kind).count();
    let lazy = s.snapshots.iter().filter(|x| x.lazy.is_some()).count();
    let _ = writeln!(
        out,
        "containerd snapshots in {}: {} ({} committed, {} active, {} views); {lazy} lazy layers, {} ordinary",
        s.root.display(),
        s.snapshots.len(),
        count("committed"),
        count("active"),
        count("view"),
        s.snapshots.len() - lazy
    );
    for x in &s.snapshots {
        let how = match &x.lazy {
            Some(l) if l.mounted => "lazy, FUSE mount up",
            Some(_) => "lazy, not mounted",
            None => "ordinary",
        };
        let _ = writeln!(out, "{}  {}, {how}", x.key, x.kind);
        if !x.parent.is_empty() {
            let _ = writeln!(out, "    parent     {}", x.parent);
        }
        let Some(l) = &x.lazy else {
            continue;
        };
        let _ = writeln!(out, "    layer      {} of {}", l.layer, l.image);
        let held = match &l.hydration {
            Some(h) => {
                let pct = percent(h.held_bytes, h.total_bytes);
                format!(
                    "{pct:.1}% ({:.1} of {:.1} MB, {} of {} chunks){}",
                    h.held_bytes as f64 / 1e6,
                    h.total_bytes as f64 / 1e6,
                    h.held_chunks,
                    h.total_chunks,
                    if h.whole_blob {
                        "; the whole blob too"
                    } else {
                        ""
                    }
                )
            }
            None => "unknown (its TOC is not in the store)".to_string(),
        };
        let _ = writeln!(out, "    hydration  {held}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_each_snapshot_and_its_hydration() {
        let status = SnapshotterStatus {
            root: "/var/lib/breakfs/snapshotter".into(),
            snapshots: vec![
                SnapshotStatus {
                    key: "default/1/sha256:aa".into(),
                    name: containerd_name("default/1/sha256:aa").into(),
                    kind: "committed".into(),
                    parent: String::new(),
                    lazy: Some(LazyLayer {
                        layer: "sha256:11".into(),
                        image: "docker://reg/app@sha256:22".into(),
                        hydration: Some(Hydration {
                            held_bytes: 1_500_000,
                            total_bytes: 6_000_000,
                            held_chunks: 3,
                            total_chunks: 10,
                            whole_blob: false,
                        }),
                        mounted: true,
                    }),
                },
                SnapshotStatus {
                    key: "default/2/c1".into(),
                    name: "c1".into(),
                    kind: "active".into(),
                    parent: "default/1/sha256:aa".into(),
                    lazy: None,
                },
            ],
        };
        assert_eq!(status.snapshots[0].name, "sha256:aa");
        let text = snapshots_report(&status);
        for want in [
            "2 (1 committed, 1 active, 0 views); 1 lazy layers, 1 ordinary",
            "default/1/sha256:aa  committed, lazy, FUSE mount up",
            "layer      sha256:11 of docker://reg/app@sha256:22",
            "hydration  25.0% (1.5 of 6.0 MB, 3 of 10 chunks)",
            "default/2/c1  active, ordinary",
            "parent     default/1/sha256:aa",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }
}
