//! The tar headers of an eStargz layer: ustar, with a PAX extended header
//! in front where a field does not fit.

use breakfs_index::{Entry, EntryKind};

use crate::{Error, Result};

/// Zero bytes that follow `size` bytes of payload to the next 512 boundary.
pub(super) fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

const MAX_OCTAL_7: u64 = 0o7_777_777;
const MAX_OCTAL_11: u64 = 0o77_777_777_777;

/// Append the tar header(s) of `e`, written under `name`: a PAX extended
/// header first when a field does not fit ustar, then the ustar header.
pub(super) fn push_header(out: &mut Vec<u8>, e: &Entry, name: &str) -> Result<()> {
    let mut pax = Vec::new();
    if name.len() > 100 {
        pax_record(&mut pax, "path", name.as_bytes());
    }
    let link = match e.kind {
        EntryKind::Symlink | EntryKind::Hardlink => e.link.as_str(),
        _ => "",
    };
    if link.len() > 100 {
        pax_record(&mut pax, "linkpath", link.as_bytes());
    }
    let size = if e.kind == EntryKind::File { e.size } else { 0 };
    let mut field = |key: &str, v: u64, max: u64| -> u64 {
        if v > max {
            pax_record(&mut pax, key, v.to_string().as_bytes());
            0
        } else {
            v
        }
    };
    let uid = field("uid", u64::from(e.uid), MAX_OCTAL_7);
    let gid = field("gid", u64::from(e.gid), MAX_OCTAL_7);
    let size_field = field("size", size, MAX_OCTAL_11);
    let mtime = if e.mtime < 0 || e.mtime as u64 > MAX_OCTAL_11 {
        pax_record(&mut pax, "mtime", e.mtime.to_string().as_bytes());
        0
    } else {
        e.mtime as u64
    };
    for (k, v) in &e.xattrs {
        pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
    }
    if u64::from(e.dev_major) > MAX_OCTAL_7 || u64::from(e.dev_minor) > MAX_OCTAL_7 {
        return Err(Error::BadEntry {
            path: e.path.clone(),
            reason: format!(
                "device {}:{} does not fit a tar header (at most {MAX_OCTAL_7} each)",
                e.dev_major, e.dev_minor
            ),
        });
    }
    if !pax.is_empty() {
        let mut h = [0u8; 512];
        put_bytes(&mut h[0..100], b"././@PaxHeader");
        put_octal(&mut h[100..108], 0o644);
        put_octal(&mut h[108..116], 0);
        put_octal(&mut h[116..124], 0);
        put_octal(&mut h[124..136], pax.len() as u64);
        put_octal(&mut h[136..148], 0);
        h[156] = b'x';
        finish_ustar(&mut h);
        out.extend_from_slice(&h);
        let pad = padding(pax.len() as u64);
        out.extend_from_slice(&pax);
        out.resize(out.len() + pad, 0);
    }
    let mut h = [0u8; 512];
    put_bytes(&mut h[0..100], truncate(name.as_bytes(), 100));
    put_octal(&mut h[100..108], u64::from(e.mode & 0o7777));
    put_octal(&mut h[108..116], uid);
    put_octal(&mut h[116..124], gid);
    put_octal(&mut h[124..136], size_field);
    put_octal(&mut h[136..148], mtime);
    h[156] = match e.kind {
        EntryKind::File => b'0',
        EntryKind::Hardlink => b'1',
        EntryKind::Symlink => b'2',
        EntryKind::CharDev => b'3',
        EntryKind::BlockDev => b'4',
        EntryKind::Dir => b'5',
        EntryKind::Fifo => b'6',
    };
    put_bytes(&mut h[157..257], truncate(link.as_bytes(), 100));
    if matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev) {
        put_octal(&mut h[329..337], u64::from(e.dev_major));
        put_octal(&mut h[337..345], u64::from(e.dev_minor));
    }
    finish_ustar(&mut h);
    out.extend_from_slice(&h);
    Ok(())
}

fn truncate(b: &[u8], n: usize) -> &[u8] {
    &b[..b.len().min(n)]
}

fn put_bytes(field: &mut [u8], b: &[u8]) {
    field[..b.len()].copy_from_slice(b);
}

/// Zero-padded octal digits filling all but the last byte, then NUL.
fn put_octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

/// Magic, version and checksum of a ustar header.
fn finish_ustar(h: &mut [u8; 512]) {
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
}

/// One PAX record: `LEN key=value\n`, LEN counting itself.
pub(super) fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let base = key.len() + value.len() + 3;
    let mut len = base + base.to_string().len();
    if len.to_string().len() != base.to_string().len() {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}
