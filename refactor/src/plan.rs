//! The layer planner: from merged views to stacks of low-redundancy layers.
//!
//! Pure: it sees merged views, package ownership and the entries of layers
//! already published, and decides which entries go into which layer; the
//! layer writer does the bytes. DESIGN.md "Planning layers" gives the
//! rules; in short:
//!
//! * every image's planned stack rebuilds its merged view exactly (with
//!   `relax_mtime`, up to the mtime changes the plan reports);
//! * directories, symlinks and special files go into the image's own top
//!   layer, last in its stack; content layers hold regular files and hard
//!   links only, each hard-link group whole in one layer;
//! * at most `max_layers` layers per image, top layer included.
//!
//! **Incremental mode** reuses published layers whose entries all appear in
//! the image, greedily by bytes, then cuts the rest into units that future
//! versions keep intact (one per source package, big ones per binary
//! package; unowned files by directory
//! subtree; with `relax_mtime` a big unit is split into binaries and data)
//! and packs the units into the layers left (see [`pack`] for the
//! heuristic). **Joint mode** groups files by the exact set of images that
//! hold them, one shared layer (or several, cut by unit) per group, and
//! dissolves the smallest groups into the member images' layers when an
//! image would exceed the cap.

use std::collections::{BTreeMap, HashMap, HashSet};

use breakfs_index::{Entry, EntryKind, MergedView};

use crate::dpkg::PackageDb;
use crate::{Error, Result};

/// How the planner cuts layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Most layers per image, its top layer included (48 by default).
    pub max_layers: usize,
    /// Treat entries equal in all but mtime as one (the image then takes
    /// the mtime of the copy planned or published first; reported).
    pub relax_mtime: bool,
    /// Plan all images at once (shared layers by image set) instead of one
    /// after the other.
    pub joint: bool,
    /// Size target of the directory-subtree units that files owned by no
    /// package are cut into.
    pub target_layer_bytes: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_layers: 48,
            relax_mtime: false,
            joint: false,
            target_layer_bytes: 32 << 20,
        }
    }
}

/// One image to plan.
#[derive(Clone, Debug)]
pub struct PlanImage {
    /// A name for labels and errors, e.g. `python:v2`.
    pub name: String,
    /// The image's merged view (canonical hard links).
    pub view: MergedView,
    /// Package ownership of the view's files.
    pub packages: PackageDb,
}

/// A layer that already exists at the destination.
#[derive(Clone, Debug)]
pub struct PublishedLayer {
    /// The layer blob's digest.
    pub id: String,
    /// Its entries as stored in that layer.
    pub entries: Vec<Entry>,
}

/// Where a planned layer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSource {
    /// An already published layer, by index into the `published` slice.
    Reused(usize),
    /// A layer to write.
    New,
}

/// One layer of the plan.
#[derive(Clone, Debug)]
pub struct PlanLayer {
    /// Published or to write.
    pub source: LayerSource,
    /// For a new layer, its entries in write order (hard-link members after
    /// their primary); for a reused one, the published entries.
    pub entries: Vec<Entry>,
    /// Indices of the images whose stacks hold this layer.
    pub users: Vec<usize>,
    /// What the layer holds, e.g. `pkg:openssl`, `shared:3 images`, `top:python:v2`.
    pub label: String,
}

/// One image's stack and what the plan costs and saves for it.
#[derive(Clone, Debug, Default)]
pub struct ImagePlan {
    /// Indices into [`Plan::layers`], bottom first.
    pub layers: Vec<usize>,
    /// Bytes of the image's regular files (hard links counted once).
    pub file_bytes: u64,
    /// File bytes in layers the image did not create: published layers and,
    /// in incremental mode, layers planned for earlier images of the call.
    pub reused_bytes: u64,
    /// File bytes whose entry (exact, or ignoring mtime with `relax_mtime`)
    /// is in a layer published before this image: no plan reuses more.
    pub bound_bytes: u64,
    /// Extra bytes stored for this image because of the layer cap.
    pub duplicated_bytes: u64,
    /// `(path, old mtime, new mtime)` of every entry whose mtime the plan
    /// changed (`relax_mtime` only).
    pub mtime_changes: Vec<(String, i64, i64)>,
    /// Bytes of stale files in reused layers that the image shadows (with
    /// a newer version above, or a whiteout): downloaded, never read.
    pub shadowed_bytes: u64,
}

/// The planned layers and each image's stack.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// All layers, reused and new, each once.
    pub layers: Vec<PlanLayer>,
    /// One stack per input image, in input order.
    pub images: Vec<ImagePlan>,
}

/// Chance that a package unit changes between two versions of an image.
const P_PACKAGE: f64 = 0.1;
/// Chance that an unowned subtree changes: files no package owns are mostly
/// generated at build time (caches, databases, byte code).
const P_UNOWNED: f64 = 0.5;
/// Chance that the binary part of a split unit changes (a rebuild changes
/// every ELF file).
const P_BINARY: f64 = 0.15;
/// Chance that the data part of a split unit changes.
const P_DATA: f64 = 0.05;
/// Units at least this big are split into binaries and data with
/// `relax_mtime`.
const SPLIT_MIN_BYTES: u64 = 1 << 20;
/// Source packages at least this big are cut by binary package.
const SOURCE_SPLIT_BYTES: u64 = 4 << 20;
/// Joint mode splits a group into more layers only while each stays this big.
const JOINT_SPLIT_MIN_BYTES: u64 = 1 << 20;

/// Files that eStargz adds to a layer and that no merged view holds.
const LANDMARKS: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

fn is_landmark(path: &str) -> bool {
    LANDMARKS.contains(&path)
}

fn is_content(kind: EntryKind) -> bool {
    matches!(kind, EntryKind::File | EntryKind::Hardlink)
}

/// Whether two entries count as the same: hard links by path and target
/// (their metadata is the primary's, which is compared on its own), the
/// rest by every field, or every field but mtime when relaxed.
fn same(a: &Entry, b: &Entry, relax: bool) -> bool {
    if a.kind == EntryKind::Hardlink || b.kind == EntryKind::Hardlink {
        return a.kind == b.kind && a.path == b.path && a.link == b.link;
    }
    if relax {
        a.eq_ignoring_mtime(b)
    } else {
        a == b
    }
}

/// Bytes of regular files in a list of entries (hard links not counted).
fn file_bytes_of(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum()
}

/// A regular file with its hard links: the unit that cannot be split.
#[derive(Clone, Debug)]
struct Item {
    /// The primary (a `File`) first, then its hard links in path order.
    entries: Vec<Entry>,
    bytes: u64,
}

/// An image's merged view sorted into content items and top entries.
struct Prepared {
    items: Vec<Item>,
    others: Vec<Entry>,
    item_of: HashMap<String, usize>,
    other_of: HashMap<String, usize>,
    file_bytes: u64,
}

fn prepare(img: &PlanImage) -> Result<Prepared> {
    let mut items: Vec<Item> = Vec::new();
    let mut others = Vec::new();
    let mut item_of = HashMap::new();
    let mut other_of = HashMap::new();
    let mut links = Vec::new();
    for me in img.view.iter() {
        let e = &me.entry;
        match e.kind {
            EntryKind::File => {
                item_of.insert(e.path.clone(), items.len());
                items.push(Item {
                    entries: vec![e.clone()],
                    bytes: e.size,
                });
            }
            EntryKind::Hardlink => links.push(e.clone()),
            _ => {
                other_of.insert(e.path.clone(), others.len());
                others.push(e.clone());
            }
        }
    }
    for l in links {
        let Some(&n) = item_of.get(&l.link) else {
            return Err(Error::PlanInput {
                image: img.name.clone(),
                path: l.path.clone(),
                reason: format!(
                    "hard link to {:?}, which is not a regular file of the view",
                    l.link
                ),
            });
        };
        item_of.insert(l.path.clone(), n);
        items[n].entries.push(l);
    }
    let file_bytes = items.iter().map(|i| i.bytes).sum();
    Ok(Prepared {
        items,
        others,
        item_of,
        other_of,
        file_bytes,
    })
}

