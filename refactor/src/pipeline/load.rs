//! Loading a source image: each layer blob inflated once into an
//! uncompressed tar in the work directory (keyed by diff_id) and indexed on
//! the way, then the merged view and the dpkg database.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use breakfs_fetch::{Image, Store};
use breakfs_index::{
    Compression, Descriptor, Digest, EntryKind, HashingReader, ImageRef, LayerIndex, MergedView,
    NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, decoder,
};

use super::{Progress, RefactorOptions, blocking};
use crate::dpkg::{INFO_DIR, STATUS_PATH};
use crate::{Error, PackageDb, Result};

/// One source image, loaded: its layers decompressed and indexed.
pub struct LoadedImage {
    /// The reference it came from.
    pub reference: ImageRef,
    /// Manifest and config.
    pub image: Image,
    /// The store's short name (layout directory or repository basename).
    pub name: String,
    /// The uncompressed tar of each layer, bottom first.
    pub tars: Vec<PathBuf>,
    /// The merged view.
    pub view: MergedView,
    /// dpkg ownership of its files.
    pub packages: PackageDb,
}

/// Decompress `blob` into `tar` and index it, in one pass: the blob is
/// inflated on a thread of its own while this one indexes, hashes and
/// writes the tar. With `verify`, the blob's own digest and size are
/// checked against it on the way (a blob read in place, not copied).
fn decompress_and_index(
    blob: &Path,
    media_type: &str,
    tar: &Path,
    what: &str,
    verify: Option<&Descriptor>,
) -> Result<LayerIndex> {
    let compression = Compression::from_media_type(media_type).ok_or_else(|| {
        breakfs_index::Error::UnsupportedMediaType {
            media_type: media_type.to_string(),
            what: what.to_string(),
        }
    })?;
    let input =
        File::open(blob).map_err(|e| Error::io(format!("opening {}", blob.display()), e))?;
    // Named after the blob too: two blobs may hold one tar.
    let blob_name = blob.file_name().unwrap_or_default().to_string_lossy();
    let tmp = tar.with_extension(format!("{blob_name}.tmp"));
    let out =
        File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let (indexed, read) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let inflater = s.spawn(move || inflate_to(compression, input, &tx));
        let indexed = LayerIndex::read_copying(Inflated::new(rx), &mut out, what);
        let read = inflater
            .join()
            .map_err(|_| Error::io(format!("decompressing {what}"), io_other("a thread died")));
        (indexed, read)
    });
    let checked = (|| {
        let index = indexed?;
        let (digest, size) = read??;
        if let Some(desc) = verify {
            let what = format!("{what} ({})", blob.display());
            if size != desc.size {
                return Err(breakfs_fetch::Error::SizeMismatch {
                    what,
                    expected: desc.size,
                    actual: size,
                }
                .into());
            }
            if digest != desc.digest {
                return Err(breakfs_fetch::Error::DigestMismatch {
                    what,
                    expected: desc.digest.clone(),
                    actual: digest,
                }
                .into());
            }
        }
        out.flush()
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        Ok(index)
    })();
    drop(out);
    match checked {
        Ok(index) => {
            std::fs::rename(&tmp, tar)
                .map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
            Ok(index)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn io_other(msg: &str) -> std::io::Error {
    std::io::Error::other(msg.to_string())
}

/// Bytes inflated per message from the inflating thread.
const INFLATED_PIECE: usize = 1 << 20;

/// Inflate `input` into pieces sent on `tx` until the stream ends or the
/// receiver goes; then read the rest of `input`. The digest and size of
/// all of `input`, or why inflating failed (also sent to the receiver).
fn inflate_to(
    compression: Compression,
    input: File,
    tx: &std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
) -> Result<(Digest, u64)> {
    let mut raw = HashingReader::new(input);
    {
        let mut dec =
            decoder(compression, &mut raw).map_err(|e| Error::io("starting to decompress", e))?;
        loop {
            let mut piece = vec![0u8; INFLATED_PIECE];
            let mut n = 0;
            while n < piece.len() {
                match dec.read(&mut piece[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                        return Err(Error::io("decompressing", e));
                    }
                }
            }
            if n == 0 {
                break;
            }
            piece.truncate(n);
            if tx.send(Ok(piece)).is_err() {
                break; // the reader stopped: it has what it wanted or failed
            }
        }
    }
    std::io::copy(&mut raw, &mut std::io::sink()).map_err(|e| Error::io("reading the blob", e))?;
    Ok(raw.finish())
}

/// The reading end of [`inflate_to`].
struct Inflated {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    piece: Vec<u8>,
    at: usize,
}

impl Inflated {
    fn new(rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Inflated {
        Inflated {
            rx,
            piece: Vec::new(),
            at: 0,
        }
    }
}

impl Read for Inflated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.piece.len() {
            match self.rx.recv() {
                Ok(piece) => (self.piece, self.at) = (piece?, 0),
                Err(_) => return Ok(0), // the inflater is done
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn short_name(r: &ImageRef) -> String {
    match r {
        ImageRef::Layout { dir, .. } => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        ImageRef::Registry { repo, .. } => repo.rsplit('/').next().unwrap_or(repo).to_string(),
    }
}

/// Largest dpkg database file read (a real status file is a few MiB): a
/// bigger one is not a package database but a way to make us hold it all.
const MAX_DB_FILE: u64 = 64 << 20;

/// Read the content of a regular file of a view from its layer tar; `None`
/// for a missing or non-regular file, or one larger than `MAX_DB_FILE`.
fn read_file(tars: &[PathBuf], view: &MergedView, path: &str) -> Result<Option<Vec<u8>>> {
    let Some(me) = view.get(path) else {
        return Ok(None);
    };
    if !matches!(me.entry.kind, EntryKind::File | EntryKind::Hardlink) {
        return Ok(None);
    }
    if me.entry.size > MAX_DB_FILE {
        tracing::warn!(
            "{path} has {} bytes, more than a dpkg database file holds: \
             left out of package ownership",
            me.entry.size
        );
        return Ok(None);
    }
    let tar = &tars[me.layer];
    let f = File::open(tar).map_err(|e| Error::io(format!("opening {}", tar.display()), e))?;
    let mut buf = vec![0; me.entry.size as usize];
    f.read_exact_at(&mut buf, me.data_offset)
        .map_err(|e| Error::io(format!("reading {path} from {}", tar.display()), e))?;
    Ok(Some(buf))
}

/// The dpkg database of an image, if it has one.
fn package_db(tars: &[PathBuf], view: &MergedView) -> Result<PackageDb> {
    let Some(status) = read_file(tars, view, STATUS_PATH)? else {
        return Ok(PackageDb::empty());
    };
    let prefix = format!("{INFO_DIR}/");
    let mut lists = Vec::new();
    for me in view.iter() {
        let Some(name) = me.entry.path.strip_prefix(&prefix) else {
            continue;
        };
        let Some(package) = name.strip_suffix(".list") else {
            continue;
        };
        if package.contains('/') {
            continue;
        }
        if let Some(content) = read_file(tars, view, &me.entry.path)? {
            lists.push((package.to_string(), content));
        }
    }
    Ok(PackageDb::from_dpkg(&status, &lists, view))
}

/// Fetch, decompress and index one source image.
pub async fn load_image(
    r: &ImageRef,
    opts: &RefactorOptions,
    progress: &dyn Progress,
) -> Result<LoadedImage> {
    let store = Store::open(r, &opts.client).await?;
    let image = store.resolve(r).await?;
    let diff_ids = image.config.diff_ids()?;
    if diff_ids.len() != image.layers().len() {
        return Err(Error::Source {
            image: r.to_string(),
            reason: format!(
                "the manifest has {} layers but the config lists {} diff_ids",
                image.layers().len(),
                diff_ids.len()
            ),
        });
    }
    let tars_dir = opts.work_dir.join("tars");
    let blobs_dir = opts.work_dir.join("blobs");
    for d in [&tars_dir, &blobs_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    }
    // A manifest may list one blob several times (identical empty layers
    // do): each distinct blob is fetched, decompressed and indexed once,
    // as two loads of one blob would write the same files at once.
    let mut distinct: Vec<(&Descriptor, &Digest)> = Vec::new();
    let mut slot_of: HashMap<(&Digest, &Digest), usize> = HashMap::new();
    let slots: Vec<usize> = image
        .layers()
        .iter()
        .zip(&diff_ids)
        .map(|(desc, diff_id)| {
            *slot_of.entry((&desc.digest, diff_id)).or_insert_with(|| {
                distinct.push((desc, diff_id));
                distinct.len() - 1
            })
        })
        .collect();
    let total: u64 = distinct.iter().map(|(l, _)| l.size).sum();
    progress.stage(&format!("reading {r}"), total);
    // Layers load concurrently: each is fetched, then decompressed and
    // indexed in one pass on a blocking thread.
    let loads = distinct.iter().map(|&(desc, diff_id)| {
        let (store, tars_dir, blobs_dir) = (&store, &tars_dir, &blobs_dir);
        async move {
            let what = format!("layer {} of {r}", desc.digest);
            let (tar, index) =
                local_layer(store, desc, diff_id, tars_dir, blobs_dir, &what).await?;
            progress.advance(desc.size);
            Ok::<_, Error>((tar, index))
        }
    });
    let loaded = futures::future::try_join_all(loads).await?;
    let (tars, indexes): (Vec<PathBuf>, Vec<LayerIndex>) =
        slots.iter().map(|&i| loaded[i].clone()).unzip();
    let mut view = MergedView::build(&indexes).map_err(|e| Error::Source {
        image: r.to_string(),
        reason: breakfs_index::Causes(&e).to_string(),
    })?;
    // An eStargz source carries its TOC and landmarks as files: they belong
    // to the format, not the image, and every new layer gets its own.
    for path in [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK] {
        if view
            .get(path)
            .is_some_and(|m| m.entry.kind == EntryKind::File)
        {
            view.remove(path);
        }
    }
    let packages = package_db(&tars, &view)?;
    Ok(LoadedImage {
        reference: r.clone(),
        image,
        name: short_name(r),
        tars,
        view,
        packages,
    })
}

/// A layer's uncompressed tar in the work directory, and its index: read
/// from the tar if an earlier run left it, else fetched, decompressed and
/// indexed in one pass.
pub(super) async fn local_layer(
    store: &Store,
    desc: &Descriptor,
    diff_id: &Digest,
    tars_dir: &Path,
    blobs_dir: &Path,
    what: &str,
) -> Result<(PathBuf, LayerIndex)> {
    let tar = tars_dir.join(format!("{}.tar", diff_id.hex()));
    let index = if tar.exists() {
        let (t, w) = (tar.clone(), what.to_string());
        blocking(what, move || -> Result<LayerIndex> {
            let f = File::open(&t).map_err(|e| Error::io(format!("opening {}", t.display()), e))?;
            Ok(LayerIndex::read(
                std::io::BufReader::with_capacity(1 << 20, f),
                &w,
            )?)
        })
        .await?
    } else if let Store::Layout(layout) = store {
        // A blob on this machine is read in place, checked as it is read.
        let (b, t, d, w) = (
            layout.blob_path(&desc.digest),
            tar.clone(),
            desc.clone(),
            what.to_string(),
        );
        blocking(what, move || {
            decompress_and_index(&b, &d.media_type, &t, &w, Some(&d))
        })
        .await?
    } else {
        let blob = blobs_dir.join(desc.digest.hex());
        store.blob_to_file(desc, &blob).await?;
        let (b, t, m, w) = (
            blob.clone(),
            tar.clone(),
            desc.media_type.clone(),
            what.to_string(),
        );
        let index = blocking(what, move || decompress_and_index(&b, &m, &t, &w, None)).await;
        let _ = std::fs::remove_file(&blob);
        index?
    };
    if &index.diff_id != diff_id {
        let _ = std::fs::remove_file(&tar);
        return Err(Error::DiffIdMismatch {
            what: what.to_string(),
            actual: index.diff_id,
            expected: diff_id.clone(),
        });
    }
    Ok((tar, index))
}
