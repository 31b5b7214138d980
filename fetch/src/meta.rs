//! Image metadata through the fetch chain (store → peers → cloud): configs
//! and eStargz TOCs, recorded in the content store so that a remount or a
//! restart reads them from disk.

use breakfs_index::{Descriptor, Digest, Toc, TocLayer};
use serde::{Deserialize, Serialize};

use crate::tocread::{put_metas, read_toc_with, toc_from_tail, toc_tail_name};
use crate::{Error, Fetcher, Meta, MetaTurn, Result};

/// Largest blob asked of the nodes sharing metadata ([`Meta::Blob`]):
/// configs are a few KiB.
const MAX_SHARED_BLOB: u64 = 4 << 20;

impl Fetcher {
    /// A small blob (a config, a manifest) by descriptor, verified: from the
    /// store, else from another node that has it or is fetching it now
    /// ([`Source::metadata`](crate::Source::metadata)), else fetched whole
    /// through the sources; kept.
    pub async fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        if let Some(b) = self.store().read_blob(&desc.digest)? {
            return Ok(b);
        }
        let turn = if desc.size <= MAX_SHARED_BLOB {
            self.meta_turn(Meta::Blob(desc)).await
        } else {
            None
        };
        if let Some((from, bytes)) = turn.as_ref().and_then(|t| t.got.as_ref()) {
            // Kept only if it checks out against its digest.
            match self.store().put_blob(&desc.digest, bytes) {
                Ok(()) => {
                    self.record_transfer(from, bytes.len() as u64);
                    return Ok(bytes.clone());
                }
                Err(e) => tracing::warn!(
                    blob = %desc.digest,
                    "{from} sent a blob that does not check out ({e}); fetching it here",
                    e = breakfs_index::Causes(&e)
                ),
            }
        }
        self.ensure_blob(desc).await?;
        drop(turn);
        self.store()
            .read_blob(&desc.digest)?
            .ok_or_else(|| Error::NotFound {
                what: format!("blob {} in the store right after fetching it", desc.digest),
            })
    }

    /// The TOC of layer `desc` (eStargz) with the offset of its member, or
    /// `None` for a layer without one. Read from the store's record, or
    /// from the blob's tail through the sources (peers only when the
    /// descriptor carries the TOC digest to check it by) and then recorded.
    pub async fn layer_toc(&self, desc: &Descriptor) -> Result<Option<TocLayer>> {
        let store = self.store();
        let name = format!("toc-{}.json", desc.digest.hex());
        if let Some(bytes) = store.read_meta(&name)? {
            if bytes == b"none" {
                return Ok(None);
            }
            if let Some(nl) = bytes.iter().position(|&b| b == b'\n')
                && let Ok(off) = std::str::from_utf8(&bytes[..nl])
                    .unwrap_or("")
                    .parse::<u64>()
                && let Ok(toc) = Toc::parse(&bytes[nl + 1..])
            {
                return Ok(Some(toc.to_layer(desc.size, Some(off))?));
            }
        }
        let what = format!("TOC of layer {}", desc.digest);
        // Peers only when the TOC can be checked; when what came does not
        // check out, read it again from the cloud alone. Whether a peer
        // answered is not known here (there may be none): the second
        // read's error is the one that names the cause.
        let began = std::time::Instant::now();
        let checked = desc.toc_digest().is_some();
        // Another node may have the TOC, or be reading it right now.
        let gzip = breakfs_index::Compression::from_media_type(&desc.media_type)
            == Some(breakfs_index::Compression::Gzip);
        let turn = if checked && gzip {
            self.meta_turn(Meta::Toc(desc)).await
        } else {
            None
        };
        let shared = turn
            .as_ref()
            .and_then(|t| t.got.as_ref())
            .and_then(|(from, tail)| match toc_from_tail(desc, &what, tail) {
                Ok(t) => {
                    self.record_transfer(from, tail.len() as u64);
                    Some(t)
                }
                Err(e) => {
                    tracing::warn!(
                        layer = %desc.digest,
                        "{from} sent a TOC that does not check out ({e}); reading it here",
                        e = breakfs_index::Causes(&e)
                    );
                    None
                }
            });
        let read =
            |trusted_only| move |start, len| self.read_any(&desc.digest, start, len, trusted_only);
        let found = match shared {
            Some(t) => Some(t),
            None => match read_toc_with(desc, &what, read(!checked)).await {
                Ok(t) => t,
                Err(first) if checked => {
                    let t = read_toc_with(desc, &what, read(true)).await?;
                    tracing::warn!(
                        layer = %desc.digest,
                        "a first read of the TOC, peers allowed, did not check out ({e}); \
                         read again from the cloud alone, it did",
                        e = breakfs_index::Causes(&first)
                    );
                    t
                }
                Err(e) => return Err(e),
            },
        };
        let out = match found {
            Some(t) => {
                let mut rec = format!("{}\n", t.toc_offset).into_bytes();
                rec.extend_from_slice(&t.toc.to_json());
                let mut records = vec![(name, rec)];
                if checked {
                    // What other nodes ask for; checked by them too.
                    records.push((toc_tail_name(&desc.digest), t.tail.clone()));
                }
                put_metas(store, records).await?;
                tracing::debug!(
                    layer = %desc.digest.short(),
                    size = desc.size,
                    fetched = t.fetched,
                    requests = t.requests,
                    secs = began.elapsed().as_secs_f64(),
                    "TOC read"
                );
                Some(t.layer)
            }
            None => {
                put_metas(store, vec![(name, b"none".to_vec())]).await?;
                None
            }
        };
        // Recorded: nodes waiting on this one for it are answered now.
        drop(turn);
        Ok(out)
    }

    /// Ask the first source that shares metadata among nodes about `meta`
    /// ([`Source::metadata`](crate::Source::metadata)); `None` when no
    /// source does.
    async fn meta_turn(&self, meta: Meta<'_>) -> Option<MetaTurn> {
        for s in self.sources() {
            if let Some(turn) = s.metadata(meta) {
                return Some(turn.await);
            }
        }
        None
    }
}