/// A published (or earlier planned) layer that an image can take: its
/// entries match the image's, except for a few stale files that the image
/// changed or removed. Those are shadowed: the image's own version goes into
/// a new layer above, and a removed file gets a whiteout in the top layer.
/// A stale byte is downloaded but never read, so only layers that are
/// mostly current qualify ([`MAX_STALE_FRACTION`]).
struct Match {
    items: Vec<usize>,
    others: Vec<usize>,
    bytes: u64,
    changes: Vec<(String, i64, i64)>,
    /// Paths of stale files.
    stale: Vec<String>,
    /// Stale files the image does not have at all: they need whiteouts.
    removed: Vec<String>,
    stale_bytes: u64,
}

/// At most this fraction of a reused layer's file bytes may be stale. A
/// node that holds the older image pays nothing for stale bytes, a fresh
/// node downloads them once; the report states them. On the Debian corpus,
/// 0.5 lifts the worst v1→v2 pair from 0.85 to 0.93 of its bound.
const MAX_STALE_FRACTION: f64 = 0.5;

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

/// The whiteout entry that hides `path` of a lower layer.
fn whiteout(path: &str) -> Entry {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    let mut e = Entry::new(format!("{dir}.wh.{name}"), EntryKind::File);
    e.mode = 0o644;
    e.digest = Some(breakfs_index::Digest::of(b""));
    e
}

fn match_layer(p: &Prepared, entries: &[Entry], relax: bool) -> Option<Match> {
    let mut items = HashSet::new();
    let mut others = Vec::new();
    let mut changes = Vec::new();
    let mut seen = HashSet::new();
    let mut matched_entries: HashMap<usize, usize> = HashMap::new();
    let mut stale = Vec::new();
    let mut removed = Vec::new();
    let mut stale_bytes = 0u64;
    for e in entries {
        if is_landmark(&e.path) {
            continue;
        }
        if !seen.insert(e.path.as_str()) {
            return None;
        }
        // A layer with whiteouts only makes sense over the stack it was made for.
        if e.path
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(".wh."))
        {
            return None;
        }
        if is_content(e.kind) {
            let current = p.item_of.get(&e.path).and_then(|&n| {
                p.items[n]
                    .entries
                    .iter()
                    .find(|v| v.path == e.path)
                    .map(|v| (n, v))
            });
            match current {
                Some((n, v)) if same(e, v, relax) => {
                    if e.kind == EntryKind::File && e.mtime != v.mtime {
                        for member in &p.items[n].entries {
                            changes.push((member.path.clone(), member.mtime, e.mtime));
                        }
                    }
                    items.insert(n);
                    *matched_entries.entry(n).or_default() += 1;
                }
                // Only plain files can be shadowed: hard links and paths
                // that became directories or symlinks disqualify the layer.
                _ if e.kind != EntryKind::File || p.other_of.contains_key(&e.path) => {
                    return None;
                }
                Some((n, _)) if p.items[n].entries.len() > 1 => return None,
                Some(_) => {
                    stale.push(e.path.clone());
                    stale_bytes += e.size;
                }
                None => {
                    // A whiteout needs its directory in the image.
                    let parent = parent_of(&e.path);
                    let dir_kept = p
                        .other_of
                        .get(parent)
                        .is_some_and(|&o| p.others[o].kind == EntryKind::Dir);
                    if !parent.is_empty() && !dir_kept {
                        return None;
                    }
                    stale.push(e.path.clone());
                    removed.push(e.path.clone());
                    stale_bytes += e.size;
                }
            }
        } else {
            let &n = p.other_of.get(&e.path)?;
            let v = &p.others[n];
            if !same(e, v, relax) {
                return None;
            }
            if e.mtime != v.mtime {
                changes.push((v.path.clone(), v.mtime, e.mtime));
            }
            others.push(n);
        }
    }
    // A hard-link group is taken whole or not at all.
    if matched_entries
        .iter()
        .any(|(&n, &k)| k != p.items[n].entries.len())
        || (items.is_empty() && others.is_empty())
    {
        return None;
    }
    // A layer with top entries sits above the new layers, where a stale
    // file would hide the image's own version.
    if !others.is_empty() && !stale.is_empty() {
        return None;
    }
    let mut items: Vec<usize> = items.into_iter().collect();
    items.sort_unstable();
    let bytes: u64 = items.iter().map(|&n| p.items[n].bytes).sum();
    if stale_bytes as f64 > MAX_STALE_FRACTION * (bytes + stale_bytes) as f64 {
        return None;
    }
    Some(Match {
        items,
        others,
        bytes,
        changes,
        stale,
        removed,
        stale_bytes,
    })
}

/// Which candidate layers an image reuses, and what they cover.
struct Reuse {
    /// (candidate, whether it holds top entries, stale bytes in it).
    picks: Vec<(usize, bool, u64)>,
    covered_items: Vec<bool>,
    covered_others: Vec<bool>,
    changes: Vec<(String, i64, i64)>,
    /// Whiteouts the top layer needs for stale files of reused layers.
    whiteouts: Vec<String>,
}

/// Greedy reuse: layers with the most current bytes first, never two with
/// a path in common, no stale file over a file another pick provides, at
/// most `limit` of them.
fn choose_reuse(p: &Prepared, cands: &[&[Entry]], relax: bool, limit: usize) -> Reuse {
    let mut matches: Vec<(usize, Match)> = cands
        .iter()
        .enumerate()
        .filter_map(|(c, entries)| match_layer(p, entries, relax).map(|m| (c, m)))
        .collect();
    matches.sort_by(|(ca, a), (cb, b)| {
        (b.bytes, a.stale_bytes, b.items.len() + b.others.len(), *ca).cmp(&(
            a.bytes,
            b.stale_bytes,
            a.items.len() + a.others.len(),
            *cb,
        ))
    });
    let mut r = Reuse {
        picks: Vec::new(),
        covered_items: vec![false; p.items.len()],
        covered_others: vec![false; p.others.len()],
        changes: Vec::new(),
        whiteouts: Vec::new(),
    };
    let mut stale_paths: HashSet<String> = HashSet::new();
    for (c, m) in matches {
        if r.picks.len() >= limit {
            break;
        }
        if m.items.iter().any(|&n| r.covered_items[n])
            || m.others.iter().any(|&n| r.covered_others[n])
            || m.items.iter().any(|&n| {
                p.items[n]
                    .entries
                    .iter()
                    .any(|e| stale_paths.contains(&e.path))
            })
            || m.stale.iter().any(|s| {
                stale_paths.contains(s) || p.item_of.get(s).is_some_and(|&n| r.covered_items[n])
            })
        {
            continue;
        }
        for &n in &m.items {
            r.covered_items[n] = true;
        }
        for &n in &m.others {
            r.covered_others[n] = true;
        }
        r.changes.extend(m.changes);
        stale_paths.extend(m.stale);
        r.whiteouts.extend(m.removed);
        r.picks.push((c, !m.others.is_empty(), m.stale_bytes));
    }
    r.whiteouts.sort();
    r
}

/// A set of items that future versions are expected to keep or change
/// together.
#[derive(Clone, Debug)]
struct Unit {
    key: String,
    members: Vec<usize>,
    bytes: u64,
    p: f64,
}

/// Whether a file is (probably) an executable or shared library, or a
/// package's documentation (its changelog changes with every version);
/// the planner never reads content, so it goes by path and mode.
fn is_binary(e: &Entry) -> bool {
    let mut comps: Vec<&str> = e.path.split('/').collect();
    let name = comps.pop().unwrap_or("");
    comps.iter().any(|c| *c == "bin" || *c == "sbin")
        || e.path.starts_with("usr/share/doc/")
        || name.ends_with(".so")
        || name.contains(".so.")
        || e.mode & 0o111 != 0
}

