//! Incremental mode: one image after the other, each reusing published
//! layers and the layers planned for earlier images, its other files cut
//! into units and packed into the layers left.

use breakfs_index::Entry;

use super::builder::{Builder, Stack};
use super::items::{Item, Prepared};
use super::reuse::{Known, Reuse, choose_reuse};
use super::types::{LayerSource, PlanImage, PlanOptions, PublishedLayer};
use super::units::{bin_label, cut_units, layer_entries, pack_by_class};

impl Builder {
    /// Plan `images` in order on top of `published`.
    pub(super) fn incremental(
        &mut self,
        images: &[PlanImage],
        preps: &[Prepared],
        published: &[PublishedLayer],
        opts: &PlanOptions,
    ) {
        let mut known = Known::default();
        for l in published {
            known.remember(&l.entries);
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
            let reuse = choose_reuse(p, &cands, opts.relax_mtime, reuse_limit(p, &cands, opts));
            let bound = known.bound(p, opts.relax_mtime);
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
            let stack = Stack {
                reuse: &reuse,
                picks,
                new,
                bound,
                duplicated: 0,
            };
            self.finish_image(i, img, p, stack);
            for &l in &self.plan.images[i].layers {
                if self.creator[l] == Some(i) {
                    known.remember(&self.plan.layers[l].entries);
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
        let bins = pack_by_class(&units, budget);
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
}

/// Weight of the uncovered share in [`reuse_limit`]: 1 gave the Debian
/// registry sequence's newest versions their bound but cost point releases
/// a third of theirs.
const RESERVE_WEIGHT: f64 = 0.5;

/// How many layers an image may reuse: the cap less its top layer and
/// one new layer, less a share of the cap [`RESERVE_WEIGHT`] times the
/// share of the image's bytes that reuse leaves uncovered. Taking many small published
/// layers would otherwise leave the image's own new files one or two
/// layers, bundles that its next versions and other images cannot take
/// whole; the layer price of `choose_reuse` then keeps the biggest.
fn reuse_limit(p: &Prepared, cands: &[&[Entry]], opts: &PlanOptions) -> usize {
    let most = opts.max_layers - 2;
    let all = choose_reuse(p, cands, opts.relax_mtime, most);
    let covered: u64 = p
        .items
        .iter()
        .zip(&all.covered_items)
        .filter(|(_, c)| **c)
        .map(|(it, _)| it.bytes)
        .sum();
    let left = 1.0 - covered as f64 / p.file_bytes.max(1) as f64;
    let reserve = (most as f64 * left * RESERVE_WEIGHT).round() as usize;
    most.saturating_sub(reserve).max(1).min(most)
}
