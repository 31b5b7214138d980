//! The merged view of a layer stack under the OCI layer rules.

use std::collections::BTreeMap;

use crate::Entry;

/// An entry of the merged view and where its content lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedEntry {
    /// The entry as the merged view shows it.
    pub entry: Entry,
    /// Index of the layer (bottom = 0) whose tar holds the content.
    pub layer: usize,
    /// Offset of the content in that layer's uncompressed tar.
    pub data_offset: u64,
}

/// The merged view of an image: every path and its entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergedView {
    entries: BTreeMap<String, MergedEntry>,
}
