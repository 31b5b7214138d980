//! Reading one layer's tar stream into a list of entries.
//!
//! The stream is read once, front to back: every entry's metadata, the
//! sha256 of every regular file's content and where that content sits in
//! the stream, and the diff_id of the whole stream. Paths that could escape
//! the image root (`..`, absolute paths) and entry types breakfs cannot
//! represent are refused here, so nothing downstream has to care.
//!
//! The block framing is done here, with `tar::Header` for the header
//! layout: the `tar` crate's own entry iterator splits PAX records at
//! newlines, which corrupts binary xattr values (`security.capability`
//! often contains a `\n` byte), and we want exact offsets and a clear
//! error for every way a stream can end early.

use std::io::{self, Read, Write};

use base64::Engine as _;
use tar::EntryType;

use crate::{Digest, Entry, EntryKind, Error, HashingReader, Result};

/// One tar entry of a layer, with where its content starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    /// The entry, path normalised; whiteouts keep their `.wh.` names here.
    pub entry: Entry,
    /// Offset of the content in the uncompressed tar stream.
    pub data_offset: u64,
}

/// A layer's entries in tar order, with its diff_id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// Entries in tar order.
    pub entries: Vec<LayerEntry>,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Size of the uncompressed tar stream.
    pub tar_size: u64,
}

const BLOCK: usize = 512;
/// Largest GNU long name / long link / PAX header accepted, so a corrupt
/// size field cannot make us buffer gigabytes.
const MAX_EXTENSION: u64 = 16 << 20;
/// Most entries a layer may have. Refactoring holds about 2.5 KiB per
/// entry (a million took 2.5 GiB), so this bounds a layer to about 5 GiB;
/// the largest layers of real images have a few hundred thousand.
pub const MAX_ENTRIES: usize = 1 << 21;

impl LayerIndex {
    /// [`LayerIndex::read`], copying every byte read into `out` on the way
    /// (one pass to both index a layer and keep its uncompressed tar).
    pub fn read_copying<R: Read, W: Write>(
        reader: R,
        out: &mut W,
        what: &str,
    ) -> Result<LayerIndex> {
        LayerIndex::read(Tee { inner: reader, out }, what)
    }

    /// Read an uncompressed layer tar stream; `what` names the layer in errors
    /// (e.g. `layer sha256:ab12… of oci:/x:v1`).
    ///
    /// Handles v7, ustar (with the name prefix), GNU long names and long
    /// links, base-256 numbers, and PAX headers (`path`, `linkpath`, `size`,
    /// `uid`, `gid`, `mtime`, `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`).
    /// Global PAX headers are skipped. The root entry (`./`, `/`) is not
    /// recorded.
    pub fn read<R: Read>(reader: R, what: &str) -> Result<LayerIndex> {
        LayerIndex::read_at_most(reader, what, MAX_ENTRIES)
    }

