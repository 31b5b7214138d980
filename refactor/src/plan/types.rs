//! The planner's inputs and its result: options, images, published
//! layers, and the plan (layers and each image's stack).

use breakfs_index::{Entry, MergedView};

use crate::dpkg::PackageDb;

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
    /// File bytes the image reuses from layers that hold stale files: what
    /// its shadowed bytes bought (the planner accepts at most 3% of the
    /// image's file bytes stale, giving up the layers that buy least first).
    pub stale_bought_bytes: u64,
}

/// The planned layers and each image's stack.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// All layers, reused and new, each once.
    pub layers: Vec<PlanLayer>,
    /// One stack per input image, in input order.
    pub images: Vec<ImagePlan>,
}
