//! Checking a content store end to end (`breakfs verify`).
//!
//! Every blob and chunk is hashed against its name. Every kept range must
//! hold as many bytes as its name says, start and end on the gzip members
//! its layer's TOC record gives, and inflate to chunks that match their
//! digests: the checks the fetcher made before it kept the range. Every
//! record in `meta/` must parse. A temp file whose process no longer runs,
//! and the kept ranges of a layer held whole, are leftovers of a kill
//! (opening the store removes them). With `repair`, what is corrupt and
//! what is left over is removed, so that it is fetched again when needed.
//!
//! The store may be in use meanwhile: a file that goes away while it is
//! checked (evicted, assembled) is skipped, and temp files of live
//! processes are left alone.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use breakfs_index::{Descriptor, Digest, Entry, Toc};
use serde::Serialize;

use crate::cas::{inflate_chunk, temp_owner_alive};
use crate::{ChunkLoc, Error, Result};

/// How many files and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Files.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

/// What a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Content or a record that does not check out: never to be served.
    Corrupt,
    /// Harmless remains of a killed process, removed when the store opens.
    Leftover,
}

/// One file that did not check out.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Corrupt, or a leftover.
    pub severity: Severity,
    /// The file (or directory), relative to the store.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
    /// Its size.
    pub bytes: u64,
    /// Whether it was removed.
    pub removed: bool,
}

/// What [`verify_store`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// The store.
    pub root: PathBuf,
    /// Whole blobs that checked out.
    pub blobs: Tally,
    /// Chunks that checked out.
    pub chunks: Tally,
    /// Kept ranges that checked out.
    pub ranges: Tally,
    /// Records in `meta/` that parse.
    pub records: Tally,
    /// Temp files of live processes (writes in progress), left alone.
    pub in_progress: Tally,
    /// Everything that did not check out.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// The corrupt findings.
    pub fn corrupt(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Corrupt)
    }

    /// The leftovers of killed processes.
    pub fn leftovers(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Leftover)
    }

    /// Corrupt files still in the store (found and not removed).
    pub fn corrupt_remaining(&self) -> usize {
        self.corrupt().filter(|f| !f.removed).count()
    }

    fn find(&mut self, severity: Severity, root: &Path, path: &Path, reason: String, bytes: u64) {
        self.findings.push(Finding {
            severity,
            path: path.strip_prefix(root).unwrap_or(path).to_path_buf(),
            reason,
            bytes,
            removed: false,
        });
    }
}

/// "1 corrupt entry", "2 corrupt entries".
fn entries(n: usize) -> String {
    format!("{n} corrupt {}", if n == 1 { "entry" } else { "entries" })
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store {}", self.root.display())?;
        for (what, t) in [
            ("blobs", self.blobs),
            ("chunks", self.chunks),
            ("kept ranges", self.ranges),
            ("records", self.records),
        ] {
            writeln!(f, "  {what:<12} {:>7} ok  {:>10}", t.count, mb(t.bytes))?;
        }
        if self.in_progress.count > 0 {
            writeln!(
                f,
                "  {} writes in progress by live processes ({}), left alone",
                self.in_progress.count,
                mb(self.in_progress.bytes)
            )?;
        }
        for (what, list) in [
            ("corrupt", self.corrupt().collect::<Vec<_>>()),
            ("left over by killed processes", self.leftovers().collect()),
        ] {
            if list.is_empty() {
                continue;
            }
            let bytes: u64 = list.iter().map(|x| x.bytes).sum();
            writeln!(f, "  {what}: {} ({})", list.len(), mb(bytes))?;
            for x in list {
                writeln!(
                    f,
                    "    {}: {}{}",
                    x.path.display(),
                    x.reason,
                    if x.removed { " (removed)" } else { "" }
                )?;
            }
        }
        let corrupt = self.corrupt().count();
        let entries = entries(corrupt);
        if corrupt == 0 {
            write!(f, "  nothing corrupt")
        } else if self.corrupt_remaining() == 0 {
            write!(f, "  {entries} removed: fetched again when needed")
        } else {
            write!(
                f,
                "  {entries}; `breakfs verify --repair` removes them so that they are fetched again"
            )
        }
    }
}