    /// [`LayerIndex::read`], refusing a layer of more than `max` entries.
    fn read_at_most<R: Read>(reader: R, what: &str, max: usize) -> Result<LayerIndex> {
        let mut stream = HashingReader::new(reader);
        let mut entries = Vec::new();
        let mut ext = Extensions::default();
        let mut block = [0u8; BLOCK];
        loop {
            let header_pos = stream.count();
            match read_block(&mut stream, &mut block).map_err(|e| Error::io(what, e))? {
                Block::Eof => {
                    return Err(truncated(
                        what,
                        format!(
                            "tar stream ends after {header_pos} bytes without the \
                             end-of-archive marker"
                        ),
                    ));
                }
                Block::Zero if ext.is_empty() => break,
                Block::Zero => {
                    return Err(truncated(
                        what,
                        format!("extension headers at offset {header_pos} describe no entry"),
                    ));
                }
                Block::Data => {}
            }
            let header = tar::Header::from_byte_slice(&block);
            if !checksum_ok(&block) {
                return Err(Error::io(
                    what,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "tar header at offset {header_pos} has a wrong checksum: \
                             the layer is corrupt or not an uncompressed tar"
                        ),
                    ),
                ));
            }
            let etype = header.entry_type();
            let shown = || String::from_utf8_lossy(&header.path_bytes()).into_owned();
            let header_size = num(&header.as_old().size).ok_or_else(|| Error::BadEntry {
                path: shown(),
                reason: format!("unreadable size field (in {what})"),
            })?;
            match etype {
                EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader => {
                    let data = read_extension(&mut stream, header_size, what, &shown())?;
                    match etype {
                        EntryType::GNULongName => ext.long_name = Some(trim_nul(data)),
                        EntryType::GNULongLink => ext.long_link = Some(trim_nul(data)),
                        _ => {
                            ext.pax = parse_pax(&data).map_err(|reason| Error::BadEntry {
                                path: shown(),
                                reason: format!("{reason} (in {what})"),
                            })?
                        }
                    }
                    continue;
                }
                EntryType::XGlobalHeader => {
                    read_extension(&mut stream, header_size, what, &shown())?;
                    continue;
                }
                _ => {}
            }
            let pax_size = ext.pax_value("size");
            let size = match pax_size {
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| Error::BadEntry {
                        path: shown(),
                        reason: format!("PAX size is not a number (in {what})"),
                    })?,
                None => header_size,
            };
            let exts = std::mem::take(&mut ext);
            let data_offset = stream.count();
            let parsed = index_entry(header, &exts, what)?;
            let content = match parsed {
                Some(_) if entries.len() >= max => {
                    return Err(Error::io(
                        what,
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the layer has more than {max} entries (the next is at offset \
                                 {header_pos}); breakfs refuses layers this large, as indexing \
                                 them would take gigabytes of memory: split the layer"
                            ),
                        ),
                    ));
                }
                Some(mut entry) => {
                    if entry.kind == EntryKind::File {
                        let mut hashing = HashingReader::new((&mut stream).take(size));
                        io::copy(&mut hashing, &mut io::sink()).map_err(|e| Error::io(what, e))?;
                        let (digest, got) = hashing.finish();
                        if got != size {
                            return Err(truncated(
                                what,
                                format!(
                                    "{:?} should have {size} bytes but the stream ends \
                                     after {got}",
                                    entry.path
                                ),
                            ));
                        }
                        entry.size = size;
                        entry.digest = Some(digest);
                        entries.push(LayerEntry { entry, data_offset });
                        0
                    } else {
                        entries.push(LayerEntry { entry, data_offset });
                        size
                    }
                }
                None => size,
            };
            let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
            // A PAX size may be any u64: past the largest stream, not an overflow.
            let rest = content
                .checked_add(padding)
                .ok_or_else(|| Error::BadEntry {
                    path: shown(),
                    reason: format!("size {size} is larger than any tar stream (in {what})"),
                })?;
            skip(&mut stream, rest, what)?;
        }
        io::copy(&mut stream, &mut io::sink()).map_err(|e| Error::io(what, e))?;
        let (diff_id, tar_size) = stream.finish();
        Ok(LayerIndex {
            entries,
            diff_id,
            tar_size,
        })
    }
}

/// What GNU long name/link and PAX headers said about the next entry.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Vec<(String, Vec<u8>)>,
}

impl Extensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_empty()
    }

    /// The last value of PAX `key`; an empty value unsets it, as POSIX says.
    fn pax_value(&self, key: &str) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
            .filter(|v| !v.is_empty())
    }
}

enum Block {
    Data,
    Zero,
    Eof,
}

fn read_block<R: Read>(r: &mut R, buf: &mut [u8; BLOCK]) -> io::Result<Block> {
    let mut read = 0;
    while read < BLOCK {
        match r.read(&mut buf[read..]) {
            Ok(0) if read == 0 => return Ok(Block::Eof),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside a header: the layer is truncated, fetch it again",
                ));
            }
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if buf.iter().all(|b| *b == 0) {
        Block::Zero
    } else {
        Block::Data
    })
}

