//! The gRPC face: containerd's `Snapshots` service as a thin translation
//! onto [`Snapshots`], with the
//! node crate's errors mapped to gRPC codes in one place ([`status`]).
//! Filesystem work runs on the blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::Fault;
use super::api::snapshots as pb;
use super::api::types::Mount;
use super::filter::Filter;
use super::meta::{Kind, Remote, Snapshot};
use super::remote::{self, Outcome, Remotes};
use super::store::{MountSpec, Snapshots};
use crate::{Error, Result};

/// List answers carry this many snapshots per message.
const LIST_BATCH: usize = 100;

/// The service containerd talks to.
pub(crate) struct SnapshotService {
    pub(crate) snaps: Arc<Snapshots>,
    pub(crate) remotes: Arc<Remotes>,
}

/// The gRPC status of `e`: a refusal's own code, otherwise internal, with
/// the error's causes as the message.
pub(crate) fn status(e: Error) -> Status {
    let code = match &e {
        Error::Snapshot { fault, .. } => match fault {
            Fault::NotFound => tonic::Code::NotFound,
            Fault::AlreadyExists => tonic::Code::AlreadyExists,
            Fault::FailedPrecondition => tonic::Code::FailedPrecondition,
            Fault::InvalidArgument => tonic::Code::InvalidArgument,
        },
        _ => tonic::Code::Internal,
    };
    Status::new(code, breakfs_index::Causes(&e).to_string())
}

impl SnapshotService {
    /// Run `f` over the snapshots on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let snaps = self.snaps.clone();
        tokio::task::spawn_blocking(move || f(&snaps))
            .await
            .map_err(|e| Status::internal(format!("a snapshot task failed: {e}")))?
            .map_err(status)
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        let labels: BTreeMap<_, _> = labels.into_iter().collect();
        let began = std::time::Instant::now();
        if kind == Kind::Active {
            self.remote_layer(&parent, &labels).await.inspect_err(|_| {
                tracing::debug!(
                    key = %key,
                    ms = began.elapsed().as_millis() as u64,
                    "prepare answered"
                );
            })?;
        }
        let remotes = self
            .blocking({
                let parent = parent.clone();
                move |s| s.remotes_under(&parent)
            })
            .await?;
        self.mount_layers(&remotes).await?;
        let k = key.clone();
        let mounts = self
            .blocking(move |s| s.prepare(kind, &k, &parent, labels))
            .await?;
        tracing::debug!(
            key = %key,
            kind = kind.name(),
            remote_layers = remotes.len(),
            ms = began.elapsed().as_millis() as u64,
            "prepare answered"
        );
        Ok(mounts.into_iter().map(mount).collect())
    }

    /// A prepare whose labels ask for a remote layer that can be served
    /// lazily: record its target and answer AlreadyExists, so containerd
    /// downloads nothing. Otherwise (no such labels, no TOC, the image
    /// unreachable now: logged) Ok, and the prepare takes the ordinary
    /// path; labels naming something malformed, or a layer the image does
    /// not list, are refused.
    async fn remote_layer(
        &self,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> std::result::Result<(), Status> {
        let stats = &self.remotes.node().snapshot_stats;
        let Some(ask) = remote::ask_of(labels).map_err(status)? else {
            if labels.contains_key(remote::TARGET) {
                stats.ordinary(None);
            }
            return Ok(());
        };
        let snaps = self.snaps.clone();
        let served = move |layer: &breakfs_index::Digest| snaps.layer_in_use(layer);
        match self.remotes.check(&ask, served).await.map_err(status)? {
            Outcome::Ordinary(fallback, why) => {
                stats.ordinary(Some(fallback));
                tracing::warn!(
                    "layer {} of {} takes the ordinary path (containerd downloads it): {why}",
                    ask.layer,
                    ask.image
                );
                Ok(())
            }
            Outcome::Lazy(remote) => {
                let (target, parent, labels) =
                    (ask.target.clone(), parent.to_string(), labels.clone());
                let ahead = remote.clone();
                self.blocking(move |s| s.commit_remote(&target, &parent, labels, remote))
                    .await?;
                stats.lazy();
                // An update of an image that runs here: its container
                // follows, so its new layers are mounted now.
                if self.remotes.runs_here(&ask.reference) {
                    let (a, b) = (self.snaps.clone(), self.snaps.clone());
                    self.remotes.mount_ahead(
                        ahead,
                        move |d| a.layer_in_use(d),
                        move |d| b.layer_dir(d),
                    );
                }
                eprintln!(
                    "breakfs node: layer {} of {} is served lazily as snapshot {}",
                    ask.layer, ask.image, ask.target
                );
                Err(Status::already_exists(format!(
                    "target snapshot {:?} exists: layer {} of {} is served lazily",
                    ask.target, ask.layer, ask.image
                )))
            }
        }
    }

    /// Mount the remote layers `remotes` that are not mounted yet.
    async fn mount_layers(&self, remotes: &[Remote]) -> std::result::Result<(), Status> {
        let snaps = self.snaps.clone();
        self.remotes
            .ensure(remotes, |d| snaps.layer_dir(d))
            .await
            .map_err(status)
    }
}

fn mount(m: MountSpec) -> Mount {
    Mount {
        r#type: m.kind,
        source: m.source,
        target: String::new(),
        options: m.options,
    }
}

fn timestamp(nanos: u128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

fn info(name: String, s: Snapshot) -> pb::Info {
    let kind = match s.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name,
        parent: s.parent,
        kind: kind as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::Active, r.key, r.parent, r.labels).await?;
        Ok(Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> std::result::Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let mounts = self.create(Kind::View, r.key, r.parent, r.labels).await?;
        Ok(Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> std::result::Result<Response<pb::MountsResponse>, Status> {
        let key = req.into_inner().key;
        let remotes = self
            .blocking({
                let key = key.clone();
                move |s| s.remotes_of(&key)
            })
            .await?;
        self.mount_layers(&remotes).await?;
        let mounts = self.blocking(move |s| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts.into_iter().map(mount).collect(),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = req.into_inner();
        let labels = r.labels.into_iter().collect();
        self.blocking(move |s| s.commit(&r.name, &r.key, labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let key = req.into_inner().key;
        let gone = self.blocking(move |s| s.remove(&key)).await?;
        // The last remote snapshot of a layer takes its mount with it.
        if let Some(r) = gone.remote
            && !self.snaps.layer_in_use(&r.layer)
        {
            self.remotes.release(&self.snaps.layer_dir(&r.layer)).await;
        }
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> std::result::Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let s = self
            .blocking({
                let key = key.clone();
                move |s| s.stat(&key)
            })
            .await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(key, s)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(given) = r.info else {
            return Err(Status::invalid_argument(
                "an update names the snapshot in its info, and it has none",
            ));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = given.name;
        let labels = given.labels.into_iter().collect();
        let s = self
            .blocking({
                let key = key.clone();
                move |s| s.update(&key, labels, &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(key, s)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let filters = req
            .into_inner()
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>>>()
            .map_err(status)?;
        let all: Vec<pb::Info> = self
            .snaps
            .list(&filters)
            .into_iter()
            .map(|(k, s)| info(k, s))
            .collect();
        let batches: Vec<_> = all
            .chunks(LIST_BATCH)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> std::result::Result<Response<pb::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let u = self.blocking(move |s| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.bytes as i64,
            inodes: u.inodes as i64,
        }))
    }

    async fn cleanup(
        &self,
        _req: Request<pb::CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
