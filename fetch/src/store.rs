//! [`Store`]: one OCI layout or one registry repository behind one API, and
//! [`Image`]: a resolved, verified manifest and config.

use std::path::Path;

use breakfs_index::{
    Descriptor, Digest, ImageConfig, ImageIndex, ImageRef, Manifest, ManifestDoc, Platform,
    Reference, annotations,
};

use crate::{ClientOptions, Error, OciLayout, RegistryRepo, Result};

/// A resolved image: its manifest and config, both verified against their digests.
#[derive(Clone, Debug)]
pub struct Image {
    /// The reference it was resolved from.
    pub reference: ImageRef,
    /// The single-platform image manifest.
    pub manifest: Manifest,
    /// The manifest exactly as stored.
    pub manifest_bytes: Vec<u8>,
    /// The digest of `manifest_bytes`.
    pub manifest_digest: Digest,
    /// The digest of the index the manifest was picked from, if any.
    pub index_digest: Option<Digest>,
    /// The parsed config.
    pub config: ImageConfig,
    /// The config exactly as stored.
    pub config_bytes: Vec<u8>,
}

impl Image {
    /// The layers, bottom first.
    pub fn layers(&self) -> &[Descriptor] {
        &self.manifest.layers
    }

    /// The manifest's media type (OCI when the document does not say).
    pub fn media_type(&self) -> &str {
        self.manifest
            .media_type
            .as_deref()
            .unwrap_or(breakfs_index::media_types::OCI_MANIFEST)
    }
}

/// Reads a small blob (a config) by descriptor, verified.
pub type BlobLoader<'a> =
    &'a (dyn Fn(Descriptor) -> futures::future::BoxFuture<'static, Result<Vec<u8>>> + Send + Sync);

/// Where images are read from and written to: one layout or one repository.
// A store is made once per reference; boxing the registry would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Store {
    /// An OCI image layout directory.
    Layout(OciLayout),
    /// A repository in a registry.
    Registry(RegistryRepo),
}

impl Store {
    /// The store holding `r` (a layout directory need not exist yet: it is
    /// created on the first write). Makes no network request.
    pub async fn open(r: &ImageRef, opts: &ClientOptions) -> Result<Store> {
        Ok(match r {
            ImageRef::Layout { dir, .. } => {
                Store::Layout(OciLayout::new(dir.clone()).with_platform(opts.platform.clone()))
            }
            ImageRef::Registry { host, repo, .. } => {
                Store::Registry(RegistryRepo::new(host, repo, opts)?)
            }
        })
    }

    /// `oci:DIR` or `docker://HOST/REPO`.
    pub fn name(&self) -> String {
        match self {
            Store::Layout(l) => format!("oci:{}", l.dir().display()),
            Store::Registry(r) => format!("docker://{}/{}", r.host(), r.repo()),
        }
    }

    /// Whether `r` points into this store.
    fn holds(&self, r: &ImageRef) -> bool {
        match (self, r) {
            (Store::Layout(l), ImageRef::Layout { dir, .. }) => l.dir() == dir,
            (Store::Registry(g), ImageRef::Registry { host, repo, .. }) => {
                g.host() == host && g.repo() == repo
            }
            _ => false,
        }
    }

    /// Resolve `r` to a verified image manifest and config; an index is
    /// followed to the manifest for `platform`.
    pub async fn resolve_platform(&self, r: &ImageRef, platform: &Platform) -> Result<Image> {
        self.resolve_with(r, platform, None).await
    }

