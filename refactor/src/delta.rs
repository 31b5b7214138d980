//! Delta updates: when an image is refactored into a destination that
//! holds an earlier version, each chunk of a file the new image changed
//! (same path, other content, at least [`MIN_FILE`] bytes) gets a zstd
//! delta against the earlier file's content (a raw-content dictionary),
//! kept when it is well under the chunk's compressed size. A node that ran
//! the earlier version holds that content and fetches the delta instead
//! of the chunk (`breakfs_fetch::delta`, which also describes the
//! artifact the deltas are published in: beside the image, not in it).
//!
//! Made after the image's manifest is pushed, so the image is usable at
//! once; its cost is bounded by the changed files alone, compressed side
//! by side at [`LEVEL`] (a few seconds for 45 MB of changed files here).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use breakfs_fetch::Store;
use breakfs_fetch::delta::{
    ARTIFACT_TYPE, ChunkDelta, DeltaIndex, EMPTY_MEDIA_TYPE, INDEX_MEDIA_TYPE, MAX_BASE,
    PACK_MEDIA_TYPE, delta_tag, make_delta,
};
use breakfs_index::{Descriptor, Digest, Entry, MergedView, media_types};
use rayon::prelude::*;

use crate::{ContentSource, Error, PublishedLayer, Result};

/// Smallest file that gets deltas: below it a round trip costs more than
/// the bytes.
pub const MIN_FILE: u64 = 16 << 10;
/// Most bytes of changed files an image gets deltas for (redis v1→v2
/// changes 48 MB of files of 16 KiB or more).
pub const MAX_INPUT: u64 = 128 << 20;
/// The zstd level of the deltas (level 9: 20 % of the gzip size of the
/// redis update's start files in 0.6 s; level 19 saves 3 % more in 12×
/// the time).
pub const LEVEL: i32 = 9;

/// What making the deltas of one image did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeltaReport {
    /// Changed files that got deltas.
    pub files: usize,
    /// Chunks with a delta.
    pub chunks: usize,
    /// Bytes of the deltas (the pack).
    pub delta_bytes: u64,
    /// Deflated size of the chunks they stand for (what a node would
    /// fetch otherwise, about).
    pub replaced_bytes: u64,
    /// Seconds spent, reading bases and compressing included.
    pub seconds: f64,
}

/// A layer of the destination: its descriptor and entries.
pub(crate) struct BaseLayer<'a> {
    pub desc: &'a Descriptor,
    pub layer: &'a PublishedLayer,
}

/// A changed file of the new image and the earlier file chosen as its base.
struct Pair<'a> {
    new: &'a Entry,
    layer: usize,
    base_path: String,
}

