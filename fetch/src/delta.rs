//! Binary deltas for updates: a chunk of a new image's file, made from
//! the earlier version of that file, which a node that ran the earlier
//! image holds.
//!
//! The refactoring (`breakfs-refactor`), refactoring an image into a
//! destination that holds an earlier version, makes for each chunk of a
//! changed file a zstd frame compressed with the earlier file's whole
//! content as a raw-content dictionary, and publishes them as an OCI
//! artifact beside the image: a manifest whose `subject` is the image's
//! manifest and whose `artifactType` is [`ARTIFACT_TYPE`], pushed under
//! the referrers tag fallback `sha256-<hex>` ([`delta_tag`]; docker-registry
//! 2.x has no referrers API), with two blobs: a [`DeltaIndex`] (JSON) and
//! the pack of deltas it points into. The image itself is unchanged, so a
//! registry or runtime that knows nothing of it is not affected.
//!
//! A node finds the artifact when it resolves the image
//! ([`load_deltas`]) and gives its index to the fetcher; the fetcher
//! then, for a chunk whose base file's chunks are all in its store, fetches
//! the delta's range instead of the chunk (`fetcher/delta.rs`), applies it
//! and stores the result only if it matches the chunk's digest: a lying
//! delta or a wrong base costs a normal fetch, never a failed read.

use std::collections::HashMap;

use breakfs_index::{Descriptor, Digest, ImageRef, Reference, annotations};
use serde::{Deserialize, Serialize};

use crate::{ClientOptions, CloudSource, Error, Fetcher, Image, Result, Store};

/// The artifact type of a delta artifact.
pub const ARTIFACT_TYPE: &str = "application/vnd.breakfs.delta.v1";
/// The media type of its index blob.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.breakfs.delta.index.v1+json";
/// The media type of its pack blob (deltas one after the other).
pub const PACK_MEDIA_TYPE: &str = "application/vnd.breakfs.delta.pack.v1";
/// The OCI empty descriptor's media type (the artifact's config).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// Largest index a node reads.
const MAX_INDEX: u64 = 16 << 20;
/// Largest base file a node rebuilds for a delta.
pub const MAX_BASE: u64 = 256 << 20;

/// The delta of one chunk of a new file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// sha256 of the chunk's content (its key in a node's store).
    pub chunk: Digest,
    /// The chunk's size.
    pub size: u64,
    /// The chunks of the base file (the earlier version), in order: their
    /// concatenation is the dictionary.
    pub base: Vec<Digest>,
    /// The base file's size.
    pub base_size: u64,
    /// Where the delta sits in the pack.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

/// The index blob of a delta artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaIndex {
    /// The pack blob the deltas sit in.
    pub pack: Digest,
    /// The pack's size.
    pub pack_size: u64,
    /// The deltas.
    pub deltas: Vec<ChunkDelta>,
}

/// The tag a delta artifact of the image with manifest `manifest` is
/// pushed under (the OCI referrers tag schema).
pub fn delta_tag(manifest: &Digest) -> String {
    format!("sha256-{}", manifest.hex())
}

/// Whether `tag` is such a tag (not an image's).
pub fn is_delta_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `new` as a zstd frame compressed at `level` with `base` as a raw-content
/// dictionary.
pub fn make_delta(base: &[u8], new: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::with_dictionary(level, base)?;
    // The window must reach the whole dictionary.
    let log = (usize::BITS - (base.len() + new.len()).max(1 << 10).leading_zeros()).min(30);
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(log))?;
    c.compress(new)
}

