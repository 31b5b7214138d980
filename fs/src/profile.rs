//! Learned access profiles (docs/profiles.md): the order in which a mount's
//! chunks are first read, recorded cheaply on the read path
//! ([`Recorder`]), kept as a small versioned JSON document per image
//! ([`Profile`], runs merged by mean rank), and used by a later mount of
//! the image to fetch those chunks at once, in as few Range requests as the
//! layers allow, before anything else ([`prefetch_profile`]).
//!
//! A profile may come from an untrusted peer: [`Profile::parse`] bounds its
//! size and entries, drops entries that do not parse, and a profile only
//! names where chunks sit; [`plan`] keeps only entries that name a chunk
//! of the mounted image exactly, and every byte is still checked against
//! the image's TOC digests when it is fetched. The prefetch never holds a
//! worker a reader needs: it keeps fewer requests in flight than the
//! fetcher has workers, so an on-demand read always finds one free.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use breakfs_fetch::ChunkLoc;
use breakfs_index::Digest;
use serde::{Deserialize, Serialize};

use crate::tree::{LayerFile, Node, Tree};
use crate::{Error, Result};

/// The profile document's format version.
pub const PROFILE_VERSION: u32 = 1;
/// Largest profile document read, in bytes.
pub const MAX_PROFILE_BYTES: usize = 4 << 20;
/// Most entries a profile keeps (the rest, ranked last, are dropped).
pub const MAX_ENTRIES: usize = 16_384;
/// Most compressed bytes a profile makes a mount fetch up front.
pub const MAX_PREFETCH_BYTES: u64 = 256 << 20;
/// Runs counted at most (a weight in merges; more says nothing new).
const MAX_RUNS: u32 = 1 << 16;
/// Longest path an entry may name.
const MAX_PATH: usize = 4096;
/// Most layers a profile says where the TOC of.
pub const MAX_TOCS: usize = 1024;

/// One chunk of an image in a profile: a gzip member of a layer blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// The layer blob.
    pub layer: Digest,
    /// Offset of the chunk's gzip member in the blob.
    pub offset: u64,
    /// End of the member (exclusive).
    pub end: u64,
    /// A file the chunk belongs to (for people and `refactor --profile`).
    pub path: String,
    /// Offset of the chunk in that file.
    pub file_offset: u64,
    /// Mean first-read rank over the runs, 0 (first) to 1 (last, or not
    /// read in a run).
    pub rank: f64,
    /// Runs that read it.
    pub seen: u32,
}

/// What a node learned about one image's start-up reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// [`PROFILE_VERSION`].
    pub version: u32,
    /// The image's manifest digest.
    pub image: Digest,
    /// Recorded runs merged into it.
    pub runs: u32,
    /// Chunks by rank, first read first.
    pub entries: Vec<ProfileEntry>,
    /// Where the image's layers keep their TOCs: a mount with the profile
    /// reads each TOC in one request of exactly its bytes ([`TocAt`]).
    #[serde(default)]
    pub tocs: Vec<TocAt>,
}

/// Where a layer blob's TOC member starts, and the blob's size: its TOC,
/// footer included, is the blob's last `size - offset` bytes. Only a hint
/// (`breakfs_fetch::hint_toc_tail`): a wrong one costs a second read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocAt {
    /// The layer blob.
    pub layer: Digest,
    /// Offset of its TOC's gzip member.
    pub offset: u64,
    /// The blob's size.
    pub size: u64,
}

/// A profile as it comes over the wire: entries are checked one by one.
#[derive(Deserialize)]
struct WireProfile {
    version: u32,
    image: String,
    runs: u64,
    entries: Vec<WireEntry>,
    #[serde(default)]
    tocs: Vec<WireTocAt>,
}

#[derive(Deserialize)]
struct WireTocAt {
    layer: String,
    offset: u64,
    size: u64,
}

#[derive(Deserialize)]
struct WireEntry {
    layer: String,
    offset: u64,
    end: u64,
    #[serde(default)]
    path: String,
    #[serde(default)]
    file_offset: u64,
    #[serde(default)]
    rank: f64,
    #[serde(default)]
    seen: u64,
}

