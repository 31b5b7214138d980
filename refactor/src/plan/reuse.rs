//! Reuse: which published (or earlier planned) layers an image can take
//! whole, and the bound no plan can beat.

use std::collections::{HashMap, HashSet};

use breakfs_index::{Entry, EntryKind};

use super::items::{Prepared, is_content, is_landmark, parent_of, same};

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

/// The whiteout entry that hides `path` of a lower layer.
pub(super) fn whiteout(path: &str) -> Entry {
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
pub(super) struct Reuse {
    /// (candidate, whether it holds top entries, stale bytes in it).
    pub(super) picks: Vec<(usize, bool, u64)>,
    pub(super) covered_items: Vec<bool>,
    pub(super) covered_others: Vec<bool>,
    pub(super) changes: Vec<(String, i64, i64)>,
    /// Whiteouts the top layer needs for stale files of reused layers.
    pub(super) whiteouts: Vec<String>,
}

/// Greedy reuse: layers with the most current bytes first, never two with
/// a path in common, no stale file over a file another pick provides, at
/// most `limit` of them.
pub(super) fn choose_reuse(p: &Prepared, cands: &[&[Entry]], relax: bool, limit: usize) -> Reuse {
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

/// File entries known to be published before the image being planned:
/// published layers, and in incremental mode the layers made for earlier
/// images of the call. They set each image's bound.
#[derive(Default)]
pub(super) struct Known(HashMap<String, Vec<Entry>>);

impl Known {
    /// Record the regular files of a layer's entries.
    pub(super) fn remember(&mut self, entries: &[Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
            self.0.entry(e.path.clone()).or_default().push(e.clone());
        }
    }

    /// Bytes of the image's files whose entry is known: no plan reuses more.
    pub(super) fn bound(&self, p: &Prepared, relax: bool) -> u64 {
        p.items
            .iter()
            .filter(|it| {
                self.0
                    .get(&it.entries[0].path)
                    .is_some_and(|v| v.iter().any(|e| same(e, &it.entries[0], relax)))
            })
            .map(|it| it.bytes)
            .sum()
    }
}