fn truncated(what: &str, detail: String) -> Error {
    Error::io(
        what,
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{detail}: the layer is truncated, fetch it again"),
        ),
    )
}

fn skip<R: Read>(r: &mut R, n: u64, what: &str) -> Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink()).map_err(|e| Error::io(what, e))?;
    if got != n {
        return Err(truncated(
            what,
            format!("tar stream ends {} bytes early", n - got),
        ));
    }
    Ok(())
}

/// Read an extension header's data and its padding.
fn read_extension<R: Read>(r: &mut R, size: u64, what: &str, shown: &str) -> Result<Vec<u8>> {
    if size > MAX_EXTENSION {
        return Err(Error::BadEntry {
            path: shown.to_string(),
            reason: format!(
                "extension header of {size} bytes, more than the {MAX_EXTENSION} breakfs \
                 accepts (in {what})"
            ),
        });
    }
    let mut data = Vec::new();
    r.take(size)
        .read_to_end(&mut data)
        .map_err(|e| Error::io(what, e))?;
    if data.len() as u64 != size {
        return Err(truncated(
            what,
            "tar stream ends inside an extension header".to_string(),
        ));
    }
    skip(r, (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64, what)?;
    Ok(data)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parse PAX records (`LEN KEY=VALUE\n`). Values are binary-safe: the
/// length, not the newline, ends a record (xattr values such as
/// `security.capability` may contain newlines).
fn parse_pax(mut data: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|b| *b == 0) {
            break;
        }
        let bad = || "malformed PAX header record".to_string();
        let sp = data.iter().position(|b| *b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad());
        }
        let kv = &data[sp + 1..len - 1];
        let eq = kv.iter().position(|b| *b == b'=').ok_or_else(bad)?;
        let key = std::str::from_utf8(&kv[..eq]).map_err(|_| bad())?;
        out.push((key.to_string(), kv[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// Both the unsigned and the signed byte sum are accepted, like GNU tar
/// and Go's archive/tar.
fn checksum_ok(block: &[u8; BLOCK]) -> bool {
    let Some(want) = num(&block[148..156]) else {
        return false;
    };
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || i64::try_from(want).ok() == Some(signed)
}

/// A numeric header field: octal text (blank means 0, like Go's
/// archive/tar) or GNU base-256.
fn num(field: &[u8]) -> Option<u64> {
    u64::try_from(signed_num(field)?).ok()
}

fn signed_num(field: &[u8]) -> Option<i64> {
    let first = *field.first()?;
    if first & 0x80 != 0 {
        let inv = if first & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, c) in field.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        let x = i64::try_from(x).ok()?;
        return Some(if inv == 0xff { !x } else { x });
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    i64::from_str_radix(text, 8).ok()
}

/// Turn one tar header (and its extensions) into an entry; `None` for the
/// root directory. Content size and digest are filled in by the caller.
fn index_entry(header: &tar::Header, ext: &Extensions, what: &str) -> Result<Option<Entry>> {
    let raw_path: Vec<u8> = match (&ext.long_name, ext.pax_value("path")) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p.to_vec(),
        (None, None) => header.path_bytes().into_owned(),
    };
    let shown = shown_path(&String::from_utf8_lossy(&raw_path));
    let bad = |reason: String| Error::BadEntry {
        path: shown.clone(),
        reason: format!("{reason} (in {what})"),
    };
    let etype = header.entry_type();
    let kind = match etype {
        EntryType::Regular | EntryType::Continuous if raw_path.ends_with(b"/") => EntryKind::Dir,
        EntryType::Regular | EntryType::Continuous => EntryKind::File,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Char => EntryKind::CharDev,
        EntryType::Block => EntryKind::BlockDev,
        EntryType::Fifo => EntryKind::Fifo,
        other => {
            return Err(bad(format!(
                "unsupported tar entry type {}: breakfs reads regular files, directories, \
                 links, devices and fifos only; rebuild the layer without it",
                type_name(other)
            )));
        }
    };
    if ext.pax.iter().any(|(k, _)| k.starts_with("GNU.sparse.")) {
        return Err(bad(
            "GNU sparse file in PAX format: breakfs does not read sparse files; \
             rebuild the layer without --sparse"
                .to_string(),
        ));
    }
    let path_str = String::from_utf8(raw_path.clone())
        .map_err(|_| bad("path is not valid UTF-8".to_string()))?;
    let Some(path) = normalize(&path_str).map_err(bad)? else {
        return Ok(None);
    };

    let old = header.as_old();
    let pax_num = |key: &str| -> Result<Option<u64>> {
        match ext.pax_value(key) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| bad(format!("PAX {key} is not a number"))),
        }
    };
    let field = |name: &str, raw: &[u8]| -> Result<u64> {
        num(raw).ok_or_else(|| bad(format!("unreadable {name} field")))
    };
    let mode = field("mode", &old.mode)? as u32 & 0o7777;
    let uid = match pax_num("uid")? {
        Some(v) => v,
        None => field("uid", &old.uid)?,
    };
    let uid = u32::try_from(uid).map_err(|_| bad(format!("uid {uid} does not fit 32 bits")))?;
    let gid = match pax_num("gid")? {
        Some(v) => v,
        None => field("gid", &old.gid)?,
    };
    let gid = u32::try_from(gid).map_err(|_| bad(format!("gid {gid} does not fit 32 bits")))?;
    let mtime = match ext.pax_value("mtime") {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(parse_pax_time)
            .ok_or_else(|| bad("PAX mtime is not a number".to_string()))?,
        None => signed_num(&old.mtime).ok_or_else(|| bad("unreadable mtime field".to_string()))?,
    };
    let (dev_major, dev_minor) = match (kind, header.as_ustar(), header.as_gnu()) {
        (EntryKind::CharDev | EntryKind::BlockDev, Some(u), _) => (
            field("device major", &u.dev_major)?,
            field("device minor", &u.dev_minor)?,
        ),
        (EntryKind::CharDev | EntryKind::BlockDev, None, Some(g)) => (
            field("device major", &g.dev_major)?,
            field("device minor", &g.dev_minor)?,
        ),
        _ => (0, 0),
    };
    let dev = |n: u64| u32::try_from(n).map_err(|_| bad(format!("device number {n} too large")));
    let link = match kind {
        EntryKind::Symlink | EntryKind::Hardlink => {
            let raw = match (&ext.long_link, ext.pax_value("linkpath")) {
                (Some(n), _) => n.clone(),
                (None, Some(p)) => p.to_vec(),
                (None, None) => header
                    .link_name_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default(),
            };
            let target = String::from_utf8(raw)
                .map_err(|_| bad("link target is not valid UTF-8".to_string()))?;
            if target.contains('\0') {
                return Err(bad(format!("link target {target:?}: {NUL_IN_PATH}")));
            }
            if kind == EntryKind::Hardlink {
                match normalize(&target) {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        return Err(bad(
                            "hard link to the root directory: only files can be hard linked"
                                .to_string(),
                        ));
                    }
                    Err(reason) => {
                        return Err(bad(format!("hard link target {target:?}: {reason}")));
                    }
                }
            } else {
                if target.is_empty() {
                    return Err(bad("symlink with an empty target".to_string()));
                }
                target
            }
        }
        _ => String::new(),
    };

    let mut entry = Entry::new(path, kind);
    for (key, value) in &ext.pax {
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            entry.xattrs.insert(name.to_string(), value.clone());
        }
    }
    for (key, value) in &ext.pax {
        if let Some(name) = key.strip_prefix("LIBARCHIVE.xattr.") {
            let name = percent_decode(name)
                .ok_or_else(|| bad(format!("undecodable PAX xattr name {name:?}")))?;
            let value = decode_base64(value)
                .ok_or_else(|| bad(format!("PAX xattr {name:?} is not valid base64")))?;
            // libarchive writes SCHILY too; that one is verbatim, so it wins.
            entry.xattrs.entry(name).or_insert(value);
        }
    }
    entry.mode = mode;
    entry.uid = uid;
    entry.gid = gid;
    entry.mtime = mtime;
    entry.link = link;
    entry.dev_major = dev(dev_major)?;
    entry.dev_minor = dev(dev_minor)?;
    Ok(Some(entry))
}