impl Profile {
    /// Read a profile of image `image` from `bytes`, an untrusted document:
    /// at most [`MAX_PROFILE_BYTES`] and [`MAX_ENTRIES`] entries, of this
    /// version and image; entries that do not parse are dropped, ranks
    /// clamped to 0..=1, duplicates kept once.
    pub fn parse(bytes: &[u8], image: &Digest) -> Result<Profile> {
        let bad = |reason: String| Error::BadImage {
            what: format!("the access profile of {image}"),
            reason,
        };
        if bytes.len() > MAX_PROFILE_BYTES {
            return Err(bad(format!(
                "it is {} bytes, more than the {MAX_PROFILE_BYTES} a profile may have",
                bytes.len()
            )));
        }
        let wire: WireProfile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if wire.version != PROFILE_VERSION {
            return Err(bad(format!(
                "it is of version {}, this node reads version {PROFILE_VERSION}",
                wire.version
            )));
        }
        if Digest::parse(&wire.image).ok().as_ref() != Some(image) {
            return Err(bad(format!("it is the profile of {:.80}", wire.image)));
        }
        let runs = wire.runs.clamp(1, MAX_RUNS as u64) as u32;
        let mut seen = HashSet::new();
        let mut entries: Vec<ProfileEntry> = wire
            .entries
            .into_iter()
            .filter_map(|w| {
                let layer = Digest::parse(&w.layer).ok()?;
                if w.end <= w.offset || w.path.len() > MAX_PATH {
                    return None;
                }
                let rank = if w.rank.is_finite() {
                    w.rank.clamp(0.0, 1.0)
                } else {
                    1.0
                };
                Some(ProfileEntry {
                    layer,
                    offset: w.offset,
                    end: w.end,
                    path: w.path,
                    file_offset: w.file_offset,
                    rank,
                    seen: w.seen.clamp(1, runs as u64) as u32,
                })
            })
            .filter(|e| seen.insert((e.layer.clone(), e.offset)))
            .collect();
        sort_by_rank(&mut entries);
        entries.truncate(MAX_ENTRIES);
        let mut layers = HashSet::new();
        let tocs = wire
            .tocs
            .into_iter()
            .filter_map(|w| {
                let at = TocAt {
                    layer: Digest::parse(&w.layer).ok()?,
                    offset: w.offset,
                    size: w.size,
                };
                (at.tail().is_some() && layers.insert(at.layer.clone())).then_some(at)
            })
            .take(MAX_TOCS)
            .collect();
        Ok(Profile {
            version: PROFILE_VERSION,
            image: image.clone(),
            runs,
            entries,
            tocs,
        })
    }

    /// The document (compact JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A profile of one run of image `image`: chunks in first-read order.
    pub fn from_run(image: &Digest, order: Vec<RunEntry>) -> Profile {
        let n = order.len().max(1) as f64;
        let mut seen = HashSet::new();
        let entries = order
            .into_iter()
            .filter(|r| seen.insert((r.layer.clone(), r.offset)))
            .take(MAX_ENTRIES)
            .enumerate()
            .map(|(i, r)| ProfileEntry {
                layer: r.layer,
                offset: r.offset,
                end: r.end,
                path: r.path,
                file_offset: r.file_offset,
                rank: i as f64 / n,
                seen: 1,
            })
            .collect();
        Profile {
            version: PROFILE_VERSION,
            image: image.clone(),
            runs: 1,
            entries,
            tocs: Vec::new(),
        }
    }

