//! The snapshots themselves, like containerd's overlayfs snapshotter:
//! each snapshot owns `snapshots/ID/fs` (its files, the overlay upper dir
//! while active) and `snapshots/ID/work` (overlayfs' work dir); an active
//! snapshot or a view is an overlay of its own dir over its committed
//! parents' dirs (a bind mount when there is one dir only). Every change
//! is on disk before it is answered: directories first, then the metadata
//! (`meta`); a crash between the two leaves a directory no record names,
//! which [`Snapshots::cleanup`] (and every start) removes.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use breakfs_index::Digest;
use parking_lot::Mutex;

use super::filter::{Filter, any_matches};
use super::meta::{Durability, Kind, MetaFile, Remote, Snapshot, State, now};
use super::{Fault, fault};
use crate::{Error, Result};

/// A mount containerd performs to use a snapshot (`containerd.types.Mount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Disk use of a snapshot's own files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// The snapshots under one root directory.
pub(crate) struct Snapshots {
    root: PathBuf,
    file: MetaFile,
    state: Mutex<State>,
    /// Whether overlayfs knows `index=off` (containerd's overlayfs
    /// snapshotter turns the index off where it can: lower dirs here are
    /// shared by many overlays).
    index_off: bool,
}

impl Snapshots {
    /// Open (creating) the snapshots under `root`, dropping directories
    /// no record names (left by a crash).
    pub(crate) fn open(root: &Path) -> Result<Snapshots> {
        let dir = root.join("snapshots");
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let file = MetaFile::new(root);
        let state = file.load()?;
        let s = Snapshots {
            root: root.to_path_buf(),
            file,
            state: Mutex::new(state),
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        };
        s.cleanup()?;
        Ok(s)
    }

    /// The root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn dir_of(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Where the lazy mount of `layer` goes: `ROOT/l/` and 16 hex digits
    /// of its digest, short because overlay's options hold one per lower
    /// dir in a page.
    pub(crate) fn layer_dir(&self, layer: &Digest) -> PathBuf {
        let hex = layer.hex();
        self.root.join("l").join(&hex[..hex.len().min(16)])
    }

    /// The dir that gives snapshot `s`'s files as a lower dir.
    fn lower_dir(&self, s: &Snapshot) -> PathBuf {
        match &s.remote {
            Some(r) => self.layer_dir(&r.layer),
            None => self.dir_of(s.id).join("fs"),
        }
    }

    /// Apply `change` to a copy of the state, save it (synced), then make
    /// it the state; the state is unchanged when either fails.
    fn change<T>(&self, change: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        self.change_as(Durability::Synced, change)
    }

    /// [`Snapshots::change`], on disk as `durability` says.
    fn change_as<T>(
        &self,
        durability: Durability,
        change: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.state.lock();
        let mut next = st.clone();
        let out = change(&mut next)?;
        self.file.record(&st, &next, durability)?;
        *st = next;
        Ok(out)
    }

    /// A new active snapshot (or view) `key` over the committed `parent`,
    /// labelled `labels`; the mounts that give its tree.
    pub(crate) fn prepare(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<MountSpec>> {
        check_key(key)?;
        self.change(|st| {
            check_new(st, key, parent)?;
            let id = st.next_id.max(1);
            st.next_id = id + 1;
            let dir = self.dir_of(id);
            // A directory left by a crash under this id is stale.
            let _ = fs::remove_dir_all(&dir);
            for sub in ["fs", "work"] {
                fs::create_dir_all(dir.join(sub))
                    .map_err(|e| Error::io(format!("creating {}", dir.join(sub).display()), e))?;
            }
            let t = now();
            let s = Snapshot {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: t,
                updated: t,
                remote: None,
            };
            let mounts = self.mounts_of(st, &s)?;
            st.snapshots.insert(key.to_string(), s);
            Ok(mounts)
        })
    }

    /// Record `target` as a committed snapshot over `parent` whose files
    /// are the lazily served layer `remote` (no files of its own). Synced
    /// just after it is answered: one of dozens in a pull, and made again
    /// by the next pull should a power cut lose it.
    pub(crate) fn commit_remote(
        &self,
        target: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: Remote,
    ) -> Result<()> {
        check_key(target)?;
        self.change_as(Durability::Written, |st| {
            check_new(st, target, parent)?;
            let id = st.next_id.max(1);
            st.next_id = id + 1;
            let dir = self.dir_of(id);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("fs"))
                .map_err(|e| Error::io(format!("creating {}", dir.join("fs").display()), e))?;
            let t = now();
            st.snapshots.insert(
                target.to_string(),
                Snapshot {
                    id,
                    kind: Kind::Committed,
                    parent: parent.to_string(),
                    labels,
                    created: t,
                    updated: t,
                    remote: Some(remote),
                },
            );
            Ok(())
        })
    }

