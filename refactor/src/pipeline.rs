//! The refactoring pipeline: source images → local layer tars → merged
//! views → plan → eStargz layers → destination.
//!
//! Source layers are decompressed once into a work directory (keyed by
//! diff_id, so a second run or a second image with the same layer skips
//! it) and read back with `pread` when the writer needs file content.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use breakfs_fetch::{ClientOptions, Store};
use breakfs_index::{Descriptor, Digest, Entry, ImageRef, Manifest, Reference, media_types};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

use load::local_layer;
pub use load::{LoadedImage, load_image};
use published::{Destination, Published, published_layers};

mod load;
mod published;
use crate::{
    ContentSource, Error, LayerSource, Plan, PlanImage, PlanOptions, PublishedLayer, Result,
    WriterOptions, WrittenLayer, plan, write_layer,
};

/// Everything `breakfs refactor` is told.
#[derive(Clone, Debug)]
pub struct RefactorOptions {
    /// Planner options (joint, layer cap, relax-mtime).
    pub plan: PlanOptions,
    /// Layer writer options (chunk size, gzip level).
    pub writer: WriterOptions,
    /// Registry client options.
    pub client: ClientOptions,
    /// Where source layers are decompressed and new layers written.
    pub work_dir: PathBuf,
    /// Also make and push zstd deltas of the image's changed files against
    /// the destination's earlier versions of them (`crate::delta`): fewer
    /// bytes for a node that ran the earlier version, more refactoring time.
    pub deltas: bool,
}

/// Where the pipeline reports progress; the CLI draws bars from it.
pub trait Progress: Sync {
    /// A new stage begins (`total` bytes of work, 0 if unknown).
    fn stage(&self, message: &str, total: u64);
    /// `n` more bytes of the current stage are done.
    fn advance(&self, n: u64);
}

/// A progress sink that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _message: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
}

/// What refactoring one image did; `breakfs refactor --json` prints it as
/// one JSON object per image, a key per field.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageReport {
    /// The source reference.
    pub source: String,
    /// Where the refactored image was written.
    pub dest: String,
    /// The digest of the refactored manifest (key `manifest`).
    #[serde(rename = "manifest")]
    pub manifest_digest: Digest,
    /// Layers of the refactored image.
    pub layers: usize,
    /// Layers of the original image.
    pub original_layers: usize,
    /// Compressed bytes of the refactored image's layers.
    pub compressed_bytes: u64,
    /// Compressed bytes of the original image's layers.
    pub original_compressed_bytes: u64,
    /// Compressed bytes of layers that were already in the destination.
    pub reused_compressed_bytes: u64,
    /// Uncompressed file bytes of the image.
    pub file_bytes: u64,
    /// File bytes that lie in layers reused from the destination.
    pub reused_file_bytes: u64,
    /// File bytes whose exact entry was already published (no exact
    /// refactoring can reuse more).
    pub bound_bytes: u64,
    /// Bytes stored twice because of the layer cap.
    pub duplicated_bytes: u64,
    /// Entries whose mtime `--relax-mtime` changed.
    pub mtime_changes: usize,
    /// Bytes of stale files in reused layers, shadowed by this image.
    pub shadowed_bytes: u64,
    /// File bytes reused from layers that hold those stale files: what the
    /// shadowed bytes bought (the planner's trade-off).
    pub stale_bought_bytes: u64,
    /// Compressed bytes uploaded (blobs the destination lacked).
    pub uploaded_bytes: u64,
    /// Wall time spent on this image (joint mode: the share of the run).
    pub seconds: f64,
}

impl ImageReport {
    /// reused_file_bytes / file_bytes.
    pub fn share(&self) -> f64 {
        ratio(self.reused_file_bytes, self.file_bytes)
    }

