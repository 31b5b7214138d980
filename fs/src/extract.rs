//! `breakfs pull --extract`: the mount pipeline writing a plain directory.
//! The skeleton (directories, links, devices, empty files of the right size)
//! is made first; then every chunk is requested at once, so the fetcher can
//! merge neighbours into large Range requests, and each chunk is written
//! into every file that holds it as soon as it arrives; ownership, modes,
//! xattrs and times are set last (directories deepest first).
//!
//! All of it is written into a staging directory inside the destination
//! and moved to its final names only once every byte checked out: a
//! failed extraction removes what it wrote, and one killed half-way
//! leaves only the staging directory, which the next run clears. A retry
//! starts clean (the chunks that arrived are in the cache already).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use breakfs_fetch::Priority;
use breakfs_index::{Digest, EntryKind};
use futures::StreamExt;

use crate::image::OpenedImage;
use crate::tree::{ROOT, Tree};
use crate::{Error, Result};

/// What an extraction did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExtractStats {
    /// Paths written.
    pub paths: usize,
    /// Content bytes written.
    pub bytes: u64,
}

/// [`extract`], calling `report` with the content bytes written so far
/// every `every` while it runs (a progress bar).
pub async fn extract_reporting(
    opened: &OpenedImage,
    dest: &Path,
    every: std::time::Duration,
    mut report: impl FnMut(u64),
) -> Result<ExtractStats> {
    let done = Arc::new(AtomicU64::new(0));
    let work = extract(opened, dest, done.clone());
    tokio::pin!(work);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => report(done.load(Ordering::Relaxed)),
        }
    }
}