    /// [`Store::resolve_platform`], reading the config (and only the
    /// config) through `config` when given: a node's content store and fetch
    /// chain (the manifest is always asked of this store, since a tag moves).
    pub async fn resolve_with(
        &self,
        r: &ImageRef,
        platform: &Platform,
        cache: Option<BlobLoader<'_>>,
    ) -> Result<Image> {
        if !self.holds(r) {
            return Err(Error::OtherLocation {
                reference: r.to_string(),
                store: self.name(),
            });
        }
        let what = r.to_string();
        // The top document: a manifest or an index, and its digest.
        let (doc, bytes, digest) = match (self, r) {
            (Store::Layout(l), ImageRef::Layout { tag, .. }) => {
                let index = l.index().await?;
                match pick_in_layout(&index, tag.as_deref(), &what)? {
                    LayoutPick::One(desc) => {
                        let bytes = l.read_blob(&desc).await?;
                        let doc = ManifestDoc::parse(&bytes, Some(&desc.media_type), &what)?;
                        (doc, bytes, desc.digest)
                    }
                    // Several platform entries under one tag in index.json itself.
                    LayoutPick::Platforms(i) => {
                        let desc = pick_platform(&i, platform, &what)?;
                        return self.finish(r, desc, None, platform, cache).await;
                    }
                }
            }
            (Store::Registry(g), ImageRef::Registry { reference, .. }) => {
                let m = g.get_manifest(reference).await?;
                let doc = ManifestDoc::parse(&m.bytes, m.content_type.as_deref(), &what)?;
                (doc, m.bytes, m.digest)
            }
            _ => {
                return Err(Error::OtherLocation {
                    reference: what,
                    store: self.name(),
                });
            }
        };
        match doc {
            ManifestDoc::Image(manifest) => {
                self.with_config(r, manifest, bytes, digest, None, cache)
                    .await
            }
            ManifestDoc::Index(index) => {
                let desc = pick_platform(&index, platform, &what)?;
                self.finish(r, desc, Some(digest), platform, cache).await
            }
        }
    }

    /// [`Store::resolve_platform`] with the platform of the options the store
    /// was opened with.
    pub async fn resolve(&self, r: &ImageRef) -> Result<Image> {
        let platform = self.platform().clone();
        self.resolve_platform(r, &platform).await
    }

    /// The platform [`Store::resolve`] picks from an index.
    pub fn platform(&self) -> &Platform {
        match self {
            Store::Layout(l) => l.platform(),
            Store::Registry(g) => g.platform(),
        }
    }

    /// Fetch the platform manifest `desc` picked from an index, then its config.
    async fn finish(
        &self,
        r: &ImageRef,
        desc: Descriptor,
        index_digest: Option<Digest>,
        platform: &Platform,
        cache: Option<BlobLoader<'_>>,
    ) -> Result<Image> {
        let what = format!("{platform} manifest {} of {r}", desc.digest);
        let bytes = match self {
            Store::Layout(l) => l.read_blob(&desc).await?,
            Store::Registry(g) => {
                let m = g
                    .get_manifest(&Reference::Digest(desc.digest.clone()))
                    .await?;
                crate::blobfile::check_bytes(&what, &desc, &m.bytes)?;
                m.bytes
            }
        };
        match ManifestDoc::parse(&bytes, Some(&desc.media_type), &what)? {
            ManifestDoc::Image(m) => {
                self.with_config(r, m, bytes, desc.digest, index_digest, cache)
                    .await
            }
            ManifestDoc::Index(_) => Err(Error::Protocol {
                what,
                reason: "an index inside an index is not supported".into(),
            }),
        }
    }

    async fn with_config(
        &self,
        r: &ImageRef,
        manifest: Manifest,
        manifest_bytes: Vec<u8>,
        manifest_digest: Digest,
        index_digest: Option<Digest>,
        cache: Option<BlobLoader<'_>>,
    ) -> Result<Image> {
        let config_bytes = match cache {
            Some(load) => load(manifest.config.clone()).await?,
            None => self.read_blob(&manifest.config).await?,
        };
        let config = ImageConfig::parse(&config_bytes, &format!("config of {r}"))?;
        Ok(Image {
            reference: r.clone(),
            manifest,
            manifest_bytes,
            manifest_digest,
            index_digest,
            config,
            config_bytes,
        })
    }

    /// The tags: `ref.name` annotations of a layout, `tags/list` of a repository.
    pub async fn tags(&self) -> Result<Vec<String>> {
        match self {
            Store::Layout(l) => l.tags().await,
            Store::Registry(g) => g.tags().await,
        }
    }