/// Check every file of the content store at `root`; with `repair`, remove
/// what is corrupt or left over.
pub fn verify_store(root: &Path, repair: bool) -> Result<VerifyReport> {
    for sub in ["blobs/sha256", "chunks/sha256"] {
        if !root.join(sub).is_dir() {
            return Err(Error::NotFound {
                what: format!("a breakfs content store ({sub}) in {}", root.display()),
            });
        }
    }
    let mut report = VerifyReport {
        root: root.to_path_buf(),
        ..VerifyReport::default()
    };
    check_named_by_digest(root, "blobs", &mut report, |r| &mut r.blobs)?;
    check_named_by_digest(root, "chunks", &mut report, |r| &mut r.chunks)?;
    let tocs = check_records(root, &mut report);
    check_ranges(root, &tocs, &mut report);
    check_temps(root, &mut report);
    if repair {
        for x in &mut report.findings {
            let path = root.join(&x.path);
            let gone = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            x.removed = match gone {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
        }
    }
    Ok(report)
}

/// Files in `dir`, with their names and sizes; none if it cannot be read.
fn files_in(dir: &Path) -> Vec<(String, PathBuf, u64)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flat_map(|d| d.flatten())
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name, e.path(), if m.is_file() { m.len() } else { 0 }))
        })
        .collect();
    out.sort();
    out
}

/// Blobs or chunks: each file's sha256 must be its name. Hashed on all
/// cores: a store holds gigabytes.
fn check_named_by_digest(
    root: &Path,
    kind: &str,
    report: &mut VerifyReport,
    tally: impl Fn(&mut VerifyReport) -> &mut Tally,
) -> Result<()> {
    let files = files_in(&root.join(kind).join("sha256"));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = files.len().div_ceil(threads).max(1);
    let outcomes: Vec<(usize, Option<std::result::Result<Digest, String>>)> =
        std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(per)
                .enumerate()
                .map(|(n, part)| {
                    s.spawn(move || {
                        part.iter()
                            .enumerate()
                            .map(|(i, (_, path, _))| (n * per + i, hash_file(path)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
    for (i, outcome) in outcomes {
        let (name, path, size) = &files[i];
        let Ok(named) = Digest::parse(&format!("sha256:{name}")) else {
            let reason = format!("not a {kind} file: its name is no sha256 digest");
            report.find(Severity::Leftover, root, path, reason, *size);
            continue;
        };
        match outcome {
            // Removed meanwhile (evicted): nothing to check.
            None => {}
            Some(Ok(actual)) if actual == named => tally(report).add(*size),
            Some(Ok(actual)) => {
                let reason = format!("its content hashes to {actual}, not to its name");
                report.find(Severity::Corrupt, root, path, reason, *size);
            }
            Some(Err(e)) => {
                let reason = format!("cannot be read: {e}");
                report.find(Severity::Corrupt, root, path, reason, *size);
            }
        }
    }
    Ok(())
}

/// The sha256 of a file; `None` if it is gone.
fn hash_file(path: &Path) -> Option<std::result::Result<Digest, String>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(e.to_string())),
    };
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        return Some(Err("it is a directory".into()));
    }
    let mut hw = breakfs_index::HashingWriter::new(std::io::sink());
    Some(match std::io::copy(&mut f, &mut hw) {
        Ok(_) => Ok(hw.finish().1),
        Err(e) => Err(e.to_string()),
    })
}

/// The TOC record of a layer: where its TOC starts and the TOC itself.
type TocRecord = (u64, Toc);

/// Check that every record in `meta/` parses; returns the TOC records by
/// layer, to check kept ranges by.
fn check_records(root: &Path, report: &mut VerifyReport) -> BTreeMap<Digest, TocRecord> {
    let mut tocs = BTreeMap::new();
    for (name, path, size) in files_in(&root.join("meta")) {
        let Ok(bytes) = fs::read(&path) else {
            continue; // replaced or removed meanwhile
        };
        let checked = if let Some(hex) = record_hex(&name, "toc-") {
            parse_toc_record(&bytes).map(|toc| {
                if let (Some(toc), Ok(layer)) = (toc, Digest::parse(&format!("sha256:{hex}"))) {
                    tocs.insert(layer, toc);
                }
            })
        } else if record_hex(&name, "layer-").is_some() {
            serde_json::from_slice::<Vec<Entry>>(&bytes)
                .map(drop)
                .map_err(|e| format!("not a layer index: {e}"))
        } else if name.starts_with("ref-") && name.ends_with(".json") {
            parse_ref_record(&bytes)
        } else if name == "budget-uses.json" {
            serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&bytes)
                .map(drop)
                .map_err(|e| format!("not the budget's use records: {e}"))
        } else {
            // Not a record breakfs writes: not ours to judge.
            continue;
        };
        match checked {
            Ok(()) => report.records.add(size),
            Err(reason) => report.find(Severity::Corrupt, root, &path, reason, size),
        }
    }
    tocs
}

/// The hex digest in a record name `PREFIXHEX.json`.
fn record_hex<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?.strip_suffix(".json")
}

