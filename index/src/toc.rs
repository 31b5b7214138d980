//! The eStargz table of contents (`stargz.index.json`) and footer.
//!
//! An eStargz blob is a concatenation of gzip members that is also a valid
//! `tar+gzip` layer: every non-empty regular file's payload (and every chunk
//! of a big file) starts a new member, the last tar entry is the TOC in its
//! own member, and a 51-byte empty gzip member (the footer) carries the TOC's
//! offset in its Extra field. This module models the TOC JSON, encodes and
//! parses the footer, and turns a TOC into breakfs [`Entry`]s with the chunk
//! map a lazy reader needs.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::{Digest, Entry, EntryKind, Error, Result};

/// Name of the TOC's tar entry, the last entry of an eStargz blob.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Landmark entry that ends the prioritized (prefetch) files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Landmark entry that says no file is prioritized.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Content of a landmark file: one byte, 0xf.
pub const LANDMARK_CONTENT: u8 = 0xf;
/// Size of the eStargz footer in bytes.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy (CRFS stargz) footer in bytes.
pub const LEGACY_FOOTER_SIZE: u64 = 47;

/// Largest TOC JSON breakfs accepts (a guard against decompression bombs).
const MAX_TOC_JSON: u64 = 1 << 30;

/// The TOC document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Toc {
    /// Format version, 1.
    pub version: u32,
    /// Entries in tar order.
    #[serde(default)]
    pub entries: Vec<TocEntry>,
}

/// The type of a TOC entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TocEntryType {
    /// A directory.
    Dir,
    /// A regular file (and its first chunk).
    Reg,
    /// A symbolic link.
    Symlink,
    /// A hard link.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// The second and later chunks of the preceding `reg` entry.
    Chunk,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// One TOC entry as the eStargz spec defines it. Fields that are zero or
/// empty are left out of the JSON, as the reference writer does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// The complete path as stored in the tar (directories may end in `/`).
    pub name: String,
    /// The entry's type.
    #[serde(rename = "type")]
    pub kind: TocEntryType,
    /// Uncompressed size of a regular file.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub size: u64,
    /// Modification time, UTC RFC3339; empty means zero or unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    /// Target of a symlink or hard link.
    #[serde(default, rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Permission and mode bits (as in the tar header; may carry type bits).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    /// Owner.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub uid: u32,
    /// Group.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub gid: u32,
    /// Owner's user name.
    #[serde(default, rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    /// Owner's group name.
    #[serde(
        default,
        rename = "groupName",
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    /// Offset of the gzip member holding this file's or chunk's payload.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub offset: u64,
    /// Uncompressed offset of the payload inside the member at `offset`.
    #[serde(default, rename = "innerOffset", skip_serializing_if = "is_zero_u64")]
    pub inner_offset: u64,
    /// Major device number.
    #[serde(default, rename = "devMajor", skip_serializing_if = "is_zero_u32")]
    pub dev_major: u32,
    /// Minor device number.
    #[serde(default, rename = "devMinor", skip_serializing_if = "is_zero_u32")]
    pub dev_minor: u32,
    /// Extended attributes (base64 values in the JSON).
    #[serde(default, with = "b64map", skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of a regular file's whole content, `sha256:HEX`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Offset of this chunk in the file's content.
    #[serde(default, rename = "chunkOffset", skip_serializing_if = "is_zero_u64")]
    pub chunk_offset: u64,
    /// Uncompressed size of this chunk; 0 means "to the end of the file".
    #[serde(default, rename = "chunkSize", skip_serializing_if = "is_zero_u64")]
    pub chunk_size: u64,
    /// sha256 of this chunk's content.
    #[serde(
        default,
        rename = "chunkDigest",
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
}

impl TocEntry {
    /// An entry of `kind` named `name` with every other field empty.
    pub fn new(name: impl Into<String>, kind: TocEntryType) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind,
            size: 0,
            modtime: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            offset: 0,
            inner_offset: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
        }
    }
}

mod b64map {
    use std::collections::BTreeMap;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let enc: BTreeMap<&str, String> = map
            .iter()
            .map(|(k, v)| (k.as_str(), STANDARD.encode(v)))
            .collect();
        enc.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw: Option<BTreeMap<String, String>> = Option::deserialize(d)?;
        raw.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                STANDARD
                    .decode(v.as_bytes())
                    .map(|b| (k.clone(), b))
                    .map_err(|e| {
                        serde::de::Error::custom(format!("xattr {k:?} is not valid base64: {e}"))
                    })
            })
            .collect()
    }
}

