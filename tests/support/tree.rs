//! Directory-tree snapshots for comparing a root filesystem with what an
//! image's layers hold: every path's type, mode, owner, size, mtime,
//! content digest, link target, device numbers, hardlink group and xattrs.
//!
//! The walk never follows symlinks (`symlink_metadata`, `llistxattr`), so a
//! snapshot of a mounted image describes the image, not the host. Paths are
//! relative to the root, `/`-separated, and the root itself is `"."`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::FileType;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};

/// The type of one tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        })
    }
}

impl Kind {
    fn of(ft: FileType) -> Option<Kind> {
        Some(if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            return None;
        })
    }
}

/// Everything recorded about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// File type.
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Byte size for regular files; 0 for everything else.
    pub size: u64,
    /// Modification time, whole seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: i64,
    /// `sha256:HEX` of the content, regular files only.
    pub sha256: Option<String>,
    /// Symlink target, symlinks only.
    pub link_target: Option<String>,
    /// (major, minor) for character and block devices.
    pub rdev: Option<(u32, u32)>,
    /// The sorted paths in this tree that share this entry's inode
    /// (including itself); empty when no other path in the tree does.
    pub hardlinks: Vec<String>,
    /// Extended attributes, all namespaces readable by the caller.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Major number of a Linux `dev_t` (glibc's `gnu_dev_major`).
pub fn dev_major(dev: u64) -> u32 {
    (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32
}

/// Minor number of a Linux `dev_t` (glibc's `gnu_dev_minor`).
pub fn dev_minor(dev: u64) -> u32 {
    ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32
}

/// Walk `root` (without following symlinks) and describe every path below it.
pub fn snapshot(root: &Path) -> Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    walk(root, ".", &mut out, &mut inodes)?;
    for mut paths in inodes.into_values() {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        for p in &paths {
            if let Some(node) = out.get_mut(p) {
                node.hardlinks = paths.clone();
            }
        }
    }
    Ok(out)
}

fn walk(
    path: &Path,
    rel: &str,
    out: &mut BTreeMap<String, Node>,
    inodes: &mut HashMap<(u64, u64), Vec<String>>,
) -> Result<()> {
    let md = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    let kind = Kind::of(md.file_type())
        .with_context(|| format!("{} has an unknown file type", path.display()))?;
    let mut xattrs = BTreeMap::new();
    // Sockets and fifos on some filesystems refuse xattr calls; treat an
    // unsupported-operation answer as "none".
    match xattr::list(path) {
        Ok(names) => {
            for name in names {
                let value = xattr::get(path, &name)
                    .with_context(|| format!("reading xattr {name:?} of {}", path.display()))?;
                if let Some(v) = value {
                    xattrs.insert(name.to_string_lossy().into_owned(), v);
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(95) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("listing the xattrs of {}", path.display()));
        }
    }
    let mut node = Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: 0,
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        sha256: None,
        link_target: None,
        rdev: None,
        hardlinks: Vec::new(),
        xattrs,
    };
    match kind {
        Kind::File => {
            node.size = md.len();
            node.sha256 = Some(sha256_file(path)?);
        }
        Kind::Symlink => {
            let t = std::fs::read_link(path)
                .with_context(|| format!("reading the symlink {}", path.display()))?;
            node.link_target = Some(t.to_string_lossy().into_owned());
        }
        Kind::Char | Kind::Block => {
            node.rdev = Some((dev_major(md.rdev()), dev_minor(md.rdev())));
        }
        Kind::Dir | Kind::Fifo | Kind::Socket => {}
    }
    if kind != Kind::Dir {
        inodes
            .entry((md.dev(), md.ino()))
            .or_default()
            .push(rel.to_string());
    }
    out.insert(rel.to_string(), node);
    if kind == Kind::Dir {
        let mut children = Vec::new();
        for e in std::fs::read_dir(path)
            .with_context(|| format!("listing the directory {}", path.display()))?
        {
            let e = e.with_context(|| format!("listing the directory {}", path.display()))?;
            children.push(e.file_name());
        }
        children.sort();
        for name in children {
            let name_s = name.to_string_lossy();
            let child_rel = if rel == "." {
                name_s.into_owned()
            } else {
                format!("{rel}/{name_s}")
            };
            walk(&path.join(&name), &child_rel, out, inodes)?;
        }
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What [`compare`] leaves out.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// Paths (and everything below them) that may be on either side only
    /// and are not compared, e.g. `stargz.index.json`, `.prefetch.landmark`.
    pub ignore_paths: Vec<String>,
    /// Do not compare the mtime of `"."`.
    pub ignore_root_mtime: bool,
    /// Do not compare the mtime of any directory.
    pub ignore_dir_mtime: bool,
    /// Do not compare the mtime of these paths.
    pub ignore_mtime_of: BTreeSet<String>,
    /// Compare mtimes in whole seconds only (tar headers without PAX
    /// times carry no nanoseconds).
    pub ignore_mtime_nanos: bool,
}

impl CompareOptions {
    fn ignored(&self, path: &str) -> bool {
        self.ignore_paths.iter().any(|i| {
            let i = i.trim_matches('/');
            path == i || path.strip_prefix(i).is_some_and(|r| r.starts_with('/'))
        })
    }
}

fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}

