//! Remote (lazy) layers. containerd prepares a layer snapshot with labels
//! naming the image and the layer (`containerd.io/snapshot/cri.*`, set by
//! its CRI plugin, or `containerd.io/snapshot/remote/stargz.*`, set by
//! `ctr-remote image rpull`) and the snapshot it will commit
//! (`containerd.io/snapshot.ref`). When the layer has a TOC, the target is
//! recorded as a committed snapshot served lazily and containerd is told
//! it exists, so it downloads nothing. Each such layer is one FUSE mount
//! of the layer alone in overlayfs' form, keyed by layer digest, served
//! through the daemon's mounts (its fetch chain and prefetch), mounted at
//! the first snapshot that needs it and unmounted with the last remote
//! snapshot of that layer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakfs_fetch::Image;
use breakfs_fs::MountOptions;
use breakfs_index::{Causes, Digest, ImageRef, Reference};
use parking_lot::Mutex;

use super::meta::Remote;
use super::stats::Fallback;
use super::{Fault, fault};
use crate::mounts::Source;
use crate::server::NodeService;
use crate::{Error, Result};

/// The snapshot containerd will commit the layer as.
pub(crate) const TARGET: &str = "containerd.io/snapshot.ref";

/// The label pairs (image, layer digest) that ask for a remote layer.
const FAMILIES: [(&str, &str); 2] = [
    (
        "containerd.io/snapshot/cri.image-ref",
        "containerd.io/snapshot/cri.layer-digest",
    ),
    (
        "containerd.io/snapshot/remote/stargz.reference",
        "containerd.io/snapshot/remote/stargz.digest",
    ),
];

/// How long a resolved image is reused: the prepares of one pull come
/// within seconds, and a tag may move afterwards.
const IMAGE_TTL: Duration = Duration::from_secs(60);

/// How long a layer's tree built at pull waits for its mount (the first
/// container): a later mount builds it again from the stored TOC.
const TREE_TTL: Duration = Duration::from_secs(600);

/// A prepare that asks for a remote layer.
#[derive(Clone, Debug)]
pub(crate) struct Ask {
    /// The snapshot to commit.
    pub target: String,
    /// The image as the labels name it.
    pub image: String,
    /// The same, parsed.
    pub reference: ImageRef,
    /// The layer.
    pub layer: Digest,
}

/// What to do with an [`Ask`].
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Serve the layer lazily.
    Lazy(Remote),
    /// Let containerd download it, for this reason.
    Ordinary(Fallback, String),
}

/// The remote layer a prepare's `labels` ask for, if any; labels that
/// name something malformed (half a pair, an unparsable reference or
/// digest) are InvalidArgument.
pub(crate) fn ask_of(labels: &BTreeMap<String, String>) -> Result<Option<Ask>> {
    let Some((image_key, digest_key)) = FAMILIES
        .iter()
        .find(|(i, d)| labels.contains_key(*i) || labels.contains_key(*d))
    else {
        return Ok(None);
    };
    let invalid = |what: String| fault(Fault::InvalidArgument, what);
    let (Some(image), Some(digest)) = (labels.get(*image_key), labels.get(*digest_key)) else {
        return Err(invalid(format!(
            "a remote layer needs both labels {image_key} and {digest_key}; one is missing"
        )));
    };
    let target = labels.get(TARGET).cloned().unwrap_or_default();
    if target.is_empty() {
        return Err(invalid(format!(
            "the labels name layer {digest} of {image} but no {TARGET} to commit it as"
        )));
    }
    let full = if image.contains("://") {
        image.clone()
    } else {
        format!("docker://{image}")
    };
    let reference = match ImageRef::parse(&full) {
        Ok(r @ ImageRef::Registry { .. }) => r,
        Ok(_) => {
            return Err(invalid(format!(
                "label {image_key}={image:?}: a remote layer comes from a registry"
            )));
        }
        Err(e) => {
            return Err(invalid(format!(
                "label {image_key}={image:?} is not an image reference: {}",
                Causes(&e)
            )));
        }
    };
    let layer = Digest::parse(digest).map_err(|e| {
        invalid(format!(
            "label {digest_key}={digest:?} is not a digest: {}",
            Causes(&e)
        ))
    })?;
    Ok(Some(Ask {
        target,
        image: image.clone(),
        reference,
        layer,
    }))
}