/// One chunk of a regular file's content inside an eStargz blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocChunk {
    /// Offset of the chunk's gzip member in the blob.
    pub offset: u64,
    /// Uncompressed offset of the chunk's bytes inside that member
    /// (0 unless several payloads share a member).
    pub inner_offset: u64,
    /// Where the compressed range to fetch ends: the next member's offset,
    /// else the TOC's offset, else the blob's size.
    pub compressed_end: u64,
    /// Offset of the chunk in the file's content.
    pub chunk_offset: u64,
    /// Uncompressed size of the chunk.
    pub chunk_size: u64,
    /// sha256 of the chunk's content, when the TOC gives it.
    pub chunk_digest: Option<Digest>,
}

/// A TOC turned into breakfs entries: each entry with its chunks (empty for
/// everything but non-empty regular files), in TOC order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocLayer {
    /// Entries in TOC order, landmarks and the TOC itself left out.
    pub entries: Vec<(Entry, Vec<TocChunk>)>,
    /// Offset of the `.prefetch.landmark` member, when the layer has one:
    /// the members before it hold the files its workload reads first.
    pub prefetch_end: Option<u64>,
}

/// What the tail of a blob says: the TOC, or how many tail bytes are needed.
#[derive(Clone, Debug, PartialEq)]
pub enum TailRead {
    /// The tail held the whole TOC member and footer.
    Toc(TocTail),
    /// The tail was too short: fetch the last `n` bytes of the blob and retry.
    NeedTail(u64),
}

/// The TOC read from the tail of a blob, with where it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct TocTail {
    /// The parsed TOC.
    pub toc: Toc,
    /// sha256 of the TOC JSON, to check against the layer's
    /// `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: Digest,
    /// Offset of the TOC's gzip member in the blob.
    pub toc_offset: u64,
    /// Size of the footer found (51, or 47 for a legacy stargz blob).
    pub footer_size: u64,
}