    /// bound_bytes / file_bytes.
    pub fn bound(&self) -> f64 {
        ratio(self.bound_bytes, self.file_bytes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Run `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(what.to_string(), std::io::Error::other(e)))?
}

/// File content for the writer: every source image's regular files by digest.
struct TarContent {
    files: Vec<File>,
    by_digest: HashMap<Digest, (usize, u64)>,
}

impl TarContent {
    fn new(images: &[&LoadedImage]) -> Result<TarContent> {
        let mut files = Vec::new();
        let mut index_of: HashMap<PathBuf, usize> = HashMap::new();
        let mut by_digest = HashMap::new();
        for img in images {
            for me in img.view.iter() {
                let Some(d) = &me.entry.digest else { continue };
                if by_digest.contains_key(d) {
                    continue;
                }
                let tar = &img.tars[me.layer];
                let fi = match index_of.get(tar) {
                    Some(i) => *i,
                    None => {
                        let f = File::open(tar)
                            .map_err(|e| Error::io(format!("opening {}", tar.display()), e))?;
                        files.push(f);
                        index_of.insert(tar.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                by_digest.insert(d.clone(), (fi, me.data_offset));
            }
        }
        Ok(TarContent { files, by_digest })
    }
}

impl ContentSource for TarContent {
    fn read_at(&self, entry: &Entry, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (fi, base) = entry
            .digest
            .as_ref()
            .and_then(|d| self.by_digest.get(d))
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no source holds the content of {}", entry.path),
                )
            })?;
        self.files[*fi].read_exact_at(buf, base + offset)
    }

    /// Each file's digest was computed from these tars' bytes as they
    /// were written (or, for a tar an earlier run left, as it was read).
    fn digests_checked(&self) -> bool {
        true
    }
}

/// Write one planned layer to `out_dir`, named by its digest.
fn write_new_layer(
    entries: &[Entry],
    content: &TarContent,
    opts: &WriterOptions,
    out_dir: &Path,
    n: usize,
) -> Result<(WrittenLayer, PathBuf)> {
    let tmp = out_dir.join(format!("layer-{n}.tmp"));
    let f = File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let written = write_layer(&mut w, entries, content, opts)?;
    w.flush()
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    drop(w);
    let path = out_dir.join(written.digest.hex());
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
    Ok((written, path))
}

/// The store opened for `target`.
async fn store_of<'a>(
    stores: &'a BTreeMap<String, Store>,
    target: &ImageRef,
    opts: &RefactorOptions,
) -> Result<&'a Store> {
    stores
        .get(&Store::open(target, &opts.client).await?.name())
        .ok_or_else(|| Error::PlanOption {
            reason: format!("no store opened for {target}"),
        })
}

/// Where one source image goes.
fn dest_ref(dest: &ImageRef, src: &LoadedImage, name_tags: bool, single: bool) -> Result<ImageRef> {
    let src_tag = src.reference.tag().unwrap_or("latest").to_string();
    let tag = if name_tags {
        format!("{}-{}", src.name, src_tag)
    } else {
        src_tag
    };
    Ok(match dest {
        ImageRef::Layout { dir, tag: given } => ImageRef::Layout {
            dir: dir.clone(),
            tag: Some(match given {
                Some(t) if single => t.clone(),
                _ => tag,
            }),
        },
        ImageRef::Registry {
            host,
            repo,
            reference,
        } => {
            // Repository `_` (from `--to docker://HOST`): the source's repository path under HOST.
            let repo = if repo == "_" {
                match &src.reference {
                    ImageRef::Registry { repo, .. } => repo.clone(),
                    ImageRef::Layout { .. } => src.name.clone(),
                }
            } else {
                repo.clone()
            };
            let tag = match reference {
                Reference::Tag(t) if single && t != "latest" => t.clone(),
                _ => tag,
            };
            ImageRef::Registry {
                host: host.clone(),
                repo,
                reference: Reference::Tag(tag),
            }
        }
    })
}