/// How much of a layer the store holds, by its chunks (distinct ones).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hydration {
    /// Uncompressed bytes of the chunks held.
    pub held_bytes: u64,
    /// Uncompressed bytes of all the layer's chunks.
    pub total_bytes: u64,
    /// Chunks held.
    pub held_chunks: u64,
    /// Chunks in all.
    pub total_chunks: u64,
    /// Whether the whole layer blob is held too.
    pub whole_blob: bool,
}

impl crate::ContentStore {
    /// How much of lazy layer `layer` the store holds, by the chunks its
    /// recorded TOC lists; `None` without a TOC record (not read yet, or
    /// a layer without a TOC).
    pub fn hydration(&self, layer: &Digest) -> Option<Hydration> {
        let bytes = self
            .read_meta(&format!("toc-{}.json", layer.hex()))
            .ok()??;
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let offset: u64 = std::str::from_utf8(&bytes[..nl]).ok()?.parse().ok()?;
        let toc = Toc::parse(&bytes[nl + 1..]).ok()?;
        // The blob's size only bounds the last chunk, which ends at the TOC.
        let entries = toc.to_layer(u64::MAX, Some(offset)).ok()?;
        let desc = Descriptor::new("", layer.clone(), u64::MAX);
        let mut seen = std::collections::HashSet::new();
        let mut h = Hydration {
            whole_blob: self.has_blob(layer),
            ..Hydration::default()
        };
        for (entry, chunks) in &entries.entries {
            for c in chunks {
                let Ok(loc) = chunk_loc_or_why(&desc, entry, chunks.len(), c) else {
                    continue;
                };
                if !seen.insert(loc.digest.clone()) {
                    continue;
                }
                h.total_bytes += loc.size;
                h.total_chunks += 1;
                if self.has_chunk(&loc.digest) {
                    h.held_bytes += loc.size;
                    h.held_chunks += 1;
                }
            }
        }
        Some(h)
    }
}

/// Largest chunk fetched on its own, compressed or not: a chunk is held in
/// memory while it is checked, so a TOC declaring a huge chunk (or a small
/// member that inflates to gigabytes) must not be taken at its word. Chunks
/// are 4 MiB as breakfs and the eStargz tools write them.
const MAX_CHUNK: u64 = 16 << 20;

/// Where chunk `c` of an entry of layer `desc` sits, or `None` when it
/// cannot be fetched alone (see [`chunk_loc_or_why`]).
pub fn chunk_loc(
    desc: &Descriptor,
    entry: &breakfs_index::Entry,
    chunks: usize,
    c: &breakfs_index::TocChunk,
) -> Option<crate::ChunkLoc> {
    chunk_loc_or_why(desc, entry, chunks, c).ok()
}

