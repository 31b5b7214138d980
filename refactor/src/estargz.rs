//! The eStargz layer writer.
//!
//! Writes breakfs [`Entry`]s as one eStargz-compatible `tar+gzip` layer, laid
//! out as the reference (stargz-snapshotter) writer does: a tar header lives
//! in the gzip member that is open when it is written, every non-empty regular
//! file's payload (and each `chunk_size` chunk of it) starts a new member, the
//! TOC (`stargz.index.json`) is the last tar entry in a member of its own, and
//! the 51-byte footer member points at it. Members are compressed in parallel
//! in batches; the blob is still one valid gzip stream of one valid tar.
//!
//! Small files are the exception: a file under `group_below` bytes joins the
//! member open before it (header and payload) while that member stays under
//! `member_size` uncompressed bytes, its TOC entry naming the member's
//! `offset` and its place in the inflated member (`innerOffset`, as the
//! reference writer's `--estargz-min-chunk-size` does). A member per small
//! file would cost each its gzip framing and the deflate context it would
//! share with its neighbours; a lazy read of one of them inflates at most
//! `member_size` bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Write};

use breakfs_index::{
    Descriptor, Digest, Entry, EntryKind, HashingWriter, LANDMARK_CONTENT, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, TOC_TAR_NAME, Toc, TocEntry, TocEntryType, annotations, footer,
    format_modtime, media_types,
};
use libdeflater::{CompressionLvl, Compressor, crc32};
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

mod ustar;
use ustar::{padding, push_header};

/// Where the writer gets file content from.
pub trait ContentSource: Sync {
    /// Fill `buf` with the content of regular file `entry` starting at `offset`.
    fn read_at(&self, entry: &Entry, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Whether every file's content is known to hash to its entry's digest
    /// (the source hashed it as it was read): the writer then takes a
    /// file's digest from its entry instead of hashing the file again, and
    /// hashes only the chunks of files split into several. `false` (the
    /// default) checks every file against its entry.
    fn digests_checked(&self) -> bool {
        false
    }
}

/// How to write a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// Largest uncompressed chunk of a file in one gzip member (4 MiB).
    pub chunk_size: u64,
    /// Deflate level, 0–9, on libdeflate's scale. 2 by default: about as
    /// many bytes as the source images' gzip (0.99–1.01× on the corpus'
    /// layers, 3–4% more than level 5) in two thirds of level 5's time,
    /// which is most of the time an image that reuses little takes.
    pub level: u32,
    /// Paths to put first, before the prefetch landmark; empty for none.
    pub prefetch: Vec<String>,
    /// Files smaller than this share a gzip member with the files before
    /// them (64 KiB); 0 gives every file a member of its own.
    pub group_below: u64,
    /// Most uncompressed bytes of a member that small files share (256 KiB).
    pub member_size: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: 4 << 20,
            level: 2,
            prefetch: Vec::new(),
            group_below: 64 << 10,
            member_size: 256 << 10,
        }
    }
}

/// What [`write_layer`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenLayer {
    /// sha256 of the blob.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// sha256 of the TOC JSON.
    pub toc_digest: Digest,
    /// Bytes from the TOC's member to the blob's end, footer included.
    pub toc_tail: u64,
    /// Number of tar entries written, landmark and TOC included.
    pub entries: usize,
}

impl WrittenLayer {
    /// The layer's OCI descriptor: gzip layer media type, TOC digest,
    /// uncompressed size and TOC tail (`breakfs_fetch::TOC_TAIL_HINT`: a
    /// node reads the TOC in one request) annotations.
    pub fn descriptor(&self) -> Descriptor {
        let mut d = Descriptor::new(media_types::OCI_LAYER_GZIP, self.digest.clone(), self.size);
        d.annotations
            .insert(annotations::TOC_DIGEST.into(), self.toc_digest.to_string());
        d.annotations.insert(
            annotations::UNCOMPRESSED_SIZE.into(),
            self.uncompressed_size.to_string(),
        );
        breakfs_fetch::hint_toc_tail(&mut d, self.toc_tail);
        d
    }
}