/// The remote layers of one snapshotter: their lazy mounts under
/// `ROOT/l/`, served by the daemon.
pub(crate) struct Remotes {
    svc: Arc<NodeService>,
    /// Images resolved lately, by reference.
    images: Mutex<HashMap<String, (Instant, Image)>>,
    /// Mounts and unmounts, one at a time.
    mounting: tokio::sync::Mutex<()>,
    /// TOC fetches under way, by layer (see [`Remotes::warm`]).
    tocs: Mutex<HashMap<Digest, (Instant, TocFetch, TreeBuild)>>,
    /// Layer trees built when their prepare checked them, kept for their
    /// mount, by layer.
    trees: Mutex<HashMap<Digest, BuiltTree>>,
    /// Images whose start is being fetched ahead, by manifest digest
    /// (see [`Remotes::fetch_start`]).
    starting: Mutex<HashMap<Digest, Instant>>,
    /// The layers this daemon mounted, by mount dir, with the repository
    /// (`HOST/REPO`) of their image.
    mounted: Mutex<HashMap<PathBuf, String>>,
    /// Layers to mount ahead of their first container, and whether a task
    /// is mounting them (see [`Remotes::mount_ahead`]).
    ahead: Mutex<(Vec<Remote>, bool)>,
}

/// A layer's tree as its prepare built it: when, and the image (listing
/// that layer alone) it was built of.
type BuiltTree = (
    Instant,
    Image,
    Arc<breakfs_fs::Tree>,
    Vec<(Digest, Vec<breakfs_fetch::ChunkLoc>)>,
);

/// What a layer's TOC made: its tree (with the image listing that layer
/// alone and its landmarked regions), no TOC, a TOC that cannot be served
/// lazily (why), or skipped (served already: its prepare, if one comes,
/// builds it).
enum Built {
    Tree(Box<Image>, Arc<breakfs_fs::Tree>, Regions),
    NoToc,
    Refused(String),
    Skipped,
}

/// A layer's landmarked regions.
type Regions = Vec<(Digest, Vec<breakfs_fetch::ChunkLoc>)>;

/// A TOC fetch that any number of prepares can wait for.
type TocFetch = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// A layer's tree build (after its TOC fetch) that its prepare waits for.
type TreeBuild = futures::future::Shared<futures::future::BoxFuture<'static, Arc<Built>>>;

impl Remotes {
    /// Remote layers fetched and served through `svc`.
    pub(crate) fn new(svc: Arc<NodeService>) -> Remotes {
        Remotes {
            svc,
            images: Mutex::new(HashMap::new()),
            mounting: tokio::sync::Mutex::new(()),
            tocs: Mutex::new(HashMap::new()),
            trees: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
            mounted: Mutex::new(HashMap::new()),
            ahead: Mutex::new((Vec::new(), false)),
        }
    }

    /// The node daemon's service it serves layers through.
    pub(crate) fn node(&self) -> &NodeService {
        &self.svc
    }

    /// `reference` resolved through the node's chain (reused for a while).
    async fn resolve(&self, reference: &ImageRef) -> Result<Image> {
        let key = reference.to_string();
        if let Some((at, image)) = self.images.lock().get(&key)
            && at.elapsed() < IMAGE_TTL
        {
            return Ok(image.clone());
        }
        let s = &self.svc;
        let image =
            breakfs_fetch::resolve_image(reference, &s.client, &s.fetcher, &s.cloud).await?;
        let mut images = self.images.lock();
        images.retain(|_, (at, _)| at.elapsed() < IMAGE_TTL);
        images.insert(key, (Instant::now(), image.clone()));
        Ok(image)
    }

