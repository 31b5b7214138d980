//! containerd's snapshots gRPC API (`containerd.services.snapshots.v1`),
//! served by the node daemon on a Unix socket so that containerd loads
//! breakfs as a proxy snapshotter (`[proxy_plugins.breakfs] type =
//! "snapshot"`). Snapshots behave like containerd's overlayfs
//! snapshotter's; their records survive restarts and `SIGKILL`.
//! docs/snapshotter.md has the design.
//!
//! * `store`: the snapshots, their directories and overlay mounts;
//! * `meta`: their records, written atomically;
//! * `remote`: remote (lazy) layers, one FUSE mount per layer served by
//!   the daemon;
//! * `filter`: containerd's filter syntax for List;
//! * `service`: the gRPC service over them, errors mapped to codes;
//! * `status`: what `breakfs status` lists of them (`GET /snapshots`).

mod filter;
mod meta;
mod remote;
mod service;
mod stats;
mod status;
mod store;

pub(crate) use stats::SnapshotStats;
pub use status::{LazyLayer, SnapshotStatus, SnapshotterStatus, snapshots_report};
pub(crate) use status::{percent, snapshotter_status};

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::server::NodeService;
use crate::{Error, Result};

/// The code generated from `node/proto` (containerd's API, Apache-2.0).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod api {
    /// `containerd.types`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
    pub use services::snapshots::v1 as snapshots;
}

/// Why a snapshots request is refused; answered as the gRPC code of the
/// same name, which containerd maps to its own errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The snapshot (or parent) does not exist.
    NotFound,
    /// A snapshot with that key or name exists.
    AlreadyExists,
    /// The snapshot is not in a state that allows it.
    FailedPrecondition,
    /// The request itself is malformed.
    InvalidArgument,
}

/// A refusal of kind `fault`.
pub(crate) fn fault(fault: Fault, what: impl Into<String>) -> Error {
    Error::Snapshot {
        fault,
        what: what.into(),
    }
}

/// The snapshots API over the snapshots kept in `root`, ready to serve.
pub(crate) struct Snapshotter {
    svc: service::SnapshotService,
}

impl Snapshotter {
    /// Open the snapshots under `root` (created if needed); remote layers
    /// are fetched and served through the daemon's `node`.
    pub(crate) fn open(root: &Path, node: Arc<NodeService>) -> Result<Snapshotter> {
        let snaps = Arc::new(store::Snapshots::open(root)?);
        node.snapshot_stats.attach(snaps.clone());
        Ok(Snapshotter {
            svc: service::SnapshotService {
                snaps,
                remotes: Arc::new(remote::Remotes::new(node)),
            },
        })
    }

    /// Where its snapshots live.
    pub(crate) fn root(&self) -> &Path {
        self.svc.snaps.root()
    }

    /// Serve the API on `listener` until `shutdown` is cancelled.
    pub(crate) async fn serve(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> std::result::Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(api::snapshots::snapshots_server::SnapshotsServer::new(
                self.svc,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }
}

/// A client of the snapshots API served on the Unix socket `path` (what
/// containerd is to it; `breakfs status` and the tests use it).
pub async fn snapshots_client(
    path: &Path,
) -> Result<api::snapshots::snapshots_client::SnapshotsClient<tonic::transport::Channel>> {
    let path = path.to_path_buf();
    let what = format!("connecting to the snapshotter socket {}", path.display());
    // The URI is not used: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::from_static("http://breakfs-snapshotter")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| Error::io(what, std::io::Error::other(e)))?;
    Ok(api::snapshots::snapshots_client::SnapshotsClient::new(
        channel,
    ))
}