/// Uncompressed bytes gathered before a batch is compressed in parallel
/// (two layers are written at once: both batches, and what they compress
/// to, stay inside a refactoring's 128 MiB).
const BATCH_BYTES: usize = 32 << 20;
/// Most header and padding bytes in one member between payloads.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// Write `entries` (in order; directories before their children, hard links
/// after their targets) as an eStargz layer to `out`, reading file content
/// from `content` and checking it against each entry's size and digest.
pub fn write_layer<W: Write>(
    out: W,
    entries: &[Entry],
    content: &dyn ContentSource,
    opts: &WriterOptions,
) -> Result<WrittenLayer> {
    write_layer_batched(out, entries, content, opts, BATCH_BYTES)
}

fn write_layer_batched<W: Write>(
    out: W,
    entries: &[Entry],
    content: &dyn ContentSource,
    opts: &WriterOptions,
    batch_bytes: usize,
) -> Result<WrittenLayer> {
    if opts.chunk_size == 0 {
        return Err(Error::BadEntry {
            path: String::new(),
            reason: "chunk size 0: use a positive chunk size such as 4 MiB".into(),
        });
    }
    if opts.level > 9 {
        return Err(Error::BadEntry {
            path: String::new(),
            reason: format!("gzip level {} is not in 0..=9", opts.level),
        });
    }
    let order = write_order(entries, &opts.prefetch);
    let mut w = LayerWriter {
        entries,
        content,
        level: opts.level,
        chunk_size: opts.chunk_size,
        group_below: opts.group_below.min(opts.chunk_size.saturating_add(1)),
        member_size: usize::try_from(opts.member_size).unwrap_or(usize::MAX),
        batch_bytes,
        out: HashingWriter::new(out),
        diff: Sha256::new(),
        uncompressed: 0,
        toc: Toc {
            version: 1,
            entries: Vec::new(),
        },
        open: Segment::default(),
        batch: Vec::new(),
        batch_len: 0,
        pool: Vec::new(),
        file_hash: None,
    };
    for item in &order {
        w.append(*item)?;
    }
    w.close_open_segment();
    w.flush_batch()?;

    // The TOC member: header, JSON, padding and the end-of-archive blocks.
    // The JSON is written once, after room for its header, and the TOC
    // dropped before it is compressed: a TOC of a million entries is big.
    let mut tail = vec![0; 512];
    w.toc.append_json(&mut tail);
    w.toc.entries = Vec::new();
    let json_len = tail.len() - 512;
    let toc_digest = Digest::of(&tail[512..]);
    let mut meta = Entry::new(TOC_TAR_NAME, EntryKind::File);
    meta.mode = 0o644;
    meta.size = json_len as u64;
    let mut header = Vec::with_capacity(512);
    push_header(&mut header, &meta, TOC_TAR_NAME)?;
    tail.splice(..512, header);
    tail.resize(tail.len() + padding(json_len as u64), 0);
    tail.resize(tail.len() + 1024, 0);
    w.diff.update(&tail);
    w.uncompressed += tail.len() as u64;
    let toc_offset = w.out.count();
    let mut member = Vec::new();
    with_compressor(w.level, |c| gzip_member(c, w.level, &tail, &mut member))
        .map_err(|e| Error::io("compressing the eStargz TOC", e))?;
    let what = "writing the eStargz layer";
    w.out.write_all(&member).map_err(|e| Error::io(what, e))?;
    w.out
        .write_all(&footer(toc_offset))
        .map_err(|e| Error::io(what, e))?;
    w.out.flush().map_err(|e| Error::io(what, e))?;
    let (_, digest, size) = w.out.finish();
    Ok(WrittenLayer {
        digest,
        size,
        diff_id: Digest::from_hasher(w.diff),
        uncompressed_size: w.uncompressed,
        toc_digest,
        toc_tail: size - toc_offset,
        entries: order.len() + 1,
    })
}

/// One tar entry to write: an input entry or a landmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Entry(usize),
    Landmark(&'static str),
}

