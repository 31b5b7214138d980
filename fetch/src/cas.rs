//! The node's content store: verified, content-addressed files on disk.
//!
//! ```text
//! CACHE/blobs/sha256/HEX    whole blobs (manifests, configs, plain layers)
//! CACHE/chunks/sha256/HEX   uncompressed file chunks, keyed by their own
//!                           digest, so a chunk two layers share is stored once
//! CACHE/ranges/sha256/HEX/START-END
//!                           verified compressed ranges of layer HEX, kept
//!                           so that peers can fetch them; assembled into
//!                           blobs/ once the layer is complete
//! CACHE/meta/...            derived records (TOCs, layer indexes, refs)
//! CACHE/tmp/PID.START.BOOT-N writes in progress, named after the process
//! ```
//!
//! Every byte is checked against its digest before it is renamed into place
//! (temp file, `fdatasync`, rename), so a crash or `SIGKILL` leaves the old
//! state or the new one, never a torn file. What a killed process leaves
//! behind is removed when the store is opened: its temp files, and the
//! kept ranges of a layer it had just assembled whole. `breakfs verify`
//! (`crate::verify`) checks every byte.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use breakfs_index::Digest;

use crate::{Error, Result};

/// A content store rooted at one directory.
pub struct ContentStore {
    root: PathBuf,
    seq: AtomicU64,
    budget: std::sync::OnceLock<std::sync::Arc<crate::budget::Budget>>,
}

impl std::fmt::Debug for ContentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentStore")
            .field("root", &self.root)
            .finish()
    }
}

