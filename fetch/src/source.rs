//! Where chunk and blob bytes come from: the seam between the fetch
//! scheduler and the places that hold content. A node tries, per request,
//! its own store ([`LocalSource`]), then peer edge nodes that hold the blob
//! (`crate::peer`), then, with relays, one of the links to the registry
//! (`crate::relay`), then the cloud ([`CloudSource`]: the registry
//! repository or OCI layout each blob was announced from).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use breakfs_index::{Descriptor, Digest};
use futures::future::BoxFuture;

use crate::{ChunkLoc, ContentStore, Error, Priority, Result, Store};

/// What a source standing for others proposes for the chunks of one
/// range: per chunk (in the order asked), the source to ask first, or
/// `None` when none of them has it or will have it soon.
pub type Plan = Vec<Option<Arc<dyn Source>>>;

/// Image metadata that the nodes of a cluster share while they read it
/// ([`Source::metadata`]), and how a node checks it.
#[derive(Clone, Copy, Debug)]
pub enum Meta<'a> {
    /// The TOC of eStargz layer `desc`: the blob's bytes from the TOC's
    /// gzip member to the blob's end, checked by the descriptor's TOC
    /// digest annotation.
    Toc(&'a Descriptor),
    /// Small blob `desc` (an image config), whole, checked by its digest.
    Blob(&'a Descriptor),
}

impl Meta<'_> {
    /// `toc` or `blob`.
    pub fn kind(&self) -> &'static str {
        match self {
            Meta::Toc(_) => "toc",
            Meta::Blob(_) => "blob",
        }
    }

    /// The layer (of a TOC) or the blob.
    pub fn desc(&self) -> &Descriptor {
        match self {
            Meta::Toc(d) | Meta::Blob(d) => d,
        }
    }
}

/// What a source standing for other nodes says of metadata this node is
/// about to read.
pub struct MetaTurn {
    /// Its bytes from another node that had them or read them meanwhile,
    /// unverified (the caller checks them), with the name of the source
    /// that sent them; `None`: read them here.
    pub got: Option<(String, Vec<u8>)>,
    /// Kept until this node has read and recorded the metadata, or given
    /// up: meanwhile other nodes may wait on this one for it.
    pub turn: Box<dyn Send + Sync>,
}

impl MetaTurn {
    /// Read it here, and nobody waits on this node for it.
    pub fn here() -> MetaTurn {
        MetaTurn {
            got: None,
            turn: Box::new(()),
        }
    }
}

/// The kind of a source, for metrics and for deciding what to trust it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceClass {
    /// The node's own store.
    Local,
    /// Another edge node.
    Peer,
    /// Another edge node fetching from the registry for this one.
    Relay,
    /// The registry (or layout) the image comes from.
    Cloud,
}

impl SourceClass {
    /// `local`, `peer`, `relay` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceClass::Local => "local",
            SourceClass::Peer => "peer",
            SourceClass::Relay => "relay",
            SourceClass::Cloud => "cloud",
        }
    }

    /// Whether the bytes come through another node: not trusted with
    /// unverifiable data, and rested after a failure.
    pub fn other_node(self) -> bool {
        matches!(self, SourceClass::Peer | SourceClass::Relay)
    }
}

/// A place that serves layer blobs by digest.
pub trait Source: Send + Sync {
    /// A short name for status and logs (`cloud`, `peer 10.0.0.2:7070`).
    fn name(&self) -> String;

    /// What kind of source this is.
    fn class(&self) -> SourceClass {
        SourceClass::Cloud
    }

    /// For a source standing for several (the peers), the ones to try for
    /// `blob`, best first; `None` for a plain source.
    fn expand(&self, _blob: &Digest) -> Option<Vec<Arc<dyn Source>>> {
        None
    }

    /// For a source standing for others (the peers): asked right before
    /// `chunks` (neighbours in blob `blob`, by offset) are fetched, which
    /// of those others to take each chunk from, found out now rather than
    /// from what they held a while ago. `None` (the default): no plan, the
    /// source is tried as [`Source::expand`] gives it. With a plan, the
    /// source is not expanded for these chunks: a chunk planned for no one,
    /// or that its planned source fails, goes on to the next sources.
    /// `prio` is how urgent the fetch is (the others may take chunks on at
    /// that priority).
    fn plan<'a>(
        &'a self,
        _blob: &'a Digest,
        _chunks: &'a [ChunkLoc],
        _prio: Priority,
    ) -> Option<BoxFuture<'a, Plan>> {
        None
    }

    /// For a source standing for other nodes (the peers): asked right
    /// before this node reads image metadata `meta` from its next sources,
    /// whether another node has it or is reading it now. The answer holds
    /// its bytes from that node (waited for, bounded), or none: read it
    /// here. `None` (the default): not a source that shares metadata.
    fn metadata<'a>(&'a self, _meta: Meta<'a>) -> Option<BoxFuture<'a, MetaTurn>> {
        None
    }

    /// `len` bytes at `start` of blob `blob`, unverified (the caller checks
    /// every chunk against its digest). By default [`Error::NotFound`]: a
    /// source standing for others, or one that moves whole blobs only.
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        not_here(format!(
            "bytes {start}+{len} of blob {blob} from {}",
            self.name()
        ))
    }

    /// The whole blob into `path`, verified against `desc`. By default
    /// [`Error::NotFound`]: a source standing for others, or one that moves
    /// ranges only.
    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        _path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        not_here(format!("whole blob {} from {}", desc.digest, self.name()))
    }

    /// Note a finished transfer of `bytes` that took `secs` (for link
    /// measurements); nothing by default.
    fn observe(&self, _bytes: u64, _secs: f64) {}

    /// Note that bytes this source delivered failed their check; nothing
    /// by default (the fetcher never asks it for those chunks again).
    fn wrong_bytes(&self) {}
}