/// Write the image's tree to `dest` (which must not exist, or be an empty
/// directory, or hold only what an interrupted extraction left). On error
/// `dest` is left as it was found. `progress` counts content bytes written.
pub async fn extract(
    opened: &OpenedImage,
    dest: &Path,
    progress: Arc<AtomicU64>,
) -> Result<ExtractStats> {
    let staging = prepare_dest(dest, &opened.tree)?;
    let result = async {
        let stats = write_tree(opened, &staging, progress).await?;
        let (tree, from, to) = (opened.tree.clone(), staging.clone(), dest.to_path_buf());
        blocking(move || publish(&tree, &from, &to)).await?;
        Ok(stats)
    }
    .await;
    if result.is_err() {
        // Nothing half-written stays under a final name.
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Extract the tree into `root` (the staging directory), all but the
/// root's own metadata.
async fn write_tree(
    opened: &OpenedImage,
    root: &Path,
    progress: Arc<AtomicU64>,
) -> Result<ExtractStats> {
    let tree = opened.tree.clone();
    let root = root.to_path_buf();
    // The skeleton is made while the first chunks are on their way.
    let mut skeleton_task = {
        let (tree, root) = (tree.clone(), root.clone());
        Box::pin(blocking(move || skeleton(&tree, &root)))
    };
    let mut skeleton_done = false;
    let mut waiting: Vec<(Digest, u64)> = Vec::new();

    // Which files (inode, offset) each chunk digest goes to.
    let mut targets: HashMap<Digest, Vec<(u64, u64)>> = HashMap::new();
    for (ino, n) in tree.nodes() {
        for c in &n.chunks {
            targets
                .entry(c.digest.clone())
                .or_default()
                .push((ino, c.file_offset));
        }
    }
    let targets = Arc::new(targets);
    let fetcher = opened.fetcher.clone();
    let mut arrivals: futures::stream::FuturesUnordered<_> = tree
        .fetchable_chunks()
        .into_iter()
        .map(|c| {
            let fetcher = &fetcher;
            async move {
                let r = c.fetch(fetcher, Priority::OnDemand, None).await;
                (c.digest.clone(), c.size, r)
            }
        })
        .collect();
    let mut writes = futures::stream::FuturesUnordered::new();
    let writers = Arc::new(tokio::sync::Semaphore::new(16));
    let mut first_err: Option<Error> = None;
    let mut bytes = 0u64;
    let writer = Writer {
        tree: tree.clone(),
        root: root.clone(),
        targets,
        store: fetcher.store().clone(),
        progress,
        permits: writers,
    };
    loop {
        tokio::select! {
            r = &mut skeleton_task, if !skeleton_done => {
                skeleton_done = true;
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                    break;
                }
                for (digest, size) in waiting.drain(..) {
                    writes.push(writer.write(digest, size).await);
                }
            }
            Some((digest, size, r)) = arrivals.next() => {
                if let Err(e) = r {
                    first_err.get_or_insert(e.into());
                    continue;
                }
                if skeleton_done {
                    writes.push(writer.write(digest, size).await);
                } else {
                    waiting.push((digest, size));
                }
            }
            Some(w) = writes.next() => {
                match w {
                    Ok(Ok(n)) => bytes += n,
                    Ok(Err(e)) => { first_err.get_or_insert(e); }
                    Err(e) => { first_err.get_or_insert(Error::io("writing a chunk", std::io::Error::other(e.to_string()))); }
                }
            }
            else => break,
        }
    }
    drop(arrivals);
    if let Some(e) = first_err {
        return Err(e);
    }
    let paths = tree.paths();
    blocking(move || finish_metadata(&tree, &root)).await?;
    Ok(ExtractStats { paths, bytes })
}

/// Bytes a writer copies at a time.
const COPY_PIECE: u64 = 1 << 20;

/// Writes arrived chunks into every file that holds them.
struct Writer {
    tree: Arc<Tree>,
    root: PathBuf,
    targets: Arc<HashMap<Digest, Vec<(u64, u64)>>>,
    store: Arc<breakfs_fetch::ContentStore>,
    progress: Arc<AtomicU64>,
    /// Bounds the chunks held in memory by writers at once.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Writer {
    async fn write(&self, digest: Digest, size: u64) -> tokio::task::JoinHandle<Result<u64>> {
        let permit = self.permits.clone().acquire_owned().await;
        let (tree, root, targets, store, progress) = (
            self.tree.clone(),
            self.root.clone(),
            self.targets.clone(),
            self.store.clone(),
            self.progress.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let chunk_path = store.chunk_path(&digest);
            let chunk = File::open(&chunk_path)
                .map_err(|e| Error::io(format!("reading chunk {digest}"), e))?;
            // A chunk of a layer fetched whole is a whole file, of any size:
            // copied in pieces, so memory stays bounded.
            let mut buf = vec![0u8; size.min(COPY_PIECE) as usize];
            let mut n = 0;
            for (ino, off) in targets.get(&digest).into_iter().flatten() {
                let Some(node) = tree.node(*ino) else {
                    continue;
                };
                let path = root.join(&node.entry.path);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                let mut done = 0;
                while done < size {
                    let piece = &mut buf[..(size - done).min(COPY_PIECE) as usize];
                    chunk
                        .read_exact_at(piece, done)
                        .map_err(|e| Error::io(format!("reading {}", chunk_path.display()), e))?;
                    f.write_all_at(piece, off + done)
                        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                    done += piece.len() as u64;
                }
                n += size;
            }
            progress.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        })
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("extracting", std::io::Error::other(e.to_string())))?
}

/// Names of the staging directory inside the destination start so.
const STAGING: &str = ".breakfs-partial";

