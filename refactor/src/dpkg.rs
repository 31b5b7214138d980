//! Package ownership from the dpkg database, for cutting layers along
//! package lines.
//!
//! A Debian image records in `var/lib/dpkg/status` which packages are
//! installed (and each one's source package) and in
//! `var/lib/dpkg/info/PKG[:ARCH].list` which paths each package owns. A new
//! package version changes (or at least re-stamps) all its files at once,
//! so the planner keeps the files of one *source* package together: a
//! later version of the image then reuses the layers of every source
//! package that did not move.

use std::collections::{BTreeMap, HashMap};

use breakfs_index::{EntryKind, MergedView};

/// Where the dpkg status file lives in an image.
pub(crate) const STATUS_PATH: &str = "var/lib/dpkg/status";
/// The directory that holds the `PKG.list` files.
pub(crate) const INFO_DIR: &str = "var/lib/dpkg/info";

/// Package ownership of an image's files: path → unit key (the binary
/// package name, architecture qualifier dropped), plus each unit's file
/// bytes and source package.
///
/// The unit is the binary package, not the source package: binary
/// packages of one source do move separately (a point release that
/// upgrades `bsdutils` but not `util-linux`), and measured on the corpus
/// the finer cut loses fewer unchanged bytes than it costs in bundling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackageDb {
    owner: HashMap<String, String>,
    unit_bytes: BTreeMap<String, u64>,
    sources: HashMap<String, String>,
}

impl PackageDb {
    /// A database that owns nothing (an image without a package manager).
    pub fn empty() -> Self {
        PackageDb::default()
    }

    /// Build from the dpkg `status` file and the `.list` files, mapping
    /// every listed path to its canonical path in `view` (symlinked parent
    /// directories such as `/lib` → `usr/lib` resolved through the view).
    ///
    /// `lists` holds `(package, content)` with the package as in the list
    /// file's name (`libc6:amd64` is accepted). Paths listed but absent
    /// from the view, and non-regular files, are ignored; a path listed by
    /// two packages goes to the first one in `lists` order.
    pub fn from_dpkg(status: &[u8], lists: &[(String, Vec<u8>)], view: &MergedView) -> Self {
        let mut db = PackageDb {
            sources: parse_status(status),
            ..PackageDb::default()
        };
        for (package, content) in lists {
            let unit = package.split(':').next().unwrap_or(package).to_string();
            for line in String::from_utf8_lossy(content).lines() {
                let line = line.trim_end_matches('\r');
                if line.is_empty() || line == "/." {
                    continue;
                }
                let Some(path) = canonical_path(view, line) else {
                    continue;
                };
                let Some(me) = view.get(&path) else {
                    continue;
                };
                if !matches!(me.entry.kind, EntryKind::File | EntryKind::Hardlink) {
                    continue;
                }
                if db.owner.contains_key(&path) {
                    continue;
                }
                let bytes = if me.entry.kind == EntryKind::File {
                    me.entry.size
                } else {
                    0
                };
                *db.unit_bytes.entry(unit.clone()).or_insert(0) += bytes;
                db.owner.insert(path, unit.clone());
            }
        }
        db
    }

    /// The source package of a unit (binary package), from `Source:` in the
    /// status file; a package without one is its own source.
    pub fn source_of<'a>(&'a self, unit: &'a str) -> &'a str {
        self.sources.get(unit).map(String::as_str).unwrap_or(unit)
    }

    /// The files of `view` that [`PackageDb::from_dpkg`] needs: the status
    /// file's path and `(package, path)` of every `.list` file, or `None`
    /// when the image has no dpkg database.
    pub fn wanted_files(view: &MergedView) -> Option<(String, Vec<(String, String)>)> {
        let status = view.get(STATUS_PATH)?;
        if status.entry.kind != EntryKind::File {
            return None;
        }
        let prefix = format!("{INFO_DIR}/");
        let lists = view
            .iter()
            .filter(|me| me.entry.kind == EntryKind::File)
            .filter_map(|me| {
                let name = me.entry.path.strip_prefix(&prefix)?;
                let package = name.strip_suffix(".list")?;
                (!package.contains('/')).then(|| (package.to_string(), me.entry.path.clone()))
            })
            .collect();
        Some((STATUS_PATH.to_string(), lists))
    }

    /// The unit (binary package) that owns `path`, if any.
    pub fn unit_of(&self, path: &str) -> Option<&str> {
        self.owner.get(path).map(String::as_str)
    }

    /// File bytes of each unit present in the view.
    pub fn unit_bytes(&self) -> &BTreeMap<String, u64> {
        &self.unit_bytes
    }

    /// How many paths the database maps.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// Whether the database maps no path.
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

/// Package name → source package name, from a dpkg status file. A package
/// without `Source:` is its own source; `Source: name (version)` keeps
/// the name only.
fn parse_status(status: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(status);
    let mut map = HashMap::new();
    let mut package: Option<String> = None;
    let mut source: Option<String> = None;
    let mut flush = |package: &mut Option<String>, source: &mut Option<String>| {
        if let Some(p) = package.take() {
            let s = source.take().unwrap_or_else(|| p.clone());
            map.insert(p, s);
        }
        *source = None;
    };
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            flush(&mut package, &mut source);
            continue;
        }
        if let Some(v) = line.strip_prefix("Package:") {
            package = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Source:") {
            let name = v.split_whitespace().next().unwrap_or("");
            if !name.is_empty() {
                source = Some(name.to_string());
            }
        }
    }
    flush(&mut package, &mut source);
    map
}