fn show_bytes(v: Option<&Vec<u8>>) -> String {
    match v {
        None => "missing".into(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
            _ => format!("0x{}", hex::encode(v)),
        },
    }
}

fn show_opt<T: fmt::Debug>(v: &Option<T>) -> String {
    match v {
        None => "none".into(),
        Some(v) => format!("{v:?}"),
    }
}

/// Human-readable differences between two snapshots, in path order:
/// `usr/bin/x: mode 0755 vs 0700`, `only in left: etc/y`. Empty when equal.
pub fn compare(
    a: &BTreeMap<String, Node>,
    b: &BTreeMap<String, Node>,
    opts: &CompareOptions,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let keep = |group: &[String]| -> Vec<String> {
        group
            .iter()
            .filter(|p| !opts.ignored(p))
            .cloned()
            .collect::<Vec<_>>()
    };
    for path in paths {
        if opts.ignored(path) {
            continue;
        }
        let (l, r) = match (a.get(path), b.get(path)) {
            (Some(l), Some(r)) => (l, r),
            (Some(_), None) => {
                diffs.push(format!("only in left: {path}"));
                continue;
            }
            (None, Some(_)) => {
                diffs.push(format!("only in right: {path}"));
                continue;
            }
            (None, None) => continue,
        };
        let mut d = |what: String| diffs.push(format!("{path}: {what}"));
        if l.kind != r.kind {
            d(format!("type {} vs {}", l.kind, r.kind));
            continue;
        }
        if l.mode != r.mode {
            d(format!("mode {} vs {}", octal(l.mode), octal(r.mode)));
        }
        if l.uid != r.uid {
            d(format!("uid {} vs {}", l.uid, r.uid));
        }
        if l.gid != r.gid {
            d(format!("gid {} vs {}", l.gid, r.gid));
        }
        if l.size != r.size {
            d(format!("size {} vs {}", l.size, r.size));
        }
        let skip_mtime = (path == "." && opts.ignore_root_mtime)
            || (l.kind == Kind::Dir && opts.ignore_dir_mtime)
            || opts.ignore_mtime_of.contains(path.as_str());
        if !skip_mtime {
            if l.mtime != r.mtime {
                d(format!("mtime {} vs {}", l.mtime, r.mtime));
            } else if !opts.ignore_mtime_nanos && l.mtime_nsec != r.mtime_nsec {
                d(format!(
                    "mtime nanoseconds {} vs {}",
                    l.mtime_nsec, r.mtime_nsec
                ));
            }
        }
        if l.sha256 != r.sha256 {
            d(format!(
                "content {} vs {}",
                show_opt(&l.sha256),
                show_opt(&r.sha256)
            ));
        }
        if l.link_target != r.link_target {
            d(format!(
                "link target {} vs {}",
                show_opt(&l.link_target),
                show_opt(&r.link_target)
            ));
        }
        if l.rdev != r.rdev {
            d(format!(
                "device {} vs {}",
                show_opt(&l.rdev),
                show_opt(&r.rdev)
            ));
        }
        let (lh, rh) = (keep(&l.hardlinks), keep(&r.hardlinks));
        // A group cut down to this one path by ignore_paths is no group.
        let norm = |g: Vec<String>| if g.len() < 2 { Vec::new() } else { g };
        let (lh, rh) = (norm(lh), norm(rh));
        if lh != rh {
            d(format!("hardlink group {lh:?} vs {rh:?}"));
        }
        let names: BTreeSet<&String> = l.xattrs.keys().chain(r.xattrs.keys()).collect();
        for name in names {
            let (lv, rv) = (l.xattrs.get(name), r.xattrs.get(name));
            if lv != rv {
                d(format!(
                    "xattr {name} {} vs {}",
                    show_bytes(lv),
                    show_bytes(rv)
                ));
            }
        }
    }
    diffs
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(cmd: &str, args: &[&str]) {
        let st = Command::new(cmd).args(args).status().unwrap();
        assert!(st.success(), "{cmd} {args:?} failed");
    }

    /// A tree with every kind of entry the walker knows.
    fn build(root: &Path) {
        let p = |s: &str| root.join(s);
        std::fs::create_dir_all(p("usr/bin")).unwrap();
        std::fs::write(p("usr/bin/x"), b"#!/bin/sh\necho x\n").unwrap();
        std::fs::hard_link(p("usr/bin/x"), p("usr/bin/x2")).unwrap();
        std::fs::write(p("etc"), b"not a dir").unwrap();
        std::os::unix::fs::symlink("usr/bin/x", p("link")).unwrap();
        std::os::unix::fs::symlink("/does/not/exist", p("dangling")).unwrap();
        sh("mkfifo", &[p("fifo").to_str().unwrap()]);
        sh("mknod", &[p("null").to_str().unwrap(), "c", "1", "3"]);
        let _sock = std::os::unix::net::UnixListener::bind(p("sock")).unwrap();
        xattr::set(p("usr/bin/x"), "user.breakfs", b"yes").unwrap();
        // security.capability = cap_net_bind_service+ep (vfs cap v2).
        let cap = [
            0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        xattr::set(p("usr/bin/x"), "security.capability", &cap).unwrap();
        sh("chmod", &["4750", p("usr/bin/x").to_str().unwrap()]);
        sh("chown", &["-h", "12:34", p("link").to_str().unwrap()]);
        let t = filetime::FileTime::from_unix_time(1_700_000_000, 123_456_789);
        filetime::set_symlink_file_times(p("link"), t, t).unwrap();
        filetime::set_file_mtime(p("usr/bin/x"), t).unwrap();
    }

    #[test]
    fn snapshot_records_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        let s = snapshot(dir.path()).unwrap();
        let kinds: Vec<(&str, Kind)> = s.iter().map(|(p, n)| (p.as_str(), n.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (".", Kind::Dir),
                ("dangling", Kind::Symlink),
                ("etc", Kind::File),
                ("fifo", Kind::Fifo),
                ("link", Kind::Symlink),
                ("null", Kind::Char),
                ("sock", Kind::Socket),
                ("usr", Kind::Dir),
                ("usr/bin", Kind::Dir),
                ("usr/bin/x", Kind::File),
                ("usr/bin/x2", Kind::File),
            ]
        );
        let x = &s["usr/bin/x"];
        assert_eq!(x.mode, 0o4750);
        assert_eq!(x.size, 17);
        assert_eq!(
            x.sha256.as_deref(),
            Some(
                format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(b"#!/bin/sh\necho x\n"))
                )
                .as_str()
            )
        );
        assert_eq!((x.mtime, x.mtime_nsec), (1_700_000_000, 123_456_789));
        assert_eq!(x.hardlinks, vec!["usr/bin/x", "usr/bin/x2"]);
        assert_eq!(s["usr/bin/x2"].hardlinks, x.hardlinks);
        assert_eq!(x.xattrs["user.breakfs"], b"yes");
        assert_eq!(x.xattrs["security.capability"].len(), 20);
        let link = &s["link"];
        assert_eq!(link.link_target.as_deref(), Some("usr/bin/x"));
        assert_eq!((link.uid, link.gid), (12, 34));
        assert_eq!(link.mtime, 1_700_000_000);
        assert_eq!(link.size, 0);
        assert!(link.sha256.is_none(), "a symlink is not followed");
        assert_eq!(s["null"].rdev, Some((1, 3)));
        assert!(s["etc"].hardlinks.is_empty());
        assert!(s["dangling"].hardlinks.is_empty());
    }

    #[test]
    fn identical_trees_compare_equal_and_changes_are_named() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        build(a.path());
        build(b.path());
        let opts = CompareOptions {
            ignore_dir_mtime: true,
            ignore_root_mtime: true,
            // The sockets and fifos get the creation time.
            ignore_mtime_of: ["fifo", "sock", "null", "dangling", "etc", "usr/bin/x2"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..Default::default()
        };
        let (sa, sb) = (snapshot(a.path()).unwrap(), snapshot(b.path()).unwrap());
        assert_eq!(compare(&sa, &sb, &opts), Vec::<String>::new());

        let pb = |s: &str| b.path().join(s);
        sh("chmod", &["0700", pb("usr/bin/x").to_str().unwrap()]);
        xattr::set(pb("usr/bin/x"), "user.breakfs", b"no").unwrap();
        xattr::remove(pb("usr/bin/x"), "security.capability").unwrap();
        std::fs::remove_file(pb("usr/bin/x2")).unwrap();
        std::fs::write(pb("usr/bin/x2"), b"#!/bin/sh\necho x\n").unwrap();
        std::fs::remove_file(pb("link")).unwrap();
        std::os::unix::fs::symlink("elsewhere", pb("link")).unwrap();
        std::fs::remove_file(pb("fifo")).unwrap();
        std::fs::create_dir(pb("fifo")).unwrap();
        std::fs::remove_file(pb("etc")).unwrap();
        std::fs::write(pb("new"), b"").unwrap();
        std::fs::write(pb("stargz.index.json"), b"{}").unwrap();
        let t = filetime::FileTime::from_unix_time(1_700_000_000, 5);
        filetime::set_file_mtime(pb("usr/bin/x"), t).unwrap();

        let opts = CompareOptions {
            ignore_paths: vec!["stargz.index.json".into()],
            ignore_mtime_of: opts
                .ignore_mtime_of
                .iter()
                .cloned()
                .chain(["link".to_string()])
                .collect(),
            ..opts
        };
        let diffs = compare(&sa, &snapshot(b.path()).unwrap(), &opts);
        let cap = "0x0100000200040000000000000000000000000000";
        assert_eq!(
            diffs,
            vec![
                "only in left: etc".to_string(),
                "fifo: type fifo vs dir".into(),
                "link: uid 12 vs 0".into(),
                "link: gid 34 vs 0".into(),
                "link: link target \"usr/bin/x\" vs \"elsewhere\"".into(),
                "only in right: new".into(),
                "usr/bin/x: mode 4750 vs 0700".into(),
                "usr/bin/x: mtime nanoseconds 123456789 vs 5".into(),
                "usr/bin/x: hardlink group [\"usr/bin/x\", \"usr/bin/x2\"] vs []".into(),
                format!("usr/bin/x: xattr security.capability {cap} vs missing"),
                "usr/bin/x: xattr user.breakfs \"yes\" vs \"no\"".into(),
                "usr/bin/x2: mode 4750 vs 0644".into(),
                "usr/bin/x2: hardlink group [\"usr/bin/x\", \"usr/bin/x2\"] vs []".into(),
                format!("usr/bin/x2: xattr security.capability {cap} vs missing"),
                "usr/bin/x2: xattr user.breakfs \"yes\" vs missing".into(),
            ]
        );
        let seconds_only = CompareOptions {
            ignore_mtime_nanos: true,
            ..opts
        };
        let diffs = compare(&sa, &snapshot(b.path()).unwrap(), &seconds_only);
        assert!(!diffs.iter().any(|d| d.contains("mtime")), "{diffs:#?}");
    }

    #[test]
    fn ignored_paths_hide_subtrees_and_hardlink_members() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::write(d.join("f"), b"1").unwrap();
        }
        std::fs::hard_link(b.path().join("f"), b.path().join(".prefetch.landmark")).unwrap();
        std::fs::create_dir_all(b.path().join("extra/deep")).unwrap();
        let opts = CompareOptions {
            ignore_paths: vec![".prefetch.landmark".into(), "extra".into()],
            ignore_root_mtime: true,
            ignore_mtime_of: ["f".to_string()].into(),
            ..Default::default()
        };
        let diffs = compare(
            &snapshot(a.path()).unwrap(),
            &snapshot(b.path()).unwrap(),
            &opts,
        );
        assert_eq!(diffs, Vec::<String>::new());
    }
}
