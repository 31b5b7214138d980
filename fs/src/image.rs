//! Opening an image for mounting or extraction: manifest and config,
//! every layer's TOC (eStargz) or index (a plain layer, fetched whole
//! first), all cached in the content store, merged into a [`Tree`].

use std::io::{BufWriter, Write};
use std::sync::Arc;

use breakfs_fetch::budget::LivePin;
use breakfs_fetch::{
    ChunkLoc, ClientOptions, CloudSource, ContentStore, FetchOptions, Fetcher, Image, Source,
    chunk_loc_or_why, landmarked_chunks,
};
use breakfs_index::{
    Compression, Descriptor, Digest, Entry, EntryKind, ImageRef, LayerIndex, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, TOC_TAR_NAME, TocLayer,
};
use futures::future::try_join_all;

use crate::tree::{FileChunk, LayerFile, Tree};
use crate::{Error, Result};

/// An image ready to mount: its tree and the fetcher that fills it.
pub struct OpenedImage {
    /// The resolved image.
    pub image: Image,
    /// The merged tree.
    pub tree: Arc<Tree>,
    /// The fetch scheduler over the content store.
    pub fetcher: Fetcher,
    /// How each layer is served.
    pub layers: Vec<LayerMode>,
    /// The eStargz prefetch region of each lazy layer that has one (the
    /// chunks before its `.prefetch.landmark`): fetched at mount.
    pub regions: Vec<(Digest, Vec<ChunkLoc>)>,
    /// The layers counted live in the store's budget, from the start of
    /// opening until this (or the mount made of it) is dropped.
    pub pin: Option<LivePin>,
}

/// How a layer's content is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerMode {
    /// eStargz: chunks fetched lazily with Range requests.
    Lazy,
    /// Not seekable (plain gzip, zstd, tar, or a TOC without chunk digests):
    /// fetched whole, indexed once, its files stored as chunks.
    Whole,
}

/// Resolve `reference` and build its tree, fetching only metadata for
/// eStargz layers (and whole blobs for other layers): standalone, with a
/// fetch scheduler of its own that reads from the image's registry or layout.
pub async fn open_image(
    reference: &ImageRef,
    store: Arc<ContentStore>,
    client: &ClientOptions,
    fetch: FetchOptions,
) -> Result<OpenedImage> {
    let cloud = Arc::new(CloudSource::new());
    let fetcher = Fetcher::new(store, vec![cloud.clone() as Arc<dyn Source>], fetch);
    open_image_on(reference, client, &fetcher, &cloud).await
}

/// [`open_image`] through an existing fetch scheduler (a node daemon's,
/// shared by all its mounts and its prefetch), whose chain ends in `cloud`.
pub async fn open_image_on(
    reference: &ImageRef,
    client: &ClientOptions,
    fetcher: &Fetcher,
    cloud: &Arc<CloudSource>,
) -> Result<OpenedImage> {
    let image = breakfs_fetch::resolve_image(reference, client, fetcher, cloud).await?;
    open_resolved(image, fetcher, None).await
}

/// Told each lazy layer's files as soon as its TOC is in (before the
/// other layers' TOCs maybe, and before the tree is built): a profile's
/// prefetch starts on the layer there (`crate::profile::ProfilePrefetch`).
pub type LayerSeen<'a> = &'a (dyn Fn(&Digest, &[LayerFile]) + Sync);

