//! Reading one layer's tar stream into a list of entries.

use crate::{Digest, Entry};

/// One tar entry of a layer, with where its content starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerEntry {
    /// The entry, path normalised; whiteouts keep their `.wh.` names here.
    pub entry: Entry,
    /// Offset of the content in the uncompressed tar stream.
    pub data_offset: u64,
}

/// A layer's entries in tar order, with its diff_id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// Entries in tar order.
    pub entries: Vec<LayerEntry>,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Size of the uncompressed tar stream.
    pub tar_size: u64,
}