/// A TOC record: `none` (a layer without a TOC) or `OFFSET\nTOC-JSON`.
fn parse_toc_record(bytes: &[u8]) -> std::result::Result<Option<TocRecord>, String> {
    if bytes == b"none" {
        return Ok(None);
    }
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("not a TOC record: no offset line")?;
    let offset = std::str::from_utf8(&bytes[..nl])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("not a TOC record: its first line is no offset")?;
    let toc = Toc::parse(&bytes[nl + 1..])
        .map_err(|e| format!("not a TOC record: {}", breakfs_index::Causes(&e)))?;
    Ok(Some((offset, toc)))
}

fn parse_ref_record(bytes: &[u8]) -> std::result::Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a reference record: {e}"))?;
    let digest = v["digest"].as_str().unwrap_or_default();
    if v["name"].is_string() && v["reference"].is_string() && Digest::parse(digest).is_ok() {
        Ok(())
    } else {
        Err("not a reference record: it needs a name, a reference and a digest".into())
    }
}

/// The chunks of a layer by the offset of their gzip member.
fn chunk_locs(
    layer: &Digest,
    (offset, toc): &TocRecord,
) -> std::result::Result<Vec<ChunkLoc>, String> {
    // The TOC's offset bounds the data; the blob's size is not needed.
    let tl = toc.to_layer(u64::MAX, Some(*offset)).map_err(|e| {
        format!(
            "the layer's TOC record does not make a layer: {}",
            breakfs_index::Causes(&e)
        )
    })?;
    let desc = Descriptor::new("", layer.clone(), u64::MAX);
    let mut locs: Vec<ChunkLoc> = tl
        .entries
        .iter()
        .flat_map(|(entry, chunks)| {
            chunks
                .iter()
                .filter_map(|c| crate::chunk_loc(&desc, entry, chunks.len(), c))
                .collect::<Vec<_>>()
        })
        .collect();
    locs.sort_by_key(|l| (l.offset, l.inner_offset));
    Ok(locs)
}