/// Prioritized entries (with their parent directories and hard link
/// targets) first, in the order given, then the landmark (the prefetch one
/// when a file with content lies before it), then the rest in input order.
fn write_order(entries: &[Entry], prefetch: &[String]) -> Vec<Item> {
    let by_path: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_str(), i))
        .collect();
    let mut moved = vec![false; entries.len()];
    let mut front = Vec::new();
    fn move_rec(
        path: &str,
        depth: usize,
        entries: &[Entry],
        by_path: &HashMap<&str, usize>,
        moved: &mut [bool],
        front: &mut Vec<Item>,
    ) {
        if path.is_empty() || depth > 64 {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            move_rec(parent, depth + 1, entries, by_path, moved, front);
        }
        let Some(&i) = by_path.get(path) else { return };
        if moved[i] {
            return;
        }
        if entries[i].kind == EntryKind::Hardlink {
            move_rec(&entries[i].link, depth + 1, entries, by_path, moved, front);
        }
        if !moved[i] {
            moved[i] = true;
            front.push(Item::Entry(i));
        }
    }
    for p in prefetch {
        let p = p.trim_start_matches("./").trim_matches('/');
        move_rec(p, 0, entries, &by_path, &mut moved, &mut front);
    }
    // A front of directories alone (a profile's parents in a layer that
    // holds none of its files) has nothing for a mount to fetch.
    let has_content = front
        .iter()
        .any(|i| matches!(i, Item::Entry(i) if entries[*i].kind == EntryKind::File && entries[*i].size > 0));
    let landmark = if has_content {
        PREFETCH_LANDMARK
    } else {
        NO_PREFETCH_LANDMARK
    };
    front.push(Item::Landmark(landmark));
    front.extend((0..entries.len()).filter(|&i| !moved[i]).map(Item::Entry));
    front
}

/// Part of a member's uncompressed bytes.
enum Piece {
    Bytes(Vec<u8>),
    Content {
        entry: usize,
        offset: u64,
        len: usize,
    },
}

/// A file chunk (or landmark payload) that starts a member.
#[derive(Clone, Copy)]
struct ChunkRef {
    toc_idx: usize,
    len: usize,
    file: Option<FileRef>,
}

#[derive(Clone, Copy)]
struct FileRef {
    entry: usize,
    reg_toc_idx: usize,
    first: bool,
    last: bool,
}

/// One gzip member's worth of uncompressed bytes.
#[derive(Default)]
struct Segment {
    pieces: Vec<Piece>,
    len: usize,
    /// The payloads in the member, each with where it starts in the
    /// inflated member; the first (if any) starts it, at 0.
    chunks: Vec<(usize, ChunkRef)>,
    /// Bytes of those payloads.
    payload: usize,
    /// Whether small files may join: the member was started by a file's
    /// payload (not by headers alone, nor by a landmark).
    shared: bool,
}

/// A segment with its buffers while a batch is processed.
struct Work {
    seg: Segment,
    buf: Vec<u8>,
    /// The digest of each of `seg.chunks`.
    chunk_digests: Vec<Digest>,
}

struct LayerWriter<'a, W: Write> {
    entries: &'a [Entry],
    content: &'a dyn ContentSource,
    level: u32,
    chunk_size: u64,
    group_below: u64,
    member_size: usize,
    batch_bytes: usize,
    out: HashingWriter<W>,
    diff: Sha256,
    uncompressed: u64,
    toc: Toc,
    open: Segment,
    batch: Vec<Segment>,
    batch_len: usize,
    pool: Vec<(Vec<u8>, Vec<u8>)>,
    /// Running hash of the multi-chunk file being written.
    file_hash: Option<Sha256>,
}

