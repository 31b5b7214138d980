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
    let mut stale = 0usize;
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
                    stale += 1;
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
                    stale += 1;
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
    if !others.is_empty() && stale > 0 {
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
    /// Current bytes of the picks that hold stale files.
    pub(super) stale_bought: u64,
}

/// At most this many stale bytes over all of an image's reused layers, as
/// a fraction of the image's file bytes: each stale byte makes the image
/// that much bigger than its original for a node that fetches it fresh.
/// The layers with the least reuse per stale byte are given up first.
const MAX_STALE_SHARE: f64 = 0.03;

/// Branch-and-bound steps per group of conflicting candidates; past it
/// the best choice found so far stands (never worse than greedy).
const SEARCH_STEPS: usize = 200_000;

/// Over the stale budget, all candidates are searched at once only when
/// at most this many (each step costs a pass over them).
const GLOBAL_SEARCH_MAX: usize = 64;

/// Which candidate layers to reuse: the most current bytes in layers no
/// two of which hold a common path (a stale file may not hide a file
/// another pick provides), with at most [`MAX_STALE_SHARE`] of the image
/// stale, at most `limit` of them.
///
/// Candidates conflict only through common paths, so the choice is a
/// maximum-weight independent set of the conflict graph, solved exactly
/// per connected group (small in practice: one group per package that
/// several published layers hold) with a greedy start; over the stale
/// budget, all groups are searched at once under it. Being exact (within
/// [`SEARCH_STEPS`]), more candidates never lower the bytes reused (the cap
/// aside), so reuse across a whole destination is at least reuse of the
/// image's own previous version alone.
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
    let adj = conflicts(&matches, cands);
    let budget = (MAX_STALE_SHARE * p.file_bytes as f64) as u64;
    let mut picked = select(&matches, &adj, budget, 0);
    if picked.len() > limit {
        // Too many layers: charge a price per layer, the least (among the
        // layers' sizes) at which the best set fits the cap, so that a few
        // big layers beat many small ones that together hold a little more.
        let mut prices: Vec<u64> = matches.iter().map(|(_, m)| m.bytes).collect();
        prices.sort_unstable();
        prices.dedup();
        let (mut lo, mut hi) = (0, prices.len() - 1);
        let mut best = select(&matches, &adj, budget, prices[hi]);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let set = select(&matches, &adj, budget, prices[mid]);
            if set.len() <= limit {
                hi = mid;
                best = set;
            } else {
                lo = mid + 1;
            }
        }
        if best.len() <= limit {
            picked = best;
        }
    }
    let mut r = Reuse {
        picks: Vec::new(),
        covered_items: vec![false; p.items.len()],
        covered_others: vec![false; p.others.len()],
        changes: Vec::new(),
        whiteouts: Vec::new(),
        stale_bought: 0,
    };
    // `picked` is in candidate order: most bytes first, so the cap keeps those.
    for k in picked.into_iter().take(limit) {
        let (c, m) = &matches[k];
        for &n in &m.items {
            r.covered_items[n] = true;
        }
        for &n in &m.others {
            r.covered_others[n] = true;
        }
        r.changes.extend(m.changes.iter().cloned());
        r.whiteouts.extend(m.removed.iter().cloned());
        if m.stale_bytes > 0 {
            r.stale_bought += m.bytes;
        }
        r.picks.push((*c, !m.others.is_empty(), m.stale_bytes));
    }
    r.whiteouts.sort();
    r
}

/// The best set of matches within `budget` stale bytes, each counted at
/// its bytes less `price` (those not worth the price left out), in match
/// order.
fn select(matches: &[(usize, Match)], adj: &[Vec<usize>], budget: u64, price: u64) -> Vec<usize> {
    let mut allowed: Vec<bool> = matches.iter().map(|(_, m)| m.bytes > price).collect();
    let mut picked = best_set(matches, adj, &allowed, price);
    let stale = |set: &[usize]| set.iter().map(|&k| matches[k].1.stale_bytes).sum::<u64>();
    if stale(&picked) <= budget {
        return picked;
    }
    // Over the stale budget: give up the stale layers that buy the least
    // reuse per stale byte until within it, then (when few enough to
    // search) search every group at once under the budget from there.
    while stale(&picked) > budget {
        let worst = picked
            .iter()
            .copied()
            .filter(|&k| matches[k].1.stale_bytes > 0)
            .min_by(|&a, &b| {
                let r = |k: usize| matches[k].1.bytes as f64 / matches[k].1.stale_bytes as f64;
                r(a).total_cmp(&r(b)).then(b.cmp(&a))
            });
        let Some(k) = worst else { break };
        allowed[k] = false;
        picked = best_set(matches, adj, &allowed, price);
    }
    let open: Vec<usize> = (0..matches.len())
        .filter(|&k| matches[k].1.bytes > price)
        .collect();
    if open.len() <= GLOBAL_SEARCH_MAX {
        picked = Search::run(&open, matches, adj, budget, price, picked);
    }
    picked
}

