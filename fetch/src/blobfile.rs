//! Atomic, verified writes of blobs to files: bytes go to a temp file next
//! to the destination, are hashed on the way, and the file is renamed into
//! place only when size and digest match the descriptor.

use std::path::{Path, PathBuf};

use breakfs_index::{Descriptor, Digest};
use sha2::{Digest as _, Sha256};
use tempfile::TempPath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

/// A temp file being filled with one blob's bytes.
pub(crate) struct VerifyingFile {
    file: tokio::fs::File,
    temp: TempPath,
    hasher: Sha256,
    size: u64,
    dest: PathBuf,
}

impl VerifyingFile {
    /// Start a blob that will land at `dest` (its directory is created).
    pub(crate) async fn create(dest: &Path) -> Result<VerifyingFile> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("creating directory {}", dir.display()), e))?;
        // Named after this process, so that a content store opened by
        // another process meanwhile tells it from a dead process's leftover.
        let prefix = format!(".tmp-{}-", crate::cas::process_mark());
        let named = tempfile::Builder::new()
            .prefix(&prefix)
            .tempfile_in(&dir)
            .map_err(|e| Error::io(format!("creating a temp file in {}", dir.display()), e))?;
        let (file, temp) = named.into_parts();
        Ok(VerifyingFile {
            file: tokio::fs::File::from_std(file),
            temp,
            hasher: Sha256::new(),
            size: 0,
            dest: dest.to_path_buf(),
        })
    }

    /// Append bytes.
    pub(crate) async fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        self.file
            .write_all(buf)
            .await
            .map_err(|e| Error::io(format!("writing {}", self.temp.display()), e))
    }

    /// Append bytes of the blob `desc` describes, failing as soon as more
    /// arrive than it declares (a stream that never ends is cut short).
    pub(crate) async fn write_within(
        &mut self,
        buf: &[u8],
        desc: &Descriptor,
        what: &str,
    ) -> Result<()> {
        self.write(buf).await?;
        if self.size > desc.size {
            return Err(Error::SizeMismatch {
                what: what.to_string(),
                expected: desc.size,
                actual: self.size,
            });
        }
        Ok(())
    }

    /// Check size and digest against `desc`, fsync, and rename into place.
    /// On a mismatch the temp file is removed and nothing appears at `dest`.
    pub(crate) async fn finish(mut self, desc: &Descriptor, what: &str) -> Result<()> {
        check(what, desc, self.size, Digest::from_hasher(self.hasher))?;
        let temp_name = self.temp.display().to_string();
        self.file
            .flush()
            .await
            .map_err(|e| Error::io(format!("writing {temp_name}"), e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| Error::io(format!("syncing {temp_name}"), e))?;
        drop(self.file);
        let dest = self.dest.clone();
        self.temp.persist(&dest).map_err(|e| {
            Error::io(
                format!("renaming {temp_name} to {}", dest.display()),
                e.error,
            )
        })?;
        sync_parent(&dest).await
    }
}

/// Check a blob's size and digest against its descriptor.
pub(crate) fn check(what: &str, desc: &Descriptor, size: u64, digest: Digest) -> Result<()> {
    if size != desc.size {
        return Err(Error::SizeMismatch {
            what: what.to_string(),
            expected: desc.size,
            actual: size,
        });
    }
    if digest != desc.digest {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: desc.digest.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Check bytes against a descriptor.
pub(crate) fn check_bytes(what: &str, desc: &Descriptor, bytes: &[u8]) -> Result<()> {
    check(what, desc, bytes.len() as u64, Digest::of(bytes))
}

/// fsync the directory holding `path`, so that a rename survives a crash.
pub(crate) async fn sync_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let dir = dir.to_path_buf();
    let res = tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await;
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::io(
            format!("syncing directory of {}", path.display()),
            e,
        )),
        Err(e) => Err(Error::io(
            format!("syncing directory of {}", path.display()),
            std::io::Error::other(e),
        )),
    }
}

/// Copy the file at `src` to `dest` through a [`VerifyingFile`].
pub(crate) async fn copy_verified(
    src: &Path,
    desc: &Descriptor,
    dest: &Path,
    what: &str,
) -> Result<()> {
    let mut input = tokio::fs::File::open(src)
        .await
        .map_err(|e| open_error(src, what, e))?;
    let mut out = VerifyingFile::create(dest).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|e| Error::io(format!("reading {}", src.display()), e))?;
        if n == 0 {
            break;
        }
        out.write_within(&buf[..n], desc, what).await?;
    }
    out.finish(desc, what).await
}

/// A missing file is `NotFound`, anything else an I/O error.
pub(crate) fn open_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound {
            what: format!("{what} ({})", path.display()),
        }
    } else {
        Error::io(format!("opening {}", path.display()), e)
    }
}
