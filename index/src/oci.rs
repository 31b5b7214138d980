//! The OCI image model: descriptors, manifests, indexes and configs, read
//! from both OCI and Docker schema2 documents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, Error, Result};

/// Media types breakfs reads and writes.
pub mod media_types {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed tar.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker schema2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker foreign layer (never pulled by breakfs).
    pub const DOCKER_LAYER_FOREIGN: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    /// The `Accept` header value for manifests and indexes of both kinds.
    pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
}

/// Annotation keys breakfs reads and writes.
pub mod annotations {
    /// The eStargz TOC digest on a layer descriptor.
    pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
    /// The uncompressed size of an eStargz layer.
    pub const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
    /// The tag of a manifest in an OCI layout's `index.json`.
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
    /// Set by breakfs on layers it wrote: which images share the layer's group.
    pub const BREAKFS_GROUP: &str = "io.breakfs.layer.group";
}

/// A platform an image is built for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// Variant, e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`, the default.
    pub fn linux_amd64() -> Platform {
        Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        }
    }

    /// Parse `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(Error::Invalid {
                what: format!("platform {s:?}"),
                reason: "expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64".into(),
            }),
        }
    }

    /// Whether a descriptor's platform matches this one (variant only if asked).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor: what a manifest says about a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The blob's media type.
    pub media_type: String,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Annotations (TOC digest, uncompressed size, tag name…).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform, in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Alternate URLs (foreign layers); kept, never followed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    /// A descriptor without annotations or platform.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
        }
    }

    /// The eStargz TOC digest annotation, if present and well-formed.
    pub fn toc_digest(&self) -> Option<Digest> {
        self.annotations
            .get(annotations::TOC_DIGEST)
            .and_then(|s| Digest::parse(s).ok())
    }
}

/// An image manifest (OCI or Docker schema2; both have this shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type, when the document states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The index's media type, when the document states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
    /// Index annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A parsed manifest-like document: an image manifest or an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestDoc {
    /// A single-platform image manifest.
    Image(Manifest),
    /// An index of manifests (multi-platform).
    Index(ImageIndex),
}

impl ManifestDoc {
    /// Parse a manifest or index; `content_type` is the HTTP header or the
    /// descriptor's media type when known, otherwise the document decides.
    pub fn parse(bytes: &[u8], content_type: Option<&str>, what: &str) -> Result<ManifestDoc> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            what: what.to_string(),
            source: e,
        })?;
        let declared = value
            .get("mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let media_type = declared
            .as_deref()
            .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()))
            .map(str::to_string);
        let kind = match media_type.as_deref() {
            Some(media_types::OCI_MANIFEST | media_types::DOCKER_MANIFEST) => "image",
            Some(media_types::OCI_INDEX | media_types::DOCKER_LIST) => "index",
            Some(other) if !other.is_empty() && other != "application/json" => {
                return Err(Error::UnsupportedMediaType {
                    media_type: other.to_string(),
                    what: what.to_string(),
                });
            }
            _ if value.get("manifests").is_some() => "index",
            _ if value.get("layers").is_some() => "image",
            _ => {
                return Err(Error::Invalid {
                    what: what.to_string(),
                    reason:
                        "neither an image manifest (no \"layers\") nor an index (no \"manifests\")"
                            .into(),
                });
            }
        };
        let json_err = |e| Error::Json {
            what: what.to_string(),
            source: e,
        };
        if kind == "image" {
            let mut m: Manifest = serde_json::from_value(value).map_err(json_err)?;
            if m.media_type.is_none() {
                m.media_type = media_type;
            }
            if m.schema_version != 2 {
                return Err(Error::Invalid {
                    what: what.to_string(),
                    reason: format!("schemaVersion {} (only 2 is supported)", m.schema_version),
                });
            }
            for l in &m.layers {
                if Compression::from_media_type(&l.media_type).is_none() {
                    return Err(Error::UnsupportedMediaType {
                        media_type: l.media_type.clone(),
                        what: format!("layer {} in {what}", l.digest),
                    });
                }
            }
            Ok(ManifestDoc::Image(m))
        } else {
            let mut i: ImageIndex = serde_json::from_value(value).map_err(json_err)?;
            if i.media_type.is_none() {
                i.media_type = media_type;
            }
            Ok(ManifestDoc::Index(i))
        }
    }
}

use crate::Compression;

/// An image config, kept as JSON so that fields breakfs does not model
/// survive a rewrite unchanged; the fields it needs have accessors.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    value: serde_json::Value,
}

impl ImageConfig {
    /// Parse a config blob.
    pub fn parse(bytes: &[u8], what: &str) -> Result<ImageConfig> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            what: what.to_string(),
            source: e,
        })?;
        if !value.is_object() {
            return Err(Error::Invalid {
                what: what.to_string(),
                reason: "config is not a JSON object".into(),
            });
        }
        Ok(ImageConfig { value })
    }

    /// The raw JSON.
    pub fn json(&self) -> &serde_json::Value {
        &self.value
    }

    /// `rootfs.diff_ids`, bottom layer first.
    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        let ids = self
            .value
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .ok_or_else(|| Error::Invalid {
                what: "image config".into(),
                reason: "no rootfs.diff_ids array".into(),
            })?;
        ids.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::BadDigest(v.to_string()))
                    .and_then(Digest::parse)
            })
            .collect()
    }

    /// Replace `rootfs.diff_ids` and `history` to describe new layers; one
    /// history line per layer, with `created_by` saying what it holds.
    pub fn set_layers(&mut self, diff_ids: &[Digest], created_by: &[String]) {
        let created = self
            .value
            .get("created")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if let Some(obj) = self.value.as_object_mut() {
            obj.insert(
                "rootfs".into(),
                serde_json::json!({
                    "type": "layers",
                    "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                }),
            );
            let history: Vec<serde_json::Value> = created_by
                .iter()
                .map(|c| {
                    let mut h =
                        serde_json::json!({ "created_by": c, "comment": "breakfs refactor" });
                    if !created.is_null() {
                        h["created"] = created.clone();
                    }
                    h
                })
                .collect();
            obj.insert("history".into(), serde_json::Value::Array(history));
        }
    }

    /// The config serialised (compact, stable key order from serde_json).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_media_type_is_named() {
        let doc =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.example.thing+json","layers":[]}"#;
        let err = ManifestDoc::parse(doc, None, "manifest of oci:x").unwrap_err();
        assert!(
            err.to_string()
                .contains("application/vnd.example.thing+json"),
            "{err}"
        );
    }

    #[test]
    fn docker_schema2_parses() {
        let d = Digest::of(b"x");
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_types::DOCKER_MANIFEST,
            "config": {"mediaType": media_types::DOCKER_CONFIG, "digest": d.to_string(), "size": 1},
            "layers": [{"mediaType": media_types::DOCKER_LAYER_GZIP, "digest": d.to_string(), "size": 1}],
        });
        let parsed = ManifestDoc::parse(doc.to_string().as_bytes(), None, "m").unwrap();
        assert!(matches!(parsed, ManifestDoc::Image(m) if m.layers.len() == 1));
    }
}
