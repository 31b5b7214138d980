//! The layers a destination already holds, with their entries.
//!
//! Each layer's entries come from its TOC (or its tar, for a layer without
//! one), read once and then kept in the destination's *layer index*: one
//! file of TOC-derived entries per layer digest, so that the next run reads
//! that file instead of a thousand TOCs. For an OCI layout the file is
//! `DIR/breakfs-layer-index.json`, beside `index.json`; for a registry it is
//! kept in the work directory. A layer is taken from the index only when a
//! manifest of the destination lists it with the same digest, size and
//! media type (and, in a layout, its blob is there); any other layer is read
//! again and the index rewritten. Digests name contents, so an indexed layer
//! never goes stale.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};

use breakfs_fetch::Store;
use breakfs_index::{Descriptor, Digest, Entry, EntryKind, ImageRef};
use serde::{Deserialize, Serialize};

use super::{Progress, RefactorOptions, blocking, local_layer};
use crate::{Error, PublishedLayer, Result};

/// The layer index being written in the background; [`IndexWrite::finish`]
/// waits for it (a failure only costs the next run its TOC reads).
pub(super) struct IndexWrite(Option<tokio::task::JoinHandle<Result<()>>>);

impl IndexWrite {
    pub async fn finish(self) {
        let Some(handle) = self.0 else { return };
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{}", breakfs_index::Causes(&e)),
            Err(e) => tracing::warn!("writing the layer index: {e}"),
        }
    }
}

/// What the manifest needs of a layer already in the destination (its
/// entries are the [`PublishedLayer`] of the same index).
#[derive(Clone, Debug)]
pub(super) struct Published {
    pub desc: Descriptor,
    pub diff_id: Digest,
    /// A local copy of the blob, for layers written in this run.
    pub local: Option<PathBuf>,
}

/// Every layer of a destination: what the manifests need and what the
/// planner reads, index for index.
#[derive(Default)]
pub(super) struct Destination {
    pub meta: Vec<Published>,
    pub layers: Vec<PublishedLayer>,
}

impl Destination {
    pub fn push(&mut self, meta: Published, layer: PublishedLayer) {
        self.meta.push(meta);
        self.layers.push(layer);
    }

    fn holds(&self, d: &Digest) -> bool {
        self.meta.iter().any(|p| &p.desc.digest == d)
    }

    /// Add the layers of `other` this one lacks.
    pub fn extend(&mut self, other: Destination) {
        if self.meta.is_empty() {
            *self = other;
            return;
        }
        for (m, l) in other.meta.into_iter().zip(other.layers) {
            if !self.holds(&m.desc.digest) {
                self.push(m, l);
            }
        }
    }
}

/// Name of the layer index file in an OCI layout.
pub const INDEX_FILE: &str = "breakfs-layer-index.json";

/// Bump when what the index holds per layer changes (2: the TOC's tail).
const INDEX_VERSION: u32 = 2;

#[derive(Default, Serialize, Deserialize)]
struct LayerIndexFile {
    version: u32,
    /// By layer blob digest.
    layers: BTreeMap<String, IndexedLayer>,
}

#[derive(Serialize, Deserialize)]
struct IndexedLayer {
    size: u64,
    media_type: String,
    entries: Vec<Entry>,
    /// Bytes from the TOC's member to the blob's end (`None`: no TOC).
    #[serde(default)]
    toc_tail: Option<u64>,
}

/// Where the layer index of `store` (holding `dest`) is kept.
fn index_path(dest: &ImageRef, store: &Store, opts: &RefactorOptions) -> PathBuf {
    match dest {
        ImageRef::Layout { dir, .. } => dir.join(INDEX_FILE),
        ImageRef::Registry { .. } => opts.work_dir.join("layer-index").join(format!(
            "{}.json",
            Digest::of(store.name().as_bytes()).hex()
        )),
    }
}

/// The index at `path`; empty if there is none or it cannot be used.
fn read_index(path: &Path) -> LayerIndexFile {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return LayerIndexFile::default(),
        Err(e) => {
            tracing::warn!("reading {}: {e}; reading every layer's TOC", path.display());
            return LayerIndexFile::default();
        }
    };
    match serde_json::from_reader::<_, LayerIndexFile>(BufReader::with_capacity(1 << 20, f)) {
        Ok(i) if i.version == INDEX_VERSION => i,
        Ok(_) => LayerIndexFile::default(),
        Err(e) => {
            tracing::warn!(
                "{} is not a layer index ({e}); reading every layer's TOC",
                path.display()
            );
            LayerIndexFile::default()
        }
    }
}

/// Write `index` to `path` atomically (a temp file renamed over it).
fn write_index(path: &Path, index: &LayerIndexFile) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io(format!("creating a temp file in {}", dir.display()), e))?;
    let what = format!("writing {}", path.display());
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    serde_json::to_writer(&mut w, index)
        .map_err(|e| Error::io(what.clone(), std::io::Error::other(e)))?;
    w.flush().map_err(|e| Error::io(what.clone(), e))?;
    drop(w);
    tmp.persist(path).map_err(|e| Error::io(what, e.error))?;
    Ok(())
}