    /// The remote layers below a new snapshot over `parent` (nearest
    /// first): what must be mounted before its mounts are used.
    pub(crate) fn remotes_under(&self, parent: &str) -> Result<Vec<Remote>> {
        let st = self.state.lock();
        Ok(st
            .lineage(parent)?
            .into_iter()
            .filter_map(|s| s.remote.clone())
            .collect())
    }

    /// The remote layers below the existing snapshot `key`.
    pub(crate) fn remotes_of(&self, key: &str) -> Result<Vec<Remote>> {
        let parent = self.state.lock().get(key)?.parent.clone();
        self.remotes_under(&parent)
    }

    /// Whether a snapshot is served by the lazy mount of `layer`.
    pub(crate) fn layer_in_use(&self, layer: &Digest) -> bool {
        self.state
            .lock()
            .snapshots
            .values()
            .any(|s| s.remote.as_ref().is_some_and(|r| &r.layer == layer))
    }

    /// The mounts of the active snapshot or view `key`.
    pub(crate) fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let st = self.state.lock();
        let s = st.get(key)?;
        if s.kind == Kind::Committed {
            return Err(fault(
                Fault::FailedPrecondition,
                format!("snapshot {key:?} is committed: only active snapshots and views mount"),
            ));
        }
        self.mounts_of(&st, s)
    }

    fn mounts_of(&self, st: &State, s: &Snapshot) -> Result<Vec<MountSpec>> {
        let own = self.dir_of(s.id);
        let lower: Vec<String> = st
            .lineage(&s.parent)?
            .into_iter()
            .map(|p| self.lower_dir(p).display().to_string())
            .collect();
        let bind = |source: String, ro: bool| MountSpec {
            kind: "bind".into(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        Ok(match (s.kind, lower.as_slice()) {
            (Kind::View, []) => vec![bind(own.join("fs").display().to_string(), true)],
            (Kind::View, [one]) => vec![bind(one.clone(), true)],
            (Kind::View, many) => {
                options.push(format!("lowerdir={}", many.join(":")));
                vec![overlay(options)]
            }
            (_, []) => vec![bind(own.join("fs").display().to_string(), false)],
            (_, many) => {
                options.push(format!("workdir={}", own.join("work").display()));
                options.push(format!("upperdir={}", own.join("fs").display()));
                options.push(format!("lowerdir={}", many.join(":")));
                vec![overlay(options)]
            }
        })
    }

    /// Commit the active snapshot `key` as `name`, labelled `labels`.
    pub(crate) fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        check_key(name)?;
        let work = self.change(|st| {
            let s = st.get(key)?.clone();
            if s.kind != Kind::Active {
                return Err(fault(
                    Fault::FailedPrecondition,
                    format!(
                        "snapshot {key:?} is {}: only an active snapshot can be committed",
                        s.kind.name()
                    ),
                ));
            }
            if st.snapshots.contains_key(name) {
                return Err(fault(
                    Fault::AlreadyExists,
                    format!("a snapshot named {name:?} already exists"),
                ));
            }
            st.snapshots.remove(key);
            let work = self.dir_of(s.id).join("work");
            st.snapshots.insert(
                name.to_string(),
                Snapshot {
                    kind: Kind::Committed,
                    labels,
                    updated: now(),
                    ..s
                },
            );
            Ok(work)
        })?;
        // A committed snapshot is never an upper dir again.
        let _ = fs::remove_dir_all(work);
        Ok(())
    }

    /// Remove snapshot `key` and its files; a parent of others stays.
    /// Returns what was removed.
    pub(crate) fn remove(&self, key: &str) -> Result<Snapshot> {
        let gone = self.change(|st| {
            st.get(key)?;
            if st.has_children(key) {
                return Err(fault(
                    Fault::FailedPrecondition,
                    format!("snapshot {key:?} has children: remove them first"),
                ));
            }
            st.snapshots
                .remove(key)
                .ok_or_else(|| fault(Fault::NotFound, format!("snapshot {key:?} does not exist")))
        })?;
        let dir = self.dir_of(gone.id);
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(
                "removing {} of a removed snapshot: {e}; Cleanup retries",
                dir.display()
            );
        }
        Ok(gone)
    }

    /// Snapshot `key`'s record.
    pub(crate) fn stat(&self, key: &str) -> Result<Snapshot> {
        Ok(self.state.lock().get(key)?.clone())
    }

    /// Change the labels of snapshot `key` as `paths` say (containerd's
    /// field mask: none or `labels` replaces them all with `labels`,
    /// `labels.K` sets or drops one); the updated record.
    pub(crate) fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        self.change(|st| {
            let s = st.snapshots.get_mut(key).ok_or_else(|| {
                fault(Fault::NotFound, format!("snapshot {key:?} does not exist"))
            })?;
            if paths.is_empty() {
                s.labels = labels.clone();
            }
            for p in paths {
                if p == "labels" {
                    s.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => s.labels.insert(k.to_string(), v.clone()),
                        None => s.labels.remove(k),
                    };
                } else {
                    return Err(fault(
                        Fault::InvalidArgument,
                        format!(
                            "cannot update {p:?} of snapshot {key:?}: only labels change \
                             (name, parent, kind and times do not)"
                        ),
                    ));
                }
            }
            s.updated = now();
            Ok(s.clone())
        })
    }

    /// The snapshots passing any of `filters`, by key.
    pub(crate) fn list(&self, filters: &[Filter]) -> Vec<(String, Snapshot)> {
        self.state
            .lock()
            .snapshots
            .iter()
            .filter(|(k, s)| any_matches(filters, k, s))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// The disk use of snapshot `key`'s own files.
    pub(crate) fn usage(&self, key: &str) -> Result<Usage> {
        let s = self.stat(key)?;
        let dir = self.dir_of(s.id).join("fs");
        disk_usage(&dir).map_err(|e| Error::io(format!("measuring {}", dir.display()), e))
    }

    /// Remove the directories no snapshot owns (left by a crash or by a
    /// removal that failed).
    pub(crate) fn cleanup(&self) -> Result<()> {
        let ids: HashSet<String> = self
            .state
            .lock()
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        let dir = self.root.join("snapshots");
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        for e in entries.flatten() {
            let name = e.file_name();
            if !ids.contains(&*name.to_string_lossy())
                && let Err(err) = fs::remove_dir_all(e.path())
            {
                tracing::warn!("removing {}: {err}", e.path().display());
            }
        }
        Ok(())
    }
}