/// Refactor `sources` into `dest`. Incremental (one image after the
/// other, each reusing what `dest` already holds) unless `opts.plan.joint`.
pub async fn refactor(
    sources: &[ImageRef],
    dest: &ImageRef,
    opts: &RefactorOptions,
    progress: &dyn Progress,
) -> Result<Vec<ImageReport>> {
    let out_dir = opts.work_dir.join("out");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    let mut loaded = Vec::new();
    let mut load_secs = Vec::new();
    for r in sources {
        let t = Instant::now();
        loaded.push(load_image(r, opts, progress).await?);
        load_secs.push(t.elapsed().as_secs_f64());
        tracing::debug!("loaded {r} in {:.2}s", t.elapsed().as_secs_f64());
    }
    let names: std::collections::BTreeSet<&str> = loaded.iter().map(|l| l.name.as_str()).collect();
    let name_tags = names.len() > 1 && matches!(dest, ImageRef::Layout { .. });
    let single = loaded.len() == 1;
    let targets: Vec<ImageRef> = loaded
        .iter()
        .map(|l| dest_ref(dest, l, name_tags, single))
        .collect::<Result<_>>()?;
    {
        let mut seen = std::collections::HashSet::new();
        for t in &targets {
            if !seen.insert(t.to_string()) {
                return Err(Error::PlanOption {
                    reason: format!(
                        "two sources would both be written to {t}; give them distinct tags"
                    ),
                });
            }
        }
    }

    // Destination stores and what they already hold.
    let mut stores: BTreeMap<String, Store> = BTreeMap::new();
    let mut published = Destination::default();
    let mut index_writes = Vec::new();
    let t_index = Instant::now();
    for t in &targets {
        let store = Store::open(t, &opts.client).await?;
        let key = store.name();
        if stores.contains_key(&key) {
            continue;
        }
        let (p, write) = published_layers(&store, t, opts, progress).await?;
        published.extend(p);
        index_writes.push(write);
        stores.insert(key, store);
    }
    tracing::debug!(
        "indexed {} published layers in {:.2}s",
        published.layers.len(),
        t_index.elapsed().as_secs_f64()
    );

    let mut reports = Vec::new();
    let groups: Vec<Vec<usize>> = if opts.plan.joint {
        vec![(0..loaded.len()).collect()]
    } else {
        (0..loaded.len()).map(|i| vec![i]).collect()
    };
    let mut written_n = 0usize;
    for group in groups {
        let t0 = Instant::now();
        let plan_images: Vec<PlanImage> = group
            .iter()
            .map(|&i| PlanImage {
                name: targets[i].to_string(),
                view: loaded[i].view.clone(),
                packages: loaded[i].packages.clone(),
            })
            .collect();
        progress.stage(&format!("planning {} image(s)", plan_images.len()), 0);
        // The published layers go to the planner's thread and come back:
        // a destination's entries are many, and cloning them per image
        // cost as much as planning.
        let the_plan: Plan = {
            let pub_layers = std::mem::take(&mut published.layers);
            let (pi, pl, po) = (plan_images, pub_layers, opts.plan.clone());
            let res = tokio::task::spawn_blocking(
                move || -> Result<(Plan, Vec<PlanImage>, Vec<PublishedLayer>)> {
                    let p = plan(&pi, &pl, &po)?;
                    p.check(&pi, &pl)?;
                    Ok((p, pi, pl))
                },
            )
            .await
            .map_err(|e| Error::io("planning", std::io::Error::other(e)))??;
            published.layers = res.2;
            res.0
        };
        tracing::debug!("planned in {:.2}s", t0.elapsed().as_secs_f64());

        // Write the new layers.
        let content = Arc::new(TarContent::new(
            &group.iter().map(|&i| &loaded[i]).collect::<Vec<_>>(),
        )?);
        let new_bytes: u64 = the_plan
            .layers
            .iter()
            .filter(|l| matches!(l.source, LayerSource::New))
            .flat_map(|l| l.entries.iter())
            .map(|e| e.size)
            .sum();
        progress.stage(
            &format!(
                "writing {} layer(s)",
                the_plan
                    .layers
                    .iter()
                    .filter(|l| matches!(l.source, LayerSource::New))
                    .count()
            ),
            new_bytes,
        );
        // New layers are written two at a time: each compresses its
        // members in parallel, but a small layer's last members and its
        // TOC leave a core idle that the next layer can use. Each layer's
        // bytes depend on its entries alone, and they are published in
        // plan order. When the group is one image (incremental), each
        // layer goes up to its store as soon as it is written, a few at a
        // time, while the next ones compress: pushing (a copy and an fsync
        // in a layout, a round trip to a registry) no longer waits for the
        // last layer.
        let early_store = match group.as_slice() {
            [i] => Some(store_of(&stores, &targets[*i], opts).await?),
            _ => None,
        };
        let writes = the_plan
            .layers
            .iter()
            .filter(|l| matches!(l.source, LayerSource::New))
            .map(|layer| {
                let (entries, c, w, dir, n) = (
                    layer.entries.clone(),
                    content.clone(),
                    opts.writer.clone(),
                    out_dir.clone(),
                    written_n,
                );
                written_n += 1;
                async move {
                    let bytes: u64 = entries.iter().map(|e| e.size).sum();
                    let written = tokio::task::spawn_blocking(move || {
                        write_new_layer(&entries, &c, &w, &dir, n)
                    })
                    .await
                    .map_err(|e| Error::io("writing a layer", std::io::Error::other(e)))??;
                    progress.advance(bytes);
                    Ok::<_, Error>(written)
                }
            })
            .collect::<Vec<_>>();
        let mut written = futures::stream::iter(writes)
            .buffered(2)
            .map(|w| async move {
                let (written, path) = w?;
                let pushed = match early_store {
                    Some(store) => Some(store.push_blob_file(&written.descriptor(), &path).await?),
                    None => None,
                };
                Ok::<_, Error>((written, path, pushed))
            })
            .buffered(4)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter();
        // Whether a layer pushed already went up, by its place in `published`.
        let mut pushed_early: HashMap<usize, bool> = HashMap::new();
        let mut layer_pub: Vec<usize> = Vec::with_capacity(the_plan.layers.len());
        for layer in &the_plan.layers {
            match layer.source {
                LayerSource::Reused(p) => layer_pub.push(p),
                LayerSource::New => {
                    let (written, path, pushed) =
                        written.next().ok_or_else(|| Error::PlanOption {
                            reason: "a new layer was not written".into(),
                        })?;
                    published.push(
                        Published {
                            desc: written.descriptor(),
                            diff_id: written.diff_id.clone(),
                            local: Some(path),
                        },
                        PublishedLayer {
                            id: written.digest.to_string(),
                            entries: layer.entries.clone(),
                        },
                    );
                    layer_pub.push(published.meta.len() - 1);
                    if let Some(up) = pushed {
                        pushed_early.insert(published.meta.len() - 1, up);
                    }
                }
            }
        }

        tracing::debug!(
            "planned and wrote {} bytes of new layers in {:.2}s",
            new_bytes,
            t0.elapsed().as_secs_f64()
        );
        // Manifests, configs and uploads, one image at a time.
        let secs_each = t0.elapsed().as_secs_f64() / group.len() as f64;
        for (k, &i) in group.iter().enumerate() {
            let t1 = Instant::now();
            let ip = &the_plan.images[k];
            let target = &targets[i];
            let store = store_of(&stores, target, opts).await?;
            let mut descs = Vec::new();
            let mut diff_ids = Vec::new();
            let mut created_by = Vec::new();
            let mut uploaded = 0u64;
            let mut reused_compressed = 0u64;
            progress.stage(&format!("uploading {target}"), 0);
            // Blobs go up a few at a time: a layout's writes each end in
            // an fsync, a registry's in a round trip.
            let pushed_early = &pushed_early;
            let pushes = ip.layers.iter().map(|&li| {
                let p = &published.meta[layer_pub[li]];
                let early = pushed_early.get(&layer_pub[li]).copied();
                async move {
                    if let Some(up) = early {
                        return Ok(up);
                    }
                    match &p.local {
                        Some(path) => Ok(store.push_blob_file(&p.desc, path).await?),
                        None if store.has_blob(&p.desc.digest).await? => Ok(false),
                        None => Err(Error::Source {
                            image: target.to_string(),
                            reason: format!(
                                "layer {} is published in another repository; copy it into {} first",
                                p.desc.digest,
                                store.name()
                            ),
                        }),
                    }
                }
            });
            let ups: Vec<bool> = futures::stream::iter(pushes)
                .buffered(4)
                .try_collect()
                .await?;
            for (&li, up) in ip.layers.iter().zip(ups) {
                let p = &published.meta[layer_pub[li]];
                if up {
                    uploaded += p.desc.size;
                }
                if matches!(the_plan.layers[li].source, LayerSource::Reused(_)) {
                    reused_compressed += p.desc.size;
                }
                descs.push(p.desc.clone());
                diff_ids.push(p.diff_id.clone());
                created_by.push(format!("breakfs: {}", the_plan.layers[li].label));
            }
            let mut config = loaded[i].image.config.clone();
            config.set_layers(&diff_ids, &created_by);
            let config_bytes = config.to_bytes();
            let config_desc = Descriptor::new(
                media_types::OCI_CONFIG,
                Digest::of(&config_bytes),
                config_bytes.len() as u64,
            );
            if store.push_blob_bytes(&config_desc, &config_bytes).await? {
                uploaded += config_bytes.len() as u64;
            }
            let manifest = Manifest {
                schema_version: 2,
                media_type: Some(media_types::OCI_MANIFEST.into()),
                config: config_desc,
                layers: descs,
                annotations: BTreeMap::new(),
            };
            let manifest_bytes = serde_json::to_vec(&manifest)
                .map_err(|e| Error::io("serialising the manifest", std::io::Error::other(e)))?;
            let tag = target.tag().unwrap_or("latest");
            let manifest_digest = store
                .push_manifest(tag, media_types::OCI_MANIFEST, &manifest_bytes)
                .await?;
            let compressed: u64 = manifest.layers.iter().map(|l| l.size).sum();
            tracing::debug!("wrote {target} in {:.2}s", t1.elapsed().as_secs_f64());
            if opts.deltas && group.len() == 1 {
                let desc = Descriptor::new(
                    media_types::OCI_MANIFEST,
                    manifest_digest.clone(),
                    manifest_bytes.len() as u64,
                );
                deltas(
                    store, &desc, &manifest, &loaded[i], &content, &published, opts,
                )
                .await;
            }
            reports.push(ImageReport {
                source: loaded[i].reference.to_string(),
                dest: target.to_string(),
                manifest_digest,
                layers: manifest.layers.len(),
                original_layers: loaded[i].image.layers().len(),
                compressed_bytes: compressed,
                original_compressed_bytes: loaded[i].image.layers().iter().map(|l| l.size).sum(),
                reused_compressed_bytes: reused_compressed,
                file_bytes: ip.file_bytes,
                reused_file_bytes: ip.reused_bytes,
                bound_bytes: ip.bound_bytes,
                duplicated_bytes: ip.duplicated_bytes,
                mtime_changes: ip.mtime_changes.len(),
                shadowed_bytes: ip.shadowed_bytes,
                stale_bought_bytes: ip.stale_bought_bytes,
                uploaded_bytes: uploaded,
                seconds: load_secs[i] + secs_each + t1.elapsed().as_secs_f64(),
            });
        }
    }
    for w in index_writes {
        w.finish().await;
    }
    Ok(reports)
}

