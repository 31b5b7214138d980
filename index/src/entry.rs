//! One file-system entry of a layer or of a merged view.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// The type of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; [`Entry::link`] is the target.
    Symlink,
    /// A hard link; [`Entry::link`] is the path of the file it links to.
    Hardlink,
    /// A character device.
    CharDev,
    /// A block device.
    BlockDev,
    /// A named pipe.
    Fifo,
}

/// One entry with all the metadata the merged view compares.
///
/// Paths are relative to the image root, normalised: no leading `/` or
/// `./`, no trailing `/`, no `.` or `..` components; the root itself is
/// never an entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised path, e.g. `usr/bin/python3`.
    pub path: String,
    /// The entry's type.
    pub kind: EntryKind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Content size for regular files (and hard links in a merged view), else 0.
    pub size: u64,
    /// sha256 of the content, for regular files (and hard links in a merged view).
    pub digest: Option<Digest>,
    /// Symlink target, or the path a hard link points to.
    pub link: String,
    /// Device major number, for devices.
    pub dev_major: u32,
    /// Device minor number, for devices.
    pub dev_minor: u32,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    /// A new entry of `kind` at `path` with zeroed metadata.
    pub fn new(path: impl Into<String>, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            digest: None,
            link: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// Whether this entry carries file content (a regular file).
    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }

    /// Whether two entries are equal in everything but mtime.
    pub fn eq_ignoring_mtime(&self, other: &Entry) -> bool {
        self.path == other.path
            && self.kind == other.kind
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.size == other.size
            && self.digest == other.digest
            && self.link == other.link
            && self.dev_major == other.dev_major
            && self.dev_minor == other.dev_minor
            && self.xattrs == other.xattrs
    }
}
