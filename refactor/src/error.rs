//! The one error type of the refactor crate.

use std::io;

/// What can go wrong while planning or writing refactored layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the metadata layer (digests, entries, TOC, manifests).
    #[error(transparent)]
    Index(#[from] breakfs_index::Error),
    /// An error reading or writing images in a layout or a registry.
    #[error(transparent)]
    Fetch(#[from] breakfs_fetch::Error),
    /// A source image that cannot be refactored as it is.
    #[error("image {image}: {reason}")]
    Source {
        /// The image reference.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A layer whose uncompressed content is not what the image config says.
    #[error(
        "{what}: uncompressed content has digest {actual} but the image config's diff_id is {expected}; the layer or the config is corrupt"
    )]
    DiffIdMismatch {
        /// Which layer of which image.
        what: String,
        /// The diff_id the config gives.
        expected: breakfs_index::Digest,
        /// The digest of the uncompressed content.
        actual: breakfs_index::Digest,
    },
    /// An I/O error, with what was being done (the cause follows in the
    /// error chain).
    #[error("{what}")]
    Io {
        /// What was being done, e.g. `writing layer to out.tar.gz`.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// File content that does not match the entry that describes it.
    #[error(
        "content of {path:?} does not match its entry: {reason}; the content source is corrupt or the entry is stale"
    )]
    ContentMismatch {
        /// The file's path in the layer.
        path: String,
        /// What differs (size or digest), with both values.
        reason: String,
    },
    /// An entry that cannot be written into a layer.
    #[error("cannot write entry {path:?}: {reason}")]
    BadEntry {
        /// The entry's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A planner option that cannot be satisfied.
    #[error("invalid plan option: {reason}")]
    PlanOption {
        /// What is wrong and the accepted range.
        reason: String,
    },
    /// A merged view the planner cannot plan (e.g. a hard link to a missing file).
    #[error("image {image}: cannot plan entry {path:?}: {reason}")]
    PlanInput {
        /// The image's name.
        image: String,
        /// The entry's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Planned layers that do not rebuild the image's merged view.
    #[error(
        "planned layers of image {image} do not reproduce its merged view ({count} differences, first: {}); this is a planner bug, nothing was written",
        first.join("; ")
    )]
    PlanMismatch {
        /// The image's name.
        image: String,
        /// How many paths differ.
        count: usize,
        /// The first differences, one per path.
        first: Vec<String>,
    },
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the refactor crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
