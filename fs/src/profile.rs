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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use breakfs_fetch::{ChunkLoc, Fetcher, Priority};
use breakfs_index::Digest;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::tree::{Node, Tree};
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
}

/// A profile as it comes over the wire: entries are checked one by one.
#[derive(Deserialize)]
struct WireProfile {
    version: u32,
    image: String,
    runs: u64,
    entries: Vec<WireEntry>,
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
        Ok(Profile {
            version: PROFILE_VERSION,
            image: image.clone(),
            runs,
            entries,
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
        Profile {
            version: PROFILE_VERSION,
            image: self.image.clone(),
            runs: (self.runs.saturating_add(other.runs)).min(MAX_RUNS),
            entries,
        }
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
    stopped: AtomicBool,
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

    /// How long since a chunk was first read (`None`: none was yet).
    pub fn quiet_for(&self) -> Option<Duration> {
        if self.is_empty() {
            return None;
        }
        let last = Duration::from_millis(self.last_new.load(Ordering::Relaxed));
        Some(self.started.elapsed().saturating_sub(last))
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

/// What a profile makes a mount fetch: runs of neighbouring chunks, each
/// run one Range request, the run holding the best-ranked chunk first.
#[derive(Debug, Default)]
pub struct ProfilePlan {
    /// The runs, in the order to fetch them.
    pub runs: Vec<Vec<ChunkLoc>>,
    /// Entries that name no chunk of the image (or a chunk wrongly).
    pub ignored: usize,
    /// Compressed bytes of the runs.
    pub bytes: u64,
}

/// The runs of chunks of `tree` that `profile` names, each at most
/// `max_range` compressed bytes: entries naming no member of the image's
/// lazy layers exactly are ignored, and the whole within
/// [`MAX_PREFETCH_BYTES`].
pub fn plan(tree: &Tree, profile: &Profile, max_range: u64) -> ProfilePlan {
    let mut members: HashMap<(&Digest, u64), Vec<&ChunkLoc>> = HashMap::new();
    for (_, n) in tree.nodes() {
        for loc in n.chunks.iter().filter_map(|c| c.loc.as_ref()) {
            members
                .entry((&loc.layer, loc.offset))
                .or_default()
                .push(loc);
        }
    }
    let mut plan = ProfilePlan::default();
    // (rank order, member) of every entry that names a member.
    let mut named: Vec<(usize, &Vec<&ChunkLoc>)> = Vec::new();
    let mut taken = HashSet::new();
    for (i, e) in profile.entries.iter().take(MAX_ENTRIES).enumerate() {
        match members.get(&(&e.layer, e.offset)) {
            Some(m) if m[0].compressed_end == e.end => {
                if !taken.insert((&e.layer, e.offset)) {
                    continue;
                }
                let size = e.end - e.offset;
                if plan.bytes + size > MAX_PREFETCH_BYTES {
                    break;
                }
                plan.bytes += size;
                named.push((i, m));
            }
            _ => plan.ignored += 1,
        }
    }
    // Neighbours in a layer make one run, whatever their ranks.
    named.sort_by_key(|(_, m)| (&m[0].layer, m[0].offset));
    let mut runs: Vec<(usize, Vec<ChunkLoc>)> = Vec::new();
    let mut last: Option<(&Digest, u64, u64)> = None; // layer, run start, run end
    for (rank, m) in named {
        let loc = m[0];
        let joins = last.is_some_and(|(layer, start, end)| {
            *layer == loc.layer && end == loc.offset && loc.compressed_end - start <= max_range
        });
        let mut seen_digests = HashSet::new();
        let chunks = m
            .iter()
            .filter(|l| seen_digests.insert(&l.digest))
            .map(|l| (*l).clone());
        match runs.last_mut() {
            Some((r, run)) if joins => {
                *r = (*r).min(rank);
                run.extend(chunks);
                last = last.map(|(l, s, _)| (l, s, loc.compressed_end));
            }
            _ => {
                runs.push((rank, chunks.collect()));
                last = Some((&loc.layer, loc.offset, loc.compressed_end));
            }
        }
    }
    runs.sort_by_key(|(rank, _)| *rank);
    plan.runs = runs.into_iter().map(|(_, r)| r).collect();
    plan
}

/// What a profile prefetch did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchReport {
    /// Runs (Range requests at most) asked for.
    pub runs: usize,
    /// Chunks asked for (those not in the store already).
    pub chunks: usize,
    /// Compressed bytes of the runs.
    pub bytes: u64,
    /// Profile entries ignored (naming nothing of the image).
    pub ignored: usize,
    /// Chunks that failed (a reader fetches them again when it needs them).
    pub failed: usize,
}

/// Fetch the chunks `profile` names for a mount of `tree`, best-ranked run
/// first, each run queued at once so that it goes in one Range request.
/// At most `workers - 2` runs are in flight (at least one): a reader's
/// request always finds a worker free and nothing of the profile queued
/// ahead of it. Failures are only counted: a reader's own request retries.
pub async fn prefetch_profile(
    tree: Arc<Tree>,
    fetcher: Fetcher,
    profile: &Profile,
) -> PrefetchReport {
    let opts = fetcher.options();
    let (max_range, deadline) = (opts.max_range, opts.deadline);
    let window = opts.workers.saturating_sub(2).max(1);
    let store = fetcher.store().clone();
    let p = plan(&tree, profile, max_range);
    let mut report = PrefetchReport {
        ignored: p.ignored,
        bytes: p.bytes,
        ..PrefetchReport::default()
    };
    let mut runs = p.runs.into_iter().filter_map(|run| {
        let missing: Vec<ChunkLoc> = run
            .into_iter()
            .filter(|l| !store.has_chunk(&l.digest))
            .collect();
        (!missing.is_empty()).then_some(missing)
    });
    let mut flying = futures::stream::FuturesUnordered::new();
    loop {
        while flying.len() < window {
            let Some(run) = runs.next() else { break };
            report.runs += 1;
            report.chunks += run.len();
            let f = fetcher.clone();
            flying.push(async move {
                f.ensure_all(&run, Priority::OnDemand, Some(deadline))
                    .await
                    .iter()
                    .filter(|r| r.is_err())
                    .count()
            });
        }
        match flying.next().await {
            Some(failed) => report.failed += failed,
            None => break,
        }
    }
    report
}

#[cfg(test)]
#[path = "profile_tests.rs"]
mod tests;