/// Normalise a path: drop empty and `.` components, apply `..`.
fn normalise(parts: &mut Vec<String>, path: &str) {
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c.to_string()),
        }
    }
}

/// The view's path for `listed`, with symlinked parent components
/// resolved (relative and absolute targets, chains up to 40 links). The
/// last component is not resolved: a listed symlink is that symlink.
pub(crate) fn canonical_path(view: &MergedView, listed: &str) -> Option<String> {
    let mut comps = Vec::new();
    normalise(&mut comps, listed);
    let last = comps.pop()?;
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    for c in comps {
        resolved.push(c);
        loop {
            let here = resolved.join("/");
            let Some(me) = view.get(&here) else { break };
            if me.entry.kind != EntryKind::Symlink {
                break;
            }
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = me.entry.link.clone();
            resolved.pop();
            if target.starts_with('/') {
                resolved.clear();
            }
            normalise(&mut resolved, &target);
        }
    }
    resolved.push(last);
    Some(resolved.join("/"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use breakfs_index::{Digest, Entry, MergedEntry};

    fn view(entries: Vec<Entry>) -> MergedView {
        let mut v = MergedView::default();
        for entry in entries {
            v.insert(MergedEntry {
                entry,
                layer: 0,
                data_offset: 0,
            });
        }
        v
    }

    fn file(path: &str, size: u64) -> Entry {
        let mut e = Entry::new(path, EntryKind::File);
        e.size = size;
        e.digest = Some(Digest::of(path.as_bytes()));
        e
    }

    fn link(path: &str, target: &str) -> Entry {
        let mut e = Entry::new(path, EntryKind::Symlink);
        e.link = target.to_string();
        e
    }

    fn dir(path: &str) -> Entry {
        Entry::new(path, EntryKind::Dir)
    }

    const STATUS: &str = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc (2.36-9)\nVersion: 2.36-9\n\nPackage: libc-bin\nSource: glibc\nVersion: 2.36-9\n\nPackage: bash\nVersion: 5.2-1\n";

    #[test]
    fn usrmerge_paths_resolve_and_sources_group_packages() {
        let v = view(vec![
            dir("usr"),
            dir("usr/lib"),
            dir("usr/lib/x86_64-linux-gnu"),
            file("usr/lib/x86_64-linux-gnu/libc.so.6", 100),
            dir("usr/bin"),
            file("usr/bin/bash", 50),
            file("usr/bin/ldd", 7),
            link("lib", "usr/lib"),
            link("bin", "/usr/bin"),
            dir("etc"),
            link("etc/alt", "../usr/lib"),
        ]);
        let lists = vec![
            (
                "libc6:amd64".to_string(),
                b"/.\n/lib\n/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu/libc.so.6\n/etc/alt/gone\n"
                    .to_vec(),
            ),
            ("libc-bin".to_string(), b"/usr/bin/ldd\n".to_vec()),
            ("bash".to_string(), b"/bin/bash\n/bin/missing\n".to_vec()),
        ];
        let db = PackageDb::from_dpkg(STATUS.as_bytes(), &lists, &v);
        assert_eq!(
            db.unit_of("usr/lib/x86_64-linux-gnu/libc.so.6"),
            Some("libc6")
        );
        assert_eq!(db.unit_of("usr/bin/ldd"), Some("libc-bin"));
        assert_eq!(db.unit_of("usr/bin/bash"), Some("bash"));
        assert_eq!(db.source_of("libc-bin"), "glibc");
        assert_eq!(db.source_of("bash"), "bash");
        assert_eq!(db.unit_of("lib"), None, "symlinks are not units' files");
        assert_eq!(db.unit_bytes().get("libc6"), Some(&100));
        assert_eq!(db.len(), 3);
        assert_eq!(
            canonical_path(&v, "/etc/alt/x").as_deref(),
            Some("usr/lib/x")
        );
        assert!(PackageDb::empty().is_empty());
        assert_eq!(PackageDb::wanted_files(&v), None);
        let mut with_db = v.clone();
        for path in [
            STATUS_PATH,
            "var/lib/dpkg/info/libc6:amd64.list",
            "var/lib/dpkg/info/bash.md5sums",
        ] {
            with_db.insert(MergedEntry {
                entry: file(path, 1),
                layer: 0,
                data_offset: 0,
            });
        }
        let (status, lists) = PackageDb::wanted_files(&with_db).unwrap();
        assert_eq!(status, STATUS_PATH);
        assert_eq!(
            lists,
            vec![(
                "libc6:amd64".to_string(),
                "var/lib/dpkg/info/libc6:amd64.list".to_string()
            )]
        );
    }

    #[test]
    fn symlink_loops_give_up() {
        let v = view(vec![link("a", "b"), link("b", "a")]);
        assert_eq!(canonical_path(&v, "/a/x"), None);
    }
}
