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
#[allow(clippy::unwrap_used)]
pub(crate) mod testtar {
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
    pub(crate) fn append_raw_name(
        b: &mut Builder<Vec<u8>>,
        name: &[u8],
        t: EntryType,
        data: &[u8],
    ) {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(t);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tar::{Builder, EntryType, Header};

    use super::testtar::{append, append_raw_name, tar_of};
    use super::*;

    fn file(path: &str, mode: u32) -> Entry {
        let mut e = Entry::new(path, EntryKind::File);
        e.mode = mode;
        e
    }

    fn read(bytes: &[u8]) -> Result<LayerIndex> {
        LayerIndex::read(bytes, "layer test")
    }

    fn bad_reason(r: Result<LayerIndex>) -> (String, String) {
        match r {
            Err(Error::BadEntry { path, reason }) => (path, reason),
            other => panic!("expected BadEntry, got {other:?}"),
        }
    }

    #[test]
    fn a_layer_of_too_many_entries_is_refused_naming_the_cap_and_the_fix() {
        let entries: Vec<(Entry, Vec<u8>)> = (0..5)
            .map(|i| (file(&format!("f{i}"), 0o644), vec![b'x'; i]))
            .collect();
        let tar = tar_of(&entries);
        assert_eq!(
            LayerIndex::read_at_most(&tar[..], "layer test", 5)
                .unwrap()
                .entries
                .len(),
            5
        );
        // The root entry does not count.
        let mut rooted = vec![(Entry::new("./", EntryKind::Dir), vec![])];
        rooted.extend(entries.iter().cloned());
        assert!(LayerIndex::read_at_most(&tar_of(&rooted)[..], "layer test", 5).is_ok());
        let err = LayerIndex::read_at_most(&tar[..], "layer test", 4).unwrap_err();
        let err = crate::Causes(&err).to_string();
        assert!(err.starts_with("layer test: "), "{err}");
        assert!(err.contains("more than 4 entries"), "{err}");
        assert!(err.contains("split the layer"), "{err}");
    }

    #[test]
    fn reads_metadata_digests_offsets_and_diff_id() {
        let mut d = Entry::new("./etc/", EntryKind::Dir);
        d.mode = 0o755;
        d.mtime = 1_700_000_000;
        let mut f = file("./etc/passwd", 0o4755);
        f.uid = 1000;
        f.gid = 100;
        f.mtime = 1_600_000_000;
        let mut s = Entry::new("etc/link", EntryKind::Symlink);
        s.link = "../usr/share/x".to_string();
        s.mode = 0o777;
        let mut h = Entry::new("etc/hard", EntryKind::Hardlink);
        h.link = "./etc/passwd".to_string();
        let mut c = Entry::new("dev/null", EntryKind::CharDev);
        c.dev_major = 1;
        c.dev_minor = 3;
        c.mode = 0o666;
        let mut bl = Entry::new("dev/sda", EntryKind::BlockDev);
        bl.dev_major = 8;
        bl.dev_minor = 0;
        let p = Entry::new("run/fifo", EntryKind::Fifo);
        let root = Entry::new("./", EntryKind::Dir);
        let tar = tar_of(&[
            (root, vec![]),
            (d, vec![]),
            (f, b"root:x:0:0\n".to_vec()),
            (s, vec![]),
            (h, vec![]),
            (c, vec![]),
            (bl, vec![]),
            (p, vec![]),
        ]);
        let idx = read(&tar).unwrap();
        assert_eq!(idx.diff_id, Digest::of(&tar));
        assert_eq!(idx.tar_size, tar.len() as u64);
        let paths: Vec<&str> = idx.entries.iter().map(|e| e.entry.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc",
                "etc/passwd",
                "etc/link",
                "etc/hard",
                "dev/null",
                "dev/sda",
                "run/fifo"
            ]
        );
        let dir = &idx.entries[0].entry;
        assert_eq!(
            (dir.kind, dir.mode, dir.mtime),
            (EntryKind::Dir, 0o755, 1_700_000_000)
        );
        let pw = &idx.entries[1];
        assert_eq!(pw.entry.mode, 0o4755);
        assert_eq!((pw.entry.uid, pw.entry.gid), (1000, 100));
        assert_eq!(pw.entry.size, 11);
        assert_eq!(pw.entry.digest, Some(Digest::of(b"root:x:0:0\n")));
        let off = pw.data_offset as usize;
        assert_eq!(&tar[off..off + 11], b"root:x:0:0\n");
        assert_eq!(idx.entries[2].entry.link, "../usr/share/x");
        assert_eq!(idx.entries[3].entry.kind, EntryKind::Hardlink);
        assert_eq!(idx.entries[3].entry.link, "etc/passwd");
        assert_eq!(idx.entries[3].entry.digest, None);
        let null = &idx.entries[4].entry;
        assert_eq!(
            (null.kind, null.dev_major, null.dev_minor),
            (EntryKind::CharDev, 1, 3)
        );
        let sda = &idx.entries[5].entry;
        assert_eq!(
            (sda.kind, sda.dev_major, sda.dev_minor),
            (EntryKind::BlockDev, 8, 0)
        );
        assert_eq!(idx.entries[6].entry.kind, EntryKind::Fifo);
    }