/// Build the tree of `image`, resolved through `fetcher`'s chain (see
/// [`open_image_on`]): every layer's TOC (or whole blob) at once, each
/// lazy layer told to `seen` as it comes in. A caller with `seen` is about
/// to mount the image (the node daemon): each layer's landmarked region
/// is fetched from the moment its TOC is in, not once every TOC is in and
/// the mount made (the mount's own start of the regions then finds their
/// chunks taken or stored, and asks for nothing twice).
pub async fn open_resolved(
    image: Image,
    fetcher: &Fetcher,
    seen: Option<LayerSeen<'_>>,
) -> Result<OpenedImage> {
    let reference = &image.reference;
    let pin = fetcher
        .store()
        .budget()
        .map(|b| b.pin(image.layers().iter().map(|l| l.digest.clone())));
    let diff_ids = image.config.diff_ids()?;
    if diff_ids.len() != image.layers().len() {
        return Err(Error::BadImage {
            what: reference.to_string(),
            reason: format!(
                "the manifest has {} layers but the config lists {} diff_ids",
                image.layers().len(),
                diff_ids.len()
            ),
        });
    }
    let loads = image
        .layers()
        .iter()
        .zip(&diff_ids)
        .map(|(desc, diff_id)| async move {
            let loaded = load_layer(fetcher, desc, diff_id, reference).await?;
            if let (Some(seen), (files, LayerMode::Lazy, region)) = (seen, &loaded) {
                seen(&desc.digest, files);
                fetcher.spawn_regions(vec![(desc.digest.clone(), region.clone())]);
            }
            Ok::<_, Error>(loaded)
        });
    let loaded = try_join_all(loads).await?;
    let mut layers = Vec::with_capacity(loaded.len());
    let mut modes = Vec::with_capacity(loaded.len());
    let mut regions = Vec::new();
    for ((files, mode, region), desc) in loaded.into_iter().zip(image.layers()) {
        layers.push(files);
        modes.push(mode);
        if !region.is_empty() {
            regions.push((desc.digest.clone(), region));
        }
    }
    let tree = build_tree(reference.to_string(), move || Tree::build(layers)).await?;
    Ok(OpenedImage {
        image,
        tree: Arc::new(tree),
        fetcher: fetcher.clone(),
        layers: modes,
        regions,
        pin,
    })
}

/// One layer of the resolved `image`, alone and in overlayfs' own form
/// ([`Tree::build_overlay_layer`]), to be a lower dir of an overlay (the
/// containerd snapshotter's lazy layers); `None` when the layer has no TOC
/// (it cannot be served lazily). Only its TOC is fetched (a range request,
/// or the store's copy). The opened image's manifest lists this layer
/// only, so that a mount of it hydrates and pins this layer alone.
pub async fn open_layer(
    mut image: Image,
    layer: &Digest,
    fetcher: &Fetcher,
) -> Result<Option<OpenedImage>> {
    let what = format!("layer {layer} of {}", image.reference);
    let Some(desc) = image.layers().iter().find(|d| &d.digest == layer).cloned() else {
        return Err(Error::BadImage {
            what,
            reason: "the image's manifest does not list it".into(),
        });
    };
    let toc = fetcher
        .layer_toc(&desc)
        .await
        .map_err(|e| Error::BadImage {
            what: what.clone(),
            reason: breakfs_index::Causes(&e).to_string(),
        })?;
    let Some(toc) = toc else {
        return Ok(None);
    };
    let region = landmarked_chunks(&desc, &toc);
    let files = lazy_files(toc, &desc).map_err(|reason| Error::BadImage {
        what: what.clone(),
        reason: format!("its TOC cannot be read lazily: {reason}"),
    })?;
    let tree = build_tree(what, move || Tree::build_overlay_layer(files)).await?;
    let pin = fetcher
        .store()
        .budget()
        .map(|b| b.pin([desc.digest.clone()]));
    let regions = if region.is_empty() {
        Vec::new()
    } else {
        vec![(desc.digest.clone(), region)]
    };
    image.manifest.layers = vec![desc];
    Ok(Some(OpenedImage {
        image,
        tree: Arc::new(tree),
        fetcher: fetcher.clone(),
        layers: vec![LayerMode::Lazy],
        regions,
        pin,
    }))
}

/// The tree `build` makes (of `what`), built on the blocking pool.
pub(crate) async fn build_tree(
    what: String,
    build: impl FnOnce() -> Result<Tree> + Send + 'static,
) -> Result<Tree> {
    tokio::task::spawn_blocking(build)
        .await
        .map_err(|e| Error::BadImage {
            what: what.clone(),
            reason: format!("building the tree failed: {e}"),
        })?
        .map_err(|e| Error::BadImage {
            what,
            reason: breakfs_index::Causes(&e).to_string(),
        })
}

