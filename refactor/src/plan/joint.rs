//! Joint mode: plan every image at once. Files are grouped by the exact
//! set of images that hold them, one shared layer (or several, cut by
//! unit) per group; where an image would pass the layer cap, the cheapest
//! groups are dissolved into groups of subsets of their images or into
//! private copies, and the bytes that costs are reported as duplicated.

use std::collections::{BTreeMap, HashMap};

use breakfs_index::Entry;

use super::builder::{Builder, Stack};
use super::items::{Item, Prepared};
use super::reuse::{Known, Reuse, choose_reuse};
use super::types::{ImagePlan, LayerSource, PlanImage, PlanOptions, PublishedLayer};
use super::units::{Unit, bin_label, cut_units, layer_entries, pack};

/// Joint mode splits a group into more layers only while each stays this big.
const JOINT_SPLIT_MIN_BYTES: u64 = 1 << 20;

/// `(path, old mtime, new mtime)`, as in [`ImagePlan::mtime_changes`].
type MtimeChange = (String, i64, i64);

/// One distinct item and the images that hold it; the first image's copy
/// is the one stored.
struct Occurrence {
    img: usize,
    item: usize,
    set: Vec<usize>,
}

/// The items held by one set of images, stored in `k` layers.
struct Group {
    set: Vec<usize>,
    /// `(image, item)` of each stored copy.
    items: Vec<(usize, usize)>,
    units: Vec<Unit>,
    bytes: u64,
    k: usize,
    /// False once dissolved.
    alive: bool,
}

impl Group {
    /// An empty group of one image's private files.
    fn private(i: usize) -> Group {
        Group {
            set: vec![i],
            items: Vec::new(),
            units: Vec::new(),
            bytes: 0,
            k: 1,
            alive: true,
        }
    }
}

/// Every group, and what each image holds outside them.
struct Groups {
    groups: Vec<Group>,
    /// Layers each image has besides group layers: its reused layers and its top.
    base: Vec<usize>,
    /// Bytes duplicated for each image by dissolving groups.
    duplicated: Vec<u64>,
}

/// A way to dissolve a group to meet the layer cap.
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

impl Builder {
    /// Plan all `images` at once on top of `published`.
    pub(super) fn joint(
        &mut self,
        images: &[PlanImage],
        preps: &[Prepared],
        published: &[PublishedLayer],
        opts: &PlanOptions,
    ) {
        self.tops = Some(HashMap::new());
        let reuses = choose_reuses(preps, published, opts);
        let (occurrences, mtime_changes) = occurrences(preps, &reuses, opts.relax_mtime);
        let mut groups = Groups::by_image_set(&occurrences, images, preps, &reuses, opts);
        groups.meet_layer_cap(opts.max_layers);
        groups.recut(images, preps, opts);
        groups.spend_spare_layers(opts.max_layers);
        let new = self.add_group_layers(&groups, images, preps);
        self.plan.images = mtime_changes
            .into_iter()
            .map(|mtime_changes| ImagePlan {
                mtime_changes,
                ..ImagePlan::default()
            })
            .collect();
        // Every image's stack: its reused layers, its groups' layers, its top.
        let mut known = Known::default();
        for l in published {
            known.remember(&l.entries);
        }
        for (i, ((img, p), new)) in images.iter().zip(preps).zip(new).enumerate() {
            let picks: Vec<(usize, bool)> = reuses[i]
                .picks
                .iter()
                .map(|&(c, top, _)| (self.reuse_published(c, published), top))
                .collect();
            let stack = Stack {
                reuse: &reuses[i],
                picks,
                new,
                bound: known.bound(p, opts.relax_mtime),
                duplicated: groups.duplicated[i],
            };
            self.finish_image(i, img, p, stack);
        }
    }

    /// Write each live group's layers, broadest image set first (then by
    /// set, so that stacks below a shared layer agree where they can);
    /// returns each image's new content layers, bottom first.
    fn add_group_layers(
        &mut self,
        groups: &Groups,
        images: &[PlanImage],
        preps: &[Prepared],
    ) -> Vec<Vec<usize>> {
        let groups = &groups.groups;
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
            let refs = items_of(&g.items, preps);
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
        image_new
    }
}

/// Each image's reuse of published layers.
fn choose_reuses(
    preps: &[Prepared],
    published: &[PublishedLayer],
    opts: &PlanOptions,
) -> Vec<Reuse> {
    let cands: Vec<&[Entry]> = published.iter().map(|l| l.entries.as_slice()).collect();
    preps
        .iter()
        .map(|p| choose_reuse(p, &cands, opts.relax_mtime, opts.max_layers - 2))
        .collect()
}