    /// Start fetching the TOCs of all of `image`'s layers at once (each
    /// once; kept in the store), and building the tree of each layer
    /// `served` does not say is served already: containerd prepares an
    /// image's layers one after the other, and a round trip and a tree
    /// build each on its reply path would add up.
    fn warm(&self, image: &Image, served: impl Fn(&Digest) -> bool) {
        use futures::FutureExt as _;
        let mut tocs = self.tocs.lock();
        // Done ones stay a while: the image's other prepares ask again.
        tocs.retain(|_, (at, _, b)| b.peek().is_none() || at.elapsed() < IMAGE_TTL);
        for desc in image.layers() {
            if tocs.contains_key(&desc.digest) {
                continue;
            }
            let (fetcher, d) = (self.svc.fetcher.clone(), desc.clone());
            let fetch = async move {
                // Failures show when the layer's own prepare reads it.
                let _ = fetcher.layer_toc(&d).await;
            }
            .boxed()
            .shared();
            let build = !served(&desc.digest);
            let (fetcher, d, image, toc) = (
                self.svc.fetcher.clone(),
                desc.digest.clone(),
                image.clone(),
                fetch.clone(),
            );
            let tree = async move {
                toc.await;
                if !build {
                    return Arc::new(Built::Skipped);
                }
                Arc::new(built(breakfs_fs::open_layer(image, &d, &fetcher).await))
            }
            .boxed()
            .shared();
            tokio::spawn(tree.clone());
            tocs.insert(desc.digest.clone(), (Instant::now(), fetch, tree));
        }
    }

