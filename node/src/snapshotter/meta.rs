//! The snapshots' metadata (keys, parents, kinds, labels, times), kept in
//! memory and on disk as one JSON file (`metadata.json`, written whole:
//! temp file, fsync, rename, fsync of the directory) plus a journal of the
//! changes since (`metadata.log`, one JSON line per change, appended and
//! fdatasync'd, or for a lazy layer's record synced just after: see
//! [`Durability`]). A change is made on a copy and only becomes visible
//! once its line is written, so a `SIGKILL` at any point leaves the old
//! state or the new one (a torn last line is a change never answered:
//! dropped). A
//! change costs one append of what it changed, not a rewrite of every
//! snapshot's labels; the journal is folded into the file at every start
//! and once it holds [`FOLD_AFTER`] changes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use breakfs_index::Digest;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Fault, fault};

/// The journal is folded into the whole file after this many changes.
const FOLD_AFTER: usize = 512;
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

/// One change, as a journal line: the snapshots it put (new or changed)
/// and removed, and the next id after it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Change {
    next_id: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    put: BTreeMap<String, Snapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<String>,
}

impl Change {
    /// What turns `old` into `new`.
    fn between(old: &State, new: &State) -> Change {
        Change {
            next_id: new.next_id,
            put: new
                .snapshots
                .iter()
                .filter(|(k, v)| old.snapshots.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            del: old
                .snapshots
                .keys()
                .filter(|k| !new.snapshots.contains_key(*k))
                .cloned()
                .collect(),
        }
    }

    /// Apply it to `st` (again, after a crash between a fold and the
    /// journal's truncation: the same result).
    fn apply(self, st: &mut State) {
        st.next_id = st.next_id.max(self.next_id);
        for k in self.del {
            st.snapshots.remove(&k);
        }
        st.snapshots.extend(self.put);
    }
}

/// How soon a change is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Synced before it is answered.
    Synced,
    /// Written before it is answered (a killed daemon keeps it), synced
    /// just after by the journal's flusher thread: a power cut may lose
    /// the last few. For records made again at the next pull (a lazy
    /// layer's), not worth a disk flush on each of an image's dozens of
    /// layer prepares (about 10 ms each on this host's disk).
    Written,
}

/// The metadata file and journal of a snapshotter root.
pub(crate) struct MetaFile {
    path: PathBuf,
    journal: PathBuf,
    /// The journal open for appending, and how many changes it holds.
    appending: Mutex<Option<(File, usize)>>,
    /// The flusher thread's queue: journal handles to sync (it ends when
    /// this goes).
    flush: Mutex<Option<std::sync::mpsc::Sender<File>>>,
}

impl MetaFile {
    /// `root/metadata.json` and `root/metadata.log`.
    pub(crate) fn new(root: &Path) -> MetaFile {
        MetaFile {
            path: root.join("metadata.json"),
            journal: root.join("metadata.log"),
            appending: Mutex::new(None),
            flush: Mutex::new(None),
        }
    }