async fn load_layer(
    fetcher: &Fetcher,
    desc: &Descriptor,
    diff_id: &Digest,
    reference: &ImageRef,
) -> Result<(Vec<LayerFile>, LayerMode, Vec<ChunkLoc>)> {
    let store = fetcher.store().clone();
    let what = format!("layer {} of {reference}", desc.digest);
    let toc = fetcher.layer_toc(desc).await.map_err(|e| Error::BadImage {
        what: what.clone(),
        reason: breakfs_index::Causes(&e).to_string(),
    })?;
    if let Some(toc_layer) = toc {
        let region = landmarked_chunks(desc, &toc_layer);
        match lazy_files(toc_layer, desc) {
            Ok(files) => return Ok((files, LayerMode::Lazy, region)),
            Err(why) => tracing::warn!(
                "{what}: its TOC cannot be read lazily ({why}); \
                 fetching the layer whole and reading its tar stream instead"
            ),
        }
    }
    if let Some(b) = store.budget() {
        b.mark_whole(&desc.digest);
    }
    let index_name = format!("layer-{}.json", desc.digest.hex());
    if let Some(bytes) = store.read_meta(&index_name)? {
        let entries: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|e| Error::BadImage {
            what: format!("cached index of {what}"),
            reason: e.to_string(),
        })?;
        // The chunks of a layer indexed whole come only from its blob: when
        // some went (evicted while no mount used the layer, or removed by
        // `breakfs verify --repair`), index the blob again below.
        let gone = entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.size > 0)
            .filter_map(|e| e.digest.as_ref())
            .filter(|d| !store.has_chunk(d))
            .count();
        if gone == 0 {
            return Ok((whole_files(entries), LayerMode::Whole, Vec::new()));
        }
        tracing::info!(layer = %desc.digest, gone, "files of a layer indexed whole left the store; indexing it again");
    }
    let blob = fetcher.ensure_blob(desc).await?;
    let desc = desc.clone();
    let diff_id = diff_id.clone();
    let entries = tokio::task::spawn_blocking(move || {
        index_whole_layer(&store, &blob, &desc, &diff_id, &index_name, &what)
    })
    .await
    .map_err(|e| Error::BadImage {
        what: reference.to_string(),
        reason: format!("indexing a layer failed: {e}"),
    })??;
    Ok((whole_files(entries), LayerMode::Whole, Vec::new()))
}

/// The files of an eStargz layer with their chunk locations, or why some
/// chunk cannot be fetched alone (the layer is then fetched whole).
pub(crate) fn lazy_files(
    layer: TocLayer,
    desc: &Descriptor,
) -> std::result::Result<Vec<LayerFile>, String> {
    let mut out = Vec::with_capacity(layer.entries.len());
    for (entry, chunks) in layer.entries {
        let mut fc = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let loc = chunk_loc_or_why(desc, &entry, chunks.len(), c)?;
            fc.push(FileChunk::new(
                c.chunk_offset,
                c.chunk_size,
                loc.digest.clone(),
                Some(loc),
            ));
        }
        out.push((entry, fc));
    }
    Ok(out)
}

/// The files of a layer indexed whole: without the TOC and landmark files
/// of an eStargz layer read this way, which belong to the format, not the
/// image (a lazy read of the TOC leaves them out too).
fn whole_files(entries: Vec<Entry>) -> Vec<LayerFile> {
    entries
        .into_iter()
        .filter(|e| {
            e.kind != EntryKind::File
                || ![TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK]
                    .contains(&e.path.as_str())
        })
        .map(|e| {
            let chunks = match (&e.kind, &e.digest) {
                (EntryKind::File, Some(d)) if e.size > 0 => {
                    vec![FileChunk::new(0, e.size, d.clone(), None)]
                }
                _ => Vec::new(),
            };
            (e, chunks)
        })
        .collect()
}