    /// Fetch what starting `image` reads first (the programs its config
    /// starts and the files they load, found in its merged tree) once its
    /// TOCs are in, at on-demand priority, while containerd is still
    /// preparing its layers: the first container then finds them in the
    /// store instead of fetching them one round trip at a time. Once per
    /// image a while; an image a TOC is missing from is left alone.
    fn fetch_start(&self, image: &Image) {
        use futures::FutureExt as _;
        {
            let mut starting = self.starting.lock();
            starting.retain(|_, at| at.elapsed() < IMAGE_TTL);
            if starting
                .insert(image.manifest_digest.clone(), Instant::now())
                .is_some()
            {
                return;
            }
        }
        let tocs: Vec<TocFetch> = {
            let tocs = self.tocs.lock();
            image
                .layers()
                .iter()
                .filter_map(|d| tocs.get(&d.digest).map(|(_, f, _)| f.clone()))
                .collect()
        };
        let (image, fetcher) = (image.clone(), self.svc.fetcher.clone());
        let (client, cloud) = (self.svc.client.clone(), self.svc.cloud.clone());
        tokio::spawn(async move {
            // The image's deltas (an update's changed files, made from the
            // earlier version's this node holds) are looked up beside the TOCs.
            let deltas = breakfs_fetch::load_deltas(&image, &client, &fetcher, &cloud);
            let ((), deltas) =
                futures::future::join(futures::future::join_all(tocs).map(|_| ()), deltas).await;
            match deltas {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(image = %image.reference, deltas = n, "the image has deltas")
                }
                Err(e) => {
                    tracing::warn!(image = %image.reference, "its deltas cannot be read, fetching chunks whole: {}", Causes(&e))
                }
            }
            let began = Instant::now();
            match breakfs_fs::prefetch_start(&image, &fetcher).await {
                Ok(Some(got)) => tracing::info!(
                    image = %image.reference,
                    programs = ?got.programs,
                    files = got.fetched.files,
                    bytes = got.fetched.bytes,
                    failed = got.fetched.failed,
                    ms = began.elapsed().as_millis() as u64,
                    "fetched the image's start ahead"
                ),
                Ok(None) => {}
                // Its reads fetch it then: nothing is lost but time.
                Err(e) => tracing::warn!(
                    image = %image.reference,
                    "fetching the image's start ahead: {}",
                    Causes(&e)
                ),
            }
        });
    }

    /// Whether the layer `ask` names can be served lazily: the image
    /// resolves and the layer has a TOC that reads (fetched with the
    /// image's other TOCs, range requests, and kept; its tree built with
    /// theirs, but for the layers `served` says are served already). A
    /// layer the manifest does not list is InvalidArgument.
    pub(crate) async fn check(
        &self,
        ask: &Ask,
        served: impl Fn(&Digest) -> bool,
    ) -> Result<Outcome> {
        let began = Instant::now();
        let image = match self.resolve(&ask.reference).await {
            Ok(image) => image,
            Err(e) => {
                return Ok(Outcome::Ordinary(
                    Fallback::Unresolved,
                    format!("the image cannot be resolved now: {}", Causes(&e)),
                ));
            }
        };
        if !image.layers().iter().any(|d| d.digest == ask.layer) {
            let listed: Vec<String> = image
                .layers()
                .iter()
                .map(|d| d.digest.to_string())
                .collect();
            return Err(fault(
                Fault::InvalidArgument,
                format!(
                    "image {} (manifest {}) does not list layer {}; its layers are {}",
                    ask.image,
                    image.manifest_digest,
                    ask.layer,
                    listed.join(", ")
                ),
            ));
        }
        let pinned = match &ask.reference {
            ImageRef::Registry { host, repo, .. } => ImageRef::Registry {
                host: host.clone(),
                repo: repo.clone(),
                reference: Reference::Digest(image.manifest_digest.clone()),
            },
            other => other.clone(),
        };
        let resolved = began.elapsed();
        self.warm(&image, served);
        self.fetch_start(&image);
        let fetching = self.tocs.lock().get(&ask.layer).map(|(_, _, b)| b.clone());
        let mut done = match fetching {
            Some(f) => f.await,
            None => Arc::new(Built::Skipped),
        };
        let toc = began.elapsed();
        if matches!(*done, Built::Skipped) {
            let opened = breakfs_fs::open_layer(image, &ask.layer, &self.svc.fetcher).await;
            done = Arc::new(built(opened));
        }
        tracing::debug!(
            layer = %ask.layer.short(),
            resolved_ms = resolved.as_millis() as u64,
            toc_ms = toc.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "remote layer checked"
        );
        match &*done {
            Built::Tree(image, tree, regions) => {
                let mut trees = self.trees.lock();
                trees.retain(|_, (at, _, _, _)| at.elapsed() < TREE_TTL);
                trees.insert(
                    ask.layer.clone(),
                    (
                        Instant::now(),
                        (**image).clone(),
                        tree.clone(),
                        regions.clone(),
                    ),
                );
                Ok(Outcome::Lazy(Remote {
                    image: pinned.to_string(),
                    layer: ask.layer.clone(),
                }))
            }
            Built::NoToc | Built::Skipped => Ok(Outcome::Ordinary(
                Fallback::NoToc,
                "the layer has no TOC".into(),
            )),
            Built::Refused(why) => Ok(Outcome::Ordinary(
                Fallback::TocRefused,
                format!("its TOC is refused: {why}"),
            )),
        }
    }

    /// Make sure each of `remotes` is mounted at its dir (`dir_of`):
    /// the first snapshot over a remote layer mounts it.
    pub(crate) async fn ensure(
        &self,
        remotes: &[Remote],
        dir_of: impl Fn(&Digest) -> PathBuf,
    ) -> Result<()> {
        if remotes.is_empty() {
            return Ok(());
        }
        let began = Instant::now();
        let _one = self.mounting.lock().await;
        let count = self.mount_missing(remotes, dir_of).await?;
        tracing::debug!(
            layers = remotes.len(),
            mounted = count,
            ms = began.elapsed().as_millis() as u64,
            "remote layers ensured"
        );
        Ok(())
    }

    /// Whether an image of `reference`'s repository has layers this daemon
    /// mounted (a container of it ran here).
    pub(crate) fn runs_here(&self, reference: &ImageRef) -> bool {
        let Some(repo) = repository(reference) else {
            return false;
        };
        self.mounted.lock().values().any(|r| *r == repo)
    }

    /// Mount layer `r` soon, ahead of its first container: for an update
    /// of an image that runs here ([`Remotes::runs_here`]), whose container
    /// follows its pull, so that the mounts (a FUSE handshake and threads
    /// each) are made while containerd still prepares the image's other
    /// layers instead of at the container's prepare. One task mounts the
    /// layers asked so far side by side, then those asked meanwhile; a
    /// layer no snapshot holds any more (`in_use`) is skipped, and one that
    /// fails is left to the container's prepare, which mounts what is
    /// missing.
    pub(crate) fn mount_ahead<U, D>(self: &Arc<Self>, r: Remote, in_use: U, dir_of: D)
    where
        U: Fn(&Digest) -> bool + Send + 'static,
        D: Fn(&Digest) -> PathBuf + Send + Sync + 'static,
    {
        {
            let mut ahead = self.ahead.lock();
            ahead.0.push(r);
            if ahead.1 {
                return;
            }
            ahead.1 = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let asked = {
                    let mut ahead = me.ahead.lock();
                    if ahead.0.is_empty() {
                        ahead.1 = false;
                        return;
                    }
                    std::mem::take(&mut ahead.0)
                };
                let began = Instant::now();
                // Under the lock a removal's release takes too: a layer
                // whose last snapshot went is not mounted again.
                let _one = me.mounting.lock().await;
                let held: Vec<Remote> = asked.into_iter().filter(|r| in_use(&r.layer)).collect();
                match me.mount_missing(&held, &dir_of).await {
                    Ok(n) => tracing::debug!(
                        layers = held.len(),
                        mounted = n,
                        ms = began.elapsed().as_millis() as u64,
                        "layers mounted ahead of their container"
                    ),
                    Err(e) => tracing::warn!(
                        "mounting layers ahead of their container: {} (its prepare mounts them)",
                        Causes(&e)
                    ),
                }
            }
        });
    }

    /// Mount those of `remotes` not mounted yet at their dirs (`dir_of`),
    /// side by side; the caller holds `mounting`. Returns how many.
    async fn mount_missing(
        &self,
        remotes: &[Remote],
        dir_of: impl Fn(&Digest) -> PathBuf,
    ) -> Result<usize> {
        let mut missing = Vec::new();
        for r in remotes {
            let dir = dir_of(&r.layer);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let abs = dir
                .canonicalize()
                .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
            if !self.svc.mounts.serves(&abs) && !missing.iter().any(|(_, a)| a == &abs) {
                detach_dead(&abs);
                missing.push((r, abs));
            }
        }
        // An image's layers are mounted side by side: each waits on its
        // TOC (in the store since the pull) and a FUSE handshake.
        let mounts = missing.into_iter().map(|(r, abs)| async move {
            self.mount(r, abs).await.inspect_err(|e| {
                tracing::warn!(
                    "mounting layer {} of {} failed: {}",
                    r.layer,
                    r.image,
                    Causes(e)
                );
            })
        });
        let count = mounts.len();
        futures::future::try_join_all(mounts).await?;
        Ok(count)
    }

    async fn mount(&self, r: &Remote, abs: PathBuf) -> Result<()> {
        let began = Instant::now();
        let reference = ImageRef::parse(&r.image)?;
        let repo = repository(&reference);
        let built = self.trees.lock().remove(&r.layer);
        let opened = match built {
            Some((_, mut image, tree, regions)) => {
                // As the prepare built it; named as pinned.
                image.reference = reference;
                let fetcher = self.svc.fetcher.clone();
                let pin = fetcher.store().budget().map(|b| b.pin([r.layer.clone()]));
                breakfs_fs::OpenedImage {
                    image,
                    tree,
                    fetcher,
                    layers: vec![breakfs_fs::LayerMode::Lazy],
                    regions,
                    pin,
                }
            }
            None => self.open(&reference, r).await?,
        };
        // Only what is read is fetched (with the dependency prefetch):
        // a lazy layer is not hydrated in the background. Two request
        // threads: an image has dozens of layers, each read by few (a
        // read that waits on a fetch does not hold its thread).
        let opts = MountOptions {
            hydrate: false,
            threads: 2,
            dependency_prefetch: true,
        };
        let source = Source::Layer {
            image: r.image.clone(),
            layer: r.layer.to_string(),
        };
        let opened_in = began.elapsed();
        self.svc
            .add_mount(abs.clone(), source, opened, opts)
            .await?;
        if let Some(repo) = repo {
            self.mounted.lock().insert(abs.clone(), repo);
        }
        tracing::debug!(
            layer = %r.layer.short(),
            open_ms = opened_in.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "layer mounted"
        );
        eprintln!(
            "breakfs node: mounted layer {} of {} at {}",
            r.layer,
            r.image,
            abs.display()
        );
        Ok(())
    }

    /// Layer `r` opened from its stored TOC (its tree built again).
    async fn open(&self, reference: &ImageRef, r: &Remote) -> Result<breakfs_fs::OpenedImage> {
        let image = self.resolve(reference).await?;
        breakfs_fs::open_layer(image, &r.layer, &self.svc.fetcher)
            .await?
            .ok_or_else(|| {
                fault(
                    Fault::FailedPrecondition,
                    format!(
                        "layer {} of {} was served lazily and now has no TOC",
                        r.layer, r.image
                    ),
                )
            })
    }

    /// Unmount the lazy mount at `dir` (no snapshot uses its layer now).
    pub(crate) async fn release(&self, dir: &Path) {
        let _one = self.mounting.lock().await;
        let Ok(abs) = dir.canonicalize() else {
            return;
        };
        self.mounted.lock().remove(&abs);
        match self.svc.unmount(&abs).await {
            Ok(_) | Err(Error::NotServed(_)) => {}
            Err(e) => tracing::warn!("unmounting {}: {}", abs.display(), Causes(&e)),
        }
        detach_dead(&abs);
        let _ = std::fs::remove_dir(&abs);
    }
}