/// Kept ranges: sized as named, on member boundaries, every chunk in them
/// matching its digest; leftovers beside a whole blob.
fn check_ranges(root: &Path, tocs: &BTreeMap<Digest, TocRecord>, report: &mut VerifyReport) {
    for (hex, dir, _) in files_in(&root.join("ranges/sha256")) {
        let Ok(layer) = Digest::parse(&format!("sha256:{hex}")) else {
            let reason = "not a layer's ranges: its name is no sha256 digest".to_string();
            report.find(Severity::Leftover, root, &dir, reason, 0);
            continue;
        };
        let files = files_in(&dir);
        let bytes: u64 = files.iter().map(|f| f.2).sum();
        if root.join("blobs/sha256").join(&hex).is_file() {
            let reason = format!(
                "{} kept ranges of a layer held whole (killed after assembling it)",
                files.len()
            );
            report.find(Severity::Leftover, root, &dir, reason, bytes);
            continue;
        }
        if files.is_empty() {
            let reason = "an empty directory of kept ranges".to_string();
            report.find(Severity::Leftover, root, &dir, reason, 0);
            continue;
        }
        // A record written since the records were read (a live node
        // fetching a new layer) is read now.
        let late = || -> Option<TocRecord> {
            let bytes = fs::read(root.join("meta").join(format!("toc-{hex}.json"))).ok()?;
            parse_toc_record(&bytes).ok()?
        };
        let read_late;
        let rec = match tocs.get(&layer) {
            Some(rec) => Some(rec),
            None => {
                read_late = late();
                read_late.as_ref()
            }
        };
        let locs = match rec {
            Some(rec) => chunk_locs(&layer, rec),
            None => Err("no TOC record of the layer to check it by".to_string()),
        };
        for (name, path, size) in files {
            let outcome = locs
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|locs| check_range(&name, &path, size, locs));
            match outcome {
                Ok(true) => report.ranges.add(size),
                Ok(false) => {} // gone meanwhile
                Err(reason) => report.find(Severity::Corrupt, root, &path, reason, size),
            }
        }
    }
}