/// Where chunk `c` of an entry of layer `desc` sits, or why it cannot be
/// fetched alone: the TOC gives nothing to check it by (no chunk digest,
/// and not a single-chunk file with a file digest) or the chunk is larger
/// than `MAX_CHUNK`. Such a layer is fetched whole and its tar stream
/// indexed instead.
pub fn chunk_loc_or_why(
    desc: &Descriptor,
    entry: &breakfs_index::Entry,
    chunks: usize,
    c: &breakfs_index::TocChunk,
) -> std::result::Result<crate::ChunkLoc, String> {
    let inflated = c.inner_offset.saturating_add(c.chunk_size);
    let compressed = c.compressed_end.saturating_sub(c.offset);
    if inflated > MAX_CHUNK || compressed > MAX_CHUNK {
        return Err(format!(
            "entry {:?}: its chunk at file offset {} is {inflated} bytes inflated and \
             {compressed} compressed, more than the {MAX_CHUNK} a chunk fetched alone may be",
            entry.path, c.chunk_offset
        ));
    }
    let digest = match (&c.chunk_digest, &entry.digest) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) if chunks == 1 && c.chunk_size == entry.size => d.clone(),
        _ => {
            return Err(format!(
                "entry {:?}: its chunk at file offset {} has no digest to check it by",
                entry.path, c.chunk_offset
            ));
        }
    };
    Ok(crate::ChunkLoc {
        layer: desc.digest.clone(),
        offset: c.offset,
        compressed_end: c.compressed_end,
        inner_offset: c.inner_offset,
        size: c.chunk_size,
        digest,
    })
}

/// Every chunk of layer `desc`, or `None` if some chunk cannot be checked.
pub fn layer_chunk_locs(desc: &Descriptor, layer: &TocLayer) -> Option<Vec<crate::ChunkLoc>> {
    lazy_chunk_locs(desc, layer).ok()
}

/// Every chunk of layer `desc`, or why the layer cannot be read lazily
/// through its TOC (the first chunk that cannot be fetched alone).
pub fn lazy_chunk_locs(
    desc: &Descriptor,
    layer: &TocLayer,
) -> std::result::Result<Vec<crate::ChunkLoc>, String> {
    let mut out = Vec::new();
    for (entry, chunks) in &layer.entries {
        for c in chunks {
            out.push(chunk_loc_or_why(desc, entry, chunks.len(), c)?);
        }
    }
    Ok(out)
}

impl crate::Image {
    /// Keep the manifest in `store` as a blob and record what the reference
    /// resolved to, so that the node can serve the image to peers and OCI
    /// clients (`skopeo copy` from a node).
    pub fn keep_in(&self, store: &crate::ContentStore) -> Result<()> {
        store.put_blob(&self.manifest_digest, &self.manifest_bytes)?;
        if let breakfs_index::ImageRef::Registry {
            repo, reference, ..
        } = &self.reference
        {
            store.put_ref(repo, &reference.to_string(), &self.manifest_digest)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use breakfs_index::{Entry, EntryKind, TocChunk};

    use super::*;

    #[test]
    fn chunks_too_big_to_hold_are_not_fetched_alone() {
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Digest::of(b"l"),
            1 << 40,
        );
        let mut file = Entry::new("f", EntryKind::File);
        let chunk = |offset: u64, compressed_end: u64, size: u64| TocChunk {
            offset,
            inner_offset: 0,
            compressed_end,
            chunk_offset: 0,
            chunk_size: size,
            chunk_digest: Some(Digest::of(b"c")),
        };
        file.size = 4 << 20;
        assert!(chunk_loc(&desc, &file, 1, &chunk(0, 1 << 20, 4 << 20)).is_some());
        // A TOC's word for a 1 TiB chunk, and a 1 GiB member for a small one.
        file.size = 1 << 40;
        assert!(chunk_loc(&desc, &file, 1, &chunk(0, 100, 1 << 40)).is_none());
        file.size = 10;
        assert!(chunk_loc(&desc, &file, 1, &chunk(0, 1 << 30, 10)).is_none());
    }

    #[test]
    fn hydration_counts_the_distinct_chunks_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::ContentStore::open(dir.path()).unwrap();
        let layer = Digest::of(b"layer");
        assert_eq!(store.hydration(&layer), None);
        let (a, b) = (b"first file".to_vec(), b"second, longer file".to_vec());
        let entry = |name: &str, bytes: &[u8], offset: u64| {
            let mut e = breakfs_index::TocEntry::new(name, breakfs_index::TocEntryType::Reg);
            e.size = bytes.len() as u64;
            e.digest = Digest::of(bytes).to_string();
            e.offset = offset;
            e
        };
        let toc = Toc {
            version: 1,
            entries: vec![entry("a", &a, 10), entry("a2", &a, 20), entry("b", &b, 30)],
        };
        let mut rec = b"40\n".to_vec();
        rec.extend_from_slice(&toc.to_json());
        store
            .put_meta(&format!("toc-{}.json", layer.hex()), &rec)
            .unwrap();
        store.put_chunk(&Digest::of(&a), &a).unwrap();
        let h = store.hydration(&layer).unwrap();
        // "a2" holds the same content as "a": one chunk.
        assert_eq!((h.held_chunks, h.total_chunks), (1, 2));
        assert_eq!(h.held_bytes, a.len() as u64);
        assert_eq!(h.total_bytes, (a.len() + b.len()) as u64);
        assert!(!h.whole_blob);
    }
}