/// The content `delta` makes of `base`, at most `size` bytes (the caller
/// checks it against its digest).
pub fn apply_delta(base: &[u8], delta: &[u8], size: u64) -> std::io::Result<Vec<u8>> {
    let mut d = zstd::bulk::Decompressor::with_dictionary(base)?;
    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(31))?;
    let out = d.decompress(delta, size as usize)?;
    if out.len() as u64 != size {
        return Err(std::io::Error::other(format!(
            "the delta made {} bytes, not {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// The deltas a fetcher knows, by chunk digest, with their pack.
#[derive(Default)]
pub(crate) struct Deltas {
    by_chunk: parking_lot::Mutex<HashMap<Digest, (Digest, ChunkDelta)>>,
}

impl Deltas {
    /// Know the deltas of `index`; how many were new.
    pub(crate) fn add(&self, index: &DeltaIndex) -> usize {
        let mut m = self.by_chunk.lock();
        let mut n = 0;
        for d in &index.deltas {
            if d.base_size <= MAX_BASE && d.len <= index.pack_size {
                n += usize::from(
                    m.insert(d.chunk.clone(), (index.pack.clone(), d.clone()))
                        .is_none(),
                );
            }
        }
        n
    }

    /// The delta of chunk `chunk`, if one is known.
    pub(crate) fn get(&self, chunk: &Digest) -> Option<(Digest, ChunkDelta)> {
        self.by_chunk.lock().get(chunk).cloned()
    }
}

/// The manifest tagged `tag` in `store`, raw; `None` if there is none.
async fn manifest_by_tag(store: &Store, tag: &str) -> Result<Option<Vec<u8>>> {
    match store {
        Store::Registry(r) => match r.get_manifest(&Reference::Tag(tag.to_string())).await {
            Ok(m) => Ok(Some(m.bytes)),
            Err(Error::NotFound { .. }) | Err(Error::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        },
        Store::Layout(l) => {
            let index = match l.index().await {
                Ok(i) => i,
                Err(Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let Some(desc) = index.manifests.iter().find(|d| {
                d.annotations.get(annotations::REF_NAME).map(String::as_str) == Some(tag)
            }) else {
                return Ok(None);
            };
            Ok(Some(l.read_blob(desc).await?))
        }
    }
}

/// The delta index published for `image` in `store`, if there is one: the
/// artifact under [`delta_tag`] whose subject is the image and whose type
/// is ours, its index blob read (verified) and checked.
pub async fn find_deltas(store: &Store, image: &Image) -> Result<Option<DeltaIndex>> {
    let tag = delta_tag(&image.manifest_digest);
    let Some(bytes) = manifest_by_tag(store, &tag).await? else {
        return Ok(None);
    };
    let what = format!("delta artifact {}:{tag}", store.name());
    let bad = |reason: &str| Error::Protocol {
        what: what.clone(),
        reason: reason.to_string(),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
    if v["artifactType"].as_str() != Some(ARTIFACT_TYPE)
        || v["subject"]["digest"].as_str() != Some(image.manifest_digest.to_string().as_str())
    {
        return Ok(None);
    }
    // Its layers are ours, not image layers: read as plain descriptors.
    let layers: Vec<Descriptor> = serde_json::from_value(v["layers"].clone())
        .map_err(|e| bad(&format!("its layers do not parse: {e}")))?;
    let Some(desc) = layers.iter().find(|l| l.media_type == INDEX_MEDIA_TYPE) else {
        return Err(bad("no index blob"));
    };
    if desc.size > MAX_INDEX {
        return Err(bad(&format!("its index is {} bytes", desc.size)));
    }
    let raw = store.read_blob(desc).await?;
    let index: DeltaIndex =
        serde_json::from_slice(&raw).map_err(|e| bad(&format!("its index does not parse: {e}")))?;
    if !layers
        .iter()
        .any(|l| l.digest == index.pack && l.size == index.pack_size)
    {
        return Err(bad("its index names a pack the artifact does not list"));
    }
    Ok(Some(index))
}

/// Find the deltas published for `image` (see [`find_deltas`]) and give
/// them to `fetcher`, their pack announced to `cloud`; how many deltas.
pub async fn load_deltas(
    image: &Image,
    client: &ClientOptions,
    fetcher: &Fetcher,
    cloud: &CloudSource,
) -> Result<usize> {
    let reference: &ImageRef = &image.reference;
    let store = Store::open(reference, client).await?;
    let Some(index) = find_deltas(&store, image).await? else {
        return Ok(0);
    };
    cloud.announce(&store, [&index.pack]);
    Ok(fetcher.add_deltas(&index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 7 == 0 {
                    (x >> 33) as u8
                } else {
                    (i % 251) as u8
                }
            })
            .collect()
    }

    #[test]
    fn a_delta_rebuilds_the_new_file_from_the_old_and_is_small() {
        let old = file(1, 3 << 20);
        let mut new = old.clone();
        new[1000..1200].copy_from_slice(&file(2, 200));
        new.extend_from_slice(&file(3, 4096));
        let delta = make_delta(&old, &new, 9).expect("delta");
        assert!(delta.len() < 20_000, "delta is {} bytes", delta.len());
        assert_eq!(
            apply_delta(&old, &delta, new.len() as u64).expect("apply"),
            new
        );
    }

    #[test]
    fn a_wrong_base_or_a_lying_delta_does_not_make_the_file() {
        let old = file(1, 1 << 20);
        let mut new = old.clone();
        new[5..9].copy_from_slice(b"v2v2");
        let delta = make_delta(&old, &new, 9).expect("delta");
        let other = file(9, 1 << 20);
        let wrong = apply_delta(&other, &delta, new.len() as u64);
        assert!(wrong.is_err() || wrong.is_ok_and(|b| Digest::of(&b) != Digest::of(&new)));
        let mut lying = delta.clone();
        let mid = lying.len() / 2;
        lying[mid] ^= 0xff;
        let bad = apply_delta(&old, &lying, new.len() as u64);
        assert!(bad.is_err() || bad.is_ok_and(|b| Digest::of(&b) != Digest::of(&new)));
        assert!(apply_delta(&old, b"not zstd", new.len() as u64).is_err());
    }

    #[test]
    fn delta_tags_are_told_from_image_tags() {
        let d = Digest::of(b"m");
        assert!(is_delta_tag(&delta_tag(&d)));
        assert!(!is_delta_tag("v2"));
        assert!(!is_delta_tag("sha256-abc"));
    }
}
