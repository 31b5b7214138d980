//! Units and packing: cutting an image's new files into units that future
//! versions keep or change together, and packing units into layers.

use std::collections::{BTreeMap, HashMap};

use breakfs_index::Entry;

use super::items::Item;
use super::types::PlanOptions;
use crate::dpkg::PackageDb;

/// Chance that a package unit changes between two versions of an image.
pub(super) const P_PACKAGE: f64 = 0.1;
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

/// A set of items that future versions are expected to keep or change
/// together.
#[derive(Clone, Debug)]
pub(super) struct Unit {
    pub(super) key: String,
    pub(super) members: Vec<usize>,
    pub(super) bytes: u64,
    pub(super) p: f64,
    /// Units of one class tend to be held together by other images; see
    /// [`pack_by_class`].
    pub(super) class: usize,
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
pub(super) fn cut_units(items: &[&Item], db: &PackageDb, opts: &PlanOptions) -> Vec<Unit> {
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    let mut add = |key: String, p: f64, n: usize, bytes: u64| {
        let u = units.entry(key.clone()).or_insert(Unit {
            key,
            members: Vec::new(),
            bytes: 0,
            p,
            class: usize::MAX,
        });
        u.members.push(n);
        u.bytes += bytes;
        u.class = u.class.min(items[n].layer);
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
        for (part, members, p) in [("bin", bin, P_BINARY), ("data", data, P_DATA)] {
            out.push(Unit {
                key: format!("{}#{part}", u.key),
                bytes: members.iter().map(|&n| items[n].bytes).sum(),
                members,
                p,
                class: u.class,
            });
        }
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
pub(super) fn pack(units: &[Unit], k: usize) -> Vec<Vec<usize>> {
    let order = by_size(units, (0..units.len()).collect());
    let runs = Runs::new(units, &order, k);
    stable_first(units, runs.bins(&order, k.min(order.len())))
}

/// `bins` in stack order, bottom first: by class (the original image's
/// lower layers first, as its base image is), then least likely to change
/// first. containerd and other runtimes skip every layer of a stack
/// whose chain of layers below it they already hold (the ChainID), so the
/// next version of the image, which reuses this one's layers in this
/// order, finds the longest run of them from the bottom unchanged when
/// the layers that change least come first.
fn stable_first(units: &[Unit], mut bins: Vec<Vec<usize>>) -> Vec<Vec<usize>> {
    let class = |bin: &[usize]| bin.iter().map(|&u| units[u].class).min().unwrap_or(0);
    let change = |bin: &[usize]| {
        1.0 - bin
            .iter()
            .map(|&u| 1.0 - units[u].p.clamp(0.0, 1.0))
            .product::<f64>()
    };
    // Stable sort: among equals the packing's order (largest first) stays.
    bins.sort_by(|a, b| {
        class(a)
            .cmp(&class(b))
            .then_with(|| change(a).total_cmp(&change(b)))
    });
    bins
}

/// Pack units into at most `k` bins, never two classes in one bin while
/// the bins suffice: a layer is reusable by another image only if that
/// image holds all of it, and units of one class (files that came in one
/// layer of the original image, e.g. its base image's) are held together
/// by other images far more often than units of different classes. Each
/// class is packed as [`pack`] does, with its number of bins chosen to
/// minimise the expected loss summed over classes.
pub(super) fn pack_by_class(units: &[Unit], k: usize) -> Vec<Vec<usize>> {
    let mut classes: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (u, unit) in units.iter().enumerate() {
        classes.entry(unit.class).or_default().push(u);
    }
    if classes.len() <= 1 || classes.len() > k {
        return pack(units, k);
    }
    let orders: Vec<Vec<usize>> = classes
        .into_values()
        .map(|members| by_size(units, members))
        .collect();
    let runs: Vec<Runs> = orders.iter().map(|o| Runs::new(units, o, k)).collect();
    // alloc[c][t]: least loss packing the first c classes into t bins.
    let c_n = orders.len();
    let mut alloc = vec![vec![f64::INFINITY; k + 1]; c_n + 1];
    let mut took = vec![vec![0usize; k + 1]; c_n + 1];
    alloc[0][0] = 0.0;
    for c in 1..=c_n {
        let most = orders[c - 1].len().min(k);
        for t in 1..=k {
            for j in 1..=most.min(t) {
                let v = alloc[c - 1][t - j] + runs[c - 1].loss(j);
                if v < alloc[c][t] {
                    alloc[c][t] = v;
                    took[c][t] = j;
                }
            }
        }
    }
    let Some(mut t) = (1..=k)
        .filter(|&t| alloc[c_n][t].is_finite())
        .min_by(|&a, &b| alloc[c_n][a].total_cmp(&alloc[c_n][b]).then(a.cmp(&b)))
    else {
        return pack(units, k);
    };
    let mut bins = Vec::new();
    for c in (1..=c_n).rev() {
        let j = took[c][t];
        bins.extend(runs[c - 1].bins(&orders[c - 1], j));
        t -= j;
    }
    stable_first(units, bins)
}

/// `members` sorted largest first (key order among equals).
fn by_size(units: &[Unit], mut members: Vec<usize>) -> Vec<usize> {
    members.sort_by(|&a, &b| {
        units[b]
            .bytes
            .cmp(&units[a].bytes)
            .then_with(|| units[a].key.cmp(&units[b].key))
    });
    members
}

/// The dynamic programme of [`pack`] over units in one order: the least
/// expected loss of every number of contiguous runs up to a cap.
struct Runs {
    /// best[j][i]: least expected loss packing the first i units in j runs.
    best: Vec<Vec<f64>>,
    from: Vec<Vec<usize>>,
}

impl Runs {
    fn new(units: &[Unit], order: &[usize], k: usize) -> Runs {
        let n = order.len();
        let k = k.min(n);
        let mut bytes = vec![0f64; n + 1];
        let mut logq = vec![0f64; n + 1];
        for (i, &u) in order.iter().enumerate() {
            bytes[i + 1] = bytes[i] + units[u].bytes as f64;
            logq[i + 1] = logq[i] + (1.0 - units[u].p.clamp(0.0, 0.999_999)).ln();
        }
        let cost = |a: usize, b: usize| (bytes[b] - bytes[a]) * (1.0 - (logq[b] - logq[a]).exp());
        let mut best = vec![vec![f64::INFINITY; n + 1]; k + 1];
        let mut from = vec![vec![0usize; n + 1]; k + 1];
        best[0][0] = 0.0;
        for j in 1..=k {
            for i in j..=n {
                for m in (j - 1)..i {
                    let c = best[j - 1][m] + cost(m, i);
                    if c < best[j][i] {
                        best[j][i] = c;
                        from[j][i] = m;
                    }
                }
            }
        }
        Runs { best, from }
    }

    /// Least loss with `j` runs over all the units.
    fn loss(&self, j: usize) -> f64 {
        let n = self.best[0].len() - 1;
        self.best.get(j).map_or(f64::INFINITY, |b| b[n])
    }

    /// The `j` runs of least loss, as bins of units.
    fn bins(&self, order: &[usize], j: usize) -> Vec<Vec<usize>> {
        let mut bins = Vec::with_capacity(j);
        let mut i = order.len();
        for r in (1..=j).rev() {
            let m = self.from[r][i];
            bins.push(order[m..i].to_vec());
            i = m;
        }
        bins.reverse();
        bins
    }
}

/// Entries of a content layer holding `items`, in write order.
pub(super) fn layer_entries<'a>(items: impl IntoIterator<Item = &'a Item>) -> Vec<Entry> {
    let mut items: Vec<&Item> = items.into_iter().collect();
    items.sort_by(|a, b| a.entries[0].path.cmp(&b.entries[0].path));
    items
        .iter()
        .flat_map(|i| i.entries.iter().cloned())
        .collect()
}

pub(super) fn bin_label(units: &[Unit], bin: &[usize]) -> String {
    match bin {
        [one] => units[*one].key.clone(),
        _ => {
            let names: Vec<&str> = bin.iter().take(3).map(|&u| units[u].key.as_str()).collect();
            let more = if bin.len() > 3 { ",…" } else { "" };
            format!("bundle:{} units ({}{more})", bin.len(), names.join(","))
        }
    }
}