/// Make and push the deltas of the image `manifest` (`image`, refactored
/// from `src`) against the earlier files in the layers `published` holds
/// beside its own (`crate::delta`).
/// A failure costs nodes the deltas only: logged, the image stands.
async fn deltas(
    store: &Store,
    manifest: &Descriptor,
    image: &Manifest,
    src: &LoadedImage,
    content: &Arc<TarContent>,
    published: &Destination,
    opts: &RefactorOptions,
) {
    // The image's own layers hold its files, not earlier ones.
    let own: std::collections::HashSet<&Digest> = image.layers.iter().map(|l| &l.digest).collect();
    let layers: Vec<crate::delta::BaseLayer> = published
        .meta
        .iter()
        .zip(&published.layers)
        .filter(|(m, _)| !own.contains(&m.desc.digest))
        .map(|(m, l)| crate::delta::BaseLayer {
            desc: &m.desc,
            layer: l,
        })
        .collect();
    let content: Arc<dyn ContentSource + Send> = content.clone();
    match crate::delta::publish(
        store,
        manifest,
        &src.view,
        content,
        &layers,
        opts.writer.chunk_size,
    )
    .await
    {
        Ok(Some(r)) => tracing::info!(
            image = %src.reference,
            files = r.files,
            chunks = r.chunks,
            delta_bytes = r.delta_bytes,
            replaced_bytes = r.replaced_bytes,
            secs = r.seconds,
            "published deltas against the earlier version's files"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            image = %src.reference,
            "making deltas: {}",
            breakfs_index::Causes(&e)
        ),
    }
}

