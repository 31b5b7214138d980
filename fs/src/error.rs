//! Errors of mounting and extracting images.

use std::io;
use std::path::PathBuf;

/// What can go wrong opening, mounting or extracting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching metadata or content failed.
    #[error(transparent)]
    Fetch(#[from] breakfs_fetch::Error),
    /// The image's metadata is malformed or unsafe.
    #[error(transparent)]
    Index(#[from] breakfs_index::Error),
    /// The image breaks a rule breakfs needs.
    #[error("{what}: {reason}")]
    BadImage {
        /// The image or layer.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The mountpoint cannot be used.
    #[error("cannot mount on {}: {reason}", .mountpoint.display())]
    Mountpoint {
        /// The mountpoint given.
        mountpoint: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A local file operation failed (the cause follows in the error chain).
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