    #[test]
    fn whiteouts_are_kept_as_entries() {
        let tar = tar_of(&[
            (file("a/.wh.b", 0), vec![]),
            (file("a/.wh..wh..opq", 0), vec![]),
        ]);
        let idx = read(&tar).unwrap();
        let paths: Vec<&str> = idx.entries.iter().map(|e| e.entry.path.as_str()).collect();
        assert_eq!(paths, ["a/.wh.b", "a/.wh..wh..opq"]);
    }

    #[test]
    fn long_names_and_links_via_gnu_and_ustar_prefix() {
        let long = format!("{}/{}", "d".repeat(80), "f".repeat(90));
        let mut l = Entry::new(format!("{}/sym", "s".repeat(120)), EntryKind::Symlink);
        l.link = "t".repeat(200);
        let mut h = Entry::new(format!("{}/hard", "h".repeat(120)), EntryKind::Hardlink);
        h.link = long.clone();
        let mut b = Builder::new(Vec::new());
        append(&mut b, &file(&long, 0o644), b"x");
        append(&mut b, &l, b"");
        append(&mut b, &h, b"");
        // ustar: 150-byte path split into prefix and name.
        let ustar_path = format!("{}/{}", "p".repeat(100), "n".repeat(49));
        let mut uh = Header::new_ustar();
        uh.set_path(&ustar_path).unwrap();
        uh.set_size(2);
        uh.set_mode(0o600);
        uh.set_cksum();
        b.append(&uh, &b"hi"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let idx = read(&tar).unwrap();
        assert_eq!(idx.entries[0].entry.path, long);
        assert_eq!(idx.entries[1].entry.link, "t".repeat(200));
        assert_eq!(idx.entries[2].entry.link, long);
        assert_eq!(idx.entries[3].entry.path, ustar_path);
        assert_eq!(idx.entries[3].entry.mode, 0o600);
        assert_eq!(idx.entries[3].entry.digest, Some(Digest::of(b"hi")));
    }

    #[test]
    fn pax_path_linkpath_mtime_size_and_xattrs() {
        let mut b = Builder::new(Vec::new());
        let long = "x".repeat(300);
        b.append_pax_extensions([
            ("path", long.as_bytes()),
            ("mtime", &b"1700000000.75"[..]),
            ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
            ("SCHILY.xattr.user.empty", &b""[..]),
            ("LIBARCHIVE.xattr.user.a%3Db", &b"dmFs"[..]),
            ("uid", &b"4000000000"[..]),
            ("size", &b"3"[..]),
        ])
        .unwrap();
        let mut h = Header::new_ustar();
        h.set_path("short").unwrap();
        h.set_size(0);
        h.set_mtime(5);
        h.set_cksum();
        b.append(&h, &b"abc"[..]).unwrap();
        b.append_pax_extensions([("linkpath", "y".repeat(200).as_bytes()), ("mtime", b"-3.5")])
            .unwrap();
        let mut s = Header::new_ustar();
        s.set_path("sym").unwrap();
        s.set_entry_type(EntryType::Symlink);
        s.set_size(0);
        s.set_cksum();
        b.append(&s, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let idx = read(&tar).unwrap();
        let e = &idx.entries[0].entry;
        assert_eq!(e.path, long);
        assert_eq!(e.mtime, 1_700_000_000);
        assert_eq!(e.uid, 4_000_000_000);
        assert_eq!(e.digest, Some(Digest::of(b"abc")));
        let mut want = BTreeMap::new();
        want.insert(
            "security.capability".to_string(),
            b"\x01\x00\x00\x02".to_vec(),
        );
        want.insert("user.empty".to_string(), Vec::new());
        want.insert("user.a=b".to_string(), b"val".to_vec());
        assert_eq!(e.xattrs, want);
        assert_eq!(idx.entries[1].entry.link, "y".repeat(200));
        assert_eq!(idx.entries[1].entry.mtime, -4);
    }

    #[test]
    fn rejects_dotdot_and_absolute_paths() {
        for name in [&b"a/../../etc/passwd"[..], b"../x", b"a/.."] {
            let mut b = Builder::new(Vec::new());
            append_raw_name(&mut b, name, EntryType::Regular, b"");
            let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
            assert_eq!(path.as_bytes(), name);
            assert!(reason.contains("`..`"), "{reason}");
            assert!(reason.contains("layer test"), "{reason}");
        }
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_path_absolute("/etc/shadow").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path, "/etc/shadow");
        assert!(reason.contains("absolute"), "{reason}");
        // The lone root is fine and skipped.
        let mut b = Builder::new(Vec::new());
        append_raw_name(&mut b, b"/", EntryType::Directory, b"");
        append_raw_name(&mut b, b"./", EntryType::Directory, b"");
        assert!(read(&b.into_inner().unwrap()).unwrap().entries.is_empty());
    }

    #[test]
    fn rejects_bad_hardlink_targets() {
        for target in ["../etc/shadow", "/etc/shadow", "a/../../b"] {
            let mut b = Builder::new(Vec::new());
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Link);
            h.set_path("x").unwrap();
            h.set_link_name_literal(target).unwrap();
            h.set_size(0);
            h.set_cksum();
            b.append(&h, &b""[..]).unwrap();
            let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
            assert_eq!(path, "x");
            assert!(reason.contains("hard link target"), "{reason}");
        }
    }

