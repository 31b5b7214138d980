//! The one error type of the fetch crate.

use std::io;

use breakfs_index::Digest;

/// What can go wrong while moving image bytes to and from layouts and registries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached at all (refused, timed out, TLS failed).
    #[error(
        "cannot reach registry {registry} (is it running? use --plain-http, or BREAKFS_PLAIN_HTTP=1, for an HTTP registry)"
    )]
    Unreachable {
        /// `HOST[:PORT]`.
        registry: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A transfer broke after the registry answered (reset, timeout mid-body).
    #[error("{what}: transfer failed")]
    Transfer {
        /// What was being transferred.
        what: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected HTTP status.
    #[error("{what}: the registry answered {status}: {body}")]
    Status {
        /// What was asked, e.g. `manifest docker://reg/app:v1`.
        what: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (the registry's error JSON).
        body: String,
    },
    /// The thing asked for does not exist (404, missing file).
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, with where.
        what: String,
    },
    /// The registry refused us: no credentials, or wrong ones.
    #[error("registry {registry} refused access: {hint}")]
    Unauthorized {
        /// `HOST[:PORT]`.
        registry: String,
        /// What to do about it.
        hint: String,
    },
    /// A docker credential helper that could not be run or whose answer
    /// cannot be used.
    #[error("credential helper {helper}, asked for registry {registry}: {reason}")]
    CredentialHelper {
        /// The program, `docker-credential-NAME`.
        helper: String,
        /// `HOST[:PORT]`.
        registry: String,
        /// What went wrong, and what to do.
        reason: String,
    },
    /// Content whose digest is not the one it was asked by.
    #[error(
        "{what}: digest mismatch: expected {expected}, got {actual}; the content is corrupt or was changed"
    )]
    DigestMismatch {
        /// Which blob or manifest.
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// Content whose size is not the one its descriptor gives.
    #[error("{what}: size mismatch: the descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The size asked for.
        expected: u64,
        /// The size that arrived.
        actual: u64,
    },
    /// An index has no manifest for the requested platform.
    #[error("{image} has no manifest for platform {wanted}; available: {}; choose one with --platform", .available.join(", "))]
    NoPlatform {
        /// The image reference.
        image: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: Vec<String>,
    },
    /// A layout holds several images and the reference names none of them.
    #[error("{layout} holds several images (tags: {}); name one as oci:DIR:TAG", .tags.join(", "))]
    Ambiguous {
        /// The layout reference.
        layout: String,
        /// The tags it holds.
        tags: Vec<String>,
    },
    /// A reference resolved against a store for another location.
    #[error("{reference} is not in {store}: open a store for it first")]
    OtherLocation {
        /// The reference given.
        reference: String,
        /// The store it was given to.
        store: String,
    },
    /// Content that no source delivered (in time, or with the right bytes).
    #[error("{what} is unavailable: {reason}")]
    Unavailable {
        /// What was wanted.
        what: String,
        /// Why every source failed.
        reason: String,
    },
    /// A source that is busy now (a relaying peer at its limit): ask the
    /// next one, and this one again later.
    #[error("{what}: {reason}")]
    Busy {
        /// What was asked, with of whom.
        what: String,
        /// Why it was turned away.
        reason: String,
    },
    /// A server too slow to wait for: no answer in time, or a body that
    /// trickles in (a slow link, or a hostile server holding the reader).
    #[error("{what}: {reason}; cut off")]
    TooSlow {
        /// What was being read, with from where.
        what: String,
        /// How slow it was.
        reason: String,
    },
    /// A registry or layout that breaks the protocol or format (bad header, bad token reply).
    #[error("{what}: {reason}")]
    Protocol {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An error from the image model (parsing manifests, configs, references).
    #[error(transparent)]
    Index(#[from] breakfs_index::Error),
    /// A local file error, with what was being done (the cause follows in
    /// the error chain).
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
    /// Wrap an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the fetch crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use breakfs_index::Causes;

    /// Each cause of a nested error is printed once along its chain, as
    /// the binary prints it (anyhow's `{:#}` walks the same chain).
    #[test]
    fn a_nested_error_prints_each_cause_once() {
        let inner = io::Error::new(io::ErrorKind::PermissionDenied, "permission denied");
        let nested = Error::Index(breakfs_index::Error::io("reading layer sha256:ab12", inner));
        let full = Causes(&nested).to_string();
        assert_eq!(full, "reading layer sha256:ab12: permission denied");
        for part in ["reading layer sha256:ab12", "permission denied"] {
            assert_eq!(full.matches(part).count(), 1, "{full}");
        }
        let io = Error::io(
            "creating /store/tmp",
            io::Error::new(io::ErrorKind::StorageFull, "no space left on device"),
        );
        assert_eq!(io.to_string(), "creating /store/tmp");
        let full = Causes(&io).to_string();
        assert_eq!(full, "creating /store/tmp: no space left on device");
    }
}
