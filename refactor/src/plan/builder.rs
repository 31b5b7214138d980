//! The plan under construction: layers added once, each image's stack
//! assembled and accounted (reused, bound, shadowed, duplicated bytes).
//! The two modes fill it: `incremental` and `joint`.

use std::collections::HashMap;

use breakfs_index::Entry;

use super::items::{Prepared, file_bytes_of};
use super::reuse::{Reuse, whiteout};
use super::types::{ImagePlan, LayerSource, Plan, PlanImage, PlanLayer, PublishedLayer};

/// The plan under construction, with bookkeeping the result does not show.
#[derive(Default)]
pub(super) struct Builder {
    pub(super) plan: Plan,
    /// The image that created each layer (`None`: published or shared).
    pub(super) creator: Vec<Option<usize>>,
    /// Plan layer of each reused published layer.
    reused: HashMap<usize, usize>,
    /// Joint mode: top layers by content, so identical tops are stored once.
    pub(super) tops: Option<HashMap<Vec<Entry>, usize>>,
}

/// What [`Builder::finish_image`] assembles a stack from.
pub(super) struct Stack<'a> {
    /// The image's reuse of published or earlier layers.
    pub(super) reuse: &'a Reuse,
    /// Plan layers of the reuse picks, each with whether it holds top entries.
    pub(super) picks: Vec<(usize, bool)>,
    /// New content layers, bottom first.
    pub(super) new: Vec<usize>,
    /// The image's bound (see [`ImagePlan::bound_bytes`]).
    pub(super) bound: u64,
    /// Bytes duplicated for the image because of the layer cap.
    pub(super) duplicated: u64,
}

impl Builder {
    /// Add a layer to the plan; its index.
    pub(super) fn add_layer(
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

    /// The plan layer of published layer `j`, added on first use.
    pub(super) fn reuse_published(&mut self, j: usize, published: &[PublishedLayer]) -> usize {
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

    /// Assemble image `i`'s stack: reused content layers, new content
    /// layers, reused layers with top entries, the new top layer.
    pub(super) fn finish_image(&mut self, i: usize, img: &PlanImage, p: &Prepared, s: Stack) {
        let Stack {
            reuse,
            mut picks,
            new,
            bound,
            duplicated,
        } = s;
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
        ip.stale_bought_bytes = reuse.stale_bought;
        ip.bound_bytes = bound;
        ip.duplicated_bytes = duplicated;
        ip.mtime_changes.extend(mtime_changes);
        ip.mtime_changes.sort();
    }

    /// The plan, each image's mtime changes sorted once.
    pub(super) fn finish(mut self) -> Plan {
        for ip in &mut self.plan.images {
            ip.mtime_changes.sort();
            ip.mtime_changes.dedup();
        }
        self.plan
    }
}