impl<W: Write> LayerWriter<'_, W> {
    /// Add headers or padding to the open member. Entries without content
    /// (directories, links, empty files) add headers only: past
    /// `MAX_HEADER_BYTES` of them the member is closed, so a layer of a
    /// million such entries is written a batch at a time, not held whole.
    fn push_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.open.len += bytes.len();
        self.open.pieces.push(Piece::Bytes(bytes));
        if self.open.len - self.open.payload >= MAX_HEADER_BYTES {
            self.close_open_segment();
            if self.batch_len >= self.batch_bytes {
                self.flush_batch()?;
            }
        }
        Ok(())
    }

    fn close_open_segment(&mut self) {
        if self.open.len > 0 {
            let seg = std::mem::take(&mut self.open);
            self.batch_len += seg.len;
            self.batch.push(seg);
        }
    }

    /// Close the open member and start one whose first bytes are a payload
    /// (`shared`: one small files may join).
    fn start_chunk_segment(&mut self, chunk: ChunkRef, piece: Piece, shared: bool) -> Result<()> {
        self.close_open_segment();
        if self.batch_len >= self.batch_bytes {
            self.flush_batch()?;
        }
        self.open = Segment {
            pieces: vec![piece],
            len: chunk.len,
            chunks: vec![(0, chunk)],
            payload: chunk.len,
            shared,
        };
        Ok(())
    }

    /// Whether a small file's payload of `len` bytes may join the open
    /// member.
    fn may_join(&self, len: usize) -> bool {
        self.open.shared && self.open.len.saturating_add(len) <= self.member_size
    }

    /// Put a small file's whole payload into the open member.
    fn join_open_segment(&mut self, chunk: ChunkRef, piece: Piece) {
        self.open.chunks.push((self.open.len, chunk));
        self.open.pieces.push(piece);
        self.open.len += chunk.len;
        self.open.payload += chunk.len;
    }

    fn append(&mut self, item: Item) -> Result<()> {
        let i = match item {
            Item::Entry(i) => i,
            Item::Landmark(name) => return self.append_landmark(name),
        };
        let e = &self.entries[i];
        check_entry(e)?;
        let name = if e.kind == EntryKind::Dir {
            format!("{}/", e.path)
        } else {
            e.path.clone()
        };
        let mut header = Vec::with_capacity(512);
        push_header(&mut header, e, &name)?;
        self.push_bytes(header)?;

        let mut te = TocEntry::new(name, toc_type(e.kind));
        te.mode = i64::from(e.mode & 0o7777);
        te.uid = e.uid;
        te.gid = e.gid;
        te.modtime = format_modtime(e.mtime);
        te.xattrs = e.xattrs.clone();
        match e.kind {
            EntryKind::Symlink | EntryKind::Hardlink => te.link_name = e.link.clone(),
            EntryKind::CharDev | EntryKind::BlockDev => {
                te.dev_major = e.dev_major;
                te.dev_minor = e.dev_minor;
            }
            EntryKind::File => {
                te.size = e.size;
                if let Some(d) = &e.digest {
                    te.digest = d.to_string();
                }
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        let reg_toc_idx = self.toc.entries.len();
        self.toc.entries.push(te);
        if e.kind != EntryKind::File {
            return Ok(());
        }
        if e.size == 0 {
            let empty = Digest::of(b"");
            if let Some(d) = &e.digest
                && *d != empty
            {
                return Err(mismatch(e, format!("size is 0 but digest is {d}")));
            }
            self.toc.entries[reg_toc_idx].digest = empty.to_string();
            return Ok(());
        }
        let size = e.size;
        let mut off = 0u64;
        while off < size {
            let len = self.chunk_size.min(size - off);
            let last = off + len == size;
            let toc_idx = if off == 0 {
                reg_toc_idx
            } else {
                let mut c = TocEntry::new(e.path.clone(), TocEntryType::Chunk);
                c.chunk_offset = off;
                self.toc.entries.push(c);
                self.toc.entries.len() - 1
            };
            if !last {
                self.toc.entries[toc_idx].chunk_size = len;
            }
            let len = usize::try_from(len).map_err(|_| Error::BadEntry {
                path: e.path.clone(),
                reason: format!("chunk of {len} bytes does not fit in memory"),
            })?;
            let chunk = ChunkRef {
                toc_idx,
                len,
                file: Some(FileRef {
                    entry: i,
                    reg_toc_idx,
                    first: off == 0,
                    last,
                }),
            };
            let piece = Piece::Content {
                entry: i,
                offset: off,
                len,
            };
            // Only a whole small file joins the open member; anything else
            // starts one (which small files after it may join).
            if size < self.group_below && self.may_join(len) {
                self.join_open_segment(chunk, piece);
            } else {
                self.start_chunk_segment(chunk, piece, true)?;
            }
            off += len as u64;
        }
        let pad = padding(size);
        if pad > 0 {
            self.push_bytes(vec![0; pad])?;
        }
        Ok(())
    }

    fn append_landmark(&mut self, name: &'static str) -> Result<()> {
        let mut meta = Entry::new(name, EntryKind::File);
        meta.mode = 0o644;
        meta.size = 1;
        let mut header = Vec::with_capacity(512);
        push_header(&mut header, &meta, name)?;
        self.push_bytes(header)?;
        let mut te = TocEntry::new(name, TocEntryType::Reg);
        te.mode = 0o644;
        te.size = 1;
        te.digest = Digest::of(&[LANDMARK_CONTENT]).to_string();
        let toc_idx = self.toc.entries.len();
        self.toc.entries.push(te);
        let chunk = ChunkRef {
            toc_idx,
            len: 1,
            file: None,
        };
        self.start_chunk_segment(chunk, Piece::Bytes(vec![LANDMARK_CONTENT]), false)?;
        self.push_bytes(vec![0; padding(1)])?;
        Ok(())
    }

    /// Read, digest and compress the closed segments in parallel, then hash
    /// and write them in order.
    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut works: Vec<Work> = Vec::with_capacity(self.batch.len());
        let mut outs: Vec<Vec<u8>> = Vec::with_capacity(self.batch.len());
        for seg in self.batch.drain(..) {
            let (buf, out) = self.pool.pop().unwrap_or_default();
            works.push(Work {
                seg,
                buf,
                chunk_digests: Vec::new(),
            });
            outs.push(out);
        }
        self.batch_len = 0;

        let entries = self.entries;
        let content = self.content;
        let checked = content.digests_checked();
        let level = self.level;
        works
            .par_iter_mut()
            .try_for_each(|w| fill(w, entries, content, checked))?;
        let (hashed, compressed) = rayon::join(
            || {
                hash_batch(
                    &works,
                    entries,
                    checked,
                    &mut self.diff,
                    &mut self.file_hash,
                )
            },
            || {
                works
                    .par_iter()
                    .zip(outs.par_iter_mut())
                    .try_for_each(|(w, out)| {
                        with_compressor(level, |c| gzip_member(c, level, &w.buf, out))
                            .map_err(|e| Error::io("compressing an eStargz member", e))
                    })
            },
        );
        let file_digests = hashed?;
        compressed?;

        for ((w, out), fds) in works.iter().zip(&outs).zip(file_digests) {
            self.uncompressed += w.buf.len() as u64;
            let offset = self.out.count();
            for (((inner, chunk), d), fd) in w.seg.chunks.iter().zip(&w.chunk_digests).zip(fds) {
                let te = &mut self.toc.entries[chunk.toc_idx];
                te.offset = offset;
                te.inner_offset = *inner as u64;
                te.chunk_digest = d.to_string();
                if let (Some(d), Some(file)) = (fd, chunk.file) {
                    self.toc.entries[file.reg_toc_idx].digest = d.to_string();
                }
            }
            self.out
                .write_all(out)
                .map_err(|e| Error::io("writing the eStargz layer", e))?;
        }
        for (mut w, mut out) in works.into_iter().zip(outs) {
            w.buf.clear();
            out.clear();
            self.pool.push((w.buf, out));
        }
        Ok(())
    }
}