impl ContentStore {
    /// Open (creating if needed) the store at `root`, removing temp files
    /// left behind by processes that no longer run.
    pub fn open(root: &Path) -> Result<ContentStore> {
        for sub in [
            "blobs/sha256",
            "chunks/sha256",
            "ranges/sha256",
            "meta",
            "tmp",
        ] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| {
                Error::io(
                    format!(
                        "creating the cache directory {} (choose another with --cache)",
                        dir.display()
                    ),
                    e,
                )
            })?;
        }
        let store = ContentStore {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
            budget: std::sync::OnceLock::new(),
        };
        store.remove_dead_temps();
        store.remove_ranges_of_whole_layers();
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Keep the store within `budget` from now on (once).
    pub fn set_budget(&self, budget: std::sync::Arc<crate::budget::Budget>) {
        let _ = self.budget.set(budget);
    }

    /// The budget, if one is set.
    pub fn budget(&self) -> Option<&std::sync::Arc<crate::budget::Budget>> {
        self.budget.get()
    }

    fn reserve(&self, len: u64) {
        if let Some(b) = self.budget.get() {
            b.reserve(self, len);
        }
    }

    fn release(&self, len: u64) {
        if let Some(b) = self.budget.get() {
            b.release(len);
        }
    }

    /// Remove chunk `d`; whether it was there.
    pub fn remove_chunk(&self, d: &Digest) -> bool {
        fs::remove_file(self.chunk_path(d)).is_ok()
    }

    /// Remove blob `d`; the bytes freed.
    pub fn remove_blob(&self, d: &Digest) -> u64 {
        let path = self.blob_path(d);
        let n = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if fs::remove_file(&path).is_ok() { n } else { 0 }
    }

    /// Write `bytes` as record `name`, replacing an older one atomically.
    pub fn put_meta_replace(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.meta_path(name);
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
            fs::rename(&temp, &path)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(format!("writing {}", path.display()), e)
        })
    }

    fn remove_dead_temps(&self) {
        let Ok(dir) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in dir.flatten() {
            if !e.file_name().to_str().is_some_and(temp_owner_alive) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Drop the kept ranges of layers held whole: a process killed between
    /// assembling a layer and dropping its ranges leaves both (and an empty
    /// directory when killed before its first range landed).
    fn remove_ranges_of_whole_layers(&self) {
        for (layer, dir) in list_digests(&self.root.join("ranges/sha256")) {
            if self.has_blob(&layer) {
                let _ = fs::remove_dir_all(&dir);
            } else {
                // Only removed when empty.
                let _ = fs::remove_dir(&dir);
            }
        }
    }

    /// Where a whole blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where a chunk lives.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.root.join("chunks/sha256").join(d.hex())
    }

    /// Where a derived record named `name` lives (`name` is a plain file name).
    pub fn meta_path(&self, name: &str) -> PathBuf {
        self.root.join("meta").join(name)
    }

    /// A fresh temp path inside the store (same filesystem, for renames),
    /// named after this process (see [`process_mark`]).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", process_mark()))
    }

    /// Whether the store holds the chunk `d`.
    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_path(d).is_file()
    }

    /// Whether the store holds the blob `d`.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Store a chunk after checking that `bytes` hash to `d`.
    pub fn put_chunk(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        check(d, bytes, "chunk")?;
        self.write_counted(&self.chunk_path(d), bytes)
    }

    /// Store a whole blob after checking that `bytes` hash to `d`.
    pub fn put_blob(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        check(d, bytes, "blob")?;
        self.write_counted(&self.blob_path(d), bytes)
    }

    /// Store `len` bytes at `offset` of `file` as the chunk `d`, streaming
    /// and checking the digest on the way (positioned reads: several
    /// threads may share `file`).
    pub fn put_chunk_from(&self, d: &Digest, file: &File, offset: u64, len: u64) -> Result<()> {
        use std::io::BufWriter;
        use std::os::unix::fs::FileExt;
        let dest = self.chunk_path(d);
        if dest.is_file() {
            return Ok(());
        }
        self.reserve(len);
        let temp = self.temp_path();
        let result = (|| -> std::io::Result<Digest> {
            let out = BufWriter::with_capacity(256 * 1024, File::create(&temp)?);
            let mut hw = breakfs_index::HashingWriter::new(out);
            let mut buf = vec![0u8; (256 * 1024).min(len.max(1) as usize)];
            let mut done = 0u64;
            while done < len {
                let want = buf.len().min((len - done) as usize);
                let n = file.read_at(&mut buf[..want], offset + done)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("only {done} of {len} bytes"),
                    ));
                }
                hw.write_all(&buf[..n])?;
                done += n as u64;
            }
            let (out, digest, _) = hw.finish();
            out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
            Ok(digest)
        })();
        let outcome = match result {
            Ok(actual) if &actual == d => fs::rename(&temp, &dest)
                .map_err(|e| Error::io(format!("writing {}", dest.display()), e)),
            Ok(actual) => Err(Error::DigestMismatch {
                what: format!("chunk of {len} bytes"),
                expected: d.clone(),
                actual,
            }),
            Err(e) => Err(Error::io(format!("writing {}", dest.display()), e)),
        };
        if outcome.is_err() {
            let _ = fs::remove_file(&temp);
            self.release(len);
        }
        outcome
    }

    /// A small blob's bytes, verified again on the way out; `None` if absent.
    pub fn read_blob(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(d);
        match fs::read(&path) {
            Ok(b) => {
                check(d, &b, "stored blob")?;
                Ok(Some(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Write a derived record atomically.
    pub fn put_meta(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&self.meta_path(name), bytes)
    }

    /// A derived record, `None` if absent.
    pub fn read_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.meta_path(name);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Move a finished temp file (already verified by the caller) to `dest`
    /// after syncing it.
    pub fn commit_temp(&self, temp: &Path, dest: &Path) -> Result<()> {
        let f =
            File::open(temp).map_err(|e| Error::io(format!("opening {}", temp.display()), e))?;
        f.sync_data()
            .map_err(|e| Error::io(format!("syncing {}", temp.display()), e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        self.reserve(len);
        fs::rename(temp, dest).map_err(|e| {
            self.release(len);
            Error::io(
                format!("moving {} to {}", temp.display(), dest.display()),
                e,
            )
        })
    }

    /// [`ContentStore::write_atomic`] for content the budget counts.
    fn write_counted(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        if dest.is_file() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        self.reserve(len);
        let r = self.write_atomic(dest, bytes);
        if r.is_err() {
            self.release(len);
        }
        r
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        if dest.is_file() {
            return Ok(());
        }
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
            fs::rename(&temp, dest)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(format!("writing {}", dest.display()), e)
        })
    }

    /// Bytes held by blobs, chunks and kept ranges.
    pub fn usage(&self) -> u64 {
        let files: u64 = ["blobs/sha256", "chunks/sha256"]
            .iter()
            .filter_map(|s| fs::read_dir(self.root.join(s)).ok())
            .flat_map(|d| d.flatten())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let ranges: u64 = self
            .partial_layers()
            .iter()
            .flat_map(|(_, r)| r.iter().map(|(s, e)| e - s))
            .sum();
        files + ranges
    }

    /// The whole blobs held, with their sizes.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        list_digests(&self.root.join("blobs/sha256"))
            .into_iter()
            .filter_map(|(d, p)| Some((d, fs::metadata(p).ok()?.len())))
            .collect()
    }

    /// Record that `name:reference` (a repository and tag) resolved to the
    /// manifest `digest` (itself kept as a blob), for serving it to peers.
    pub fn put_ref(&self, name: &str, reference: &str, digest: &Digest) -> Result<()> {
        let key = Digest::of(format!("{name}:{reference}").as_bytes());
        let rec = serde_json::json!({"name": name, "reference": reference, "digest": digest});
        let path = self.meta_path(&format!("ref-{}.json", &key.hex()[..32]));
        // A tag moves: replace the record (atomically) rather than keep it.
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(rec.to_string().as_bytes())?;
            f.sync_data()?;
            fs::rename(&temp, &path)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(format!("writing {}", path.display()), e)
        })
    }

    /// The manifest digest `name:reference` resolved to, if recorded.
    pub fn lookup_ref(&self, name: &str, reference: &str) -> Option<Digest> {
        let key = Digest::of(format!("{name}:{reference}").as_bytes());
        let bytes = self
            .read_meta(&format!("ref-{}.json", &key.hex()[..32]))
            .ok()??;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if v["name"] != name || v["reference"] != reference {
            return None;
        }
        Digest::parse(v["digest"].as_str()?).ok()
    }

    /// The chunks held, with their sizes.
    pub fn chunks(&self) -> Vec<(Digest, u64)> {
        list_digests(&self.root.join("chunks/sha256"))
            .into_iter()
            .filter_map(|(d, p)| Some((d, fs::metadata(p).ok()?.len())))
            .collect()
    }

    fn ranges_dir(&self, layer: &Digest) -> PathBuf {
        self.root.join("ranges/sha256").join(layer.hex())
    }

    /// Keep `bytes` (verified by the caller: every chunk in them matched
    /// its digest, and is stored) as the range at `start` of layer blob
    /// `layer`. The range is a second copy of those chunks: under a budget
    /// it is kept only if other kept ranges can make room for it, never
    /// at the cost of chunks or blobs; whether it was kept.
    pub fn put_range(&self, layer: &Digest, start: u64, bytes: &[u8]) -> Result<bool> {
        if bytes.is_empty() || self.has_blob(layer) {
            return Ok(false);
        }
        let end = start + bytes.len() as u64;
        let dir = self.ranges_dir(layer);
        let dest = dir.join(format!("{start}-{end}"));
        if dest.is_file() {
            return Ok(true);
        }
        let len = bytes.len() as u64;
        if let Some(b) = self.budget.get()
            && !b.reserve_copy(self, len)
        {
            return Ok(false);
        }
        // Once more if the budget dropped the layer's ranges (their dir
        // with them) between the two steps.
        let write = || {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
                .and_then(|()| self.write_atomic(&dest, bytes))
        };
        let r = write().or_else(|_| write());
        if r.is_err() {
            self.release(len);
        }
        r.map(|()| true)
    }

    /// Keep chunks `chunks` from eviction until the returned pin drops
    /// (see [`crate::budget::Budget::pin_chunks`]): what a reader takes
    /// from before it fetches the chunks of an answer until it has read
    /// them.
    pub fn pin_chunks(&self, chunks: impl IntoIterator<Item = Digest>) -> crate::budget::ChunkPin {
        match self.budget.get() {
            Some(b) => b.pin_chunks(chunks),
            None => crate::budget::ChunkPin::none(),
        }
    }

    /// The ranges kept of layer `layer`, sorted by start (may overlap).
    pub fn held_ranges(&self, layer: &Digest) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = fs::read_dir(self.ranges_dir(layer))
            .into_iter()
            .flat_map(|d| d.flatten())
            .filter_map(|e| parse_range(e.file_name().to_str()?))
            .collect();
        out.sort_unstable();
        out
    }

    /// Every layer with kept ranges (and no whole blob), with its ranges
    /// merged where they touch.
    pub fn partial_layers(&self) -> Vec<(Digest, Vec<(u64, u64)>)> {
        list_digests(&self.root.join("ranges/sha256"))
            .into_iter()
            .map(|(d, _)| {
                let merged = merge_ranges(&self.held_ranges(&d));
                (d, merged)
            })
            .filter(|(_, r)| !r.is_empty())
            .collect()
    }

    /// Drop the kept ranges of `layer` (once it is whole); the bytes freed.
    pub fn remove_ranges(&self, layer: &Digest) -> u64 {
        let freed = self.remove_ranges_quietly(layer);
        self.release(freed);
        freed
    }

    /// [`ContentStore::remove_ranges`] without telling the budget (which
    /// calls it while evicting).
    pub fn remove_ranges_quietly(&self, layer: &Digest) -> u64 {
        let freed = self.held_ranges(layer).iter().map(|(s, e)| e - s).sum();
        let _ = fs::remove_dir_all(self.ranges_dir(layer));
        freed
    }

    /// `len` bytes at `start` of blob `blob` if the store holds them: from
    /// the whole blob, or from kept ranges that cover them. Only verified
    /// bytes are ever here.
    pub fn read_held(&self, blob: &Digest, start: u64, len: u64) -> Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let end = start.saturating_add(len);
        let read = |path: &Path, at: u64, buf: &mut [u8]| -> std::io::Result<()> {
            File::open(path)?.read_exact_at(buf, at)
        };
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        // Whether the range is held is settled before its buffer is made:
        // a request for a huge range allocates nothing.
        let whole = self.blob_path(blob);
        if let Ok(meta) = fs::metadata(&whole)
            && meta.is_file()
        {
            if end > meta.len() {
                return Ok(None);
            }
            let mut out = vec![0u8; len as usize];
            return match read(&whole, start, &mut out) {
                Ok(()) => Ok(Some(out)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("reading {}", whole.display()), e)),
            };
        }
        let held = self.held_ranges(blob);
        if !merge_ranges(&held)
            .iter()
            .any(|&(s, e)| s <= start && end <= e)
        {
            return Ok(None);
        }
        let mut out = vec![0u8; len as usize];
        let dir = self.ranges_dir(blob);
        let mut pos = start;
        for (s, e) in held {
            if pos >= end {
                break;
            }
            if s > pos || e <= pos {
                continue;
            }
            let take = e.min(end) - pos;
            let dst = &mut out[(pos - start) as usize..(pos - start + take) as usize];
            match read(&dir.join(format!("{s}-{e}")), pos - s, dst) {
                Ok(()) => pos += take,
                // Evicted meanwhile: not held after all.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => {
                    return Err(Error::io(format!("reading a kept range of {blob}"), err));
                }
            }
        }
        Ok((pos >= end).then_some(out))
    }
}