/// Decompress a whole layer blob, check its diff_id, index it, record
/// the index as `record`, and store each file's content as a chunk keyed
/// by its digest. The record comes first: the budget learns from it which
/// layer the chunks belong to, and does not take them for strays while
/// they land (a kill meanwhile leaves a record whose missing chunks
/// [`load_layer`] stores again).
fn index_whole_layer(
    store: &ContentStore,
    blob: &std::path::Path,
    desc: &Descriptor,
    diff_id: &Digest,
    record: &str,
    what: &str,
) -> Result<Vec<Entry>> {
    let compression =
        Compression::from_media_type(&desc.media_type).ok_or_else(|| Error::BadImage {
            what: what.to_string(),
            reason: format!(
                "media type {} is not a layer breakfs can read",
                desc.media_type
            ),
        })?;
    let tar_path = store.temp_path();
    let result = (|| {
        let f = std::fs::File::open(blob)
            .map_err(|e| Error::io(format!("opening {}", blob.display()), e))?;
        let dec = breakfs_index::decoder(compression, f)
            .map_err(|e| Error::io(format!("decompressing {what}"), e))?;
        let out = std::fs::File::create(&tar_path)
            .map_err(|e| Error::io(format!("creating {}", tar_path.display()), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let index = LayerIndex::read_copying(dec, &mut out, what)?;
        out.flush()
            .map_err(|e| Error::io(format!("writing {}", tar_path.display()), e))?;
        if &index.diff_id != diff_id {
            return Err(Error::BadImage {
                what: what.to_string(),
                reason: format!(
                    "its uncompressed content has digest {}, the config's diff_id says {diff_id}",
                    index.diff_id
                ),
            });
        }
        let entries: Vec<Entry> = index.entries.iter().map(|le| le.entry.clone()).collect();
        let json = serde_json::to_vec(&entries).map_err(|e| Error::BadImage {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
        store.put_meta(record, &json)?;
        let tar = std::fs::File::open(&tar_path)
            .map_err(|e| Error::io(format!("opening {}", tar_path.display()), e))?;
        // Each file synced on its own: spread them over a few threads.
        let files: Vec<_> = index
            .entries
            .iter()
            .filter_map(|le| match (&le.entry.kind, &le.entry.digest) {
                (EntryKind::File, Some(d)) if le.entry.size > 0 => {
                    Some((d, le.data_offset, le.entry.size))
                }
                _ => None,
            })
            .collect();
        let threads = 4;
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (files, tar) = (&files, &tar);
                    scope.spawn(move || {
                        files
                            .iter()
                            .skip(t)
                            .step_by(threads)
                            .try_for_each(|(d, off, size)| {
                                store.put_chunk_from(d, tar, *off, *size)
                            })
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(breakfs_fetch::Error::Unavailable {
                        what: what.to_string(),
                        reason: "a thread storing its files failed".into(),
                    })
                })
            })
        })?;
        Ok(entries)
    })();
    let _ = std::fs::remove_file(&tar_path);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write as _;

    use breakfs_fetch::budget::Budget;

    use super::*;

    #[test]
    fn a_layer_indexed_whole_keeps_its_chunks_while_a_full_budget_evicts() {
        // Eight files of 2 KiB in a layer, the budget 4 KiB: every chunk
        // stored makes the budget evict.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::open(&dir.path().join("store")).unwrap());
        let budget = Arc::new(Budget::new(4096, &store));
        store.set_budget(budget.clone());
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..8u8 {
            let data = vec![i; 2048];
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, &gz).unwrap();
        let desc = Descriptor::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Digest::of(&gz),
            gz.len() as u64,
        );
        let record = format!("layer-{}.json", desc.digest.hex());
        // As opening an image does: pinned from the start, marked whole.
        let pin = budget.pin([desc.digest.clone()]);
        budget.mark_whole(&desc.digest);
        let entries =
            index_whole_layer(&store, &blob, &desc, &Digest::of(&tar), &record, "a layer").unwrap();
        let chunks: Vec<&Digest> = entries.iter().filter_map(|e| e.digest.as_ref()).collect();
        assert_eq!(chunks.len(), 8);
        for d in &chunks {
            assert!(
                store.has_chunk(d),
                "chunk {d} was evicted while its layer was pinned"
            );
        }
        // Unpinned, the layer is the first to go.
        drop(pin);
        store
            .put_chunk(&Digest::of(&[9u8; 2048]), &[9u8; 2048])
            .unwrap();
        assert!(chunks.iter().any(|d| !store.has_chunk(d)));
    }
}
