//! The one error type of the index crate.

use std::io;

/// What can go wrong while reading or building image metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while reading a layer or a file, with what was being read.
    #[error("{what}: {source}")]
    Io {
        /// What was being read, e.g. `layer sha256:ab12…`.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A digest string that is not `sha256:` followed by 64 hex digits.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    /// An image reference that does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// Why it does not parse, and the expected form.
        reason: String,
    },
    /// A JSON document (manifest, index, config, TOC) that does not parse.
    #[error("invalid {what}: {source}")]
    Json {
        /// Which document, e.g. `manifest of docker://reg/app:v1`.
        what: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A media type breakfs does not know how to handle.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// The media type found.
        media_type: String,
        /// What carried it.
        what: String,
    },
    /// A tar entry that breaks a safety or format rule.
    #[error("layer entry {path:?}: {reason}")]
    BadEntry {
        /// The entry's path as written in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An eStargz TOC or footer that is malformed or inconsistent.
    #[error("invalid eStargz TOC: {0}")]
    BadToc(String),
    /// A structurally invalid document (missing field, wrong value).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// What is wrong.
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

/// Result with the index crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