    #[test]
    fn rejects_unknown_entry_types() {
        let mut b = Builder::new(Vec::new());
        append_raw_name(&mut b, b"sparse", EntryType::new(b'S'), b"");
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path, "sparse");
        assert!(reason.contains("GNU sparse"), "{reason}");
        let mut b = Builder::new(Vec::new());
        append_raw_name(&mut b, b"odd", EntryType::new(b'V'), b"");
        let (_, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert!(reason.contains("'V'"), "{reason}");
    }

    #[test]
    fn truncated_streams_are_io_errors_naming_the_layer() {
        let tar = tar_of(&[
            (file("a", 0o644), vec![7u8; 1000]),
            (file("b", 0o644), vec![8u8; 10]),
        ]);
        // Cut inside content, inside a header, at a header boundary (no
        // end marker), and mid-padding.
        for cut in [700, 1600, 2560, 2100, 1, 0] {
            match LayerIndex::read(&tar[..cut], "layer sha256:abc of oci:/x:v1") {
                Err(Error::Io { what, .. }) => assert!(what.contains("oci:/x:v1"), "{what}"),
                other => panic!("cut {cut}: expected an Io error, got {other:?}"),
            }
        }
        // One zero block is enough of an end marker; the full tar reads.
        assert!(read(&tar[..2560 + 512]).is_ok());
        assert_eq!(read(&tar).unwrap().entries.len(), 2);
    }