/// The reports of a run as the table `breakfs refactor` prints: layers,
/// compressed MB before and after, reuse, sharing, stale bytes and the
/// reuse they bought, and seconds per image.
pub struct ReportTable<'a>(pub &'a [ImageReport]);

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

impl std::fmt::Display for ReportTable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<44} {:>9} {:>17} {:>8} {:>10} {:>7} {:>7} {:>9} {:>10} {:>7} {:>7}",
            "image",
            "layers",
            "MB orig→new",
            "size ×",
            "reused MB",
            "share",
            "bound",
            "stale MB",
            "bought MB",
            "dup MB",
            "secs"
        )?;
        for r in self.0 {
            writeln!(
                f,
                "{:<44} {:>9} {:>17} {:>8.3} {:>10} {:>6.1}% {:>6.1}% {:>9} {:>10} {:>7} {:>7.1}",
                r.dest,
                format!("{}→{}", r.original_layers, r.layers),
                format!(
                    "{}→{}",
                    mb(r.original_compressed_bytes),
                    mb(r.compressed_bytes)
                ),
                r.compressed_bytes as f64 / r.original_compressed_bytes.max(1) as f64,
                mb(r.reused_compressed_bytes),
                100.0 * r.share(),
                100.0 * r.bound(),
                mb(r.shadowed_bytes),
                mb(r.stale_bought_bytes),
                mb(r.duplicated_bytes),
                r.seconds,
            )?;
            if r.mtime_changes > 0 {
                writeln!(
                    f,
                    "  --relax-mtime changed the mtime of {} entries",
                    r.mtime_changes
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
