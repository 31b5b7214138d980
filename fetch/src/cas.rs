//! The node's content store: verified, content-addressed files on disk.
//!
//! ```text
//! CACHE/blobs/sha256/HEX    whole blobs (manifests, configs, plain layers)
//! CACHE/chunks/sha256/HEX   uncompressed file chunks, keyed by their own
//!                           digest, so a chunk two layers share is stored once
//! CACHE/meta/...            derived records (TOCs, layer indexes, refs)
//! CACHE/tmp/PID-N           writes in progress
//! ```
//!
//! Every byte is checked against its digest before it is renamed into place
//! (temp file, `fdatasync`, rename), so a crash or `SIGKILL` leaves the old
//! state or the new one, never a torn file. Temp files of dead processes are
//! removed when the store is opened.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use breakfs_index::Digest;

use crate::{Error, Result};

/// A content store rooted at one directory.
#[derive(Debug)]
pub struct ContentStore {
    root: PathBuf,
    seq: AtomicU64,
}

impl ContentStore {
    /// Open (creating if needed) the store at `root`, removing temp files
    /// left behind by processes that no longer run.
    pub fn open(root: &Path) -> Result<ContentStore> {
        for sub in ["blobs/sha256", "chunks/sha256", "meta", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| {
                Error::io(
                    format!(
                        "creating the cache directory {} (choose another with --cache)",
                        dir.display()
                    ),
                    e,
                )
            })?;
        }
        let store = ContentStore {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
        };
        store.remove_dead_temps();
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn remove_dead_temps(&self) {
        let Ok(dir) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Where a whole blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// Where a chunk lives.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        self.root.join("chunks/sha256").join(d.hex())
    }

    /// Where a derived record named `name` lives (`name` is a plain file name).
    pub fn meta_path(&self, name: &str) -> PathBuf {
        self.root.join("meta").join(name)
    }

    /// A fresh temp path inside the store (same filesystem, for renames).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Whether the store holds the chunk `d`.
    pub fn has_chunk(&self, d: &Digest) -> bool {
        self.chunk_path(d).is_file()
    }

    /// Whether the store holds the blob `d`.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Store a chunk after checking that `bytes` hash to `d`.
    pub fn put_chunk(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        check(d, bytes, "chunk")?;
        self.write_atomic(&self.chunk_path(d), bytes)
    }

    /// Store a whole blob after checking that `bytes` hash to `d`.
    pub fn put_blob(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        check(d, bytes, "blob")?;
        self.write_atomic(&self.blob_path(d), bytes)
    }

    /// Store `len` bytes at `offset` of `file` as the chunk `d`, streaming
    /// and checking the digest on the way (positioned reads: several
    /// threads may share `file`).
    pub fn put_chunk_from(&self, d: &Digest, file: &File, offset: u64, len: u64) -> Result<()> {
        use std::io::BufWriter;
        use std::os::unix::fs::FileExt;
        let dest = self.chunk_path(d);
        if dest.is_file() {
            return Ok(());
        }
        let temp = self.temp_path();
        let result = (|| -> std::io::Result<Digest> {
            let out = BufWriter::with_capacity(256 * 1024, File::create(&temp)?);
            let mut hw = breakfs_index::HashingWriter::new(out);
            let mut buf = vec![0u8; (256 * 1024).min(len.max(1) as usize)];
            let mut done = 0u64;
            while done < len {
                let want = buf.len().min((len - done) as usize);
                let n = file.read_at(&mut buf[..want], offset + done)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("only {done} of {len} bytes"),
                    ));
                }
                hw.write_all(&buf[..n])?;
                done += n as u64;
            }
            let (out, digest, _) = hw.finish();
            out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
            Ok(digest)
        })();
        let outcome = match result {
            Ok(actual) if &actual == d => fs::rename(&temp, &dest)
                .map_err(|e| Error::io(format!("writing {}", dest.display()), e)),
            Ok(actual) => Err(Error::DigestMismatch {
                what: format!("chunk of {len} bytes"),
                expected: d.clone(),
                actual,
            }),
            Err(e) => Err(Error::io(format!("writing {}", dest.display()), e)),
        };
        if outcome.is_err() {
            let _ = fs::remove_file(&temp);
        }
        outcome
    }

    /// A small blob's bytes, verified again on the way out; `None` if absent.
    pub fn read_blob(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(d);
        match fs::read(&path) {
            Ok(b) => {
                check(d, &b, "stored blob")?;
                Ok(Some(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Write a derived record atomically.
    pub fn put_meta(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&self.meta_path(name), bytes)
    }

    /// A derived record, `None` if absent.
    pub fn read_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.meta_path(name);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Move a finished temp file (already verified by the caller) to `dest`
    /// after syncing it.
    pub fn commit_temp(&self, temp: &Path, dest: &Path) -> Result<()> {
        let f =
            File::open(temp).map_err(|e| Error::io(format!("opening {}", temp.display()), e))?;
        f.sync_data()
            .map_err(|e| Error::io(format!("syncing {}", temp.display()), e))?;
        fs::rename(temp, dest).map_err(|e| {
            Error::io(
                format!("moving {} to {}", temp.display(), dest.display()),
                e,
            )
        })
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        if dest.is_file() {
            return Ok(());
        }
        let temp = self.temp_path();
        let result = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
            fs::rename(&temp, dest)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&temp);
            Error::io(format!("writing {}", dest.display()), e)
        })
    }

    /// Bytes held by blobs and chunks.
    pub fn usage(&self) -> u64 {
        ["blobs/sha256", "chunks/sha256"]
            .iter()
            .filter_map(|s| fs::read_dir(self.root.join(s)).ok())
            .flat_map(|d| d.flatten())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

fn check(d: &Digest, bytes: &[u8], what: &str) -> Result<()> {
    let actual = Digest::of(bytes);
    if &actual != d {
        return Err(Error::DigestMismatch {
            what: format!("{what} of {} bytes", bytes.len()),
            expected: d.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_verified_and_land_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(!s.has_chunk(&d));
        let err = s.put_chunk(&d, b"jello").unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!s.has_chunk(&d));
        s.put_chunk(&d, b"hello").unwrap();
        assert_eq!(fs::read(s.chunk_path(&d)).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn temps_of_dead_processes_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        // PID 0 never names a live process in /proc; our own PID does.
        fs::write(dir.path().join("tmp/0-1"), b"torn").unwrap();
        let mine = dir.path().join(format!("tmp/{}-9", std::process::id()));
        fs::write(&mine, b"in progress").unwrap();
        ContentStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/0-1").exists());
        assert!(mine.exists());
    }

    #[test]
    fn stored_blobs_are_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = ContentStore::open(dir.path()).unwrap();
        let d = Digest::of(b"config");
        s.put_blob(&d, b"config").unwrap();
        assert_eq!(s.read_blob(&d).unwrap().unwrap(), b"config");
        fs::write(s.blob_path(&d), b"tampered").unwrap();
        assert!(s.read_blob(&d).is_err());
        assert!(s.read_blob(&Digest::of(b"none")).unwrap().is_none());
    }
}
