//! The eStargz table of contents (`stargz.index.json`) and footer.

use serde::{Deserialize, Serialize};

/// The TOC document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Toc {
    /// Format version, 1.
    pub version: u32,
    /// Entries in tar order.
    pub entries: Vec<TocEntry>,
}

/// One TOC entry as the eStargz spec defines it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TocEntry {
    /// Path in the layer.
    pub name: String,
}

/// One chunk of a regular file's content inside an eStargz blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocChunk {
    /// Offset of the chunk's gzip member in the blob.
    pub offset: u64,
}