/// The 51-byte eStargz footer pointing at a TOC member at `toc_offset`.
pub fn footer(toc_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(FOOTER_SIZE as usize);
    // gzip header: magic, deflate, FEXTRA, mtime 0, XFL 0, OS unknown.
    out.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    out.extend_from_slice(&26u16.to_le_bytes());
    out.extend_from_slice(b"SG");
    out.extend_from_slice(&22u16.to_le_bytes());
    out.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 and ISIZE of nothing.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

/// Parse the footer at the end of `bytes` (the last 51 bytes of a blob, or
/// more): the offset of the TOC's gzip member. Legacy 47-byte stargz
/// footers are accepted too.
pub fn parse_footer(bytes: &[u8]) -> Result<u64> {
    parse_footer_sized(bytes).map(|(off, _)| off)
}

/// Like [`parse_footer`], also giving the footer's size (51 or 47).
pub fn parse_footer_sized(bytes: &[u8]) -> Result<(u64, u64)> {
    let estargz_err = match bytes.len().checked_sub(FOOTER_SIZE as usize) {
        Some(start) => match parse_estargz_footer(&bytes[start..]) {
            Ok(off) => return Ok((off, FOOTER_SIZE)),
            Err(e) => e,
        },
        None => format!("only {} bytes, need {FOOTER_SIZE}", bytes.len()),
    };
    if let Some(start) = bytes.len().checked_sub(LEGACY_FOOTER_SIZE as usize)
        && let Ok(off) = parse_legacy_footer(&bytes[start..])
    {
        return Ok((off, LEGACY_FOOTER_SIZE));
    }
    Err(Error::BadToc(format!(
        "no eStargz footer at the end of the blob: {estargz_err}"
    )))
}

fn check_gzip_extra_header(p: &[u8], xlen: u16) -> std::result::Result<(), String> {
    if p[0] != 0x1f || p[1] != 0x8b || p[2] != 0x08 {
        return Err("footer is not a gzip member".into());
    }
    if p[3] & 0x04 == 0 {
        return Err("footer gzip header has no Extra field".into());
    }
    let got = u16::from_le_bytes([p[10], p[11]]);
    if got != xlen {
        return Err(format!(
            "footer Extra field is {got} bytes, expected {xlen}"
        ));
    }
    Ok(())
}

fn parse_offset_subfield(sub: &[u8]) -> std::result::Result<u64, String> {
    if &sub[16..22] != b"STARGZ" {
        return Err("footer lacks the STARGZ magic".into());
    }
    let hex = std::str::from_utf8(&sub[..16]).map_err(|_| "footer offset is not hex")?;
    u64::from_str_radix(hex, 16).map_err(|_| format!("footer offset {hex:?} is not hex"))
}

fn parse_estargz_footer(p: &[u8]) -> std::result::Result<u64, String> {
    check_gzip_extra_header(p, 26)?;
    if &p[12..14] != b"SG" {
        return Err(format!(
            "footer Extra subfield id is {:?}, expected \"SG\"",
            String::from_utf8_lossy(&p[12..14])
        ));
    }
    let len = u16::from_le_bytes([p[14], p[15]]);
    if len != 22 {
        return Err(format!("footer Extra subfield is {len} bytes, expected 22"));
    }
    parse_offset_subfield(&p[16..38])
}

fn parse_legacy_footer(p: &[u8]) -> std::result::Result<u64, String> {
    check_gzip_extra_header(p, 22)?;
    parse_offset_subfield(&p[12..34])
}

/// Extract the TOC JSON from a TOC gzip member (the bytes from the TOC
/// offset on; anything after the member, such as the footer, is ignored).
pub fn toc_json_from_member(bytes: &[u8]) -> Result<Vec<u8>> {
    let gz = flate2::read::GzDecoder::new(bytes);
    let mut ar = tar::Archive::new(gz);
    let what = "reading the eStargz TOC member";
    let mut entries = ar.entries().map_err(|e| Error::io(what, e))?;
    let mut entry = match entries.next() {
        Some(e) => e.map_err(|e| Error::io(what, e))?,
        None => {
            return Err(Error::BadToc(
                "the TOC member holds no tar entry; the footer's offset is wrong".into(),
            ));
        }
    };
    let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    if name != TOC_TAR_NAME {
        return Err(Error::BadToc(format!(
            "the TOC member's tar entry is {name:?}, expected {TOC_TAR_NAME:?}"
        )));
    }
    let size = entry.size();
    if size > MAX_TOC_JSON {
        return Err(Error::BadToc(format!(
            "TOC JSON is {size} bytes, more than the {MAX_TOC_JSON} breakfs accepts"
        )));
    }
    // The declared size may lie: reserve no more than the compressed
    // member's size, and let what is actually read grow the buffer.
    let mut json = Vec::with_capacity(size.min(bytes.len() as u64) as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| Error::io(what, e))?;
    if json.len() as u64 != size {
        return Err(Error::BadToc(format!(
            "TOC JSON truncated: {} of {size} bytes",
            json.len()
        )));
    }
    Ok(json)
}

fn bad(name: &str, reason: impl std::fmt::Display) -> Error {
    Error::BadToc(format!(
        "entry {:?}: {reason}",
        crate::tarindex::shown_path(name)
    ))
}

/// Normalise a TOC name the way [`Entry`] paths are: `None` for the root.
fn normalise(name: &str) -> Result<Option<String>> {
    crate::tarindex::normalize(name).map_err(|reason| bad(name, reason))
}

fn parse_modtime(name: &str, s: &str) -> Result<i64> {
    if s.is_empty() {
        return Ok(0);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|e| bad(name, format!("modtime {s:?} is not RFC3339: {e}")))
}

/// Format seconds since the epoch as the TOC's modtime: UTC RFC3339, empty
/// for 0 (as the reference writer does).
pub fn format_modtime(secs: i64) -> String {
    if secs == 0 {
        return String::new();
    }
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => String::new(),
    }
}

fn parse_digest(name: &str, field: &str, s: &str) -> Result<Option<Digest>> {
    if s.is_empty() {
        return Ok(None);
    }
    Digest::parse(s)
        .map(Some)
        .map_err(|_| bad(name, format!("{field} {s:?} is not sha256:<64 hex>")))
}

impl Toc {
    /// Parse TOC JSON. Unknown fields are ignored; the version must be 1.
    pub fn parse(json: &[u8]) -> Result<Toc> {
        let toc: Toc = serde_json::from_slice(json).map_err(|source| Error::Json {
            what: "eStargz TOC (stargz.index.json)".into(),
            source,
        })?;
        if toc.version != 1 {
            return Err(Error::BadToc(format!(
                "version {} is not supported, expected 1",
                toc.version
            )));
        }
        Ok(toc)
    }

