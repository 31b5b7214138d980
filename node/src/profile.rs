//! Learned access profiles on a node (docs/profiles.md): where they are
//! kept (`CACHE_DIR/profiles/<manifest hex>.json`, surviving restarts),
//! how a mount's recorded run is merged into them once its reads go
//! quiet, how they are served (`GET /profiles/<manifest digest>`, to peers
//! and the scheduler), and how a mount of an image this node has no
//! profile of asks its peers for one, for a bounded time, before it starts
//! fetching the profile's chunks. A profile from a peer is only a hint:
//! bounded and checked when read (`breakfs_fs::profile`), every byte it
//! makes the node fetch verified as any other.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use breakfs_fetch::ContentStore;
use breakfs_fetch::toc_tail_name;
use breakfs_fs::Tree;
use breakfs_fs::profile::{MAX_PROFILE_BYTES, MAX_TOCS, Profile, ProfilePrefetch, Recorder, TocAt};
use breakfs_index::{Causes, Descriptor, Digest};

use crate::peer::Peers;
use crate::server::NodeService;
use crate::{Error, Result};

/// A recording ends once no chunk was first read for this long: longer
/// than a start-up waits on one fetch over a slow, busy link (2 s cut
/// python's start-up short on a loaded machine: a read waited longer).
pub(crate) const QUIET: Duration = Duration::from_secs(5);
/// A recording ends after this long whatever the reads do.
const MAX_RECORDING: Duration = Duration::from_secs(120);
/// How often a recording is looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long a mount waits for its peers' profiles, in all.
const PEER_WAIT: Duration = Duration::from_millis(1500);
/// How long a mount's TOC reads wait for the profile, for where its TOCs
/// are ([`ProfilePrefetch::hint_tocs`]): a peer on the cluster's network
/// answers in a few ms; one slower costs the TOCs no more than this.
pub(crate) const TOC_HINT_WAIT: Duration = Duration::from_millis(50);

/// Where the profile of image `image` is kept in `store`.
fn path_of(store: &ContentStore, image: &Digest) -> PathBuf {
    store
        .root()
        .join("profiles")
        .join(format!("{}.json", image.hex()))
}

/// The profile of `image` this node keeps, if any (a damaged one is none).
pub(crate) fn load(store: &ContentStore, image: &Digest) -> Option<Profile> {
    let path = path_of(store, image);
    let file = std::fs::File::open(&path).ok()?;
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(MAX_PROFILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    Profile::parse(&bytes, image)
        .inspect_err(|e| tracing::warn!("{}: {e}", path.display(), e = Causes(e)))
        .ok()
}

/// Keep `profile` (atomically: a crash leaves the old one or the new one).
pub(crate) fn save(store: &ContentStore, profile: &Profile) -> Result<()> {
    let path = path_of(store, &profile.image);
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let dir = store.root().join("profiles");
    std::fs::create_dir_all(&dir).map_err(|e| io("creating the directory of", e))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        profile.image.hex(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
    f.write_all(&profile.to_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("writing", e))
}

/// Merge `run` into the kept profile of its image (or keep it as the first).
fn merge_into_kept(store: &ContentStore, run: &Profile) -> Result<Profile> {
    let merged = match load(store, &run.image) {
        Some(kept) => kept.merge(run),
        None => run.clone(),
    };
    save(store, &merged)?;
    Ok(merged)
}

/// The profile of `image`: this node's, else the first good one a peer
/// answers within [`PEER_WAIT`] (kept here, so that this node serves it
/// too and merges its own runs into it).
async fn lookup(store: Arc<ContentStore>, peers: Arc<Peers>, image: Digest) -> Option<Profile> {
    let local = {
        let (store, image) = (store.clone(), image.clone());
        tokio::task::spawn_blocking(move || load(&store, &image))
            .await
            .ok()
            .flatten()
    };
    if local.is_some() {
        return local;
    }
    let urls = peers.urls();
    if urls.is_empty() {
        return None;
    }
    let asks = urls.iter().map(|u| {
        let (peers, image) = (&peers, &image);
        Box::pin(async move {
            let r = ask_peer(peers, u, image).await;
            if let Err(e) = &r {
                tracing::debug!(peer = %u, "no profile of {image}: {e}");
            }
            r
        })
    });
    let first_good = async {
        let mut pending: Vec<_> = asks.collect();
        while !pending.is_empty() {
            let (r, _, rest) = futures::future::select_all(pending).await;
            if let Ok(p) = r {
                return Some(p);
            }
            pending = rest;
        }
        None
    };
    let p = tokio::time::timeout(PEER_WAIT, first_good).await.ok()??;
    let kept = p.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = save(&store, &kept) {
            tracing::warn!("keeping a peer's profile: {e}", e = Causes(&e));
        }
    })
    .await;
    Some(p)
}

