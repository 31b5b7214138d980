//! The one error type of the index crate.

use std::io;

/// What can go wrong while reading or building image metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while reading a layer or a file, with what was being
    /// read (the cause follows in the error chain).
    #[error("{what}")]
    Io {
        /// What was being read, e.g. `layer sha256:ab12…`.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A size (flag or config) that does not parse.
    #[error("{value:?} is not a size ({reason}): give {forms}", forms = crate::size::SIZE_FORMS)]
    BadSize {
        /// The size as given.
        value: String,
        /// What is wrong with it.
        reason: String,
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
    /// A JSON document (manifest, index, config, TOC) that does not parse
    /// (the parser's complaint follows in the error chain).
    #[error("invalid {what}")]
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

/// An error and every cause in its chain on one line (`what: cause:
/// cause`), for where an error goes into a log line or into another
/// error's text: each variant's own message leaves its source out.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            write!(f, ": {c}")?;
            cur = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let json = serde_json::from_slice::<serde_json::Value>(b"{oops").unwrap_err();
        let parser = json.to_string();
        let e = Error::Json {
            what: "manifest of oci:/x:v1".into(),
            source: json,
        };
        assert_eq!(e.to_string(), "invalid manifest of oci:/x:v1");
        let full = Causes(&e).to_string();
        assert_eq!(full, format!("invalid manifest of oci:/x:v1: {parser}"));
        let io = Error::io(
            "reading layer sha256:ab",
            io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends early"),
        );
        assert_eq!(
            Causes(&io).to_string(),
            "reading layer sha256:ab: the file ends early"
        );
    }
}