/// Cut items (given as their entry lists) into units: one per source
/// package, files owned by none by directory subtree of at most
/// `target_layer_bytes`; with `relax_mtime`, big units split into
/// binaries and data.
fn cut_units(items: &[&Item], db: &PackageDb, opts: &PlanOptions) -> Vec<Unit> {
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    let mut add = |key: String, p: f64, n: usize, bytes: u64| {
        let u = units.entry(key.clone()).or_insert(Unit {
            key,
            members: Vec::new(),
            bytes: 0,
            p,
        });
        u.members.push(n);
        u.bytes += bytes;
    };
    // A small source package is one unit (its binary packages nearly
    // always move together); a big one is cut by binary package, as its
    // binary packages do move separately at times (bsdutils without
    // util-linux).
    let owners: Vec<Option<&str>> = items
        .iter()
        .map(|it| it.entries.iter().find_map(|e| db.unit_of(&e.path)))
        .collect();
    let mut source_bytes: HashMap<&str, u64> = HashMap::new();
    for (it, owner) in items.iter().zip(&owners) {
        if let Some(pkg) = owner {
            *source_bytes.entry(db.source_of(pkg)).or_insert(0) += it.bytes;
        }
    }
    let mut unowned = Vec::new();
    for (n, (it, owner)) in items.iter().zip(&owners).enumerate() {
        match owner {
            Some(pkg) => {
                let src = db.source_of(pkg);
                let key = if source_bytes.get(src).copied().unwrap_or(0) >= SOURCE_SPLIT_BYTES {
                    pkg
                } else {
                    src
                };
                add(format!("pkg:{key}"), P_PACKAGE, n, it.bytes)
            }
            None => unowned.push(n),
        }
    }
    for (key, members) in subtrees(items, &unowned, opts.target_layer_bytes) {
        for n in members {
            add(format!("dir:{key}"), P_UNOWNED, n, items[n].bytes);
        }
    }
    let mut out = Vec::new();
    for (_, u) in units {
        if !opts.relax_mtime || u.bytes < SPLIT_MIN_BYTES {
            out.push(u);
            continue;
        }
        let (bin, data): (Vec<usize>, Vec<usize>) = u
            .members
            .iter()
            .partition(|&&n| is_binary(&items[n].entries[0]));
        if bin.is_empty() || data.is_empty() {
            out.push(u);
            continue;
        }
        let bin_bytes = bin.iter().map(|&n| items[n].bytes).sum();
        out.push(Unit {
            key: format!("{}#bin", u.key),
            members: bin,
            bytes: bin_bytes,
            p: P_BINARY,
        });
        let data_bytes = data.iter().map(|&n| items[n].bytes).sum();
        out.push(Unit {
            key: format!("{}#data", u.key),
            members: data,
            bytes: data_bytes,
            p: P_DATA,
        });
    }
    out
}

/// Group `members` by directory subtree: each file goes to its shallowest
/// ancestor directory whose subtree (among `members`) holds at most
/// `target` bytes, or with the other files of its own directory when even
/// that is bigger. Keys are `/` (everything), `DIR`, or `DIR/*`.
fn subtrees(items: &[&Item], members: &[usize], target: u64) -> BTreeMap<String, Vec<usize>> {
    let mut dir_bytes: HashMap<&str, u64> = HashMap::new();
    for &n in members {
        let path = items[n].entries[0].path.as_str();
        *dir_bytes.entry("").or_insert(0) += items[n].bytes;
        for (i, _) in path.match_indices('/') {
            *dir_bytes.entry(&path[..i]).or_insert(0) += items[n].bytes;
        }
    }
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for &n in members {
        let path = items[n].entries[0].path.as_str();
        let mut ancestors = vec![""];
        ancestors.extend(path.match_indices('/').map(|(i, _)| &path[..i]));
        let key = match ancestors
            .iter()
            .find(|a| dir_bytes.get(*a).copied().unwrap_or(0) <= target)
        {
            Some(&"") => "/".to_string(),
            Some(a) => a.to_string(),
            None => format!("{}/*", ancestors.last().copied().unwrap_or("")),
        };
        out.entry(key).or_default().push(n);
    }
    out
}

/// Pack units into at most `k` bins.
///
/// The heuristic: a bin's layer stays reusable by the next version only
/// if none of its units changes, so the bytes a packing is expected to
/// lose are `sum over bins of bin_bytes * P(any unit in it changes)`, with
/// `P = 1 - prod(1 - p_unit)` and `p_unit` a per-unit change chance
/// (package 0.1, unowned subtree 0.5, binaries 0.15, data 0.05). Units are
/// sorted by size, largest first, and split into `k` contiguous runs by
/// dynamic programming to minimise that sum: the biggest units come out as
/// singletons and the small ones as bundles of similar size, so an update
/// of one small unit loses only a small bundle.
fn pack(units: &[Unit], k: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by(|&a, &b| {
        units[b]
            .bytes
            .cmp(&units[a].bytes)
            .then_with(|| units[a].key.cmp(&units[b].key))
    });
    let n = order.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut bytes = vec![0f64; n + 1];
    let mut logq = vec![0f64; n + 1];
    for (i, &u) in order.iter().enumerate() {
        bytes[i + 1] = bytes[i] + units[u].bytes as f64;
        logq[i + 1] = logq[i] + (1.0 - units[u].p.clamp(0.0, 0.999_999)).ln();
    }
    let cost = |a: usize, b: usize| (bytes[b] - bytes[a]) * (1.0 - (logq[b] - logq[a]).exp());
    // best[j][i]: least expected loss packing the first i units in j runs.
    let mut best = vec![vec![f64::INFINITY; n + 1]; k + 1];
    let mut from = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0.0;
    for j in 1..=k {
        for i in j..=n {
            // Leave at least one unit for each of the remaining runs.
            if n - i < k - j {
                continue;
            }
            for m in (j - 1)..i {
                let c = best[j - 1][m] + cost(m, i);
                if c < best[j][i] {
                    best[j][i] = c;
                    from[j][i] = m;
                }
            }
        }
    }
    let mut bins = Vec::with_capacity(k);
    let mut i = n;
    for j in (1..=k).rev() {
        let m = from[j][i];
        bins.push(order[m..i].to_vec());
        i = m;
    }
    bins.reverse();
    bins
}

/// Entries of a content layer holding `items`, in write order.
fn layer_entries<'a>(items: impl IntoIterator<Item = &'a Item>) -> Vec<Entry> {
    let mut items: Vec<&Item> = items.into_iter().collect();
    items.sort_by(|a, b| a.entries[0].path.cmp(&b.entries[0].path));
    items
        .iter()
        .flat_map(|i| i.entries.iter().cloned())
        .collect()
}

fn bin_label(units: &[Unit], bin: &[usize]) -> String {
    match bin {
        [one] => units[*one].key.clone(),
        _ => {
            let names: Vec<&str> = bin.iter().take(3).map(|&u| units[u].key.as_str()).collect();
            let more = if bin.len() > 3 { ",…" } else { "" };
            format!("bundle:{} units ({}{more})", bin.len(), names.join(","))
        }
    }
}

/// Plan the layers of `images` given the layers already `published`.
pub fn plan(
    images: &[PlanImage],
    published: &[PublishedLayer],
    opts: &PlanOptions,
) -> Result<Plan> {
    if opts.max_layers < 2 {
        return Err(Error::PlanOption {
            reason: format!(
                "max_layers must be at least 2 (one content layer and the top layer), got {}",
                opts.max_layers
            ),
        });
    }
    let preps = images.iter().map(prepare).collect::<Result<Vec<_>>>()?;
    let mut b = Builder::default();
    if opts.joint {
        b.joint(images, &preps, published, opts);
    } else {
        b.incremental(images, &preps, published, opts);
    }
    Ok(b.finish())
}

/// A way to dissolve a joint-mode group to meet the layer cap.
struct Dissolve {
    /// Whether it lowers the layer count of an image over the cap.
    helps: bool,
    /// Bytes it duplicates.
    cost: u64,
    /// The group dissolved.
    group: usize,
    /// Groups of subsets of its images that take its files.
    covers: Vec<usize>,
    /// Images that take a private copy.
    left: Vec<usize>,
}

/// The plan under construction, with bookkeeping the result does not show.
#[derive(Default)]
struct Builder {
    plan: Plan,
    /// The image that created each layer (`None`: published or shared).
    creator: Vec<Option<usize>>,
    /// Plan layer of each reused published layer.
    reused: HashMap<usize, usize>,
    /// Joint mode: top layers by content, so identical tops are stored once.
    tops: Option<HashMap<Vec<Entry>, usize>>,
}

impl Builder {
    fn add_layer(
        &mut self,
        source: LayerSource,
        entries: Vec<Entry>,
        label: String,
        creator: Option<usize>,
    ) -> usize {
        self.plan.layers.push(PlanLayer {
            source,
            entries,
            users: Vec::new(),
            label,
        });
        self.creator.push(creator);
        self.plan.layers.len() - 1
    }

    fn reuse_published(&mut self, j: usize, published: &[PublishedLayer]) -> usize {
        if let Some(&l) = self.reused.get(&j) {
            return l;
        }
        let l = self.add_layer(
            LayerSource::Reused(j),
            published[j].entries.clone(),
            format!("reused:{}", published[j].id),
            None,
        );
        self.reused.insert(j, l);
        l
    }