/// The changed files of `view` with their bases among `layers`: the entry
/// at the same path with other content, of the size nearest the new one.
fn pairs<'a>(view: &'a MergedView, layers: &[BaseLayer<'_>]) -> Vec<Pair<'a>> {
    let mut by_path: HashMap<&str, Vec<(usize, &Entry)>> = HashMap::new();
    for (i, l) in layers.iter().enumerate() {
        for e in &l.layer.entries {
            if e.is_file() && e.size >= MIN_FILE && e.size <= MAX_BASE {
                by_path.entry(e.path.as_str()).or_default().push((i, e));
            }
        }
    }
    let mut out = Vec::new();
    for me in view.iter() {
        let new = &me.entry;
        if !new.is_file() || new.size < MIN_FILE || new.digest.is_none() {
            continue;
        }
        let Some(cands) = by_path.get(new.path.as_str()) else {
            continue;
        };
        // The same content already published: nothing changed.
        if cands.iter().any(|(_, e)| e.digest == new.digest) {
            continue;
        }
        if let Some((layer, base)) = cands.iter().min_by_key(|(_, e)| e.size.abs_diff(new.size)) {
            out.push(Pair {
                new,
                layer: *layer,
                base_path: base.path.clone(),
            });
        }
    }
    out
}

/// The content of `path` in layer `desc` of `store`, read through the
/// layer's TOC (each chunk's gzip member inflated), with the digests of
/// its chunks (their keys in a node's store).
async fn base_content(
    store: &Store,
    desc: &Descriptor,
    toc: &breakfs_fetch::LayerToc,
    path: &str,
) -> Result<Option<(Vec<u8>, Vec<Digest>)>> {
    let Some((entry, chunks)) = toc.layer.entries.iter().find(|(e, _)| e.path == path) else {
        return Ok(None);
    };
    let mut content = Vec::with_capacity(entry.size as usize);
    let mut digests = Vec::with_capacity(chunks.len());
    for c in chunks {
        let member = store
            .read_range(&desc.digest, c.offset, c.compressed_end - c.offset)
            .await?;
        let Some(bytes) = inflate(&member, c.inner_offset, c.chunk_size) else {
            return Ok(None);
        };
        digests.push(Digest::of(&bytes));
        content.extend_from_slice(&bytes);
    }
    Ok((content.len() as u64 == entry.size).then_some((content, digests)))
}

/// `len` bytes at `inner` of the one gzip member `member`.
fn inflate(member: &[u8], inner: u64, len: u64) -> Option<Vec<u8>> {
    let tail: [u8; 4] = member
        .get(member.len().checked_sub(4)?..)?
        .try_into()
        .ok()?;
    let isize = u32::from_le_bytes(tail) as usize;
    let mut out = vec![0u8; isize];
    let n = libdeflater::Decompressor::new()
        .gzip_decompress(member, &mut out)
        .ok()?;
    out.get(inner as usize..(inner + len) as usize)
        .filter(|_| n == isize)
        .map(<[u8]>::to_vec)
}

/// One chunk's delta, if it is worth keeping.
struct Made {
    chunk: Digest,
    size: u64,
    base: usize,
    delta: Vec<u8>,
    deflated: u64,
}

/// The deltas of the chunks `work` (a file, its base in `bases`, the
/// chunk's offset) worth keeping, made side by side.
fn make_all(
    work: &[(Entry, usize, u64)],
    bases: &[(Vec<u8>, Vec<Digest>)],
    content: &dyn ContentSource,
    chunk_size: u64,
) -> Result<Vec<Made>> {
    let out: Vec<Result<Option<Made>>> = work
        .par_iter()
        .map(|(e, b, off)| {
            let len = chunk_size.min(e.size - off);
            let mut buf = vec![0u8; len as usize];
            content
                .read_at(e, *off, &mut buf)
                .map_err(|err| Error::io(format!("reading {}", e.path), err))?;
            let delta = make_delta(&bases[*b].0, &buf, LEVEL)
                .map_err(|err| Error::io(format!("making a delta of {}", e.path), err))?;
            let deflated = libdeflater::Compressor::new(libdeflater::CompressionLvl::default())
                .deflate_compress(&buf, &mut vec![0u8; buf.len() + 1024])
                .unwrap_or(buf.len()) as u64;
            Ok((delta.len() as u64 * 2 <= deflated).then(|| Made {
                chunk: Digest::of(&buf),
                size: len,
                base: *b,
                delta,
                deflated,
            }))
        })
        .collect();
    out.into_iter().filter_map(Result::transpose).collect()
}

/// Make the deltas of the image `manifest` (merged view `view`, its
/// content in `content`, cut into `chunk_size` chunks as the writer cut
/// it) against the earlier files in `layers` of `store`, and push them as
/// the image's delta artifact. `None` when no file has a base there.
pub(crate) async fn publish(
    store: &Store,
    manifest: &Descriptor,
    view: &MergedView,
    content: Arc<dyn ContentSource + Send>,
    layers: &[BaseLayer<'_>],
    chunk_size: u64,
) -> Result<Option<DeltaReport>> {
    let began = Instant::now();
    let mut pairs = pairs(view, layers);
    // Bounded: an image refactored beside unrelated ones (other files at
    // the same paths) must not pay for deltas nobody fetches.
    let mut total = 0u64;
    pairs.retain(|p| {
        total += p.new.size;
        total <= MAX_INPUT
    });
    if pairs.is_empty() {
        return Ok(None);
    }
    // The bases, read through their layers' TOCs (each TOC once).
    let mut tocs: HashMap<usize, Option<breakfs_fetch::LayerToc>> = HashMap::new();
    let mut bases: Vec<(Vec<u8>, Vec<Digest>)> = Vec::new();
    let mut jobs: Vec<(&Entry, usize)> = Vec::new();
    for p in &pairs {
        let desc = layers[p.layer].desc;
        if let std::collections::hash_map::Entry::Vacant(e) = tocs.entry(p.layer) {
            e.insert(store.read_toc(desc).await?);
        }
        let Some(Some(toc)) = tocs.get(&p.layer) else {
            continue;
        };
        if let Some(b) = base_content(store, desc, toc, &p.base_path).await? {
            bases.push(b);
            jobs.push((p.new, bases.len() - 1));
        }
    }
    let work: Vec<(Entry, usize, u64)> = jobs
        .iter()
        .flat_map(|&(e, b)| {
            (0..e.size.div_ceil(chunk_size.max(1))).map(move |k| (e.clone(), b, k * chunk_size))
        })
        .collect();
    let bases = Arc::new(bases);
    tracing::debug!(
        changed = pairs.len(),
        with_base = jobs.len(),
        chunks = work.len(),
        "changed files with an earlier version in the destination"
    );
    let made = {
        let bases = bases.clone();
        tokio::task::spawn_blocking(move || make_all(&work, &bases, &*content, chunk_size))
            .await
            .map_err(|e| Error::io("making deltas", std::io::Error::other(e)))??
    };
    if made.is_empty() {
        return Ok(None);
    }
    let mut pack = Vec::new();
    let mut deltas = Vec::new();
    let mut report = DeltaReport {
        files: jobs.len(),
        ..DeltaReport::default()
    };
    let mut seen = BTreeMap::new();
    for m in made {
        if seen.insert(m.chunk.clone(), ()).is_some() {
            continue;
        }
        report.chunks += 1;
        report.replaced_bytes += m.deflated;
        let (base, base_digests) = &bases[m.base];
        deltas.push(ChunkDelta {
            chunk: m.chunk,
            size: m.size,
            base: base_digests.clone(),
            base_size: base.len() as u64,
            offset: pack.len() as u64,
            len: m.delta.len() as u64,
        });
        pack.extend_from_slice(&m.delta);
    }
    report.delta_bytes = pack.len() as u64;
    let pack_desc = Descriptor::new(PACK_MEDIA_TYPE, Digest::of(&pack), pack.len() as u64);
    let index = DeltaIndex {
        pack: pack_desc.digest.clone(),
        pack_size: pack_desc.size,
        deltas,
    };
    let index_bytes = serde_json::to_vec(&index)
        .map_err(|e| Error::io("serialising the delta index", std::io::Error::other(e)))?;
    let index_desc = Descriptor::new(
        INDEX_MEDIA_TYPE,
        Digest::of(&index_bytes),
        index_bytes.len() as u64,
    );
    let empty = b"{}";
    let empty_desc = Descriptor::new(EMPTY_MEDIA_TYPE, Digest::of(empty), empty.len() as u64);
    store.push_blob_bytes(&pack_desc, &pack).await?;
    store.push_blob_bytes(&index_desc, &index_bytes).await?;
    store.push_blob_bytes(&empty_desc, empty).await?;
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_desc,
        "layers": [index_desc, pack_desc],
        "subject": manifest,
    });
    let bytes = serde_json::to_vec(&artifact)
        .map_err(|e| Error::io("serialising the delta artifact", std::io::Error::other(e)))?;
    store
        .push_manifest(
            &delta_tag(&manifest.digest),
            media_types::OCI_MANIFEST,
            &bytes,
        )
        .await?;
    report.seconds = began.elapsed().as_secs_f64();
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write as _;

    use breakfs_index::{EntryKind, MergedEntry};

    use super::*;

    fn file(path: &str, size: u64, content: &[u8]) -> Entry {
        let mut e = Entry::new(path, EntryKind::File);
        e.size = size;
        e.digest = Some(Digest::of(content));
        e
    }

    #[test]
    fn changed_files_pair_with_the_earlier_file_of_the_nearest_size() {
        let big = MIN_FILE * 2;
        let view = MergedView::from_entries(
            [
                file("usr/bin/app", big, b"app v2"),
                file("usr/lib/same.so", big, b"same"),
                file("usr/lib/new.so", big, b"new"),
                file("etc/small", 10, b"small v2"),
            ]
            .into_iter()
            .map(|entry| MergedEntry {
                entry,
                layer: 0,
                data_offset: 0,
            }),
        );
        let (d0, d1) = (
            Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::of(b"0"), 1),
            Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::of(b"1"), 1),
        );
        let (l0, l1) = (
            PublishedLayer {
                id: d0.digest.to_string(),
                entries: vec![
                    file("usr/bin/app", big * 4, b"app v0"),
                    file("usr/lib/same.so", big, b"same"),
                    file("etc/small", 10, b"small v1"),
                ],
            },
            PublishedLayer {
                id: d1.digest.to_string(),
                entries: vec![file("usr/bin/app", big + 5, b"app v1")],
            },
        );
        let layers = [
            BaseLayer {
                desc: &d0,
                layer: &l0,
            },
            BaseLayer {
                desc: &d1,
                layer: &l1,
            },
        ];
        let got: Vec<(String, usize)> = pairs(&view, &layers)
            .into_iter()
            .map(|p| (p.new.path.clone(), p.layer))
            .collect();
        // Unchanged, new and small files get none; the app pairs with v1's.
        assert_eq!(got, vec![("usr/bin/app".to_string(), 1)]);
    }

    #[test]
    fn a_chunk_is_read_out_of_its_gzip_member() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let member = e.finish().unwrap();
        assert_eq!(inflate(&member, 100, 400).unwrap(), data[100..500]);
        assert!(inflate(&member, 4900, 400).is_none());
        assert!(inflate(&member[..member.len() - 9], 0, 10).is_none());
    }
}