/// Materialise a segment's bytes and digest its payloads (a whole file's
/// digest is its entry's when the source's digests are `checked`).
fn fill(w: &mut Work, entries: &[Entry], content: &dyn ContentSource, checked: bool) -> Result<()> {
    w.buf.clear();
    w.buf.reserve(w.seg.len);
    for piece in &w.seg.pieces {
        match piece {
            Piece::Bytes(b) => w.buf.extend_from_slice(b),
            Piece::Content { entry, offset, len } => {
                let e = &entries[*entry];
                let start = w.buf.len();
                w.buf.resize(start + len, 0);
                content
                    .read_at(e, *offset, &mut w.buf[start..])
                    .map_err(|err| {
                        if err.kind() == io::ErrorKind::UnexpectedEof {
                            mismatch(
                                e,
                                format!(
                                    "the source has fewer than the {} bytes the entry says ({err})",
                                    e.size
                                ),
                            )
                        } else {
                            Error::io(format!("reading {:?} at offset {offset}", e.path), err)
                        }
                    })?;
            }
        }
    }
    w.chunk_digests = w
        .seg
        .chunks
        .iter()
        .map(|(inner, c)| {
            let known = c
                .file
                .filter(|f| checked && f.first && f.last)
                .and_then(|f| entries[f.entry].digest.clone());
            known.unwrap_or_else(|| Digest::of(&w.buf[*inner..inner + c.len]))
        })
        .collect();
    Ok(())
}