/// For each match, the matches it shares a path with.
fn conflicts(matches: &[(usize, Match)], cands: &[&[Entry]]) -> Vec<Vec<usize>> {
    let mut holders: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, (c, _)) in matches.iter().enumerate() {
        for e in cands[*c].iter().filter(|e| !is_landmark(&e.path)) {
            holders.entry(e.path.as_str()).or_default().push(k);
        }
    }
    let mut adj: Vec<HashSet<usize>> = vec![HashSet::new(); matches.len()];
    for ks in holders.values().filter(|ks| ks.len() > 1) {
        for &a in ks {
            adj[a].extend(ks.iter().copied().filter(|&b| b != a));
        }
    }
    adj.into_iter()
        .map(|s| {
            let mut v: Vec<usize> = s.into_iter().collect();
            v.sort_unstable();
            v
        })
        .collect()
}

/// The allowed matches of most current bytes, no two in conflict, in
/// match order.
fn best_set(
    matches: &[(usize, Match)],
    adj: &[Vec<usize>],
    allowed: &[bool],
    price: u64,
) -> Vec<usize> {
    let mut out = Vec::new();
    let mut seen = vec![false; matches.len()];
    for start in 0..matches.len() {
        if seen[start] || !allowed[start] {
            continue;
        }
        // One connected group of allowed matches, in match order.
        let mut group = vec![start];
        seen[start] = true;
        let mut i = 0;
        while i < group.len() {
            for &b in &adj[group[i]] {
                if allowed[b] && !seen[b] {
                    seen[b] = true;
                    group.push(b);
                }
            }
            i += 1;
        }
        group.sort_unstable();
        out.extend(Search::run(
            &group,
            matches,
            adj,
            u64::MAX,
            price,
            Vec::new(),
        ));
    }
    out.sort_unstable();
    out
}

/// Branch and bound over a group of matches: take or leave each match in
/// order, within a budget of stale bytes, pruning when even taking every
/// match left cannot beat the best.
struct Search<'a> {
    weight: Vec<u64>,
    stale: Vec<u64>,
    budget: u64,
    spent: u64,
    /// Conflicts within the group, by position in it.
    adj: Vec<Vec<usize>>,
    group: &'a [usize],
    blocked: Vec<u32>,
    chosen: Vec<usize>,
    best: (u64, Vec<usize>),
    steps: usize,
}

impl<'a> Search<'a> {
    /// The best set of `group` (match indices, in match order) within
    /// `budget` stale bytes; `seed`, a valid set, is the one to beat.
    fn run(
        group: &'a [usize],
        matches: &[(usize, Match)],
        adj: &[Vec<usize>],
        budget: u64,
        price: u64,
        seed: Vec<usize>,
    ) -> Vec<usize> {
        let pos: HashMap<usize, usize> = group.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        let mut s = Search {
            weight: group
                .iter()
                .map(|&k| matches[k].1.bytes.saturating_sub(price))
                .collect(),
            stale: group.iter().map(|&k| matches[k].1.stale_bytes).collect(),
            budget,
            spent: 0,
            adj: group
                .iter()
                .map(|&k| adj[k].iter().filter_map(|b| pos.get(b).copied()).collect())
                .collect(),
            group,
            blocked: vec![0; group.len()],
            chosen: Vec::new(),
            best: (0, Vec::new()),
            steps: 0,
        };
        // Greedy first: the bound to beat, and the answer if the search is cut short.
        for i in 0..group.len() {
            if s.fits(i) {
                s.take(i);
            }
        }
        s.best = (
            s.chosen.iter().map(|&i| s.weight[i]).sum(),
            s.chosen.clone(),
        );
        while !s.chosen.is_empty() {
            s.untake();
        }
        let seed: Vec<usize> = seed.iter().filter_map(|k| pos.get(k).copied()).collect();
        let seed_weight: u64 = seed.iter().map(|&i| s.weight[i]).sum();
        if seed_weight > s.best.0 {
            s.best = (seed_weight, seed);
        }
        if group.len() > 1 {
            s.branch(0, 0);
        }
        let mut out: Vec<usize> = s.best.1.iter().map(|&i| group[i]).collect();
        out.sort_unstable();
        out
    }

    fn fits(&self, i: usize) -> bool {
        self.blocked[i] == 0 && self.spent.saturating_add(self.stale[i]) <= self.budget
    }

    fn take(&mut self, i: usize) {
        self.chosen.push(i);
        self.spent += self.stale[i];
        for b in 0..self.adj[i].len() {
            let j = self.adj[i][b];
            self.blocked[j] += 1;
        }
    }

    fn untake(&mut self) {
        if let Some(i) = self.chosen.pop() {
            self.spent -= self.stale[i];
            for b in 0..self.adj[i].len() {
                let j = self.adj[i][b];
                self.blocked[j] -= 1;
            }
        }
    }

    fn branch(&mut self, i: usize, have: u64) {
        self.steps += 1;
        if self.steps > SEARCH_STEPS {
            return;
        }
        if i == self.group.len() {
            if have > self.best.0 {
                self.best = (have, self.chosen.clone());
            }
            return;
        }
        let open: u64 = (i..self.group.len())
            .filter(|&j| self.fits(j))
            .map(|j| self.weight[j])
            .sum();
        if have + open <= self.best.0 {
            return;
        }
        if self.fits(i) {
            self.take(i);
            self.branch(i + 1, have + self.weight[i]);
            self.untake();
        }
        self.branch(i + 1, have);
    }
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