/// Refuse a new snapshot `key` over `parent` unless the key is free and
/// the parent (if any) is committed.
fn check_new(st: &State, key: &str, parent: &str) -> Result<()> {
    if st.snapshots.contains_key(key) {
        return Err(fault(
            Fault::AlreadyExists,
            format!("snapshot {key:?} already exists"),
        ));
    }
    if !parent.is_empty() {
        let p = st.snapshots.get(parent).ok_or_else(|| {
            fault(
                Fault::NotFound,
                format!("the parent snapshot {parent:?} of {key:?} does not exist"),
            )
        })?;
        if p.kind != Kind::Committed {
            return Err(fault(
                Fault::InvalidArgument,
                format!(
                    "the parent {parent:?} of {key:?} is not a committed snapshot (it is {})",
                    p.kind.name()
                ),
            ));
        }
    }
    Ok(())
}

fn overlay(options: Vec<String>) -> MountSpec {
    MountSpec {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

/// Keys are containerd's: any non-empty string.
fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(fault(
            Fault::InvalidArgument,
            "a snapshot key must not be empty",
        ));
    }
    Ok(())
}

/// Bytes (allocated blocks, as containerd counts) and inodes below `dir`,
/// each hard-linked inode once.
fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut u = Usage::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if seen.insert((m.dev(), m.ino())) {
                u.bytes += m.blocks() * 512;
                u.inodes += 1;
            }
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn code(r: Result<impl std::fmt::Debug>) -> Fault {
        match r {
            Err(Error::Snapshot { fault, .. }) => fault,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// The overlayfs snapshotter's shapes: a bind mount for a snapshot
    /// with one dir, an overlay with the parents nearest first otherwise;
    /// the records survive a reopen (a restart or a kill).
    #[test]
    fn snapshots_chain_into_overlays_and_persist() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let s = Snapshots::open(dir.path()).expect("opened");
        let m = s
            .prepare(Kind::Active, "l1-extract", "", labels(&[]))
            .expect("prepared");
        assert_eq!(m[0].kind, "bind");
        assert_eq!(m[0].options, ["rw", "rbind"]);
        let l1_fs = PathBuf::from(&m[0].source);
        fs::write(l1_fs.join("a"), b"one").expect("a file in layer 1");
        s.commit("l1", "l1-extract", labels(&[("x", "1")]))
            .expect("committed");
        let m = s
            .prepare(Kind::Active, "l2-extract", "l1", labels(&[]))
            .expect("prepared over l1");
        assert_eq!(m[0].kind, "overlay");
        let lower = format!("lowerdir={}", l1_fs.display());
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        s.commit("l2", "l2-extract", labels(&[]))
            .expect("committed");
        let v = s
            .prepare(Kind::View, "v1", "l1", labels(&[]))
            .expect("a view of one layer");
        assert_eq!(v[0].kind, "bind");
        assert_eq!(v[0].options, ["ro", "rbind"]);
        assert_eq!(v[0].source, l1_fs.display().to_string());
        let v = s
            .prepare(Kind::View, "v2", "l2", labels(&[]))
            .expect("a view of two");
        assert_eq!(v[0].kind, "overlay");
        assert!(
            v[0].options.iter().all(|o| !o.starts_with("upperdir=")),
            "a view is read-only: {:?}",
            v[0].options
        );
        let c = s
            .prepare(Kind::Active, "ctr", "l2", labels(&[]))
            .expect("a container");
        let l2_fs = s.dir_of(s.stat("l2").expect("l2").id).join("fs");
        let lower = format!("lowerdir={}:{}", l2_fs.display(), l1_fs.display());
        assert!(c[0].options.contains(&lower), "{:?}", c[0].options);
        assert!(c[0].options.iter().any(|o| o.starts_with("upperdir=")));
        assert_eq!(s.mounts("ctr").expect("mounts again"), c);

        let before = s.list(&[]);
        drop(s);
        let s = Snapshots::open(dir.path()).expect("reopened");
        assert_eq!(s.list(&[]), before);
        assert_eq!(s.stat("l1").expect("l1").labels, labels(&[("x", "1")]));
        assert_eq!(s.usage("l1").expect("usage").inodes, 1);
        let active = s.list(&[Filter::parse("kind==active").expect("a filter")]);
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].0, "ctr");
    }

    /// Refusals carry containerd's codes, and change nothing.
    #[test]
    fn bad_requests_are_refused_with_containerd_codes() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let s = Snapshots::open(dir.path()).expect("opened");
        s.prepare(Kind::Active, "a", "", labels(&[]))
            .expect("prepared");
        assert_eq!(code(s.stat("nope")), Fault::NotFound);
        assert_eq!(code(s.mounts("nope")), Fault::NotFound);
        assert_eq!(code(s.remove("nope")), Fault::NotFound);
        assert_eq!(
            code(s.prepare(Kind::Active, "a", "", labels(&[]))),
            Fault::AlreadyExists
        );
        assert_eq!(
            code(s.prepare(Kind::Active, "b", "nope", labels(&[]))),
            Fault::NotFound
        );
        assert_eq!(
            code(s.prepare(Kind::Active, "b", "a", labels(&[]))),
            Fault::InvalidArgument
        );
        assert_eq!(
            code(s.prepare(Kind::Active, "", "", labels(&[]))),
            Fault::InvalidArgument
        );
        assert_eq!(code(s.commit("c", "nope", labels(&[]))), Fault::NotFound);
        s.commit("c", "a", labels(&[])).expect("committed");
        assert_eq!(code(s.mounts("c")), Fault::FailedPrecondition);
        assert_eq!(
            code(s.commit("d", "c", labels(&[]))),
            Fault::FailedPrecondition
        );
        s.prepare(Kind::Active, "e", "c", labels(&[]))
            .expect("a child");
        assert_eq!(code(s.remove("c")), Fault::FailedPrecondition);
        assert_eq!(
            code(s.update("c", labels(&[]), &["parent".to_string()])),
            Fault::InvalidArgument
        );
        // Nothing changed: c and e are there, and only their dirs.
        assert_eq!(s.list(&[]).len(), 2);
        s.remove("e").expect("the child goes");
        s.remove("c").expect("then the parent");
        assert!(s.list(&[]).is_empty());
        let left: Vec<_> = fs::read_dir(dir.path().join("snapshots"))
            .expect("the dir")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// Label updates: a mask of `labels.K` touches K only; no mask
    /// replaces them all.
    #[test]
    fn updates_change_labels_as_the_mask_says() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let s = Snapshots::open(dir.path()).expect("opened");
        s.prepare(Kind::Active, "a", "", labels(&[("k", "1"), ("j", "2")]))
            .expect("prepared");
        let u = s
            .update("a", labels(&[("k", "9")]), &["labels.k".into()])
            .expect("updated");
        assert_eq!(u.labels, labels(&[("k", "9"), ("j", "2")]));
        let u = s
            .update("a", labels(&[]), &["labels.j".into()])
            .expect("dropped j");
        assert_eq!(u.labels, labels(&[("k", "9")]));
        let u = s.update("a", labels(&[("z", "0")]), &[]).expect("replaced");
        assert_eq!(u.labels, labels(&[("z", "0")]));
        assert_eq!(code(s.update("nope", labels(&[]), &[])), Fault::NotFound);
    }

    /// A remote layer is committed at once; a snapshot over it has the
    /// layer's shared mount dir as its lower dir, and two remote
    /// snapshots of one layer (at different places in two chains) share
    /// that dir; the records survive a reopen.
    #[test]
    fn remote_layers_are_lower_dirs_shared_by_digest() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let s = Snapshots::open(dir.path()).expect("opened");
        let layer = Digest::of(b"a shared layer");
        let remote = |image: &str| Remote {
            image: image.into(),
            layer: layer.clone(),
        };
        s.commit_remote("a1", "", labels(&[]), remote("docker://r/a@x"))
            .expect("a remote base layer");
        assert_eq!(
            code(s.commit_remote("a1", "", labels(&[]), remote("docker://r/a@x"))),
            Fault::AlreadyExists
        );
        s.prepare(Kind::Active, "b0-extract", "", labels(&[]))
            .expect("an ordinary base");
        s.commit("b0", "b0-extract", labels(&[]))
            .expect("committed");
        s.commit_remote("b1", "b0", labels(&[]), remote("docker://r/b@y"))
            .expect("the same layer over another base");
        let c = s
            .prepare(Kind::Active, "ctr", "b1", labels(&[]))
            .expect("a container over b1");
        let shared = s.layer_dir(&layer);
        let b0_fs = s.dir_of(s.stat("b0").expect("b0").id).join("fs");
        let lower = format!("lowerdir={}:{}", shared.display(), b0_fs.display());
        assert!(c[0].options.contains(&lower), "{:?}", c[0].options);
        assert_eq!(
            s.remotes_of("ctr").expect("the layers under ctr"),
            [remote("docker://r/b@y")]
        );
        assert_eq!(s.remotes_under("a1").expect("under a1").len(), 1);
        assert_eq!(code(s.mounts("a1")), Fault::FailedPrecondition);

        drop(s);
        let s = Snapshots::open(dir.path()).expect("reopened");
        assert_eq!(
            s.stat("b1").expect("b1").remote,
            Some(remote("docker://r/b@y"))
        );
        s.remove("ctr").expect("the container goes");
        let gone = s.remove("b1").expect("b1 goes");
        assert_eq!(gone.remote, Some(remote("docker://r/b@y")));
        assert!(s.layer_in_use(&layer), "a1 still uses the layer");
        s.remove("a1").expect("a1 goes");
        assert!(!s.layer_in_use(&layer));
    }

    /// A directory no record names (a crash between mkdir and the
    /// metadata write) is gone after a reopen.
    #[test]
    fn orphan_dirs_are_cleaned_up() {
        let dir = tempfile::tempdir().expect("a temp dir");
        drop(Snapshots::open(dir.path()).expect("opened"));
        let orphan = dir.path().join("snapshots/77/fs");
        fs::create_dir_all(&orphan).expect("an orphan");
        let s = Snapshots::open(dir.path()).expect("reopened");
        assert!(!orphan.exists());
        s.prepare(Kind::Active, "a", "", labels(&[]))
            .expect("prepared");
        assert!(s.dir_of(1).join("fs").is_dir());
    }
}
