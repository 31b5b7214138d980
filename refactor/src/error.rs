//! The one error type of the refactor crate.

use std::io;

/// What can go wrong while planning or writing refactored layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the metadata layer (digests, entries, TOC, manifests).
    #[error(transparent)]
    Index(#[from] breakfs_index::Error),
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
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