/// Hash a batch into the diff_id and the running file digests; returns, per
/// work and per chunk in it, the whole-file digest when that chunk ends a
/// file.
fn hash_batch(
    works: &[Work],
    entries: &[Entry],
    checked: bool,
    diff: &mut Sha256,
    file_hash: &mut Option<Sha256>,
) -> Result<Vec<Vec<Option<Digest>>>> {
    let mut out = Vec::with_capacity(works.len());
    for w in works {
        diff.update(&w.buf);
        let mut dones = Vec::with_capacity(w.seg.chunks.len());
        for ((inner, chunk), chunk_digest) in w.seg.chunks.iter().zip(&w.chunk_digests) {
            let mut done = None;
            if let Some(file) = chunk.file {
                let known = entries[file.entry].digest.as_ref().filter(|_| checked);
                let digest = if file.first && file.last {
                    Some(chunk_digest.clone())
                } else if let Some(d) = known {
                    file.last.then(|| d.clone())
                } else {
                    let h = file_hash.get_or_insert_with(Sha256::new);
                    h.update(&w.buf[*inner..inner + chunk.len]);
                    if file.last {
                        file_hash.take().map(Digest::from_hasher)
                    } else {
                        None
                    }
                };
                if let Some(d) = digest {
                    let e = &entries[file.entry];
                    if let Some(want) = &e.digest
                        && *want != d
                    {
                        return Err(mismatch(
                            e,
                            format!("the entry says {want} but the content hashes to {d}"),
                        ));
                    }
                    done = Some(d);
                }
            }
            dones.push(done);
        }
        out.push(dones);
    }
    Ok(out)
}

fn mismatch(e: &Entry, reason: String) -> Error {
    Error::ContentMismatch {
        path: e.path.clone(),
        reason,
    }
}

fn check_entry(e: &Entry) -> Result<()> {
    let bad = |reason: &str| Error::BadEntry {
        path: e.path.clone(),
        reason: reason.to_string(),
    };
    if e.path.is_empty() {
        return Err(bad("empty path"));
    }
    if e.path.starts_with('/') || e.path.ends_with('/') {
        return Err(bad("path is not normalised (leading or trailing `/`)"));
    }
    if e.path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("path has an empty, `.` or `..` component"));
    }
    if e.path == TOC_TAR_NAME || e.path == PREFETCH_LANDMARK || e.path == NO_PREFETCH_LANDMARK {
        return Err(bad("the name is reserved by eStargz"));
    }
    if matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink) && e.link.is_empty() {
        return Err(bad("link without a target"));
    }
    Ok(())
}

fn toc_type(kind: EntryKind) -> TocEntryType {
    match kind {
        EntryKind::File => TocEntryType::Reg,
        EntryKind::Dir => TocEntryType::Dir,
        EntryKind::Symlink => TocEntryType::Symlink,
        EntryKind::Hardlink => TocEntryType::Hardlink,
        EntryKind::CharDev => TocEntryType::Char,
        EntryKind::BlockDev => TocEntryType::Block,
        EntryKind::Fifo => TocEntryType::Fifo,
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(u32, Compressor)>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's raw deflate compressor at `level`, reused
/// across members.
fn with_compressor<T>(level: u32, f: impl FnOnce(&mut Compressor) -> T) -> T {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut() {
            Some((l, c)) if *l == level => f(c),
            _ => {
                // `level` is checked to be 0..=9 before any member is written.
                let lvl = CompressionLvl::new(level as i32).unwrap_or_default();
                let (_, c) = slot.insert((level, Compressor::new(lvl)));
                f(c)
            }
        }
    })
}

/// Compress `input` as one complete gzip member into `out` (cleared first).
/// libdeflate compresses a whole buffer at once (members are whole
/// buffers here); its output depends on the input and level only, not on
/// the thread.
fn gzip_member(c: &mut Compressor, level: u32, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    let xfl = match level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    const HEADER: usize = 10;
    out.extend_from_slice(&[0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, xfl, 0xff]);
    out.resize(HEADER + c.deflate_compress_bound(input.len()), 0);
    let n = c
        .deflate_compress(input, &mut out[HEADER..])
        .map_err(|e| io::Error::other(format!("deflate: {e:?}")))?;
    out.truncate(HEADER + n);
    out.extend_from_slice(&crc32(input).to_le_bytes());
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests;
