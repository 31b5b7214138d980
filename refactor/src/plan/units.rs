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
        for (part, members, p) in [("bin", bin, P_BINARY), ("data", data, P_DATA)] {
            out.push(Unit {
                key: format!("{}#{part}", u.key),
                bytes: members.iter().map(|&n| items[n].bytes).sum(),
                members,
                p,
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