    /// The TOC JSON as the reference writer formats it (tab-indented).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_json(&mut out);
        out
    }

    /// [`Toc::to_json`] appended to `out` (a big TOC is not copied again).
    pub fn append_json(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
        let mut ser = serde_json::Serializer::with_formatter(&mut *out, fmt);
        // Serialising plain structs of strings and numbers cannot fail.
        if self.serialize(&mut ser).is_err() {
            out.truncate(start);
        }
    }

    /// Parse the TOC from its gzip member (the blob bytes from the TOC
    /// offset on).
    pub fn from_toc_member(bytes: &[u8]) -> Result<Toc> {
        Toc::parse(&toc_json_from_member(bytes)?)
    }

    /// Read the TOC from the last `tail.len()` bytes of a blob of
    /// `blob_size` bytes. If the tail is too short, says how many tail bytes
    /// are needed.
    pub fn read_from_blob_tail(tail: &[u8], blob_size: u64) -> Result<TailRead> {
        let have = tail.len() as u64;
        if have > blob_size {
            return Err(Error::BadToc(format!(
                "tail of {have} bytes is longer than the blob ({blob_size} bytes)"
            )));
        }
        if have < FOOTER_SIZE && have < blob_size {
            return Ok(TailRead::NeedTail(FOOTER_SIZE.min(blob_size)));
        }
        let (toc_offset, footer_size) = parse_footer_sized(tail)?;
        if toc_offset >= blob_size.saturating_sub(footer_size) {
            return Err(Error::BadToc(format!(
                "footer says the TOC is at offset {toc_offset}, past the end of the \
                 {blob_size}-byte blob"
            )));
        }
        let need = blob_size - toc_offset;
        if need > have {
            return Ok(TailRead::NeedTail(need));
        }
        let start = (have - need) as usize;
        let member = &tail[start..tail.len() - footer_size as usize];
        let json = toc_json_from_member(member)?;
        let toc_digest = Digest::of(&json);
        Ok(TailRead::Toc(TocTail {
            toc: Toc::parse(&json)?,
            toc_digest,
            toc_offset,
            footer_size,
        }))
    }

    /// Turn the TOC into breakfs entries with their chunk maps, checking
    /// that every chunk lies inside the blob's payload (before `toc_offset`
    /// if known, else before `blob_size`) and that each file's chunks cover
    /// its content in order.
    pub fn to_layer(&self, blob_size: u64, toc_offset: Option<u64>) -> Result<TocLayer> {
        let data_end = toc_offset.unwrap_or(blob_size).min(blob_size);
        // Where each data member ends: the next greater member offset.
        // Payloads that share a member (`innerOffset`) share its offset, so
        // the member after `next` is remembered too.
        let mut ends = vec![data_end; self.entries.len()];
        let (mut next, mut after_next) = (data_end, data_end);
        for (i, e) in self.entries.iter().enumerate().rev() {
            if matches!(e.kind, TocEntryType::Reg | TocEntryType::Chunk) {
                if e.offset != 0 && e.offset == next {
                    ends[i] = after_next;
                    continue;
                }
                ends[i] = next;
                if e.offset != 0 && e.offset < next {
                    (next, after_next) = (e.offset, next);
                }
            }
        }

        let mut out: Vec<(Entry, Vec<TocChunk>)> = Vec::with_capacity(self.entries.len());
        // Index in `out` of the reg entry that `chunk` entries extend, or a
        // landmark/TOC whose chunks are skipped.
        let mut open: Option<Option<usize>> = None;
        let mut prefetch_end = None;
        for (i, te) in self.entries.iter().enumerate() {
            let raw_name = te.name.as_str();
            if te.kind == TocEntryType::Chunk {
                let Some(owner) = open else {
                    return Err(bad(raw_name, "chunk entry without a preceding reg entry"));
                };
                if let Some(idx) = owner {
                    let chunk = make_chunk(te, &out[idx].0, ends[i], data_end)?;
                    out[idx].1.push(chunk);
                }
                continue;
            }
            open = None;
            let Some(path) = normalise(raw_name)? else {
                continue; // the root directory itself
            };
            if te.kind == TocEntryType::Reg
                && (path == TOC_TAR_NAME
                    || path == PREFETCH_LANDMARK
                    || path == NO_PREFETCH_LANDMARK)
            {
                if path == PREFETCH_LANDMARK && te.offset <= data_end {
                    prefetch_end = Some(te.offset);
                }
                open = Some(None);
                continue;
            }
            let kind = match te.kind {
                TocEntryType::Dir => EntryKind::Dir,
                TocEntryType::Reg => EntryKind::File,
                TocEntryType::Symlink => EntryKind::Symlink,
                TocEntryType::Hardlink => EntryKind::Hardlink,
                TocEntryType::Char => EntryKind::CharDev,
                TocEntryType::Block => EntryKind::BlockDev,
                TocEntryType::Fifo => EntryKind::Fifo,
                TocEntryType::Chunk => unreachable_chunk(raw_name)?,
            };
            let mut entry = Entry::new(path, kind);
            entry.mode = (te.mode & 0o7777) as u32;
            entry.uid = te.uid;
            entry.gid = te.gid;
            entry.mtime = parse_modtime(raw_name, &te.modtime)?;
            entry.xattrs = te.xattrs.clone();
            let mut chunks = Vec::new();
            match kind {
                EntryKind::File => {
                    entry.size = te.size;
                    entry.digest = parse_digest(raw_name, "digest", &te.digest)?;
                    if te.size > 0 {
                        let mut first = te.clone();
                        first.chunk_offset = 0;
                        chunks.push(make_chunk(&first, &entry, ends[i], data_end)?);
                    }
                }
                EntryKind::Symlink => {
                    if te.link_name.is_empty() {
                        return Err(bad(raw_name, "symlink without linkName"));
                    }
                    if te.link_name.contains('\0') {
                        return Err(bad(
                            raw_name,
                            format!(
                                "symlink target {:?}: {}",
                                te.link_name,
                                crate::tarindex::NUL_IN_PATH
                            ),
                        ));
                    }
                    entry.link = te.link_name.clone();
                }
                EntryKind::Hardlink => match crate::tarindex::normalize(&te.link_name) {
                    Ok(Some(target)) => entry.link = target,
                    Ok(None) => return Err(bad(raw_name, "hard link without a target")),
                    Err(reason) => {
                        return Err(bad(
                            raw_name,
                            format!("hard link target {:?}: {reason}", te.link_name),
                        ));
                    }
                },
                EntryKind::CharDev | EntryKind::BlockDev => {
                    entry.dev_major = te.dev_major;
                    entry.dev_minor = te.dev_minor;
                }
                EntryKind::Dir | EntryKind::Fifo => {}
            }
            let is_file = kind == EntryKind::File;
            out.push((entry, chunks));
            if is_file {
                open = Some(Some(out.len() - 1));
            }
        }
        for (entry, chunks) in &out {
            check_coverage(entry, chunks)?;
        }
        Ok(TocLayer {
            entries: out,
            prefetch_end,
        })
    }
}