async fn ask_peer(
    peers: &Peers,
    url: &str,
    image: &Digest,
) -> std::result::Result<Profile, String> {
    let resp = peers
        .client()
        .get(format!("{url}/profiles/{image}"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| Causes(&e).to_string())?;
    let body = breakfs_fetch::guard::body_within(resp, MAX_PROFILE_BYTES, "a profile")
        .await
        .map_err(|e| Causes(&e).to_string())?;
    Profile::parse(&body, image).map_err(|e| Causes(&e).to_string())
}

impl NodeService {
    /// The prefetch of `image`'s profile, this node's or a peer's, looked
    /// up from now on: feed it the image's layers as their TOCs come in
    /// ([`breakfs_fs::open_resolved`]), then [`log_prefetch`] it.
    pub(crate) fn profile_prefetch(&self, image: &Digest) -> Arc<ProfilePrefetch> {
        let (store, peers) = (self.store.clone(), self.peers.clone());
        ProfilePrefetch::new(self.fetcher.clone(), lookup(store, peers, image.clone()))
    }
}

/// Once every layer of `image` was fed to `prefetch`: log what it did
/// when it is done (in the background).
pub(crate) fn log_prefetch(prefetch: Arc<ProfilePrefetch>, image: Digest) {
    let began = std::time::Instant::now();
    tokio::spawn(async move {
        if let Some(r) = prefetch.finish().await {
            tracing::info!(
                image = %image,
                runs = r.runs,
                chunks = r.chunks,
                bytes = r.bytes,
                ignored = r.ignored,
                failed = r.failed,
                "profile prefetch done {:?} after the image was opened",
                began.elapsed()
            );
        }
    });
}

/// Where each of `layers` keeps its TOC, as this node read it: the blob's
/// tail from the TOC's member, which the store keeps for peers
/// ([`toc_tail_name`]; layers with a TOC digest only).
fn tocs_of(store: &ContentStore, layers: &[Descriptor]) -> Vec<TocAt> {
    layers
        .iter()
        .filter_map(|d| {
            let tail = std::fs::metadata(store.meta_path(&toc_tail_name(&d.digest)))
                .ok()?
                .len();
            let at = TocAt {
                layer: d.digest.clone(),
                offset: d.size.checked_sub(tail)?,
                size: d.size,
            };
            at.tail().is_some().then_some(at)
        })
        .take(MAX_TOCS)
        .collect()
}

/// Watch `recorder` of a mount of `image` (of layers `layers`, tree `tree`)
/// until its reads go quiet, then merge the run, with where the layers
/// keep their TOCs, into the kept profile.
pub(crate) fn record(
    store: Arc<ContentStore>,
    image: Digest,
    layers: Vec<Descriptor>,
    tree: Arc<Tree>,
    recorder: Arc<Recorder>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TICK).await;
            let quiet = recorder.quiet_for().is_some_and(|q| q >= QUIET);
            if quiet || recorder.is_stopped() || recorder.age() >= MAX_RECORDING {
                break;
            }
        }
        recorder.stop();
        if recorder.is_empty() {
            return;
        }
        let r = tokio::task::spawn_blocking(move || {
            let mut run = Profile::from_run(&image, recorder.run(&tree));
            run.tocs = tocs_of(&store, &layers);
            merge_into_kept(&store, &run)
        })
        .await;
        match r {
            Ok(Ok(p)) => tracing::info!(
                image = %p.image,
                runs = p.runs,
                entries = p.entries.len(),
                "access profile kept"
            ),
            Ok(Err(e)) => tracing::warn!("keeping an access profile: {e}", e = Causes(&e)),
            Err(e) => tracing::warn!("keeping an access profile: {e}"),
        }
    });
}

/// `GET /profiles/<manifest digest>`: the profile this node keeps.
pub(crate) async fn serve(
    State(svc): State<Arc<NodeService>>,
    Path(image): Path<String>,
) -> Response {
    let Ok(image) = Digest::parse(&image) else {
        return (
            StatusCode::BAD_REQUEST,
            "a profile is asked by manifest digest: /profiles/sha256:<64 hex>\n",
        )
            .into_response();
    };
    let store = svc.store.clone();
    let found = tokio::task::spawn_blocking(move || load(&store, &image)).await;
    match found {
        Ok(Some(p)) => ([(header::CONTENT_TYPE, "application/json")], p.to_bytes()).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no profile of that image here\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded run says where the TOCs are of the layers whose TOC
    /// tail the store keeps, and of no other.
    #[test]
    fn a_run_says_where_the_tocs_it_read_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let gz = breakfs_index::media_types::OCI_LAYER_GZIP;
        let read = Descriptor::new(gz, Digest::of(b"read"), 10_000);
        let unread = Descriptor::new(gz, Digest::of(b"unread"), 10_000);
        let tiny = Descriptor::new(gz, Digest::of(b"tiny"), 10_000);
        store
            .put_meta(&toc_tail_name(&read.digest), &[0; 700])
            .unwrap();
        store
            .put_meta(&toc_tail_name(&tiny.digest), &[0; 3])
            .unwrap();
        assert_eq!(
            tocs_of(&store, &[read.clone(), unread, tiny]),
            [TocAt {
                layer: read.digest,
                offset: 9_300,
                size: 10_000
            }]
        );
    }

    #[test]
    fn a_kept_profile_survives_and_a_damaged_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let image = Digest::of(b"m");
        assert!(load(&store, &image).is_none());
        let run = Profile::from_run(&image, Vec::new());
        merge_into_kept(&store, &run).unwrap();
        let kept = merge_into_kept(&store, &run).unwrap();
        assert_eq!(kept.runs, 2);
        assert_eq!(load(&store, &image).unwrap().runs, 2);
        std::fs::write(path_of(&store, &image), b"{garbage").unwrap();
        assert!(load(&store, &image).is_none());
        std::fs::write(path_of(&store, &image), vec![b' '; MAX_PROFILE_BYTES + 10]).unwrap();
        assert!(load(&store, &image).is_none());
    }
}