    /// Bytes of files whose entry some published layer (or one of `extra`
    /// plan layers) holds.
    fn bound(p: &Prepared, known: &HashMap<String, Vec<Entry>>, relax: bool) -> u64 {
        p.items
            .iter()
            .filter(|it| {
                known
                    .get(&it.entries[0].path)
                    .is_some_and(|v| v.iter().any(|e| same(e, &it.entries[0], relax)))
            })
            .map(|it| it.bytes)
            .sum()
    }

    fn remember(known: &mut HashMap<String, Vec<Entry>>, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
            known.entry(e.path.clone()).or_default().push(e.clone());
        }
    }

    fn incremental(
        &mut self,
        images: &[PlanImage],
        preps: &[Prepared],
        published: &[PublishedLayer],
        opts: &PlanOptions,
    ) {
        let mut known: HashMap<String, Vec<Entry>> = HashMap::new();
        for l in published {
            Self::remember(&mut known, &l.entries);
        }
        for (i, (img, p)) in images.iter().zip(preps).enumerate() {
            // Candidates: published layers, then layers made for earlier images.
            let planned: Vec<usize> = (0..self.plan.layers.len())
                .filter(|&l| self.creator[l].is_some())
                .collect();
            let mut cands: Vec<&[Entry]> = published.iter().map(|l| l.entries.as_slice()).collect();
            cands.extend(
                planned
                    .iter()
                    .map(|&l| self.plan.layers[l].entries.as_slice()),
            );
            let reuse = choose_reuse(p, &cands, opts.relax_mtime, opts.max_layers - 2);
            let bound = Self::bound(p, &known, opts.relax_mtime);
            let picks: Vec<(usize, bool)> = reuse
                .picks
                .iter()
                .map(|&(c, top, _)| {
                    let l = if c < published.len() {
                        self.reuse_published(c, published)
                    } else {
                        planned[c - published.len()]
                    };
                    (l, top)
                })
                .collect();
            let budget = opts.max_layers - picks.len() - 1;
            let new = self.new_layers(i, img, p, &reuse, budget, opts);
            self.finish_image(i, img, p, &reuse, picks, new, bound, 0);
            for &l in &self.plan.images[i].layers {
                if self.creator[l] == Some(i) {
                    Self::remember(&mut known, &self.plan.layers[l].entries);
                }
            }
        }
    }

    /// Cut the image's items not covered by reuse into at most `budget`
    /// new content layers.
    fn new_layers(
        &mut self,
        i: usize,
        img: &PlanImage,
        p: &Prepared,
        reuse: &Reuse,
        budget: usize,
        opts: &PlanOptions,
    ) -> Vec<usize> {
        let rest: Vec<&Item> = p
            .items
            .iter()
            .zip(&reuse.covered_items)
            .filter(|(_, c)| !**c)
            .map(|(it, _)| it)
            .collect();
        let units = cut_units(&rest, &img.packages, opts);
        let bins = pack(&units, budget);
        let mut out = Vec::new();
        for bin in &bins {
            let entries = layer_entries(
                bin.iter()
                    .flat_map(|&u| units[u].members.iter().map(|&n| rest[n])),
            );
            let l = self.add_layer(LayerSource::New, entries, bin_label(&units, bin), Some(i));
            out.push(l);
        }
        out
    }

    /// Assemble image `i`'s stack: reused content layers, new content
    /// layers, reused layers with top entries, the new top layer.
    #[allow(clippy::too_many_arguments)]
    fn finish_image(
        &mut self,
        i: usize,
        img: &PlanImage,
        p: &Prepared,
        reuse: &Reuse,
        mut picks: Vec<(usize, bool)>,
        new: Vec<usize>,
        bound: u64,
        duplicated: u64,
    ) {
        let mut top: Vec<Entry> = p
            .others
            .iter()
            .zip(&reuse.covered_others)
            .filter(|(_, c)| !**c)
            .map(|(e, _)| e.clone())
            .collect();
        top.extend(reuse.whiteouts.iter().map(|path| whiteout(path)));
        let key = |l: usize, b: &Builder| match b.plan.layers[l].source {
            LayerSource::Reused(j) => (0, j),
            LayerSource::New => (1, l),
        };
        picks.sort_by_key(|&(l, top)| (top, key(l, self)));
        let mut layers: Vec<usize> = picks.iter().filter(|(_, t)| !t).map(|(l, _)| *l).collect();
        layers.extend(new);
        layers.extend(picks.iter().filter(|(_, t)| *t).map(|(l, _)| *l));
        if !top.is_empty() {
            let shared = self.tops.as_ref().and_then(|t| t.get(&top)).copied();
            let l = match shared {
                Some(l) => l,
                None => {
                    let creator = if self.tops.is_some() { None } else { Some(i) };
                    let l = self.add_layer(
                        LayerSource::New,
                        top.clone(),
                        format!("top:{}", img.name),
                        creator,
                    );
                    if let Some(t) = self.tops.as_mut() {
                        t.insert(top, l);
                    }
                    l
                }
            };
            layers.push(l);
        }
        let shadowed: u64 = reuse.picks.iter().map(|&(_, _, b)| b).sum();
        let mut reused_bytes = 0;
        for &l in &layers {
            self.plan.layers[l].users.push(i);
            let foreign = match self.plan.layers[l].source {
                LayerSource::Reused(_) => true,
                LayerSource::New => self.creator[l].is_some_and(|c| c != i),
            };
            if foreign {
                reused_bytes += file_bytes_of(&self.plan.layers[l].entries);
            }
        }
        let mut mtime_changes = reuse.changes.clone();
        mtime_changes.sort();
        mtime_changes.dedup();
        if self.plan.images.len() <= i {
            self.plan.images.resize(i + 1, ImagePlan::default());
        }
        let ip = &mut self.plan.images[i];
        ip.layers = layers;
        ip.file_bytes = p.file_bytes;
        ip.reused_bytes = reused_bytes.saturating_sub(shadowed);
        ip.shadowed_bytes = shadowed;
        ip.bound_bytes = bound;
        ip.duplicated_bytes = duplicated;
        ip.mtime_changes.extend(mtime_changes);
        ip.mtime_changes.sort();
    }

    fn joint(
        &mut self,
        images: &[PlanImage],
        preps: &[Prepared],
        published: &[PublishedLayer],
        opts: &PlanOptions,
    ) {
        let relax = opts.relax_mtime;
        self.tops = Some(HashMap::new());
        let mut known: HashMap<String, Vec<Entry>> = HashMap::new();
        for l in published {
            Self::remember(&mut known, &l.entries);
        }
        let cands: Vec<&[Entry]> = published.iter().map(|l| l.entries.as_slice()).collect();
        let reuses: Vec<Reuse> = preps
            .iter()
            .map(|p| choose_reuse(p, &cands, relax, opts.max_layers - 2))
            .collect();
        self.plan.images = vec![ImagePlan::default(); images.len()];

        // Occurrences: each distinct item once, with the images that hold it;
        // the first image's copy is the one stored.
        struct Occ {
            img: usize,
            item: usize,
            set: Vec<usize>,
        }
        let mut occs: Vec<Occ> = Vec::new();
        let mut index: HashMap<Vec<Entry>, usize> = HashMap::new();
        for (i, p) in preps.iter().enumerate() {
            for (n, it) in p.items.iter().enumerate() {
                if reuses[i].covered_items[n] {
                    continue;
                }
                let key: Vec<Entry> = it
                    .entries
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        if relax {
                            e.mtime = 0;
                        }
                        e
                    })
                    .collect();
                match index.get(&key) {
                    Some(&o) => {
                        occs[o].set.push(i);
                        let rep = &preps[occs[o].img].items[occs[o].item];
                        for (mine, theirs) in it.entries.iter().zip(&rep.entries) {
                            if mine.mtime != theirs.mtime {
                                self.plan.images[i].mtime_changes.push((
                                    mine.path.clone(),
                                    mine.mtime,
                                    theirs.mtime,
                                ));
                            }
                        }
                    }
                    None => {
                        index.insert(key, occs.len());
                        occs.push(Occ {
                            img: i,
                            item: n,
                            set: vec![i],
                        });
                    }
                }
            }
        }
        drop(index);

        // Groups by image set, each cut into units by its first image's packages.
        struct Group {
            set: Vec<usize>,
            items: Vec<(usize, usize)>,
            units: Vec<Unit>,
            bytes: u64,
            k: usize,
            alive: bool,
        }
        let mut by_set: BTreeMap<Vec<usize>, Vec<(usize, usize)>> = BTreeMap::new();
        for o in &occs {
            by_set
                .entry(o.set.clone())
                .or_default()
                .push((o.img, o.item));
        }
        let mut groups: Vec<Group> = by_set
            .into_iter()
            .map(|(set, items)| {
                let refs: Vec<&Item> = items.iter().map(|&(i, n)| &preps[i].items[n]).collect();
                let units = cut_units(&refs, &images[set[0]].packages, opts);
                let bytes = refs.iter().map(|it| it.bytes).sum();
                Group {
                    set,
                    items,
                    units,
                    bytes,
                    k: 1,
                    alive: true,
                }
            })
            .collect();

        let base: Vec<usize> = (0..images.len())
            .map(|i| reuses[i].picks.len() + 1)
            .collect();
        let counts = |groups: &[Group]| {
            let mut c = base.clone();
            for g in groups.iter().filter(|g| g.alive) {
                for &i in &g.set {
                    c[i] += g.k;
                }
            }
            c
        };

        // The cap: dissolve the cheapest groups of over-cap images into
        // groups of subsets of their images, or private copies.
        loop {
            let c = counts(&groups);
            let over: Vec<bool> = c.iter().map(|&n| n > opts.max_layers).collect();
            if !over.iter().any(|&o| o) {
                break;
            }
            let private: HashMap<usize, usize> = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.alive && g.set.len() == 1)
                .map(|(n, g)| (g.set[0], n))
                .collect();
            let mut best: Option<Dissolve> = None;
            for (gi, g) in groups.iter().enumerate() {
                if !g.alive || g.set.len() < 2 || !g.set.iter().any(|&i| over[i]) {
                    continue;
                }
                let mut subsets: Vec<usize> = groups
                    .iter()
                    .enumerate()
                    .filter(|(ti, t)| {
                        *ti != gi
                            && t.alive
                            && t.set.len() > 1
                            && t.set.len() < g.set.len()
                            && t.set.iter().all(|i| g.set.contains(i))
                    })
                    .map(|(ti, _)| ti)
                    .collect();
                subsets.sort_by_key(|&t| (std::cmp::Reverse(groups[t].set.len()), t));
                let mut left: Vec<usize> = g.set.clone();
                let mut covers = Vec::new();
                for t in subsets {
                    if groups[t].set.iter().all(|i| left.contains(i)) {
                        left.retain(|i| !groups[t].set.contains(i));
                        covers.push(t);
                    }
                }
                let copies = (covers.len() + left.len()) as u64;
                let cost = g.bytes * copies.saturating_sub(1);
                let helps = g
                    .set
                    .iter()
                    .any(|&i| over[i] && (!left.contains(&i) || private.contains_key(&i)));
                let better = best.as_ref().is_none_or(|b| {
                    (helps, std::cmp::Reverse(cost)) > (b.helps, std::cmp::Reverse(b.cost))
                });
                if better {
                    best = Some(Dissolve {
                        helps,
                        cost,
                        group: gi,
                        covers,
                        left,
                    });
                }
            }
            let Some(Dissolve {
                group: gi,
                covers,
                left,
                ..
            }) = best
            else {
                break;
            };
            groups[gi].alive = false;
            let moved = std::mem::take(&mut groups[gi].items);
            let bytes = groups[gi].bytes;
            // Every copy but the first is a duplicate, charged to the first
            // image that holds it.
            for &t in covers.iter().skip(1) {
                self.plan.images[groups[t].set[0]].duplicated_bytes += bytes;
            }
            let mut targets = covers;
            for (n, &i) in left.iter().enumerate() {
                if n > 0 || !targets.is_empty() {
                    self.plan.images[i].duplicated_bytes += bytes;
                }
                let t = match private.get(&i) {
                    Some(&t) => t,
                    None => {
                        groups.push(Group {
                            set: vec![i],
                            items: Vec::new(),
                            units: Vec::new(),
                            bytes: 0,
                            k: 1,
                            alive: true,
                        });
                        groups.len() - 1
                    }
                };
                targets.push(t);
            }
            for t in targets {
                let g = &mut groups[t];
                g.items.extend(moved.iter().copied());
                g.bytes += bytes;
            }
        }

        // Recut groups that changed, then spend spare layers on splitting
        // the biggest groups by unit.
        for g in groups.iter_mut().filter(|g| g.alive) {
            let refs: Vec<&Item> = g.items.iter().map(|&(i, n)| &preps[i].items[n]).collect();
            g.units = cut_units(&refs, &images[g.set[0]].packages, opts);
        }
        loop {
            let c = counts(&groups);
            let pick = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| {
                    g.alive
                        && g.units.len() > g.k
                        && g.bytes / (g.k as u64 + 1) >= JOINT_SPLIT_MIN_BYTES
                        && g.set.iter().all(|&i| c[i] < opts.max_layers)
                })
                .max_by_key(|(n, g)| (g.bytes / g.k as u64, std::cmp::Reverse(*n)))
                .map(|(n, _)| n);
            match pick {
                Some(n) => groups[n].k += 1,
                None => break,
            }
        }

        // Broadest first, then by image set, so that stacks below a shared
        // layer agree where they can.
        let mut order: Vec<usize> = (0..groups.len())
            .filter(|&n| groups[n].alive && !groups[n].items.is_empty())
            .collect();
        order.sort_by(|&a, &b| {
            groups[b]
                .set
                .len()
                .cmp(&groups[a].set.len())
                .then_with(|| groups[a].set.cmp(&groups[b].set))
        });
        let mut image_new: Vec<Vec<usize>> = vec![Vec::new(); images.len()];
        for gn in order {
            let g = &groups[gn];
            let refs: Vec<&Item> = g.items.iter().map(|&(i, n)| &preps[i].items[n]).collect();
            let bins = pack(&g.units, g.k);
            let prefix = if g.set.len() == 1 {
                format!("own:{}", images[g.set[0]].name)
            } else {
                format!("shared:{} images", g.set.len())
            };
            for bin in &bins {
                let entries = layer_entries(
                    bin.iter()
                        .flat_map(|&u| g.units[u].members.iter().map(|&n| refs[n])),
                );
                let label = format!("{prefix} {}", bin_label(&g.units, bin));
                let l = self.add_layer(LayerSource::New, entries, label, None);
                for &i in &g.set {
                    image_new[i].push(l);
                }
            }
        }
        for (i, (img, p)) in images.iter().zip(preps).enumerate() {
            let picks: Vec<(usize, bool)> = reuses[i]
                .picks
                .iter()
                .map(|&(c, top, _)| (self.reuse_published(c, published), top))
                .collect();
            let bound = Self::bound(p, &known, relax);
            let dup = self.plan.images[i].duplicated_bytes;
            let new = std::mem::take(&mut image_new[i]);
            self.finish_image(i, img, p, &reuses[i], picks, new, bound, dup);
        }
    }

    fn finish(mut self) -> Plan {
        for ip in &mut self.plan.images {
            ip.mtime_changes.sort();
            ip.mtime_changes.dedup();
        }
        self.plan
    }
}