fn unreachable_chunk(name: &str) -> Result<EntryKind> {
    Err(bad(name, "chunk entry in an unexpected place"))
}

fn make_chunk(te: &TocEntry, file: &Entry, end: u64, data_end: u64) -> Result<TocChunk> {
    let name = file.path.as_str();
    if te.offset >= data_end {
        return Err(bad(
            name,
            format!(
                "chunk at file offset {} has blob offset {}, outside the blob's payload \
                 (which ends at {data_end})",
                te.chunk_offset, te.offset
            ),
        ));
    }
    if te.chunk_offset > file.size {
        return Err(bad(
            name,
            format!(
                "chunk offset {} is past the file's size {}",
                te.chunk_offset, file.size
            ),
        ));
    }
    let size = if te.chunk_size == 0 {
        file.size - te.chunk_offset
    } else {
        te.chunk_size
    };
    Ok(TocChunk {
        offset: te.offset,
        inner_offset: te.inner_offset,
        compressed_end: end.max(te.offset),
        chunk_offset: te.chunk_offset,
        chunk_size: size,
        chunk_digest: parse_digest(name, "chunkDigest", &te.chunk_digest)?,
    })
}

fn check_coverage(entry: &Entry, chunks: &[TocChunk]) -> Result<()> {
    if entry.kind != EntryKind::File {
        return Ok(());
    }
    let mut at = 0u64;
    for c in chunks {
        if c.chunk_offset != at {
            return Err(bad(
                &entry.path,
                format!(
                    "chunks do not cover the file in order: a chunk starts at {} where {at} \
                     was expected",
                    c.chunk_offset
                ),
            ));
        }
        at = at
            .checked_add(c.chunk_size)
            .ok_or_else(|| bad(&entry.path, "chunk sizes overflow"))?;
    }
    if at != entry.size {
        return Err(bad(
            &entry.path,
            format!("chunks cover {at} bytes but the file has {}", entry.size),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