/// A registry or layout store as a source, named `name`.
pub struct StoreSource {
    /// The store.
    pub store: Store,
    /// How it shows in status output.
    pub name: String,
}

impl Source for StoreSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(self.store.read_range(blob, start, len))
    }

    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.store.blob_to_file(desc, path))
    }
}

/// Called with (link, bytes, seconds) after each transfer.
pub type TransferHook = Arc<dyn Fn(&str, u64, f64) + Send + Sync>;

/// The cloud: every blob is fetched from the registry repository (or OCI
/// layout) of an image that was opened with it. One `CloudSource` serves
/// all images of a node, so one fetch scheduler orders all their requests.
#[derive(Default)]
pub struct CloudSource {
    homes: Mutex<HashMap<Digest, Store>>,
    measured: Mutex<Option<TransferHook>>,
}

impl CloudSource {
    /// An empty cloud: no blob is known until [`CloudSource::announce`].
    pub fn new() -> CloudSource {
        CloudSource::default()
    }

    /// Blobs `digests` can be fetched from `store`.
    pub fn announce<'a>(&self, store: &Store, digests: impl IntoIterator<Item = &'a Digest>) {
        let mut homes = self.homes.lock();
        for d in digests {
            homes.insert(d.clone(), store.clone());
        }
    }

    /// Where `blob` comes from, if announced.
    pub fn home(&self, blob: &Digest) -> Option<Store> {
        self.homes.lock().get(blob).cloned()
    }

    /// The registry (`HOST[:PORT]`) and repository `blob` comes from, if
    /// it was announced from a registry.
    pub fn registry_home(&self, blob: &Digest) -> Option<(String, String)> {
        match self.homes.lock().get(blob)? {
            Store::Registry(r) => Some((r.host().to_string(), r.repo().to_string())),
            Store::Layout(_) => None,
        }
    }

    /// The registries (`HOST[:PORT]`) blobs are fetched from.
    pub fn registries(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .homes
            .lock()
            .values()
            .filter_map(|s| match s {
                Store::Registry(r) => Some(r.host().to_string()),
                Store::Layout(_) => None,
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Call `f(registry, bytes, secs)` after each transfer (link measurements).
    pub fn on_transfer(&self, f: TransferHook) {
        *self.measured.lock() = Some(f);
    }

    fn unknown(blob: &Digest) -> Error {
        Error::NotFound {
            what: format!("blob {blob} (no image announced it to the cloud source)"),
        }
    }
}

impl Source for CloudSource {
    fn name(&self) -> String {
        "cloud".into()
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let store = self.home(blob).ok_or_else(|| Self::unknown(blob))?;
            store.read_range(blob, start, len).await
        })
    }

    fn blob_to_file<'a>(
        &'a self,
        desc: &'a Descriptor,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let store = self
                .home(&desc.digest)
                .ok_or_else(|| Self::unknown(&desc.digest))?;
            store.blob_to_file(desc, path).await
        })
    }

    fn observe(&self, bytes: u64, secs: f64) {
        if let Some(f) = self.measured.lock().clone() {
            f("cloud", bytes, secs);
        }
    }
}

/// The node's own store as a source: ranges of whole blobs and of the
/// verified compressed ranges kept for peers. Chunks themselves are checked
/// before this source is asked, so it matters when a chunk was evicted or a
/// layer was prefetched whole.
pub struct LocalSource {
    /// The store.
    pub store: Arc<ContentStore>,
}

impl Source for LocalSource {
    fn name(&self) -> String {
        "local".into()
    }

    fn class(&self) -> SourceClass {
        SourceClass::Local
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let store = self.store.clone();
            let blob = blob.clone();
            tokio::task::spawn_blocking(move || store.read_held(&blob, start, len))
                .await
                .map_err(|e| Error::Unavailable {
                    what: "a local read".into(),
                    reason: e.to_string(),
                })?
                .and_then(|o| {
                    o.ok_or_else(|| Error::NotFound {
                        what: "the range in the local store".into(),
                    })
                })
        })
    }

    // No blob_to_file: a whole blob in the store is found before any
    // source is asked.
}

/// An answer of [`Error::NotFound`] for `what`: what a source that lacks
/// a kind of transfer says (the default of [`Source::read_range`] and
/// [`Source::blob_to_file`]).
pub fn not_here<'a, T: Send + 'a>(what: String) -> BoxFuture<'a, Result<T>> {
    Box::pin(async move { Err(Error::NotFound { what }) })
}
