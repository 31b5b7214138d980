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
//! **Incremental mode** considers every published layer (every image of
//! the destination, not only the previous version of the same one) and
//! reuses the set of layers whose entries appear in the image (up to a few
//! stale files, shadowed, within a per-image budget) that holds the most
//! bytes, no two sharing a path (`reuse::choose_reuse`, exact per group of
//! conflicting layers); then it cuts the rest into units that future
//! versions keep intact (one per source package, big ones per binary
//! package; unowned files by directory
//! subtree; with `relax_mtime` a big unit is split into binaries and data)
//! and packs the units into the layers left (see `units::pack` for the
//! heuristic), units from different layers of the original image apart
//! (`units::pack_by_class`): other images, built on the same base image or
//! dependencies, can then take those layers whole. **Joint mode** groups files by the exact set of images that
//! hold them, one shared layer (or several, cut by unit) per group, and
//! dissolves the smallest groups into the member images' layers when an
//! image would exceed the cap.
//!
//! The modules, in reading order: `types` (inputs and the plan),
//! `items` (an image's view as items and top entries), `reuse` (which
//! published layers an image can take; the bound), `units` (cutting and
//! packing), `builder` (layers and stacks), `incremental` and `joint` (the
//! two modes), `check` (the plan rebuilds every view).

mod builder;
mod check;
mod incremental;
mod items;
mod joint;
mod reuse;
mod types;
mod units;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use types::{ImagePlan, LayerSource, Plan, PlanImage, PlanLayer, PlanOptions, PublishedLayer};

use crate::{Error, Result};

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
    let preps = images
        .iter()
        .map(items::prepare)
        .collect::<Result<Vec<_>>>()?;
    let mut b = builder::Builder::default();
    if opts.joint {
        b.joint(images, &preps, published, opts);
    } else {
        b.incremental(images, &preps, published, opts);
    }
    Ok(b.finish())
}