    /// Whether the blob is present.
    pub async fn has_blob(&self, d: &Digest) -> Result<bool> {
        match self {
            Store::Layout(l) => l.has_blob(d).await,
            Store::Registry(g) => g.has_blob(d).await,
        }
    }

    /// Write a blob to `path`: streamed, size and digest verified, atomic.
    pub async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        match self {
            Store::Layout(l) => l.blob_to_file(desc, path).await,
            Store::Registry(g) => g.blob_to_file(desc, path).await,
        }
    }

    /// Read a whole blob, verified.
    pub async fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        match self {
            Store::Layout(l) => l.read_blob(desc).await,
            Store::Registry(g) => g.read_blob(desc).await,
        }
    }

    /// Read `len` bytes at `start` of a blob, unverified; shorter at the end.
    pub async fn read_range(&self, d: &Digest, start: u64, len: u64) -> Result<Vec<u8>> {
        match self {
            Store::Layout(l) => l.read_range(d, start, len).await,
            Store::Registry(g) => g.read_range(d, start, len).await,
        }
    }

    /// Store the file at `path` as a blob (HEAD first); `true` if bytes were uploaded.
    pub async fn push_blob_file(&self, desc: &Descriptor, path: &Path) -> Result<bool> {
        self.push_blob_file_from(desc, path, None).await
    }

    /// Like [`Store::push_blob_file`], but a registry first tries to mount the
    /// blob from `from` when that is another repository on the same registry
    /// (a mount returns `false`: nothing was uploaded).
    pub async fn push_blob_file_from(
        &self,
        desc: &Descriptor,
        path: &Path,
        from: Option<&ImageRef>,
    ) -> Result<bool> {
        match self {
            Store::Layout(l) => l.push_blob_file(desc, path).await,
            Store::Registry(g) => {
                let mount = match from {
                    Some(ImageRef::Registry { host, repo, .. }) if host == g.host() => {
                        Some(repo.as_str())
                    }
                    _ => None,
                };
                g.push_blob_file(desc, path, mount).await
            }
        }
    }

    /// Store bytes as a blob (HEAD first); `true` if bytes were uploaded.
    pub async fn push_blob_bytes(&self, desc: &Descriptor, bytes: &[u8]) -> Result<bool> {
        match self {
            Store::Layout(l) => l.push_blob_bytes(desc, bytes).await,
            Store::Registry(g) => g.push_blob_bytes(desc, bytes).await,
        }
    }

    /// Store a manifest or index by digest only, untagged (an index will list
    /// it); push its blobs first.
    pub async fn push_manifest_untagged(&self, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        match self {
            Store::Layout(l) => l.push_manifest_untagged(media_type, bytes).await,
            Store::Registry(g) => g.push_manifest_untagged(media_type, bytes).await,
        }
    }

    /// Store a manifest or index under `tag`; push its blobs first.
    pub async fn push_manifest(&self, tag: &str, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        match self {
            Store::Layout(l) => l.push_manifest(tag, media_type, bytes).await,
            Store::Registry(g) => g.push_manifest(tag, media_type, bytes).await,
        }
    }
}

#[derive(Debug)]
enum LayoutPick {
    One(Descriptor),
    Platforms(ImageIndex),
}

/// Choose the `index.json` entry for `tag` (or the only / `latest` one).
fn pick_in_layout(index: &ImageIndex, tag: Option<&str>, what: &str) -> Result<LayoutPick> {
    let tag_of = |d: &Descriptor| d.annotations.get(annotations::REF_NAME).cloned();
    let mut tags: Vec<String> = Vec::new();
    for t in index.manifests.iter().filter_map(tag_of) {
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    let candidates: Vec<Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| tag_of(d).as_deref() == Some(t))
            .cloned()
            .collect(),
        None if index.manifests.len() <= 1 => index.manifests.clone(),
        None if tags.len() > 1 => {
            let latest: Vec<Descriptor> = index
                .manifests
                .iter()
                .filter(|d| tag_of(d).as_deref() == Some("latest"))
                .cloned()
                .collect();
            if latest.is_empty() {
                return Err(Error::Ambiguous {
                    layout: what.to_string(),
                    tags,
                });
            }
            latest
        }
        // Untagged entries, or all under one tag: a platform choice.
        None => index.manifests.clone(),
    };
    match candidates.len() {
        0 => Err(Error::NotFound {
            what: match tag {
                Some(t) if tags.is_empty() => format!("tag {t:?} in {what} (it has no tags)"),
                Some(t) => format!("tag {t:?} in {what} (tags: {})", tags.join(", ")),
                None => format!("an image in {what} (index.json lists none)"),
            },
        }),
        1 => Ok(LayoutPick::One(candidates.into_iter().next().ok_or_else(
            || Error::NotFound {
                what: what.to_string(),
            },
        )?)),
        _ if candidates.iter().all(|d| d.platform.is_some()) => {
            Ok(LayoutPick::Platforms(ImageIndex {
                schema_version: 2,
                media_type: None,
                manifests: candidates,
                annotations: Default::default(),
            }))
        }
        _ => Err(Error::Ambiguous {
            layout: what.to_string(),
            tags,
        }),
    }
}