    #[test]
    fn empty_layer() {
        let idx = read(&[0u8; 1024]).unwrap();
        assert!(idx.entries.is_empty());
        assert_eq!(idx.tar_size, 1024);
        assert_eq!(idx.diff_id, Digest::of(&[0u8; 1024]));
    }

    #[test]
    fn binary_xattrs_base256_numbers_and_blank_fields() {
        let mut b = Builder::new(Vec::new());
        // A capability value with a newline byte in it.
        let cap = b"\x01\x00\x00\x02\x0a\x00\n\x00\x00\x00";
        b.append_pax_extensions([("SCHILY.xattr.security.capability", &cap[..])])
            .unwrap();
        let mut h = Header::new_gnu();
        h.set_path("bin/ping").unwrap();
        h.set_size(1);
        h.set_mode(0o755);
        // Larger than 7 octal digits: written in base-256.
        h.set_uid(3_000_000_000);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        // A ustar header whose numeric fields were left blank.
        let mut u = Header::new_ustar();
        u.set_path("blank").unwrap();
        u.set_size(0);
        u.set_cksum();
        b.append(&u, &b""[..]).unwrap();
        let idx = read(&b.into_inner().unwrap()).unwrap();
        let e = &idx.entries[0].entry;
        assert_eq!(e.xattrs["security.capability"], cap.to_vec());
        assert_eq!(e.uid, 3_000_000_000);
        let blank = &idx.entries[1].entry;
        assert_eq!((blank.mode, blank.uid, blank.mtime), (0, 0, 0));
    }

