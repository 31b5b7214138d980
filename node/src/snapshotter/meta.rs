//! The snapshots' metadata (keys, parents, kinds, labels, times), kept in
//! memory and written whole to one JSON file after every change: temp
//! file, fsync, rename, fsync of the directory, so a `SIGKILL` at any
//! point leaves the old state or the new one. A change is made on a copy
//! and only becomes visible once it is on disk.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use breakfs_index::Digest;
use serde::{Deserialize, Serialize};

use super::{Fault, fault};
use crate::{Error, Result};

/// What a snapshot is (containerd's `snapshots.Kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// Read-only, over a committed parent, never committed itself.
    View,
    /// Writable, to be committed or removed.
    Active,
    /// Read-only and a possible parent.
    Committed,
}

impl Kind {
    /// containerd's name for it, as filters and `ctr snapshot ls` say it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    /// Its directory's name under `snapshots/` (stays when committed).
    pub id: u64,
    pub kind: Kind,
    /// The committed snapshot it is over ("" for none).
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix nanoseconds.
    pub created: u128,
    pub updated: u128,
    /// For a remote (lazy) layer: where its files come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
}

/// A committed snapshot whose files are one image layer served lazily
/// (a FUSE mount of the layer in overlayfs' form, shared by every
/// snapshot of that layer) rather than unpacked into its own dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Remote {
    /// The image, pinned by manifest digest (`docker://HOST/REPO@sha256:...`).
    pub image: String,
    /// The layer's digest.
    pub layer: Digest,
}

/// All snapshots by key (name, for committed ones), and the next id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    pub next_id: u64,
    pub snapshots: BTreeMap<String, Snapshot>,
}

impl State {
    /// The snapshot `key`, or NotFound.
    pub(crate) fn get(&self, key: &str) -> Result<&Snapshot> {
        self.snapshots
            .get(key)
            .ok_or_else(|| fault(Fault::NotFound, format!("snapshot {key:?} does not exist")))
    }

    /// `parent` and its parents, nearest first.
    pub(crate) fn lineage(&self, parent: &str) -> Result<Vec<&Snapshot>> {
        let mut ids = Vec::new();
        let mut at = parent;
        while !at.is_empty() {
            let s = self.snapshots.get(at).ok_or_else(|| {
                fault(
                    Fault::NotFound,
                    format!("the parent snapshot {at:?} does not exist"),
                )
            })?;
            ids.push(s);
            at = &s.parent;
            if ids.len() > self.snapshots.len() {
                return Err(fault(
                    Fault::FailedPrecondition,
                    format!("the parents of {parent:?} form a loop"),
                ));
            }
        }
        Ok(ids)
    }

    /// Whether a snapshot has `key` as its parent.
    pub(crate) fn has_children(&self, key: &str) -> bool {
        self.snapshots.values().any(|s| s.parent == key)
    }
}

/// The metadata file of a snapshotter root.
pub(crate) struct MetaFile {
    path: PathBuf,
}

impl MetaFile {
    /// `root/metadata.json`.
    pub(crate) fn new(root: &Path) -> MetaFile {
        MetaFile {
            path: root.join("metadata.json"),
        }
    }

    /// The saved state (empty when there is none yet).
    pub(crate) fn load(&self) -> Result<State> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::io(
                    format!(
                        "reading the snapshot metadata {}: it is not what breakfs writes \
                         (move it away to start with no snapshots)",
                        self.path.display()
                    ),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io(format!("reading {}", self.path.display()), e)),
        }
    }

    /// Replace the saved state with `state`, atomically and durably.
    pub(crate) fn save(&self, state: &State) -> Result<()> {
        let what = || format!("writing the snapshot metadata {}", self.path.display());
        let bytes =
            serde_json::to_vec(state).map_err(|e| Error::io(what(), std::io::Error::other(e)))?;
        let temp = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let written = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&temp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(what(), e)
        })
    }
}

/// Now, in Unix nanoseconds.
pub(crate) fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, kind: Kind, parent: &str) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::from([("a".to_string(), "b".to_string())]),
            created: 1,
            updated: 2,
            remote: None,
        }
    }

    /// What was saved is what loads, and a save replaces the whole file.
    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = MetaFile::new(dir.path());
        assert_eq!(file.load().expect("no file yet"), State::default());
        let mut st = State {
            next_id: 3,
            ..State::default()
        };
        st.snapshots
            .insert("base".into(), snap(1, Kind::Committed, ""));
        st.snapshots
            .insert("top".into(), snap(2, Kind::Active, "base"));
        file.save(&st).expect("saved");
        assert_eq!(file.load().expect("loaded"), st);
        st.snapshots.remove("top");
        file.save(&st).expect("saved again");
        assert_eq!(file.load().expect("loaded again"), st);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("the dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["metadata.json"], "a temp file was left behind");
    }

    /// Parents chain nearest first; a missing parent is NotFound.
    #[test]
    fn chains_follow_parents() {
        let mut st = State::default();
        st.snapshots
            .insert("a".into(), snap(1, Kind::Committed, ""));
        st.snapshots
            .insert("b".into(), snap(2, Kind::Committed, "a"));
        st.snapshots.insert("c".into(), snap(3, Kind::Active, "b"));
        let ids = |p: &str| -> Vec<u64> {
            st.lineage(p)
                .expect("a chain")
                .iter()
                .map(|s| s.id)
                .collect()
        };
        assert_eq!(ids("b"), [2, 1]);
        assert_eq!(ids(""), Vec::<u64>::new());
        assert!(st.has_children("a") && !st.has_children("c"));
        let e = st.lineage("nope").expect_err("a missing parent");
        assert!(matches!(
            e,
            Error::Snapshot {
                fault: Fault::NotFound,
                ..
            }
        ));
    }
}
