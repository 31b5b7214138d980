//! Image references, skopeo style: `oci:DIR[:TAG]` and
//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.

use std::fmt;
use std::path::PathBuf;

use crate::{Digest, Error, Result};

/// Where an image lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout on disk.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The tag (`org.opencontainers.image.ref.name`); `None` means the
        /// only image of the layout, or `latest`.
        tag: Option<String>,
    },
    /// A repository in a registry.
    Registry {
        /// `HOST[:PORT]`.
        host: String,
        /// The repository path, e.g. `library/python`.
        repo: String,
        /// A tag or a digest.
        reference: Reference,
    },
}

/// A tag or a digest within a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// A tag, e.g. `v1`.
    Tag(String),
    /// A manifest digest.
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => write!(f, "{t}"),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

const FORMS: &str = "expected oci:DIR[:TAG] or docker://HOST[:PORT]/REPO[:TAG|@DIGEST]";

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !t.starts_with(['.', '-'])
}

fn valid_repo(r: &str) -> bool {
    !r.is_empty()
        && r.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                })
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

impl ImageRef {
    /// Parse a reference string.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = |reason: &str| Error::BadReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(bad(&format!("no directory given; {FORMS}")));
            }
            // The tag is after the last ':' unless that ':' is part of the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !d.is_empty() && !t.contains('/') => {
                    if !valid_tag(t) {
                        return Err(bad(&format!(
                            "tag {t:?} is not a valid tag (letters, digits, _ . -; up to 128)"
                        )));
                    }
                    (d, Some(t.to_string()))
                }
                _ => (rest, None),
            };
            return Ok(ImageRef::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        let Some(rest) = s.strip_prefix("docker://") else {
            return Err(bad(FORMS));
        };
        let Some((host, path)) = rest.split_once('/') else {
            return Err(bad(&format!("no repository after the host; {FORMS}")));
        };
        if host.is_empty() {
            return Err(bad("empty registry host"));
        }
        let (repo, reference) = if let Some((repo, digest)) = path.split_once('@') {
            (repo, Reference::Digest(Digest::parse(digest)?))
        } else {
            match path.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => {
                    if !valid_tag(tag) {
                        return Err(bad(&format!(
                            "tag {tag:?} is not a valid tag (letters, digits, _ . -; up to 128)"
                        )));
                    }
                    (repo, Reference::Tag(tag.to_string()))
                }
                _ => (path, Reference::Tag("latest".to_string())),
            }
        };
        if !valid_repo(repo) {
            return Err(bad(&format!(
                "repository {repo:?} must be lowercase path components of letters, digits, _ . -"
            )));
        }
        Ok(ImageRef::Registry {
            host: host.to_string(),
            repo: repo.to_string(),
            reference,
        })
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        match self {
            ImageRef::Layout { tag, .. } => tag.as_deref(),
            ImageRef::Registry {
                reference: Reference::Tag(t),
                ..
            } => Some(t),
            ImageRef::Registry { .. } => None,
        }
    }

    /// The same location with another tag.
    pub fn with_tag(&self, tag: &str) -> ImageRef {
        match self {
            ImageRef::Layout { dir, .. } => ImageRef::Layout {
                dir: dir.clone(),
                tag: Some(tag.to_string()),
            },
            ImageRef::Registry { host, repo, .. } => ImageRef::Registry {
                host: host.clone(),
                repo: repo.clone(),
                reference: Reference::Tag(tag.to_string()),
            },
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Registry {
                host,
                repo,
                reference: Reference::Tag(t),
            } => write!(f, "docker://{host}/{repo}:{t}"),
            ImageRef::Registry {
                host,
                repo,
                reference: Reference::Digest(d),
            } => write!(f, "docker://{host}/{repo}@{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let r = ImageRef::parse("oci:/tmp/x:v1").unwrap();
        assert_eq!(
            r,
            ImageRef::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        let r = ImageRef::parse("oci:/tmp/x").unwrap();
        assert_eq!(r.tag(), None);
        let r = ImageRef::parse("docker://127.0.0.1:5000/library/python:3.11").unwrap();
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/library/python:3.11");
        let r = ImageRef::parse("docker://reg/app").unwrap();
        assert_eq!(r.tag(), Some("latest"));
        let d = Digest::of(b"a");
        let r = ImageRef::parse(&format!("docker://reg:5000/app@{d}")).unwrap();
        assert!(matches!(
            r,
            ImageRef::Registry {
                reference: Reference::Digest(_),
                ..
            }
        ));
        assert!(ImageRef::parse("python:3.11").is_err());
        assert!(ImageRef::parse("docker://reg/App").is_err());
    }
}