/// The repository (`HOST/REPO`) of a registry image.
fn repository(reference: &ImageRef) -> Option<String> {
    match reference {
        ImageRef::Registry { host, repo, .. } => Some(format!("{host}/{repo}")),
        _ => None,
    }
}

/// What opening a layer alone made, as [`Remotes::check`] answers it.
fn built(opened: breakfs_fs::Result<Option<breakfs_fs::OpenedImage>>) -> Built {
    match opened {
        Ok(Some(o)) => Built::Tree(Box::new(o.image), o.tree, o.regions),
        Ok(None) => Built::NoToc,
        Err(e) => Built::Refused(Causes(&e).to_string()),
    }
}

/// Detach a mount at `abs` no process serves (left by a daemon that was
/// killed: its readers get ENOTCONN).
fn detach_dead(abs: &Path) {
    if breakfs_fs::is_mountpoint(abs) {
        tracing::warn!("detaching the dead mount at {}", abs.display());
        let _ = nix::mount::umount2(abs, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Both label families ask; none is an ordinary prepare; half a pair
    /// or a malformed value is refused, naming it.
    #[test]
    fn labels_ask_for_remote_layers() {
        for (i, d) in FAMILIES {
            let a = ask_of(&labels(&[
                (TARGET, "sha256:chain"),
                (i, "reg.example:5000/app:v1"),
                (d, D),
            ]))
            .expect("valid labels")
            .expect("an ask");
            assert_eq!(a.target, "sha256:chain");
            assert_eq!(a.layer.to_string(), D);
            assert_eq!(a.reference.to_string(), "docker://reg.example:5000/app:v1");
        }
        assert!(ask_of(&labels(&[(TARGET, "x")])).expect("fine").is_none());
        let refused = |kv: &[(&str, &str)], says: &str| match ask_of(&labels(kv)) {
            Err(Error::Snapshot {
                fault: Fault::InvalidArgument,
                what,
            }) => assert!(what.contains(says), "{says:?} not in {what:?}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let (i, d) = FAMILIES[1];
        refused(&[(TARGET, "t"), (i, "reg/app:v1")], d);
        refused(
            &[(TARGET, "t"), (i, "reg/app:v1"), (d, "sha256:zz")],
            "not a digest",
        );
        refused(
            &[(TARGET, "t"), (i, "no-repo"), (d, D)],
            "not an image reference",
        );
        refused(&[(i, "reg/app:v1"), (d, D)], TARGET);
    }
}