    /// This profile and `other` (of the same image) as one: each entry
    /// ranked by its mean rank over all runs (a run that did not read it
    /// counts it last), the union bounded by [`MAX_ENTRIES`].
    pub fn merge(&self, other: &Profile) -> Profile {
        let (a, b) = (self.runs.max(1) as f64, other.runs.max(1) as f64);
        let mut at: HashMap<(Digest, u64), usize> = HashMap::new();
        let mut entries: Vec<ProfileEntry> = Vec::new();
        for e in &self.entries {
            at.insert((e.layer.clone(), e.offset), entries.len());
            let mut e = e.clone();
            // Absent from `other`'s runs until found there.
            e.rank = (e.rank * a + b) / (a + b);
            entries.push(e);
        }
        for o in &other.entries {
            match at.get(&(o.layer.clone(), o.offset)) {
                Some(&i) => {
                    let e = &mut entries[i];
                    e.rank += (o.rank - 1.0) * b / (a + b);
                    e.seen = e.seen.saturating_add(o.seen);
                }
                None => {
                    let mut o = o.clone();
                    o.rank = (a + o.rank * b) / (a + b);
                    entries.push(o);
                }
            }
        }
        sort_by_rank(&mut entries);
        entries.truncate(MAX_ENTRIES);
        // A layer blob's TOC sits where it sits: either profile's word does.
        let mut tocs = self.tocs.clone();
        for t in &other.tocs {
            if tocs.len() < MAX_TOCS && !tocs.iter().any(|s| s.layer == t.layer) {
                tocs.push(t.clone());
            }
        }
        Profile {
            version: PROFILE_VERSION,
            image: self.image.clone(),
            runs: (self.runs.saturating_add(other.runs)).min(MAX_RUNS),
            entries,
            tocs,
        }
    }

    /// The TOC tail length this profile gives for layer `desc` (see
    /// [`TocAt`]): `None` when it names none, or one of another size.
    pub fn toc_tail(&self, desc: &breakfs_index::Descriptor) -> Option<u64> {
        self.tocs
            .iter()
            .find(|t| t.layer == desc.digest && t.size == desc.size)
            .and_then(TocAt::tail)
    }
}

impl TocAt {
    /// The blob's bytes from the TOC's member to its end, when that is a
    /// tail a TOC can have: a footer at least, at most
    /// [`breakfs_fetch::MAX_HINTED_TAIL`].
    pub fn tail(&self) -> Option<u64> {
        let tail = self.size.checked_sub(self.offset)?;
        (breakfs_index::FOOTER_SIZE..=breakfs_fetch::MAX_HINTED_TAIL)
            .contains(&tail)
            .then_some(tail)
    }
}

fn sort_by_rank(entries: &mut [ProfileEntry]) {
    entries.sort_by(|x, y| x.rank.total_cmp(&y.rank));
}

/// One chunk of a recorded run.
#[derive(Clone, Debug)]
pub struct RunEntry {
    /// The layer blob.
    pub layer: Digest,
    /// Offset of its gzip member.
    pub offset: u64,
    /// End of the member.
    pub end: u64,
    /// The file read.
    pub path: String,
    /// Offset of the chunk in the file.
    pub file_offset: u64,
}

/// Records the order in which a mount's chunks are first read. The read
/// path costs an atomic load per chunk read, and a few atomic operations
/// the first time a chunk is read: no lock. The log is bounded
/// ([`MAX_ENTRIES`]); once full, or [`Recorder::stop`]ped, it takes no more.
pub struct Recorder {
    started: Instant,
    /// The global index of each inode's first chunk (inode `n` at `n - 1`).
    base: Vec<u32>,
    /// Chunks read at least once, one bit per global index.
    read: Vec<AtomicU64>,
    /// Global chunk indexes plus one, in first-read order (0: not yet written).
    log: Vec<AtomicU64>,
    next: AtomicUsize,
    /// When the last chunk was first read, in ms since `started`.
    last_new: AtomicU64,
    /// Reads waiting on a fetch now ([`Recorder::waiting`]).
    waiting: AtomicUsize,
    /// When the last of those ended, in ms since `started`.
    last_wait: AtomicU64,
    stopped: AtomicBool,
}

/// A read waiting on a fetch: while one lives, the reads are not quiet
/// (a start-up blocked on a slow fetch has not ended); its drop counts as
/// the last activity.
pub struct Waiting(Arc<Recorder>);

