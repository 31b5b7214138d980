//! Image metadata for breakfs: the OCI model (descriptors, manifests,
//! configs, references), file entries, the eStargz table of contents, the
//! merged view of a layer stack, and what a node publishes about its cache
//! and links.
//!
//! Everything here is pure data and codecs over `Read`/bytes: no network,
//! no content store. The doors are [`ImageRef`], [`Manifest`],
//! [`Entry`], [`LayerIndex`] (one layer's tar, indexed), [`MergedView`]
//! (a stack of layers under the OCI rules), [`Toc`] (eStargz) and
//! [`CacheIndex`] (what a node holds).

mod cache;
mod compression;
mod digest;
mod entry;
mod error;
mod merged;
mod oci;
mod reference;
mod size;
mod tarindex;
mod toc;

pub use cache::{CacheIndex, HeldBlob, LinkStats, MAX_INDEX, PartialLayer};
pub use compression::{Compression, decoder};
pub use digest::{Digest, HashingReader, HashingWriter};
pub use entry::{Entry, EntryKind};
pub use error::{Causes, Error, Result};
pub use merged::{MergedEntry, MergedView};
pub use oci::{
    Descriptor, ImageConfig, ImageIndex, Manifest, ManifestDoc, Platform, annotations, media_types,
};
pub use reference::{ImageRef, Reference};
pub use size::{SIZE_FORMS, parse_size};
pub use tarindex::{LayerEntry, LayerIndex};
pub use toc::{
    FOOTER_SIZE, LANDMARK_CONTENT, LEGACY_FOOTER_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
    TOC_TAR_NAME, TailRead, Toc, TocChunk, TocEntry, TocEntryType, TocLayer, TocTail, footer,
    format_modtime, parse_footer, parse_footer_sized, toc_json_from_member,
};