/// The distinct items that reuse leaves to store, each with the images that
/// hold it, and per image the mtime changes of copies that are not the
/// stored one (they differ in mtime only, with `relax`).
fn occurrences(
    preps: &[Prepared],
    reuses: &[Reuse],
    relax: bool,
) -> (Vec<Occurrence>, Vec<Vec<MtimeChange>>) {
    let mut occs: Vec<Occurrence> = Vec::new();
    let mut changes: Vec<Vec<MtimeChange>> = vec![Vec::new(); preps.len()];
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
                            changes[i].push((mine.path.clone(), mine.mtime, theirs.mtime));
                        }
                    }
                }
                None => {
                    index.insert(key, occs.len());
                    occs.push(Occurrence {
                        img: i,
                        item: n,
                        set: vec![i],
                    });
                }
            }
        }
    }
    (occs, changes)
}

/// The items behind `(image, item)` pairs.
fn items_of<'a>(pairs: &[(usize, usize)], preps: &'a [Prepared]) -> Vec<&'a Item> {
    pairs.iter().map(|&(i, n)| &preps[i].items[n]).collect()
}

impl Groups {
    /// One group per image set, each cut into units by its first image's
    /// packages, one layer each.
    fn by_image_set(
        occs: &[Occurrence],
        images: &[PlanImage],
        preps: &[Prepared],
        reuses: &[Reuse],
        opts: &PlanOptions,
    ) -> Groups {
        let mut by_set: BTreeMap<Vec<usize>, Vec<(usize, usize)>> = BTreeMap::new();
        for o in occs {
            by_set
                .entry(o.set.clone())
                .or_default()
                .push((o.img, o.item));
        }
        let groups = by_set
            .into_iter()
            .map(|(set, items)| {
                let refs = items_of(&items, preps);
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
        Groups {
            groups,
            base: reuses.iter().map(|r| r.picks.len() + 1).collect(),
            duplicated: vec![0; images.len()],
        }
    }

    /// Layers in each image's stack as the groups stand.
    fn counts(&self) -> Vec<usize> {
        let mut c = self.base.clone();
        for g in self.groups.iter().filter(|g| g.alive) {
            for &i in &g.set {
                c[i] += g.k;
            }
        }
        c
    }

    /// Each image's live private group (set of one), by image.
    fn private(&self) -> HashMap<usize, usize> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.alive && g.set.len() == 1)
            .map(|(n, g)| (g.set[0], n))
            .collect()
    }

    /// Dissolve the cheapest groups of over-cap images until every image
    /// fits `max_layers` or no group is left to dissolve.
    fn meet_layer_cap(&mut self, max_layers: usize) {
        loop {
            let over: Vec<bool> = self.counts().iter().map(|&n| n > max_layers).collect();
            if !over.iter().any(|&o| o) {
                break;
            }
            let Some(d) = self.cheapest_dissolve(&over) else {
                break;
            };
            self.dissolve(d);
        }
    }

    /// The shared group whose dissolving helps an over-cap image (`over`)
    /// at the least duplicated bytes (or, if none helps, the cheapest).
    fn cheapest_dissolve(&self, over: &[bool]) -> Option<Dissolve> {
        let groups = &self.groups;
        let private = self.private();
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
        best
    }

    /// Move a dissolved group's items into the groups that cover it and
    /// the private groups of the images left; every copy but the first is
    /// a duplicate, charged to the first image that holds it.
    fn dissolve(&mut self, d: Dissolve) {
        let private = self.private();
        let Dissolve {
            group: gi,
            covers,
            left,
            ..
        } = d;
        let groups = &mut self.groups;
        groups[gi].alive = false;
        let moved = std::mem::take(&mut groups[gi].items);
        let bytes = groups[gi].bytes;
        for &t in covers.iter().skip(1) {
            self.duplicated[groups[t].set[0]] += bytes;
        }
        let mut targets = covers;
        for (n, &i) in left.iter().enumerate() {
            if n > 0 || !targets.is_empty() {
                self.duplicated[i] += bytes;
            }
            let t = match private.get(&i) {
                Some(&t) => t,
                None => {
                    groups.push(Group::private(i));
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

    /// Cut every live group into units again (dissolving changed their items).
    fn recut(&mut self, images: &[PlanImage], preps: &[Prepared], opts: &PlanOptions) {
        for g in self.groups.iter_mut().filter(|g| g.alive) {
            let refs = items_of(&g.items, preps);
            g.units = cut_units(&refs, &images[g.set[0]].packages, opts);
        }
    }

    /// Spend the layers the cap leaves on splitting the biggest groups by
    /// unit, while each part stays at least [`JOINT_SPLIT_MIN_BYTES`].
    fn spend_spare_layers(&mut self, max_layers: usize) {
        loop {
            let c = self.counts();
            let pick = self
                .groups
                .iter()
                .enumerate()
                .filter(|(_, g)| {
                    g.alive
                        && g.units.len() > g.k
                        && g.bytes / (g.k as u64 + 1) >= JOINT_SPLIT_MIN_BYTES
                        && g.set.iter().all(|&i| c[i] < max_layers)
                })
                .max_by_key(|(n, g)| (g.bytes / g.k as u64, std::cmp::Reverse(*n)))
                .map(|(n, _)| n);
            match pick {
                Some(n) => self.groups[n].k += 1,
                None => break,
            }
        }
    }
}