    #[test]
    fn corrupt_header_and_pax_sparse_are_refused() {
        let mut tar = tar_of(&[(file("a", 0o644), b"abc".to_vec())]);
        tar[0] ^= 0x01;
        match read(&tar) {
            Err(Error::Io { source, .. }) => {
                assert!(source.to_string().contains("checksum"), "{source}")
            }
            other => panic!("expected Io, got {other:?}"),
        }
        let mut b = Builder::new(Vec::new());
        b.append_pax_extensions([("GNU.sparse.major", &b"1"[..]), ("GNU.sparse.minor", b"0")])
            .unwrap();
        append(&mut b, &file("big", 0o644), b"");
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path, "big");
        assert!(reason.contains("sparse"), "{reason}");
    }

    #[test]
    fn huge_pax_size_on_a_non_file_is_refused() {
        // A directory whose PAX size is u64::MAX overflowed the skip over
        // its content and padding (a panic in debug builds, a wrong skip of
        // 0 bytes in release builds).
        let mut b = Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"18446744073709551615"[..])])
            .unwrap();
        append(&mut b, &Entry::new("d", EntryKind::Dir), b"");
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert_eq!(path, "d");
        assert!(reason.contains("larger than any tar stream"), "{reason}");
    }

    #[test]
    fn rejects_paths_longer_than_path_max_with_a_short_message() {
        // A GNU long name 300,000 directories deep.
        let deep = format!("{}f", "d/".repeat(300_000));
        let mut b = Builder::new(Vec::new());
        append(&mut b, &file(&deep, 0o644), b"x");
        let (path, reason) = bad_reason(read(&b.into_inner().unwrap()));
        assert!(path.ends_with("… (600001 bytes)"), "{path}");
        assert!(reason.contains("PATH_MAX 4096"), "{reason}");
        // The longest path Linux can create is fine.
        let longest = format!("{}/f", "d".repeat(MAX_PATH - 2));
        let mut b = Builder::new(Vec::new());
        append(&mut b, &file(&longest, 0o644), b"x");
        assert_eq!(
            read(&b.into_inner().unwrap()).unwrap().entries[0]
                .entry
                .path,
            longest
        );
    }

    #[test]
    fn normalises_paths() {
        assert_eq!(normalize("./a//b/./c/").unwrap(), Some("a/b/c".to_string()));
        assert_eq!(normalize("././").unwrap(), None);
        assert_eq!(normalize("/").unwrap(), None);
        assert!(normalize("/a").is_err());
        assert!(normalize("a/../b").is_err());
        assert_eq!(parse_pax_time("12"), Some(12));
        assert_eq!(parse_pax_time("12.999"), Some(12));
        assert_eq!(parse_pax_time("-1.5"), Some(-2));
        assert_eq!(parse_pax_time("x"), None);
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,8}",
            // Long components force GNU long names (> 100 bytes in total).
            "[a-z0-9_.-]{60,90}",
        ]
    }

    fn entry_strategy() -> impl Strategy<Value = (Entry, Vec<u8>)> {
        (
            prop::collection::vec(name(), 1..4),
            0u8..6,
            0u32..0o10000,
            0u32..2_000_000,
            0u32..2_000_000,
            0i64..8_000_000_000,
            prop::collection::btree_map(
                "user\\.[a-z]{1,10}",
                prop::collection::vec(any::<u8>(), 0..20),
                0..3,
            ),
            prop::collection::vec(any::<u8>(), 0..700),
            "(/|\\.\\./)?[a-z][a-z._-]{0,30}(/[a-z][a-z._-]{0,30}){0,5}",
            (0u32..4096, 0u32..4096),
        )
            .prop_map(
                |(parts, k, mode, uid, gid, mtime, xattrs, content, target, (maj, min))| {
                    let kind = [
                        EntryKind::File,
                        EntryKind::Dir,
                        EntryKind::Symlink,
                        EntryKind::CharDev,
                        EntryKind::BlockDev,
                        EntryKind::Fifo,
                    ][k as usize];
                    let mut e = Entry::new(parts.join("/"), kind);
                    e.mode = mode;
                    e.uid = uid;
                    e.gid = gid;
                    e.mtime = mtime;
                    e.xattrs = xattrs;
                    let mut data = Vec::new();
                    match kind {
                        EntryKind::File => {
                            e.size = content.len() as u64;
                            e.digest = Some(Digest::of(&content));
                            data = content;
                        }
                        EntryKind::Symlink => e.link = target,
                        EntryKind::CharDev | EntryKind::BlockDev => {
                            e.dev_major = maj;
                            e.dev_minor = min;
                        }
                        _ => {}
                    }
                    (e, data)
                },
            )
    }

    proptest! {
        /// Writing entries to a tar and reading it back gives the same
        /// entries, and every content offset points at the content.
        #[test]
        fn tar_round_trip(mut entries in prop::collection::vec(entry_strategy(), 0..12), link_to in prop::option::of(0usize..12)) {
            let target = link_to
                .and_then(|i| entries.get(i))
                .filter(|(e, _)| e.kind == EntryKind::File)
                .map(|(e, _)| e.path.clone());
            if let Some(target) = target {
                let mut h = Entry::new(format!("{target}-hl"), EntryKind::Hardlink);
                h.link = target;
                h.mode = 0o644;
                entries.push((h, Vec::new()));
            }
            let tar = tar_of(&entries);
            let idx = read(&tar).unwrap();
            prop_assert_eq!(idx.entries.len(), entries.len());
            for (got, (want, content)) in idx.entries.iter().zip(&entries) {
                prop_assert_eq!(&got.entry, want);
                let off = got.data_offset as usize;
                prop_assert_eq!(&tar[off..off + content.len()], &content[..]);
            }
            prop_assert_eq!(idx.diff_id, Digest::of(&tar));
            prop_assert_eq!(idx.tar_size, tar.len() as u64);
        }
    }
}
