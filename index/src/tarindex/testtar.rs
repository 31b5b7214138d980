#![allow(clippy::unwrap_used)]

use tar::{Builder, EntryType, Header};

use crate::{Entry, EntryKind};

/// Append `e` (with `content` for files) to `b`, PAX xattrs first.
pub(crate) fn append(b: &mut Builder<Vec<u8>>, e: &Entry, content: &[u8]) {
    if !e.xattrs.is_empty() {
        let keys: Vec<String> = e
            .xattrs
            .keys()
            .map(|k| format!("SCHILY.xattr.{k}"))
            .collect();
        b.append_pax_extensions(
            keys.iter()
                .map(String::as_str)
                .zip(e.xattrs.values().map(Vec::as_slice)),
        )
        .unwrap();
    }
    let mut h = Header::new_gnu();
    h.set_mode(e.mode);
    h.set_uid(e.uid.into());
    h.set_gid(e.gid.into());
    h.set_mtime(e.mtime as u64);
    h.set_size(0);
    let t = match e.kind {
        EntryKind::File => EntryType::Regular,
        EntryKind::Dir => EntryType::Directory,
        EntryKind::Symlink => EntryType::Symlink,
        EntryKind::Hardlink => EntryType::Link,
        EntryKind::CharDev => EntryType::Char,
        EntryKind::BlockDev => EntryType::Block,
        EntryKind::Fifo => EntryType::Fifo,
    };
    h.set_entry_type(t);
    match e.kind {
        EntryKind::Symlink | EntryKind::Hardlink => {
            b.append_link(&mut h, &e.path, &e.link).unwrap();
        }
        EntryKind::File => {
            h.set_size(content.len() as u64);
            b.append_data(&mut h, &e.path, content).unwrap();
        }
        EntryKind::CharDev | EntryKind::BlockDev => {
            h.set_device_major(e.dev_major).unwrap();
            h.set_device_minor(e.dev_minor).unwrap();
            b.append_data(&mut h, &e.path, &[][..]).unwrap();
        }
        EntryKind::Dir | EntryKind::Fifo => {
            b.append_data(&mut h, &e.path, &[][..]).unwrap();
        }
    }
}

/// A whole tar of `entries`, each with its content.
pub(crate) fn tar_of(entries: &[(Entry, Vec<u8>)]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for (e, c) in entries {
        append(&mut b, e, c);
    }
    b.into_inner().unwrap()
}

/// Append a header whose name field holds `name` verbatim (no checks).
pub(crate) fn append_raw_name(b: &mut Builder<Vec<u8>>, name: &[u8], t: EntryType, data: &[u8]) {
    let mut h = Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(t);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}