impl Plan {
    /// Rebuild every image's merged view from its planned layers (upper
    /// wins, hard links take their primary's metadata) and compare it with
    /// the original view, mtimes as the plan reports them; also check that
    /// whiteouts hide only files of lower layers and every hard link sits
    /// after its primary in the same layer.
    pub fn check(&self, images: &[PlanImage], published: &[PublishedLayer]) -> Result<()> {
        for (i, (img, ip)) in images.iter().zip(&self.images).enumerate() {
            let mut diffs: Vec<String> = Vec::new();
            let mut expected: BTreeMap<String, Entry> = img
                .view
                .iter()
                .map(|me| (me.entry.path.clone(), me.entry.clone()))
                .collect();
            for (path, old, new) in &ip.mtime_changes {
                match expected.get_mut(path) {
                    Some(e) if e.mtime == *old => e.mtime = *new,
                    Some(e) => diffs.push(format!(
                        "{path}: reported mtime change from {old}, but the view has {}",
                        e.mtime
                    )),
                    None => diffs.push(format!(
                        "{path}: reported mtime change for a path the view lacks"
                    )),
                }
            }
            let mut rebuilt: BTreeMap<String, (usize, Entry)> = BTreeMap::new();
            for &l in &ip.layers {
                let Some(layer) = self.layers.get(l) else {
                    diffs.push(format!(
                        "stack names layer {l}, the plan has {}",
                        self.layers.len()
                    ));
                    continue;
                };
                if !layer.users.contains(&i) {
                    diffs.push(format!(
                        "layer {l} ({}) does not list the image as a user",
                        layer.label
                    ));
                }
                let entries = match layer.source {
                    LayerSource::Reused(j) => match published.get(j) {
                        Some(p) => &p.entries,
                        None => {
                            diffs.push(format!(
                                "layer {l} reuses published layer {j}, which does not exist"
                            ));
                            continue;
                        }
                    },
                    LayerSource::New => &layer.entries,
                };
                let mut here = HashSet::new();
                for e in entries {
                    if is_landmark(&e.path) {
                        continue;
                    }
                    let name = e.path.rsplit('/').next().unwrap_or(&e.path);
                    if let Some(hidden) = name.strip_prefix(".wh.") {
                        // Only a plain file of a lower layer may be hidden.
                        let dir = parent_of(&e.path);
                        let target = if dir.is_empty() {
                            hidden.to_string()
                        } else {
                            format!("{dir}/{hidden}")
                        };
                        match rebuilt.get(&target) {
                            Some((tl, t)) if *tl != l && t.kind == EntryKind::File => {
                                rebuilt.remove(&target);
                            }
                            _ => diffs.push(format!(
                                "{}: whiteout in layer {l} hides no file of a lower layer",
                                e.path
                            )),
                        }
                        continue;
                    }
                    if e.kind == EntryKind::Hardlink && !here.contains(e.link.as_str()) {
                        diffs.push(format!(
                            "{}: hard link to {:?}, which is not earlier in layer {l}",
                            e.path, e.link
                        ));
                    }
                    here.insert(e.path.as_str());
                    rebuilt.insert(e.path.clone(), (l, e.clone()));
                }
            }
            let links: Vec<(String, usize, String)> = rebuilt
                .iter()
                .filter(|(_, (_, e))| e.kind == EntryKind::Hardlink)
                .map(|(p, (l, e))| (p.clone(), *l, e.link.clone()))
                .collect();
            for (path, l, target) in links {
                let primary = match rebuilt.get(&target) {
                    Some((pl, e)) if *pl == l && e.kind == EntryKind::File => e.clone(),
                    _ => {
                        diffs.push(format!(
                            "{path}: hard link to {target:?}, not a file of the same layer"
                        ));
                        continue;
                    }
                };
                if let Some((_, e)) = rebuilt.get_mut(&path) {
                    let (p, link) = (std::mem::take(&mut e.path), std::mem::take(&mut e.link));
                    *e = Entry {
                        path: p,
                        kind: EntryKind::Hardlink,
                        link,
                        ..primary
                    };
                }
            }
            for (path, want) in &expected {
                match rebuilt.get(path) {
                    None => diffs.push(format!("{path}: missing")),
                    Some((l, got)) if got != want => diffs.push(format!(
                        "{path}: layer {l} has {got:?}, the view has {want:?}"
                    )),
                    Some(_) => {}
                }
            }
            for path in rebuilt.keys() {
                if !expected.contains_key(path) {
                    diffs.push(format!("{path}: not in the view"));
                }
            }
            if !diffs.is_empty() {
                let count = diffs.len();
                diffs.truncate(5);
                return Err(Error::PlanMismatch {
                    image: img.name.clone(),
                    count,
                    first: diffs,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use breakfs_index::{Digest, MergedEntry};
    use proptest::prelude::*;

    fn file(path: &str, size: u64, content: &str, mtime: i64) -> Entry {
        let mut e = Entry::new(path, EntryKind::File);
        e.size = size;
        e.mode = 0o644;
        e.mtime = mtime;
        e.digest = Some(Digest::of(content.as_bytes()));
        e
    }

    fn other(path: &str, kind: EntryKind, mtime: i64) -> Entry {
        let mut e = Entry::new(path, kind);
        e.mode = 0o755;
        e.mtime = mtime;
        if kind == EntryKind::Symlink {
            e.link = "target".to_string();
        }
        e
    }

    fn hardlink(path: &str, primary: &Entry) -> Entry {
        Entry {
            path: path.to_string(),
            kind: EntryKind::Hardlink,
            link: primary.path.clone(),
            ..primary.clone()
        }
    }

    /// An image from entries (parents added as directories with `dir_mtime`)
    /// and packages `(source, [paths])`.
    fn image(
        name: &str,
        entries: Vec<Entry>,
        packages: &[(&str, Vec<String>)],
        dir_mtime: i64,
    ) -> PlanImage {
        let mut view = MergedView::default();
        for e in entries {
            let mut parent = e.path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                if view.get(p).is_none() {
                    view.insert(MergedEntry {
                        entry: other(p, EntryKind::Dir, dir_mtime),
                        layer: 0,
                        data_offset: 0,
                    });
                }
                parent = p;
            }
            view.insert(MergedEntry {
                entry: e,
                layer: 0,
                data_offset: 0,
            });
        }
        let status: String = packages
            .iter()
            .map(|(src, _)| format!("Package: {src}\nSource: {src} (1.0)\n\n"))
            .collect();
        let lists: Vec<(String, Vec<u8>)> = packages
            .iter()
            .map(|(src, paths)| {
                let list: String = paths.iter().map(|p| format!("/{p}\n")).collect();
                (format!("{src}:amd64"), list.into_bytes())
            })
            .collect();
        let packages = PackageDb::from_dpkg(status.as_bytes(), &lists, &view);
        PlanImage {
            name: name.to_string(),
            view,
            packages,
        }
    }

    /// Files of package `pkg` version `ver`: `n` files of `size` bytes.
    fn package(pkg: &str, ver: u32, n: usize, size: u64) -> (Vec<Entry>, (String, Vec<String>)) {
        let entries: Vec<Entry> = (0..n)
            .map(|f| {
                file(
                    &format!("usr/share/{pkg}/f{f}"),
                    size,
                    &format!("{pkg}-{ver}-{f}"),
                    1000 + ver as i64,
                )
            })
            .collect();
        let paths = entries.iter().map(|e| e.path.clone()).collect();
        (entries, (pkg.to_string(), paths))
    }

    fn build(name: &str, versions: &[(&str, u32)], dir_mtime: i64) -> PlanImage {
        let mut entries = vec![
            other("usr/bin", EntryKind::Dir, dir_mtime),
            other("bin", EntryKind::Symlink, dir_mtime),
            other("dev/null", EntryKind::CharDev, dir_mtime),
            other("run/fifo", EntryKind::Fifo, dir_mtime),
            file("etc/generated", 10, &format!("gen{dir_mtime}"), dir_mtime),
        ];
        let mut pkgs = Vec::new();
        for (pkg, ver) in versions {
            let (e, p) = package(pkg, *ver, 4, 1000);
            entries.extend(e);
            pkgs.push(p);
        }
        let mut owned: Vec<(&str, Vec<String>)> = Vec::new();
        for (src, paths) in &pkgs {
            owned.push((src.as_str(), paths.clone()));
        }
        image(name, entries, &owned, dir_mtime)
    }

    fn publish(plan: &Plan) -> Vec<PublishedLayer> {
        plan.layers
            .iter()
            .enumerate()
            .map(|(n, l)| PublishedLayer {
                id: format!("sha256:{n}"),
                entries: l.entries.clone(),
            })
            .collect()
    }

    fn assert_shape(plan: &Plan, opts: &PlanOptions) {
        for (i, ip) in plan.images.iter().enumerate() {
            assert!(
                ip.layers.len() <= opts.max_layers,
                "image {i}: {} layers",
                ip.layers.len()
            );
            let (top, content) = ip.layers.split_last().unwrap();
            for &l in content {
                assert!(
                    plan.layers[l].entries.iter().all(|e| is_content(e.kind)),
                    "content layer {} holds a non-file",
                    plan.layers[l].label
                );
            }
            assert!(
                plan.layers[*top]
                    .entries
                    .iter()
                    .all(|e| !is_content(e.kind))
            );
        }
    }

    #[test]
    fn incremental_reuses_exactly_the_unchanged_packages() {
        let opts = PlanOptions::default();
        let v1 = build(
            "app:v1",
            &[("glibc", 1), ("openssl", 1), ("python", 1), ("zlib", 1)],
            50,
        );
        let p1 = plan(std::slice::from_ref(&v1), &[], &opts).unwrap();
        p1.check(std::slice::from_ref(&v1), &[]).unwrap();
        assert_shape(&p1, &opts);
        assert_eq!(p1.images[0].reused_bytes, 0);
        let top = &p1.layers[*p1.images[0].layers.last().unwrap()];
        assert_eq!(
            top.entries.len(),
            v1.view.len() - 17,
            "every non-file is in the top layer"
        );
        let labels: Vec<&str> = p1.layers.iter().map(|l| l.label.as_str()).collect();
        for pkg in [
            "pkg:glibc",
            "pkg:openssl",
            "pkg:python",
            "pkg:zlib",
            "dir:/",
        ] {
            assert!(labels.contains(&pkg), "{labels:?}");
        }

        let published = publish(&p1);
        let v2 = build(
            "app:v2",
            &[("glibc", 1), ("openssl", 2), ("python", 1), ("zlib", 2)],
            60,
        );
        let p2 = plan(std::slice::from_ref(&v2), &published, &opts).unwrap();
        p2.check(std::slice::from_ref(&v2), &published).unwrap();
        assert_shape(&p2, &opts);
        let ip = &p2.images[0];
        assert_eq!(ip.bound_bytes, 8000);
        assert_eq!(ip.reused_bytes, 8000);
        assert_eq!(ip.file_bytes, 16010);
        let mut reused: Vec<&str> = p2
            .layers
            .iter()
            .filter(|l| matches!(l.source, LayerSource::Reused(_)))
            .map(|l| l.label.as_str())
            .collect();
        reused.sort();
        assert_eq!(reused.len(), 2);
        for (l, pkg) in reused.iter().zip(["pkg:glibc", "pkg:python"]) {
            let LayerSource::Reused(j) = p2.layers.iter().find(|x| x.label == *l).unwrap().source
            else {
                unreachable!()
            };
            assert_eq!(p1.layers[j].label, pkg);
        }
        assert!(ip.mtime_changes.is_empty());

        // The same pair in one call: v2 reuses layers planned for v1.
        let both = [v1.clone(), v2.clone()];
        let p = plan(&both, &[], &opts).unwrap();
        p.check(&both, &[]).unwrap();
        assert_eq!(p.images[1].reused_bytes, 8000);
        assert_eq!(p.images[1].bound_bytes, 8000);
    }

    #[test]
    fn relax_mtime_reuses_restamped_files_and_reports_it() {
        let v1 = build("app:v1", &[("glibc", 1), ("python", 1)], 50);
        let mut v2 = build("app:v2", &[("glibc", 1), ("python", 1)], 60);
        // A rebuild: same content, new mtimes on every glibc file.
        let restamped: Vec<MergedEntry> = v2
            .view
            .iter()
            .filter(|me| me.entry.path.starts_with("usr/share/glibc/"))
            .cloned()
            .collect();
        for mut me in restamped {
            me.entry.mtime += 500;
            v2.view.insert(me);
        }
        let exact = PlanOptions::default();
        let relax = PlanOptions {
            relax_mtime: true,
            ..PlanOptions::default()
        };
        for (opts, reused) in [(&exact, 4000), (&relax, 8000)] {
            let p1 = plan(std::slice::from_ref(&v1), &[], opts).unwrap();
            let published = publish(&p1);
            let p2 = plan(std::slice::from_ref(&v2), &published, opts).unwrap();
            p2.check(std::slice::from_ref(&v2), &published).unwrap();
            let ip = &p2.images[0];
            assert_eq!(ip.reused_bytes, reused);
            assert_eq!(ip.bound_bytes, reused);
            if opts.relax_mtime {
                // Four glibc files back to their v1 mtime, and the top layer of
                // v1 reused with directory mtimes from v1.
                let files: Vec<_> = ip
                    .mtime_changes
                    .iter()
                    .filter(|c| c.0.starts_with("usr/share/glibc/"))
                    .collect();
                assert_eq!(files.len(), 4);
                assert!(
                    files
                        .iter()
                        .all(|(_, old, new)| *old == 1501 && *new == 1001)
                );
            } else {
                assert!(ip.mtime_changes.is_empty());
            }
        }
    }

    #[test]
    fn hardlink_groups_stay_in_one_layer_after_their_primary() {
        let a = file("usr/lib/a", 500, "a", 1);
        let entries = vec![
            a.clone(),
            hardlink("usr/lib/b", &a),
            hardlink("opt/c", &a),
            file("usr/lib/d", 100, "d", 1),
        ];
        let img = image(
            "hl",
            entries,
            &[
                ("pa", vec!["usr/lib/a".into()]),
                ("pc", vec!["opt/c".into()]),
            ],
            5,
        );
        for joint in [false, true] {
            let opts = PlanOptions {
                joint,
                ..PlanOptions::default()
            };
            let p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
            p.check(std::slice::from_ref(&img), &[]).unwrap();
            let holder: Vec<&PlanLayer> = p
                .layers
                .iter()
                .filter(|l| l.entries.iter().any(|e| e.path == "usr/lib/a"))
                .collect();
            assert_eq!(holder.len(), 1);
            let paths: Vec<&str> = holder[0].entries.iter().map(|e| e.path.as_str()).collect();
            let pos = |x: &str| paths.iter().position(|p| *p == x).unwrap();
            assert!(pos("usr/lib/a") < pos("usr/lib/b") && pos("usr/lib/a") < pos("opt/c"));
            assert_eq!(p.images[0].file_bytes, 600);
        }
    }

    #[test]
    fn a_mostly_current_layer_is_reused_with_its_stale_files_shadowed() {
        // One big package; v2 patches one small file and drops another.
        let mut v1_entries: Vec<Entry> = (0..10)
            .map(|f| {
                file(
                    &format!("usr/share/big/f{f}"),
                    10_000,
                    &format!("big-{f}"),
                    1000,
                )
            })
            .collect();
        v1_entries.push(file("usr/share/big/patched", 500, "old", 1000));
        v1_entries.push(file("usr/share/big/dropped", 500, "gone", 1000));
        let paths: Vec<String> = v1_entries.iter().map(|e| e.path.clone()).collect();
        let v1 = image("v1", v1_entries.clone(), &[("big", paths.clone())], 5);
        let mut v2_entries: Vec<Entry> = v1_entries
            .iter()
            .filter(|e| !e.path.ends_with("dropped"))
            .cloned()
            .collect();
        for e in &mut v2_entries {
            if e.path.ends_with("patched") {
                *e = file("usr/share/big/patched", 600, "new", 2000);
            }
        }
        let v2 = image("v2", v2_entries, &[("big", paths)], 6);
        let opts = PlanOptions::default();
        let p1 = plan(std::slice::from_ref(&v1), &[], &opts).unwrap();
        let published = publish(&p1);
        let p2 = plan(std::slice::from_ref(&v2), &published, &opts).unwrap();
        p2.check(std::slice::from_ref(&v2), &published).unwrap();
        let ip = &p2.images[0];
        assert_eq!(
            ip.reused_bytes, 100_000,
            "the ten unchanged files are reused"
        );
        assert_eq!(
            ip.shadowed_bytes, 1000,
            "the patched and dropped files are stale"
        );
        let top = &p2.layers[*ip.layers.last().unwrap()];
        assert!(
            top.entries
                .iter()
                .any(|e| e.path == "usr/share/big/.wh.dropped"),
            "the dropped file is whited out in the top layer"
        );
        let new_has_patched = ip.layers.iter().any(|&l| {
            matches!(p2.layers[l].source, LayerSource::New)
                && p2.layers[l]
                    .entries
                    .iter()
                    .any(|e| e.path == "usr/share/big/patched" && e.size == 600)
        });
        assert!(
            new_has_patched,
            "the new version of the patched file is in a new layer"
        );
    }

    #[test]
    fn layer_cap_holds_in_incremental_mode() {
        let pkgs: Vec<(String, u32)> = (0..30).map(|n| (format!("p{n:02}"), 1)).collect();
        let refs: Vec<(&str, u32)> = pkgs.iter().map(|(p, v)| (p.as_str(), *v)).collect();
        let img = build("many", &refs, 1);
        let opts = PlanOptions {
            max_layers: 6,
            ..PlanOptions::default()
        };
        let p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
        p.check(std::slice::from_ref(&img), &[]).unwrap();
        assert_shape(&p, &opts);
        assert_eq!(p.images[0].layers.len(), 6);
        assert_eq!(p.images[0].duplicated_bytes, 0);
    }

    #[test]
    fn joint_mode_shares_broadest_first_and_pays_for_the_cap() {
        // Four images; every pair shares one package, each has its own.
        let names = ["a", "b", "c", "d"];
        let mut images = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut vers: Vec<(String, u32)> =
                vec![("common".into(), 1), (format!("own{name}"), 1)];
            for (j, other) in names.iter().enumerate() {
                if i != j {
                    let (x, y) = if i < j { (name, other) } else { (other, name) };
                    vers.push((format!("pair{x}{y}"), 1));
                }
            }
            let refs: Vec<(&str, u32)> = vers.iter().map(|(p, v)| (p.as_str(), *v)).collect();
            images.push(build(&format!("img:{name}"), &refs, i as i64));
        }
        let opts = PlanOptions {
            joint: true,
            ..PlanOptions::default()
        };
        let p = plan(&images, &[], &opts).unwrap();
        p.check(&images, &[]).unwrap();
        assert_shape(&p, &opts);
        for ip in &p.images {
            let users: Vec<usize> = ip.layers.iter().map(|&l| p.layers[l].users.len()).collect();
            let content = &users[..users.len() - 1];
            assert!(
                content.windows(2).all(|w| w[0] >= w[1]),
                "not broadest-first: {users:?}"
            );
            assert_eq!(content[0], 4);
            assert_eq!(ip.duplicated_bytes, 0);
        }
        // Each shared package stored once.
        let stored: u64 = p.layers.iter().map(|l| file_bytes_of(&l.entries)).sum();
        let distinct: u64 = 4000 + 4 * 4000 + 6 * 4000 + 4 * 10;
        assert_eq!(stored, distinct);

        // A cap of 4: common + own + top leave one layer for three pair groups.
        let capped = PlanOptions {
            max_layers: 4,
            ..opts.clone()
        };
        let p = plan(&images, &[], &capped).unwrap();
        p.check(&images, &[]).unwrap();
        assert_shape(&p, &capped);
        let dup: u64 = p.images.iter().map(|i| i.duplicated_bytes).sum();
        let stored: u64 = p.layers.iter().map(|l| file_bytes_of(&l.entries)).sum();
        assert!(dup > 0);
        assert_eq!(
            stored,
            distinct + dup,
            "duplicated bytes are what the cap costs"
        );
    }

    #[test]
    fn joint_relax_keeps_the_first_images_mtime() {
        let a = image("a", vec![file("usr/x", 10, "x", 1)], &[], 1);
        let b = image("b", vec![file("usr/x", 10, "x", 2)], &[], 1);
        let opts = PlanOptions {
            joint: true,
            relax_mtime: true,
            ..PlanOptions::default()
        };
        let both = [a, b];
        let p = plan(&both, &[], &opts).unwrap();
        p.check(&both, &[]).unwrap();
        assert!(p.images[0].mtime_changes.is_empty());
        assert_eq!(p.images[1].mtime_changes, vec![("usr/x".to_string(), 2, 1)]);
        assert_eq!(
            p.layers.iter().filter(|l| l.users.len() == 2).count(),
            2,
            "the file and the identical top"
        );
    }

    #[test]
    fn check_catches_a_wrong_plan() {
        let img = build("x", &[("glibc", 1)], 1);
        let opts = PlanOptions::default();
        let mut p = plan(std::slice::from_ref(&img), &[], &opts).unwrap();
        let l = p.images[0].layers[0];
        p.layers[l].entries.pop();
        let err = p.check(std::slice::from_ref(&img), &[]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(
            plan(
                std::slice::from_ref(&img),
                &[],
                &PlanOptions {
                    max_layers: 1,
                    ..opts
                }
            )
            .is_err()
        );
    }

    #[test]
    fn pack_keeps_big_units_alone_and_bundles_small_ones() {
        let units: Vec<Unit> = [1000u64, 900, 10, 9, 8, 7, 6, 5]
            .iter()
            .enumerate()
            .map(|(n, &bytes)| Unit {
                key: format!("u{n}"),
                members: vec![n],
                bytes,
                p: P_PACKAGE,
            })
            .collect();
        let bins = pack(&units, 4);
        assert_eq!(bins.len(), 4);
        assert_eq!(bins[0], vec![0]);
        assert_eq!(bins[1], vec![1]);
        let mut all: Vec<usize> = bins.concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    /// A random family of images: a pool of files, each image takes some,
    /// some files change content or mtime per image, plus hard links,
    /// symlinks and fifos.
    fn family() -> impl Strategy<Value = Vec<PlanImage>> {
        let pool = prop::collection::vec((0u8..6, 0u8..6, 1u64..5000, 0u8..8), 1..40);
        let per_image =
            prop::collection::vec((prop::collection::vec(any::<u8>(), 40), any::<u8>()), 1..5);
        (pool, per_image).prop_map(|(pool, imgs)| {
            imgs.iter()
                .enumerate()
                .map(|(i, (picks, seed))| {
                    let mut entries = Vec::new();
                    let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    let mut primaries: Vec<Entry> = Vec::new();
                    for (n, (d, pkg, size, how)) in pool.iter().enumerate() {
                        let pick = picks[n];
                        if pick % 4 == 0 {
                            continue;
                        }
                        let path = format!("d{d}/s{}/f{n}", n % 3);
                        let changed = pick % 5 == 0;
                        let content = if changed {
                            format!("{n}-{i}")
                        } else {
                            format!("{n}")
                        };
                        let mtime = if pick % 7 == 0 { i as i64 } else { 0 };
                        let mut e = file(&path, *size, &content, mtime);
                        if how % 3 == 0 {
                            e.mode = 0o755;
                        }
                        match how {
                            7 if !primaries.is_empty() => {
                                let p = &primaries[n % primaries.len()];
                                entries.push(hardlink(&format!("{path}.hl"), p));
                            }
                            6 => entries.push(other(
                                &format!("{path}.ln"),
                                EntryKind::Symlink,
                                i as i64,
                            )),
                            5 => entries.push(other(&format!("{path}.p"), EntryKind::Fifo, 0)),
                            _ => {}
                        }
                        if *pkg < 4 {
                            owned
                                .entry(format!("src{pkg}"))
                                .or_default()
                                .push(path.clone());
                        }
                        primaries.push(e.clone());
                        entries.push(e);
                    }
                    // Hard links must sort after their primary: rename targets canonically.
                    let mut fixed = Vec::new();
                    for e in entries {
                        if e.kind == EntryKind::Hardlink && e.path < e.link {
                            continue;
                        }
                        fixed.push(e);
                    }
                    let pk: Vec<(&str, Vec<String>)> =
                        owned.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                    image(&format!("img{i}"), fixed, &pk, *seed as i64 % 3)
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn plans_rebuild_every_view(images in family(), max_layers in 2usize..8, relax in any::<bool>()) {
            for joint in [false, true] {
                let opts = PlanOptions { max_layers, relax_mtime: relax, joint, target_layer_bytes: 8000 };
                let p = plan(&images, &[], &opts).unwrap();
                prop_assert!(p.check(&images, &[]).is_ok(), "{:?}", p.check(&images, &[]).err());
                for ip in &p.images {
                    prop_assert!(ip.layers.len() <= max_layers);
                    prop_assert!(ip.reused_bytes <= ip.file_bytes);
                }
                // And incrementally on top of the first plan's layers.
                let published = publish(&p);
                let inc = PlanOptions { joint: false, ..opts };
                let q = plan(&images, &published, &inc).unwrap();
                prop_assert!(q.check(&images, &published).is_ok(), "{:?}", q.check(&images, &published).err());
                for (i, ip) in q.images.iter().enumerate() {
                    prop_assert!(ip.layers.len() <= max_layers);
                    if !relax {
                        prop_assert!(
                            ip.reused_bytes <= ip.bound_bytes,
                            "image {}: reused {} bytes, bound {}", i, ip.reused_bytes, ip.bound_bytes
                        );
                    }
                }
            }
        }
    }
}