    /// Have the flusher thread sync `f` soon (started at the first ask).
    fn flush_soon(&self, f: File) {
        let mut flush = self.flush.lock();
        let tx = flush.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<File>();
            std::thread::spawn(move || {
                while let Ok(mut f) = rx.recv() {
                    // Asks that came meanwhile are covered by the last.
                    f = rx.try_iter().last().unwrap_or(f);
                    if let Err(e) = f.sync_data() {
                        tracing::warn!("syncing the snapshot journal: {e}");
                    }
                }
            });
            tx
        });
        let _ = tx.send(f);
    }

    /// The saved state (empty when there is none yet), the journal's
    /// changes applied; folded into the file, the journal emptied.
    pub(crate) fn load(&self) -> Result<State> {
        let mut st = match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::io(
                    format!(
                        "reading the snapshot metadata {}: it is not what breakfs writes \
                         (move it away to start with no snapshots)",
                        self.path.display()
                    ),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(Error::io(format!("reading {}", self.path.display()), e)),
        };
        let journal = match fs::read(&self.journal) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("reading {}", self.journal.display()), e)),
        };
        let mut replayed = 0usize;
        for line in journal.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // A line cut short is a change the crash kept from being
            // answered; nothing follows it.
            let Ok(change) = serde_json::from_slice::<Change>(line) else {
                tracing::warn!(
                    "{}: dropping a change cut short by a crash (never answered)",
                    self.journal.display()
                );
                break;
            };
            change.apply(&mut st);
            replayed += 1;
        }
        if replayed > 0 || !journal.is_empty() {
            self.fold(&st)?;
        }
        Ok(st)
    }

    /// Record the change from `old` to `new` as `durability` says: one
    /// journal line (the whole file again, synced, once the journal is
    /// long).
    pub(crate) fn record(&self, old: &State, new: &State, durability: Durability) -> Result<()> {
        let what = || format!("writing the snapshot journal {}", self.journal.display());
        let mut appending = self.appending.lock();
        if appending.as_ref().is_some_and(|(_, n)| *n >= FOLD_AFTER) {
            *appending = None;
            return self.save(new);
        }
        let mut line = serde_json::to_vec(&Change::between(old, new))
            .map_err(|e| Error::io(what(), std::io::Error::other(e)))?;
        line.push(b'\n');
        if appending.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.journal)
                .map_err(|e| Error::io(what(), e))?;
            *appending = Some((f, 0));
        }
        let Some((f, n)) = appending.as_mut() else {
            return Err(Error::io(what(), std::io::ErrorKind::NotFound.into()));
        };
        let written = f.write_all(&line).and_then(|()| match durability {
            Durability::Synced => f.sync_data(),
            Durability::Written => f.try_clone().map(|c| self.flush_soon(c)),
        });
        if let Err(e) = written {
            // The line may be half there: the whole file replaces it all.
            *appending = None;
            tracing::warn!("{}: {e}; writing the whole file instead", what());
            return self.save(new);
        }
        *n += 1;
        Ok(())
    }

    /// Replace the saved state with `state`, atomically and durably, and
    /// empty the journal (a crash before that replays the whole journal
    /// again over `state`, which changes nothing: each snapshot ends as
    /// its last change in it left it). The journal must be closed.
    fn save(&self, state: &State) -> Result<()> {
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
        })?;
        let emptied = match fs::remove_file(&self.journal) {
            Ok(()) => File::open(dir).and_then(|d| d.sync_all()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        emptied.map_err(|e| {
            Error::io(
                format!("emptying the journal {}", self.journal.display()),
                e,
            )
        })
    }

    /// [`MetaFile::save`], the journal closed first.
    fn fold(&self, state: &State) -> Result<()> {
        *self.appending.lock() = None;
        self.save(state)
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

    /// Changes go to the journal, one line each; a reopen replays them
    /// (a line cut short by a crash is dropped) and folds them into the
    /// file.
    #[test]
    fn changes_are_journalled_and_replayed() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = MetaFile::new(dir.path());
        let mut st = State::default();
        for i in 1..=5u64 {
            let mut next = st.clone();
            next.next_id = i + 1;
            next.snapshots
                .insert(format!("s{i}"), snap(i, Kind::Committed, ""));
            if i == 4 {
                next.snapshots.remove("s2");
            }
            let how = if i % 2 == 0 {
                Durability::Written
            } else {
                Durability::Synced
            };
            file.record(&st, &next, how).expect("recorded");
            st = next;
        }
        let journal = fs::read_to_string(dir.path().join("metadata.log")).expect("a journal");
        assert_eq!(journal.lines().count(), 5);
        assert!(!dir.path().join("metadata.json").exists());
        // A crash in the middle of a sixth line.
        let mut torn = journal.clone();
        torn.push_str("{\"next_id\":7,\"put\":{\"s6\":{\"id\"");
        fs::write(dir.path().join("metadata.log"), torn).expect("torn");
        let again = MetaFile::new(dir.path());
        assert_eq!(again.load().expect("replayed"), st);
        assert!(!dir.path().join("metadata.log").exists(), "not folded");
        // Folded: the file alone holds it; replaying the old journal over
        // it again (a crash before the journal went) changes nothing.
        assert_eq!(MetaFile::new(dir.path()).load().expect("loaded"), st);
        fs::write(dir.path().join("metadata.log"), &journal).expect("journal back");
        assert_eq!(MetaFile::new(dir.path()).load().expect("again"), st);
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
