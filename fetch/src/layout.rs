//! OCI image layouts on disk: `DIR/oci-layout`, `DIR/index.json`,
//! `DIR/blobs/sha256/HEX`.
//!
//! Blobs are written to a temp file beside their final name and renamed
//! in; `index.json` is rewritten last (temp, fsync, rename), so a run that
//! is killed half-way never shows a half-written image.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use breakfs_index::{Descriptor, Digest, ImageIndex, Platform, annotations, media_types};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::blobfile::{VerifyingFile, check_bytes, copy_verified, open_error, sync_parent};
use crate::{Error, Result};

const OCI_LAYOUT_FILE: &str = "oci-layout";
const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// One OCI image layout directory.
#[derive(Clone, Debug)]
pub struct OciLayout {
    dir: PathBuf,
    platform: Platform,
    /// Serialises `index.json` rewrites between clones of this handle.
    index_lock: Arc<tokio::sync::Mutex<()>>,
}

impl OciLayout {
    /// A handle on the layout at `dir`; nothing is read or created yet.
    pub fn new(dir: impl Into<PathBuf>) -> OciLayout {
        OciLayout {
            dir: dir.into(),
            platform: Platform::linux_amd64(),
            index_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Pick `platform` from multi-platform images (default `linux/amd64`).
    pub fn with_platform(mut self, platform: Platform) -> OciLayout {
        self.platform = platform;
        self
    }

    /// The platform picked from multi-platform images.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob with digest `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(d.hex())
    }

    fn name(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    /// The layout's `index.json`.
    pub async fn index(&self) -> Result<ImageIndex> {
        let path = self.dir.join("index.json");
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    what: format!(
                        "{}/index.json ({} is not an OCI image layout)",
                        self.dir.display(),
                        self.name()
                    ),
                });
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Index(breakfs_index::Error::Json {
                what: format!("index.json of {}", self.name()),
                source: e,
            })
        })
    }

    /// The tags (`org.opencontainers.image.ref.name`) of `index.json`, in order.
    pub async fn tags(&self) -> Result<Vec<String>> {
        let index = match self.index().await {
            Ok(i) => i,
            Err(Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut tags: Vec<String> = Vec::new();
        for m in &index.manifests {
            if let Some(t) = m.annotations.get(annotations::REF_NAME)
                && !tags.contains(t)
            {
                tags.push(t.clone());
            }
        }
        Ok(tags)
    }

    /// Whether the blob is present.
    pub async fn has_blob(&self, d: &Digest) -> Result<bool> {
        match tokio::fs::metadata(self.blob_path(d)).await {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(
                format!("checking {}", self.blob_path(d).display()),
                e,
            )),
        }
    }

    fn blob_what(&self, d: &Digest) -> String {
        format!("blob {d} in {}", self.name())
    }

    /// Copy a blob to `path`, verified, atomically.
    pub async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        let what = self.blob_what(&desc.digest);
        copy_verified(&self.blob_path(&desc.digest), desc, path, &what).await
    }

    /// Read a whole blob, verified against its descriptor.
    pub async fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let what = self.blob_what(&desc.digest);
        let path = self.blob_path(&desc.digest);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| open_error(&path, &what, e))?;
        check_bytes(&what, desc, &bytes)?;
        Ok(bytes)
    }

    /// Read `len` bytes at `start` of a blob, unverified (shorter at the end).
    pub async fn read_range(&self, d: &Digest, start: u64, len: u64) -> Result<Vec<u8>> {
        let what = self.blob_what(d);
        let path = self.blob_path(d);
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| open_error(&path, &what, e))?;
        let io = |e| Error::io(format!("reading {}", path.display()), e);
        f.seek(std::io::SeekFrom::Start(start)).await.map_err(io)?;
        let mut out = Vec::with_capacity(usize::try_from(len.min(64 << 20)).unwrap_or(0));
        f.take(len).read_to_end(&mut out).await.map_err(io)?;
        Ok(out)
    }

    /// Write the `oci-layout` marker if it is missing.
    async fn ensure_layout(&self) -> Result<()> {
        let path = self.dir.join(OCI_LAYOUT_FILE);
        if tokio::fs::metadata(&path).await.is_ok() {
            return Ok(());
        }
        let desc = Descriptor::new(
            "",
            Digest::of(OCI_LAYOUT_CONTENT),
            OCI_LAYOUT_CONTENT.len() as u64,
        );
        let mut f = VerifyingFile::create(&path).await?;
        f.write(OCI_LAYOUT_CONTENT).await?;
        f.finish(&desc, &format!("{}/{OCI_LAYOUT_FILE}", self.dir.display()))
            .await
    }

    /// Copy the file at `path` in as a blob; `false` if it was already there.
    pub async fn push_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<bool> {
        if self.has_blob(&desc.digest).await? {
            return Ok(false);
        }
        self.ensure_layout().await?;
        let what = format!(
            "{} (pushing {} to {})",
            path.display(),
            desc.digest,
            self.name()
        );
        copy_verified(path, desc, &self.blob_path(&desc.digest), &what).await?;
        Ok(true)
    }

    /// Store bytes as a blob; `false` if it was already there.
    pub async fn push_blob_bytes(&self, desc: &Descriptor, bytes: &[u8]) -> Result<bool> {
        let what = format!("blob {} pushed to {}", desc.digest, self.name());
        check_bytes(&what, desc, bytes)?;
        if self.has_blob(&desc.digest).await? {
            return Ok(false);
        }
        self.ensure_layout().await?;
        let mut f = VerifyingFile::create(&self.blob_path(&desc.digest)).await?;
        f.write(bytes).await?;
        f.finish(desc, &what).await?;
        Ok(true)
    }

    /// Store a manifest as a blob only (an index will list it); returns its digest.
    pub async fn push_manifest_untagged(&self, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let desc = Descriptor::new(media_type, digest.clone(), bytes.len() as u64);
        self.push_blob_bytes(&desc, bytes).await?;
        Ok(digest)
    }

    /// Store a manifest (or index) and tag it in `index.json`, replacing the
    /// entry that had the same tag and keeping all others.
    pub async fn push_manifest(&self, tag: &str, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let mut desc = Descriptor::new(media_type, digest.clone(), bytes.len() as u64);
        self.push_blob_bytes(&desc, bytes).await?;
        desc.annotations
            .insert(annotations::REF_NAME.to_string(), tag.to_string());

        let _guard = self.index_lock.lock().await;
        let mut index = match self.index().await {
            Ok(i) => i,
            Err(Error::NotFound { .. }) => ImageIndex {
                schema_version: 2,
                media_type: Some(media_types::OCI_INDEX.to_string()),
                manifests: Vec::new(),
                annotations: Default::default(),
            },
            Err(e) => return Err(e),
        };
        index
            .manifests
            .retain(|m| m.annotations.get(annotations::REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(desc);
        if index.media_type.is_none() {
            index.media_type = Some(media_types::OCI_INDEX.to_string());
        }
        let json = serde_json::to_vec(&index).map_err(|e| Error::Protocol {
            what: format!("index.json of {}", self.name()),
            reason: format!("cannot serialise: {e}"),
        })?;
        self.write_atomic("index.json", json).await?;
        Ok(digest)
    }

    /// Replace `DIR/NAME` with `bytes`: temp file, fsync, rename, fsync dir.
    async fn write_atomic(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let dir = self.dir.clone();
        let dest = dir.join(name);
        let what = format!("writing {}", dest.display());
        let d2 = dest.clone();
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
            tmp.write_all(&bytes)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&d2).map_err(|e| e.error)?;
            Ok(())
        })
        .await;
        match res {
            Ok(Ok(())) => sync_parent(&dest).await,
            Ok(Err(e)) => Err(Error::io(what, e)),
            Err(e) => Err(Error::io(what, std::io::Error::other(e))),
        }
    }
}