/// The layers already in a destination store (every tag), with entries,
/// and the layer index's rewrite if it was out of date (written while the
/// run goes on).
pub(super) async fn published_layers(
    store: &Store,
    dest: &ImageRef,
    opts: &RefactorOptions,
    progress: &dyn Progress,
) -> Result<(Destination, IndexWrite)> {
    let tags = match store.tags().await {
        Ok(t) => t,
        Err(breakfs_fetch::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    progress.stage(
        &format!("indexing {} tags in {}", tags.len(), store.name()),
        0,
    );
    let mut out = Destination::default();
    if tags.is_empty() {
        return Ok((out, IndexWrite(None)));
    }
    let path = index_path(dest, store, opts);
    let mut index = {
        let p = path.clone();
        blocking("reading the layer index", move || Ok(read_index(&p))).await?
    };
    let mut seen = HashSet::new();
    let mut read = 0usize;
    let mut kept = BTreeMap::new();
    for tag in tags {
        // A delta artifact (crate::delta), not an image.
        if breakfs_fetch::delta::is_delta_tag(&tag) {
            continue;
        }
        let r = dest.with_tag(&tag);
        let image = store.resolve(&r).await?;
        let diff_ids = image.config.diff_ids()?;
        for (desc, diff_id) in image.layers().iter().zip(diff_ids) {
            if !seen.insert(desc.digest.clone()) {
                continue;
            }
            let key = desc.digest.to_string();
            let cached = match index.layers.remove(&key) {
                Some(l)
                    if l.size == desc.size
                        && l.media_type == desc.media_type
                        && (matches!(dest, ImageRef::Registry { .. })
                            || store.has_blob(&desc.digest).await?) =>
                {
                    Some(l)
                }
                _ => None,
            };
            let layer = match cached {
                Some(l) => l,
                None => {
                    read += 1;
                    let (entries, toc_tail) = layer_entries(store, desc, &diff_id, opts).await?;
                    IndexedLayer {
                        size: desc.size,
                        media_type: desc.media_type.clone(),
                        entries,
                        toc_tail,
                    }
                }
            };
            out.push(
                Published {
                    desc: with_toc_tail(desc, layer.toc_tail),
                    diff_id,
                    local: None,
                },
                PublishedLayer {
                    id: key.clone(),
                    entries: layer.entries.clone(),
                },
            );
            kept.insert(key, layer);
        }
    }
    tracing::debug!(
        "{}: {} layers, {read} read from their TOC, the rest from {}",
        store.name(),
        out.layers.len(),
        path.display()
    );
    // Rewrite the index if a layer was read or an indexed one is gone.
    let write = (read > 0 || !index.layers.is_empty()).then(|| {
        let index = LayerIndexFile {
            version: INDEX_VERSION,
            layers: kept,
        };
        tokio::task::spawn_blocking(move || write_index(&path, &index))
    });
    Ok((out, IndexWrite(write)))
}

/// `desc` as the destination lists it, saying the TOC's tail `toc_tail`
/// as a new layer's descriptor does ([`breakfs_fetch::TOC_TAIL_HINT`]),
/// and saying none when the layer has no TOC or it is out of bounds.
fn with_toc_tail(desc: &Descriptor, toc_tail: Option<u64>) -> Descriptor {
    let mut d = desc.clone();
    d.annotations.remove(breakfs_fetch::TOC_TAIL_HINT);
    if let Some(tail) = toc_tail {
        breakfs_fetch::hint_toc_tail(&mut d, tail);
    }
    d
}

/// A layer's entries from its TOC, or from its tar if it has none; and
/// the bytes from its TOC's member to its end, if it has one.
async fn layer_entries(
    store: &Store,
    desc: &Descriptor,
    diff_id: &Digest,
    opts: &RefactorOptions,
) -> Result<(Vec<Entry>, Option<u64>)> {
    Ok(match store.read_toc(desc).await? {
        Some(toc) => (
            with_link_content(toc.layer.entries.into_iter().map(|(e, _)| e)),
            Some(desc.size.saturating_sub(toc.toc_offset)),
        ),
        None => {
            let what = format!("layer {} of {}", desc.digest, store.name());
            let (tars_dir, blobs_dir) = (opts.work_dir.join("tars"), opts.work_dir.join("blobs"));
            for d in [&tars_dir, &blobs_dir] {
                std::fs::create_dir_all(d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            }
            let (_, loaded) =
                local_layer(store, desc, diff_id, &tars_dir, &blobs_dir, &what).await?;
            (
                with_link_content(loaded.entries.into_iter().map(|le| le.entry)),
                None,
            )
        }
    })
}

/// A layer's entries with hard links carrying their target's size and
/// digest, as the merged view shows them (a TOC or tar stores them bare).
fn with_link_content(entries: impl Iterator<Item = Entry>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = entries.collect();
    let files: std::collections::HashMap<String, (u64, Option<Digest>)> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (e.path.clone(), (e.size, e.digest.clone())))
        .collect();
    for e in entries.iter_mut().filter(|e| e.kind == EntryKind::Hardlink) {
        if let Some((size, digest)) = files.get(&e.link) {
            e.size = *size;
            e.digest = digest.clone();
        }
    }
    entries
}