impl Drop for Waiting {
    fn drop(&mut self) {
        let r = &self.0;
        r.last_wait
            .fetch_max(r.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        r.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Recorder {
    /// A recorder for a mount of `tree`.
    pub fn new(tree: &Tree) -> Recorder {
        let mut base = Vec::with_capacity(tree.inodes());
        let mut total: u64 = 0;
        for (_, n) in tree.nodes() {
            base.push(u32::try_from(total).unwrap_or(u32::MAX));
            total += n.chunks.len() as u64;
        }
        // An image of more than 4 G chunks is not recorded.
        let total = if total >= u32::MAX as u64 { 0 } else { total };
        Recorder {
            started: Instant::now(),
            base,
            read: (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            log: (0..total.min(MAX_ENTRIES as u64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            next: AtomicUsize::new(0),
            last_new: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            last_wait: AtomicU64::new(0),
            stopped: AtomicBool::new(total == 0),
        }
    }

    /// Note a read of bytes `[offset, end)` of inode `ino` (node `n`).
    pub fn note(&self, ino: u64, n: &Node, offset: u64, end: u64) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let Some(&base) = (ino as usize).checked_sub(1).and_then(|i| self.base.get(i)) else {
            return;
        };
        let first = n
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        for (i, c) in n.chunks.iter().enumerate().skip(first) {
            if c.file_offset >= end {
                break;
            }
            let g = base as u64 + i as u64;
            let Some(word) = self.read.get((g / 64) as usize) else {
                return;
            };
            let bit = 1u64 << (g % 64);
            if word.load(Ordering::Relaxed) & bit != 0
                || word.fetch_or(bit, Ordering::Relaxed) & bit != 0
            {
                continue;
            }
            let slot = self.next.fetch_add(1, Ordering::Relaxed);
            match self.log.get(slot) {
                Some(s) => {
                    s.store(g + 1, Ordering::Relaxed);
                    self.last_new
                        .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                None => {
                    self.stopped.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.next.load(Ordering::Relaxed).min(self.log.len())
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it takes no more (full or stopped).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// A read waits on a fetch until the guard is dropped.
    pub fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self.clone())
    }

    /// How long since a chunk was first read or a read stopped waiting on
    /// a fetch, zero while one waits (`None`: no chunk was read yet).
    pub fn quiet_for(&self) -> Option<Duration> {
        if self.is_empty() {
            return None;
        }
        if self.waiting.load(Ordering::Relaxed) > 0 {
            return Some(Duration::ZERO);
        }
        let last = self
            .last_new
            .load(Ordering::Relaxed)
            .max(self.last_wait.load(Ordering::Relaxed));
        Some(
            self.started
                .elapsed()
                .saturating_sub(Duration::from_millis(last)),
        )
    }

    /// How long it has recorded.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Take no more.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// The run so far, first read first, as chunks of `tree` (the tree it
    /// was made for): chunks of layers fetched whole are left out.
    pub fn run(&self, tree: &Tree) -> Vec<RunEntry> {
        let mut out = Vec::new();
        for s in &self.log[..self.len()] {
            let Some(g) = s.load(Ordering::Relaxed).checked_sub(1) else {
                continue;
            };
            let i = self.base.partition_point(|&b| b as u64 <= g);
            let Some(idx) = i.checked_sub(1) else {
                continue;
            };
            let Some(n) = tree.node(idx as u64 + 1) else {
                continue;
            };
            let Some(c) = n.chunks.get((g - self.base[idx] as u64) as usize) else {
                continue;
            };
            if let Some(loc) = &c.loc {
                out.push(RunEntry {
                    layer: loc.layer.clone(),
                    offset: loc.offset,
                    end: loc.compressed_end,
                    path: n.entry.path.clone(),
                    file_offset: c.file_offset,
                });
            }
        }
        out
    }

    /// The files read so far, first read first, each once, as paths of
    /// `tree` (the tree it was made for): files of layers fetched whole
    /// too, since `breakfs refactor --profile` lays out any source.
    pub fn paths(&self, tree: &Tree) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for s in &self.log[..self.len()] {
            let Some(g) = s.load(Ordering::Relaxed).checked_sub(1) else {
                continue;
            };
            let Some(idx) = self.base.partition_point(|&b| b as u64 <= g).checked_sub(1) else {
                continue;
            };
            if seen.insert(idx)
                && let Some(n) = tree.node(idx as u64 + 1)
            {
                out.push(n.entry.path.clone());
            }
        }
        out
    }
}

/// Largest stretch of a layer between two profiled chunks that one Range
/// request spans, fetching the members in between too (checked and stored
/// like the rest): at 50 Mbit/s these bytes cost 10 ms, a request more
/// costs a round trip.
pub const JOIN_GAP: u64 = 64 << 10;
/// A profile's Range requests in flight at once, over all of an image's
/// layers. They run on no fetcher worker: readers find every worker free.
/// With [`PREFETCH_RANGE`], 1.5 MiB in flight: several times what a
/// 50 ms, 50 Mbit/s link holds, so the link stays full between requests.
pub const PREFETCH_REQUESTS: usize = 6;
/// Largest Range request of a profile's prefetch, in compressed bytes:
/// the profile's bytes spread over several requests at once move faster
/// than in one (one connection rarely fills a long link by itself), and a
/// chunk is served only once its whole request is in, so small requests,
/// best-ranked first, let the command run while the rest still comes (at
/// 1 MiB, the requests in flight shared the link and ended together).
pub const PREFETCH_RANGE: u64 = 256 << 10;

/// One lazy layer's chunks by the offset of their member: what a profile's
/// entries are matched against.
#[derive(Debug)]
pub struct LayerChunks {
    layer: Digest,
    /// The chunks of each member (distinct contents).
    members: BTreeMap<u64, Vec<ChunkLoc>>,
}

impl LayerChunks {
    fn new(layer: &Digest) -> LayerChunks {
        LayerChunks {
            layer: layer.clone(),
            members: BTreeMap::new(),
        }
    }

    fn add(&mut self, loc: &ChunkLoc) {
        let m = self.members.entry(loc.offset).or_default();
        if !m.iter().any(|l| l.digest == loc.digest) {
            m.push(loc.clone());
        }
    }

    /// The chunks of layer `layer` among `files` (its files, from its TOC).
    pub fn of_files(layer: &Digest, files: &[LayerFile]) -> LayerChunks {
        let mut out = LayerChunks::new(layer);
        for (_, chunks) in files {
            for loc in chunks.iter().filter_map(|c| c.loc.as_ref()) {
                if &loc.layer == layer {
                    out.add(loc);
                }
            }
        }
        out
    }

    /// The chunks of `tree`, by layer.
    pub fn of_tree(tree: &Tree) -> Vec<LayerChunks> {
        let mut layers: HashMap<&Digest, LayerChunks> = HashMap::new();
        for (_, n) in tree.nodes() {
            for loc in n.chunks.iter().filter_map(|c| c.loc.as_ref()) {
                layers
                    .entry(&loc.layer)
                    .or_insert_with(|| LayerChunks::new(&loc.layer))
                    .add(loc);
            }
        }
        layers.into_values().collect()
    }

    /// The layer.
    pub fn layer(&self) -> &Digest {
        &self.layer
    }
}

/// Take `n` bytes of `budget` if it has them.
fn take(budget: &AtomicU64, n: u64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(n))
        .is_ok()
}

/// What a profile makes a mount fetch of one layer: runs of chunks, each
/// one Range request, with the rank of its best-ranked chunk.
#[derive(Debug, Default)]
pub struct LayerPlan {
    /// The runs, best-ranked first, each with its rank (an index into
    /// the profile's entries).
    pub runs: Vec<(usize, Vec<ChunkLoc>)>,
    /// Entries naming this layer that name none of its members (or one wrongly).
    pub ignored: usize,
    /// Compressed bytes the runs span.
    pub bytes: u64,
}

/// The runs of `chunks` (one layer) that `profile` names, each spanning at
/// most `max_range` compressed bytes. An entry must name a member's offset
/// and end exactly, or it is ignored. Members named make one run when at
/// most `gap` bytes lie between them (the members there are fetched too),
/// whatever their ranks. What the runs span is taken from `budget` (an
/// image's [`MAX_PREFETCH_BYTES`]), best-ranked entries first; what it
/// cannot pay for is left out.
pub fn plan_layer(
    chunks: &LayerChunks,
    profile: &Profile,
    max_range: u64,
    gap: u64,
    budget: &AtomicU64,
) -> LayerPlan {
    let mut plan = LayerPlan::default();
    // (rank, member offset) of every entry that names a member.
    let mut named: Vec<(usize, u64, u64)> = Vec::new();
    let mut taken = HashSet::new();
    for (i, e) in profile.entries.iter().enumerate() {
        if e.layer != chunks.layer {
            continue;
        }
        match chunks.members.get(&e.offset) {
            Some(m) if m[0].compressed_end == e.end => {
                if !taken.insert(e.offset) {
                    continue;
                }
                if !take(budget, e.end - e.offset) {
                    break;
                }
                plan.bytes += e.end - e.offset;
                named.push((i, e.offset, e.end));
            }
            _ => plan.ignored += 1,
        }
    }
    named.sort_by_key(|&(_, offset, _)| offset);
    // The open run: its rank, start, end and member offsets.
    let mut runs: Vec<(usize, u64, u64, Vec<u64>)> = Vec::new();
    for (rank, offset, end) in named {
        if let Some((r, start, run_end, members)) = runs.last_mut()
            && offset >= *run_end
            && end - *start <= max_range
            && (offset == *run_end || (offset - *run_end <= gap && take(budget, offset - *run_end)))
        {
            // What lies between, whole members only.
            members.extend(
                chunks
                    .members
                    .range(*run_end..offset)
                    .filter(|(_, m)| m[0].compressed_end <= offset)
                    .map(|(&o, _)| o),
            );
            plan.bytes += offset - *run_end;
            members.push(offset);
            *r = (*r).min(rank);
            *run_end = end;
            continue;
        }
        runs.push((rank, offset, end, vec![offset]));
    }
    runs.sort_by_key(|(rank, ..)| *rank);
    plan.runs = runs
        .into_iter()
        .map(|(rank, _, _, members)| {
            let locs = members
                .iter()
                .filter_map(|o| chunks.members.get(o))
                .flatten()
                .cloned()
                .collect();
            (rank, locs)
        })
        .collect();
    plan
}

/// What a profile makes a mount of `tree` fetch (all its layers, as
/// [`plan_layer`] plans each): the runs best-ranked first.
#[derive(Debug, Default)]
pub struct ProfilePlan {
    /// The runs, in the order to fetch them.
    pub runs: Vec<Vec<ChunkLoc>>,
    /// Entries that name no chunk of the image (or a chunk wrongly).
    pub ignored: usize,
    /// Compressed bytes the runs span.
    pub bytes: u64,
}

/// [`plan_layer`] over every layer of `tree`, within [`MAX_PREFETCH_BYTES`]
/// in all.
pub fn plan(tree: &Tree, profile: &Profile, max_range: u64, gap: u64) -> ProfilePlan {
    let budget = AtomicU64::new(MAX_PREFETCH_BYTES);
    let layers = LayerChunks::of_tree(tree);
    let mut out = ProfilePlan {
        ignored: profile
            .entries
            .iter()
            .filter(|e| !layers.iter().any(|l| l.layer == e.layer))
            .count(),
        ..ProfilePlan::default()
    };
    let mut runs = Vec::new();
    for l in &layers {
        let p = plan_layer(l, profile, max_range, gap, &budget);
        out.ignored += p.ignored;
        out.bytes += p.bytes;
        runs.extend(p.runs);
    }
    runs.sort_by_key(|(rank, _)| *rank);
    out.runs = runs.into_iter().map(|(_, r)| r).collect();
    out
}

#[path = "profile_prefetch.rs"]
mod prefetch;
pub use prefetch::{PrefetchReport, ProfilePrefetch};

#[cfg(test)]
#[path = "profile_tests.rs"]
mod tests;