/// Longest path accepted, in bytes: Linux's PATH_MAX (4096) less its NUL.
/// No runtime could create a longer path, and it bounds how deep a tree
/// goes (a 16 MiB PAX path made the tree builder recurse until the stack
/// overflowed).
const MAX_PATH: usize = 4095;

/// Why a path or link target holding NUL is refused: the kernel ends a
/// path at its first NUL, so the entry could never be created under its
/// name (and a lookup of the name would find another file, or none).
pub(crate) const NUL_IN_PATH: &str =
    "it holds a NUL byte, which no file name or link target can hold";

/// A path for a message: long ones cut to their first bytes and their size.
pub(crate) fn shown_path(raw: &str) -> String {
    const SHOWN: usize = 128;
    if raw.len() <= 2 * SHOWN {
        return raw.to_string();
    }
    let mut end = SHOWN;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &raw[..end], raw.len())
}

/// Normalise a tar path: drop `./`, empty and `.` components and a trailing
/// `/`. `Ok(None)` is the root itself; `Err` says why the path is refused.
pub(crate) fn normalize(raw: &str) -> std::result::Result<Option<String>, String> {
    if raw.contains('\0') {
        return Err(NUL_IN_PATH.to_string());
    }
    let absolute = raw.starts_with('/');
    let mut parts = Vec::new();
    for comp in raw.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                return Err(
                    "path has a `..` component, which could escape the image root".to_string(),
                );
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    if absolute {
        return Err("absolute path: layer paths must be relative to the image root".to_string());
    }
    let path = parts.join("/");
    if path.len() > MAX_PATH {
        return Err(format!(
            "path of {} bytes ({} components) is longer than PATH_MAX 4096 allows: \
             no runtime could create it",
            path.len(),
            parts.len()
        ));
    }
    Ok(Some(path))
}