/// The index entry for `platform`, or an error listing what there is.
fn pick_platform(index: &ImageIndex, platform: &Platform, what: &str) -> Result<Descriptor> {
    let found = index
        .manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)));
    match found {
        Some(d) => Ok(d.clone()),
        None => Err(Error::NoPlatform {
            image: what.to_string(),
            wanted: platform.to_string(),
            available: index
                .manifests
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => p.to_string(),
                    None => format!("(no platform: {})", d.digest.short()),
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(tag: Option<&str>, platform: Option<&str>, n: u8) -> Descriptor {
        let mut d = Descriptor::new(
            breakfs_index::media_types::OCI_MANIFEST,
            Digest::of(&[n]),
            1,
        );
        if let Some(t) = tag {
            d.annotations.insert(annotations::REF_NAME.into(), t.into());
        }
        d.platform = platform.map(|p| Platform::parse(p).unwrap());
        d
    }

    fn index(m: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: m,
            annotations: Default::default(),
        }
    }

    #[test]
    fn layout_pick_by_tag_only_and_latest() {
        let i = index(vec![entry(Some("a"), None, 1), entry(Some("b"), None, 2)]);
        assert!(
            matches!(pick_in_layout(&i, Some("b"), "x").unwrap(), LayoutPick::One(d) if d.digest == Digest::of(&[2]))
        );
        let err = pick_in_layout(&i, None, "oci:x").unwrap_err().to_string();
        assert!(err.contains("a, b") && err.contains("oci:DIR:TAG"), "{err}");
        let err = pick_in_layout(&i, Some("c"), "oci:x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"c\"") && err.contains("a, b"), "{err}");
        let i = index(vec![
            entry(Some("a"), None, 1),
            entry(Some("latest"), None, 3),
        ]);
        assert!(
            matches!(pick_in_layout(&i, None, "x").unwrap(), LayoutPick::One(d) if d.digest == Digest::of(&[3]))
        );
        let i = index(vec![entry(None, None, 4)]);
        assert!(matches!(
            pick_in_layout(&i, None, "x").unwrap(),
            LayoutPick::One(_)
        ));
    }

    #[test]
    fn layout_with_platform_entries_under_one_tag() {
        let i = index(vec![
            entry(Some("v1"), Some("linux/amd64"), 1),
            entry(Some("v1"), Some("linux/arm64"), 2),
        ]);
        let LayoutPick::Platforms(p) = pick_in_layout(&i, Some("v1"), "x").unwrap() else {
            panic!("expected a platform choice");
        };
        let d = pick_platform(&p, &Platform::parse("linux/arm64").unwrap(), "x").unwrap();
        assert_eq!(d.digest, Digest::of(&[2]));
    }

    #[test]
    fn missing_platform_lists_available() {
        let i = index(vec![
            entry(None, Some("linux/amd64"), 1),
            entry(None, Some("linux/arm/v7"), 2),
        ]);
        let err = pick_platform(&i, &Platform::parse("linux/s390x").unwrap(), "img")
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/s390x"), "{err}");
        assert!(err.contains("linux/amd64, linux/arm/v7"), "{err}");
    }
}