/// Check `dest` and make the staging directory in it: a name no entry at
/// the image's root has. What an interrupted run left is removed first.
fn prepare_dest(dest: &Path, tree: &Tree) -> Result<PathBuf> {
    match std::fs::read_dir(dest) {
        Ok(d) => {
            let mut left = Vec::new();
            for e in d {
                let e = e.map_err(|e| Error::io(format!("reading {}", dest.display()), e))?;
                if !e.file_name().to_string_lossy().starts_with(STAGING) {
                    return Err(Error::io(
                        format!("extracting into {}", dest.display()),
                        std::io::Error::other(
                            "the directory is not empty; give a new or empty one",
                        ),
                    ));
                }
                left.push(e.path());
            }
            for p in left {
                tracing::info!(
                    "removing {}, left by an interrupted extraction",
                    p.display()
                );
                let removed = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed.map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dest)
            .map_err(|e| Error::io(format!("creating {}", dest.display()), e))?,
        Err(e) => return Err(Error::io(format!("reading {}", dest.display()), e)),
    }
    let taken: std::collections::HashSet<&str> = tree
        .node(ROOT)
        .map(|r| r.children.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    let name = (0..)
        .map(|i| {
            if i == 0 {
                STAGING.to_string()
            } else {
                format!("{STAGING}-{i}")
            }
        })
        .find(|n| !taken.contains(n.as_str()))
        .unwrap_or_else(|| STAGING.to_string());
    let staging = dest.join(name);
    std::fs::create_dir(&staging)
        .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
    Ok(staging)
}

/// Move the finished tree from `staging` to its final names in `dest`,
/// then give `dest` the root's metadata.
fn publish(tree: &Tree, staging: &Path, dest: &Path) -> Result<()> {
    let rd = std::fs::read_dir(staging)
        .map_err(|e| Error::io(format!("reading {}", staging.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(format!("reading {}", staging.display()), e))?;
        let to = dest.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(|x| {
            Error::io(
                format!("moving {} to {}", e.path().display(), to.display()),
                x,
            )
        })?;
    }
    std::fs::remove_dir(staging)
        .map_err(|e| Error::io(format!("removing {}", staging.display()), e))?;
    match tree.node(ROOT) {
        Some(root) => set_metadata(&root.entry, dest),
        None => Ok(()),
    }
}

/// Directories, symlinks, devices, fifos, sized empty files, hard links.
fn skeleton(tree: &Tree, root: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for (ino, n) in tree.nodes() {
        if ino == ROOT {
            continue;
        }
        let path = root.join(&n.entry.path);
        let io = |e: std::io::Error| Error::io(format!("creating {}", path.display()), e);
        match n.entry.kind {
            EntryKind::Dir => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .map_err(io)?,
            EntryKind::File => {
                let f = File::create(&path).map_err(io)?;
                f.set_len(n.entry.size).map_err(io)?;
            }
            EntryKind::Symlink => std::os::unix::fs::symlink(&n.entry.link, &path).map_err(io)?,
            EntryKind::CharDev | EntryKind::BlockDev => {
                let kind = if n.entry.kind == EntryKind::CharDev {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                let dev =
                    nix::sys::stat::makedev(n.entry.dev_major as u64, n.entry.dev_minor as u64);
                nix::sys::stat::mknod(
                    &path,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    dev,
                )
                .map_err(|e| io(e.into()))?;
            }
            EntryKind::Fifo => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| io(e.into()))?
            }
            EntryKind::Hardlink => {}
        }
    }
    // Hard links: children whose path differs from their inode's path.
    for (_, n) in tree.nodes() {
        if n.entry.kind != EntryKind::Dir {
            continue;
        }
        for (name, child) in &n.children {
            let Some(c) = tree.node(*child) else { continue };
            let here = if n.entry.path.is_empty() {
                name.clone()
            } else {
                format!("{}/{name}", n.entry.path)
            };
            if c.entry.path != here {
                let (src, dst): (PathBuf, PathBuf) = (root.join(&c.entry.path), root.join(&here));
                std::fs::hard_link(&src, &dst).map_err(|e| {
                    Error::io(format!("linking {} to {}", dst.display(), src.display()), e)
                })?;
            }
        }
    }
    Ok(())
}

/// Owners, modes, xattrs and times, deepest inodes first; the root's
/// go to the destination itself once the tree is there.
fn finish_metadata(tree: &Tree, root: &Path) -> Result<()> {
    let nodes: Vec<_> = tree.nodes().collect();
    for (ino, n) in nodes.into_iter().rev() {
        if ino != ROOT {
            set_metadata(&n.entry, &root.join(&n.entry.path))?;
        }
    }
    Ok(())
}

fn set_metadata(e: &breakfs_index::Entry, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &str, err: std::io::Error| Error::io(format!("{what} {}", path.display()), err);
    std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid)).map_err(|x| io("chown", x))?;
    for (k, v) in &e.xattrs {
        xattr::set(path, k, v).map_err(|x| io(&format!("setting xattr {k} on"), x))?;
    }
    if e.kind != EntryKind::Symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode & 0o7777))
            .map_err(|x| io("chmod", x))?;
    }
    let t = filetime::FileTime::from_unix_time(e.mtime, 0);
    filetime::set_symlink_file_times(path, t, t).map_err(|x| io("setting times of", x))?;
    Ok(())
}