/// One kept range file `START-END` of `size` bytes; `Ok(false)` if it went
/// away meanwhile.
fn check_range(
    name: &str,
    path: &Path,
    size: u64,
    locs: &[ChunkLoc],
) -> std::result::Result<bool, String> {
    let (start, end) = name
        .split_once('-')
        .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
        .filter(|(s, e)| s < e)
        .ok_or("not a kept range: its name is not START-END")?;
    if size != end - start {
        return Err(format!(
            "holds {size} bytes, its name says {} (a torn write)",
            end - start
        ));
    }
    // The members inside the range must tile it, as when it was kept.
    let inside: Vec<&ChunkLoc> = locs
        .iter()
        .filter(|l| l.offset >= start && l.compressed_end <= end)
        .collect();
    let mut pos = start;
    for l in &inside {
        if l.offset > pos {
            break;
        }
        pos = pos.max(l.compressed_end);
    }
    if pos < end {
        return Err(format!(
            "bytes {pos}..{end} are not the layer's chunks by its TOC record: not a range \
             the fetcher keeps"
        ));
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    if bytes.len() as u64 != size {
        return Err(format!("holds {} bytes, its name says {size}", bytes.len()));
    }
    for l in inside {
        let chunk = inflate_chunk(l, &bytes, start)?;
        let actual = Digest::of(&chunk);
        if actual != l.digest {
            return Err(format!(
                "chunk {} at {} inflates to bytes with digest {actual}",
                l.digest, l.offset
            ));
        }
    }
    Ok(true)
}

/// Temp files: a live process's are writes in progress, a dead one's are
/// leftovers.
fn check_temps(root: &Path, report: &mut VerifyReport) {
    for (name, path, size) in files_in(&root.join("tmp")) {
        if temp_owner_alive(&name) {
            report.in_progress.add(size);
        } else {
            let reason = "a temp file of a process that no longer runs".to_string();
            report.find(Severity::Leftover, root, &path, reason, size);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;
    use crate::ContentStore;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A store holding a blob, a chunk, and one kept range (two files'
    /// gzip members) of a layer with its TOC record.
    struct Fixture {
        dir: tempfile::TempDir,
        store: ContentStore,
        layer: Digest,
        chunk: Digest,
        blob: Digest,
        range: PathBuf,
        members: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let (a, b) = (b"alpha ".repeat(300), b"bravo!".repeat(500));
        let (ga, gb) = (gzip(&a), gzip(&b));
        let members = [ga.clone(), gb.clone()].concat();
        let layer = Digest::of(b"a layer of two files");
        let entry = |name: &str, data: &[u8], offset: usize| {
            serde_json::json!({"name": name, "type": "reg", "size": data.len(),
                "offset": offset, "digest": Digest::of(data).to_string(),
                "chunkDigest": Digest::of(data).to_string()})
        };
        let toc = serde_json::json!({"version": 1, "entries": [
            entry("a", &a, 0), entry("b", &b, ga.len())]});
        let mut rec = format!("{}\n", members.len()).into_bytes();
        rec.extend_from_slice(toc.to_string().as_bytes());
        store
            .put_meta(&format!("toc-{}.json", layer.hex()), &rec)
            .unwrap();
        store.put_range(&layer, 0, &members).unwrap();
        let range = dir
            .path()
            .join(format!("ranges/sha256/{}/0-{}", layer.hex(), members.len()));
        assert!(range.is_file());
        let chunk = Digest::of(&a);
        store.put_chunk(&chunk, &a).unwrap();
        let blob = Digest::of(b"{\"config\": true}");
        store.put_blob(&blob, b"{\"config\": true}").unwrap();
        Fixture {
            dir,
            store,
            layer,
            chunk,
            blob,
            range,
            members,
        }
    }

    fn corrupt_paths(r: &VerifyReport) -> Vec<String> {
        r.corrupt().map(|f| f.path.display().to_string()).collect()
    }

    #[test]
    fn a_sound_store_checks_out_with_its_counts() {
        let f = fixture();
        let r = verify_store(f.dir.path(), false).unwrap();
        assert!(r.findings.is_empty(), "{r}");
        assert_eq!(r.blobs.count, 1);
        assert_eq!(r.chunks.count, 1);
        assert_eq!(
            r.ranges,
            Tally {
                count: 1,
                bytes: f.members.len() as u64
            }
        );
        assert_eq!(r.records.count, 1);
        assert!(r.to_string().contains("nothing corrupt"), "{r}");
    }

    #[test]
    fn a_flipped_byte_in_a_chunk_is_found_and_repaired() {
        let f = fixture();
        let path = f.store.chunk_path(&f.chunk);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let r = verify_store(f.dir.path(), false).unwrap();
        assert_eq!(
            corrupt_paths(&r),
            [format!("chunks/sha256/{}", f.chunk.hex())]
        );
        assert_eq!(r.corrupt_remaining(), 1);
        assert!(r.to_string().contains("--repair"), "{r}");
        assert!(path.exists(), "removed without --repair");
        let r = verify_store(f.dir.path(), true).unwrap();
        assert_eq!(r.corrupt_remaining(), 0, "{r}");
        assert!(!f.store.has_chunk(&f.chunk));
        let r = verify_store(f.dir.path(), false).unwrap();
        assert!(r.findings.is_empty(), "{r}");
    }

    #[test]
    fn a_toc_record_that_is_not_json_is_corrupt_with_the_parser_s_reason() {
        let f = fixture();
        let record = format!("toc-{}.json", f.layer.hex());
        f.store.put_meta_replace(&record, b"10\n{oops").unwrap();
        let r = verify_store(f.dir.path(), false).unwrap();
        let found = r
            .corrupt()
            .find(|x| x.reason.contains("not a TOC record"))
            .expect("the record is corrupt");
        // The parser's complaint, not only that it is not a TOC.
        assert!(found.reason.contains("at line 1 column"), "{r}");
    }

    #[test]
    fn a_truncated_blob_is_corrupt() {
        let f = fixture();
        let path = f.store.blob_path(&f.blob);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let r = verify_store(f.dir.path(), true).unwrap();
        assert_eq!(
            corrupt_paths(&r),
            [format!("blobs/sha256/{}", f.blob.hex())]
        );
        assert!(!f.store.has_blob(&f.blob));
    }

    #[test]
    fn temps_of_dead_processes_are_leftovers_and_live_ones_in_progress() {
        let f = fixture();
        let tmp = f.dir.path().join("tmp");
        let (pid, mark) = (std::process::id(), crate::cas::process_mark());
        // A dead PID; our PID with another start time (the PID reused by
        // a process started later); a blob download of ours, and of a dead one.
        let dead = [
            "0-1",
            &format!("{pid}.1.{}-2", crate::cas::boot_tag()),
            ".tmp-0.5.x-abc",
        ];
        let live = [format!("{mark}-3"), format!(".tmp-{mark}-xyz")];
        for n in dead
            .iter()
            .map(|s| s.to_string())
            .chain(live.iter().cloned())
        {
            fs::write(tmp.join(n), b"partial").unwrap();
        }
        let r = verify_store(f.dir.path(), false).unwrap();
        assert_eq!(r.corrupt().count(), 0, "{r}");
        let mut left: Vec<String> = r
            .leftovers()
            .map(|x| x.path.display().to_string())
            .collect();
        left.sort();
        let mut want: Vec<String> = dead.iter().map(|n| format!("tmp/{n}")).collect();
        want.sort();
        assert_eq!(left, want);
        assert_eq!(r.in_progress.count, 2);
        verify_store(f.dir.path(), true).unwrap();
        let mut rest: Vec<String> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        rest.sort();
        let mut live = live.to_vec();
        live.sort();
        assert_eq!(rest, live);
    }

    #[test]
    fn bad_ranges_are_corrupt() {
        let end = |f: &Fixture| f.members.len();
        // A flipped byte inside a member.
        let f = fixture();
        let mut bytes = f.members.clone();
        bytes[end(&f) - 20] ^= 0xff;
        fs::write(&f.range, &bytes).unwrap();
        let r = verify_store(f.dir.path(), false).unwrap();
        assert_eq!(r.corrupt().count(), 1, "{r}");
        // Torn: fewer bytes than its name says.
        let f = fixture();
        fs::write(&f.range, &f.members[..end(&f) - 1]).unwrap();
        let r = verify_store(f.dir.path(), false).unwrap();
        assert!(r.corrupt().any(|x| x.reason.contains("torn")), "{r}");
        // Not on the members' boundaries.
        let f = fixture();
        let dir = f.range.parent().unwrap();
        fs::write(dir.join(format!("1-{}", end(&f))), &f.members[1..]).unwrap();
        let r = verify_store(f.dir.path(), false).unwrap();
        assert!(
            r.corrupt()
                .any(|x| x.reason.contains("not the layer's chunks")),
            "{r}"
        );
        // No TOC record to check it by.
        let f = fixture();
        fs::remove_file(f.store.meta_path(&format!("toc-{}.json", f.layer.hex()))).unwrap();
        let r = verify_store(f.dir.path(), true).unwrap();
        assert!(
            r.corrupt().any(|x| x.reason.contains("no TOC record")),
            "{r}"
        );
        assert!(!f.range.exists());
    }

    #[test]
    fn a_toc_record_written_after_the_records_were_read_still_vouches_for_its_ranges() {
        // A live node: the layer's TOC record lands between the two passes.
        let f = fixture();
        let tocs = BTreeMap::new();
        let mut r = VerifyReport::default();
        check_ranges(f.dir.path(), &tocs, &mut r);
        assert!(r.findings.is_empty(), "{r}");
        assert_eq!(r.ranges.count, 1);
    }

    #[test]
    fn ranges_beside_a_whole_layer_are_leftovers_and_bad_records_corrupt() {
        let f = fixture();
        // The "layer" blob itself, held whole: its ranges are redundant.
        let layer_dir = f.range.parent().unwrap().to_path_buf();
        fs::write(f.store.blob_path(&f.layer), b"not checked here").unwrap();
        fs::write(f.store.meta_path("ref-0123.json"), b"{\"name\": 1}").unwrap();
        let r = verify_store(f.dir.path(), true).unwrap();
        assert!(
            r.leftovers()
                .any(|x| x.path == Path::new("ranges/sha256").join(f.layer.hex())),
            "{r}"
        );
        assert!(!layer_dir.exists());
        let corrupt = corrupt_paths(&r);
        assert!(corrupt.contains(&"meta/ref-0123.json".to_string()), "{r}");
    }
}