/// A name for a tar entry type in messages.
fn type_name(t: EntryType) -> String {
    match t {
        EntryType::GNUSparse => "GNU sparse file ('S')".to_string(),
        EntryType::GNULongName => "stray GNU long name ('L')".to_string(),
        EntryType::GNULongLink => "stray GNU long link ('K')".to_string(),
        EntryType::XHeader => "stray PAX header ('x')".to_string(),
        other => {
            let b = other.as_byte();
            if b.is_ascii_graphic() {
                format!("'{}'", b as char)
            } else {
                format!("byte 0x{b:02x}")
            }
        }
    }
}

/// PAX times are decimal seconds with an optional fraction; keep whole
/// seconds, rounding towards the past like `stat` does.
fn parse_pax_time(v: &str) -> Option<i64> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    if int.starts_with('-') && frac.bytes().any(|b| b != b'0') {
        secs.checked_sub(1)
    } else {
        Some(secs)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn decode_base64(v: &[u8]) -> Option<Vec<u8>> {
    let trimmed: Vec<u8> = v.iter().copied().filter(|b| *b != b'=').collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .ok()
}

/// Helpers to write layer tars in tests.
/// A reader that copies what it reads into a writer.
struct Tee<'a, R, W> {
    inner: R,
    out: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod testtar;

#[cfg(test)]
mod tests;