/// This process's mark in the names of its temp files, `PID.START.BOOT`:
/// its PID, its start time (clock ticks after boot) and the start of the
/// boot's id. A temp file of a dead process is then told from one of a live
/// process even when the PID was given out again: a daemon restarted in a
/// container often gets the very PID its killed predecessor had.
pub(crate) fn process_mark() -> &'static str {
    static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARK.get_or_init(|| {
        let pid = std::process::id();
        let start = process_start(pid).unwrap_or(0);
        format!("{pid}.{start}.{}", boot_tag())
    })
}

/// When process `pid` started (clock ticks after boot), if it runs: a
/// zombie or a gone process has no start.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: the state
    // (field 3) first, the start time is field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The first 8 hex digits of this boot's id.
pub(crate) fn boot_tag() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect()
}

/// Whether the process that named temp file `name` still runs: names are
/// `MARK-N`, or `.tmp-MARK-RANDOM` for a blob being downloaded (see
/// [`process_mark`]); `PID-N` of older versions is judged by its PID alone.
/// A name with no owner in it has none alive.
pub(crate) fn temp_owner_alive(name: &str) -> bool {
    let name = name.strip_prefix(".tmp-").unwrap_or(name);
    let owner = name.split('-').next().unwrap_or_default();
    let mut parts = owner.split('.');
    let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    match (parts.next(), parts.next()) {
        (Some(start), Some(boot)) => {
            boot == boot_tag() && start.parse::<u64>().ok() == process_start(pid)
        }
        _ => Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// The uncompressed bytes of chunk `j` out of `bytes`, compressed bytes of
/// its layer starting at offset `start`: its gzip member inflated and
/// checked against the size the TOC gives (the caller checks the digest).
/// How the fetcher reads a chunk out of a range before it keeps the range,
/// and the verifier again.
pub(crate) fn inflate_chunk(
    j: &crate::ChunkLoc,
    bytes: &[u8],
    start: u64,
) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let what = || {
        format!(
            "chunk {} of layer {} (member at {})",
            j.digest, j.layer, j.offset
        )
    };
    let lo = j.offset.saturating_sub(start) as usize;
    let hi = (j.compressed_end.saturating_sub(start) as usize).min(bytes.len());
    if j.offset < start || lo >= hi {
        return Err(format!("{}: the fetched range is short", what()));
    }
    let mut dec = flate2::read::GzDecoder::new(&bytes[lo..hi]);
    std::io::copy(&mut (&mut dec).take(j.inner_offset), &mut std::io::sink())
        .map_err(|e| format!("{}: not a gzip member: {e}", what()))?;
    let mut out = Vec::with_capacity(j.size as usize);
    (&mut dec)
        .take(j.size)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: not a gzip member: {e}", what()))?;
    if out.len() as u64 != j.size {
        return Err(format!(
            "{}: the member holds {} bytes, the TOC says {}",
            what(),
            out.len(),
            j.size
        ));
    }
    Ok(out)
}

fn parse_range(name: &str) -> Option<(u64, u64)> {
    let (s, e) = name.split_once('-')?;
    let (s, e) = (s.parse().ok()?, e.parse().ok()?);
    (s < e).then_some((s, e))
}

/// Sorted, possibly overlapping ranges merged where they overlap or touch.
pub fn merge_ranges(r: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The `sha256:HEX` names in a `.../sha256` directory with their paths.
fn list_digests(dir: &Path) -> Vec<(Digest, PathBuf)> {
    fs::read_dir(dir)
        .into_iter()
        .flat_map(|d| d.flatten())
        .filter_map(|e| {
            let name = e.file_name();
            let d = Digest::parse(&format!("sha256:{}", name.to_str()?)).ok()?;
            Some((d, e.path()))
        })
        .collect()
}

fn check(d: &Digest, bytes: &[u8], what: &str) -> Result<()> {
    let actual = Digest::of(bytes);
    if &actual != d {
        return Err(Error::DigestMismatch {
            what: format!("{what} of {} bytes", bytes.len()),
            expected: d.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_verified_and_land_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(!s.has_chunk(&d));
        let err = s.put_chunk(&d, b"jello").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!s.has_chunk(&d));
        s.put_chunk(&d, b"hello").unwrap();
        assert_eq!(fs::read(s.chunk_path(&d)).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn temps_of_dead_processes_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        // PID 0 never names a live process in /proc; our own PID does.
        fs::write(dir.path().join("tmp/0-1"), b"torn").unwrap();
        let mine = dir.path().join(format!("tmp/{}-9", std::process::id()));
        fs::write(&mine, b"in progress").unwrap();
        ContentStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/0-1").exists());
        assert!(mine.exists());
    }

    #[test]
    fn a_temp_of_a_dead_process_whose_pid_was_reused_is_removed_on_open() {
        // A daemon killed and restarted in a container often gets its
        // predecessor's PID: the start time in the name tells them apart.
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let pid = std::process::id();
        let reused = [
            format!("{pid}.1.{}-7", boot_tag()),
            format!(".tmp-{pid}.1.{}-dl", boot_tag()),
            format!("{pid}.{}.0ther-8", process_start(pid).unwrap()),
        ];
        let live = [
            format!("{}-9", process_mark()),
            format!(".tmp-{}-dl", process_mark()),
        ];
        for n in reused.iter().chain(&live) {
            fs::write(tmp.join(n), b"partial").unwrap();
        }
        let s = ContentStore::open(dir.path()).unwrap();
        for n in &reused {
            assert!(!tmp.join(n).exists(), "{n} outlived its process");
        }
        for n in &live {
            assert!(tmp.join(n).exists(), "{n} of a live process was removed");
        }
        // Our own temps carry our mark.
        let t = s.temp_path();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(process_mark()) && temp_owner_alive(name));
    }

    #[test]
    fn ranges_of_a_layer_assembled_whole_are_dropped_on_open() {
        // Killed between assembling the blob and dropping its ranges.
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let layer = b"a whole layer".to_vec();
        let d = Digest::of(&layer);
        s.put_range(&d, 0, &layer[..4]).unwrap();
        s.put_range(&Digest::of(b"other"), 0, b"kept").unwrap();
        fs::write(s.blob_path(&d), &layer).unwrap();
        let empty = dir
            .path()
            .join("ranges/sha256")
            .join(Digest::of(b"e").hex());
        fs::create_dir_all(&empty).unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        assert!(s.held_ranges(&d).is_empty());
        assert!(!dir.path().join("ranges/sha256").join(d.hex()).exists());
        assert!(!empty.exists());
        assert_eq!(s.held_ranges(&Digest::of(b"other")), [(0, 4)]);
        assert!(s.has_blob(&d));
    }

    #[test]
    fn a_range_not_held_is_refused_before_its_buffer_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let whole = Digest::of(b"a whole blob");
        s.put_blob(&whole, b"a whole blob").unwrap();
        let part = Digest::of(b"a partial layer");
        s.put_range(&part, 0, b"a par").unwrap();
        s.put_range(&part, 5, b"tial").unwrap();
        // Held: read back, across two kept ranges too.
        assert_eq!(s.read_held(&whole, 2, 5).unwrap().unwrap(), b"whole");
        assert_eq!(s.read_held(&part, 2, 6).unwrap().unwrap(), b"partia");
        // A length no one could allocate (2^62 bytes) is answered "not
        // held" at once: allocating first would abort the process.
        for d in [&whole, &part, &Digest::of(b"absent")] {
            assert_eq!(s.read_held(d, 1, 1 << 62).unwrap(), None);
            assert_eq!(s.read_held(d, u64::MAX - 1, 1 << 62).unwrap(), None);
        }
        // A gap between kept ranges is not held.
        s.put_range(&part, 12, b"yer").unwrap();
        assert_eq!(s.read_held(&part, 2, 12).unwrap(), None);
    }

    #[test]
    fn stored_blobs_are_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let d = Digest::of(b"config");
        s.put_blob(&d, b"config").unwrap();
        assert_eq!(s.read_blob(&d).unwrap().unwrap(), b"config");
        fs::write(s.blob_path(&d), b"tampered").unwrap();
        assert!(s.read_blob(&d).is_err());
        assert!(s.read_blob(&Digest::of(b"none")).unwrap().is_none());
    }
}
