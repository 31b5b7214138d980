//! The service's life as a process (`breakfs sched`): [`Server::start`]
//! builds the service, with the Kubernetes glue when configured, polls the
//! node daemons once and starts its loops; [`Server::serve`] serves the
//! extender until a shutdown token fires, then gives the calls under way a
//! little time to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakfs_fetch::guard::Token;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::SchedConfig;
use crate::error::{Error, Result};
use crate::service::Sched;

/// How long calls under way may take to finish once shutdown came; a
/// client holding a connection open does not hold the process longer.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the Kubernetes watches get to list Nodes and Pods at start.
const KUBE_READY: Duration = Duration::from_secs(30);

/// A started scheduler service.
pub struct Server {
    sched: Arc<Sched>,
    listener: TcpListener,
    local: SocketAddr,
}

/// Run the service for `cfg` on `listener` until `shutdown` fires.
pub async fn run(
    cfg: SchedConfig,
    token: Option<Token>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    Server::start(cfg, token, listener)
        .await?
        .serve(shutdown)
        .await
}

impl Server {
    /// Build the service for `cfg` (with `token`, see
    /// [`Sched::with_token`]); with the Kubernetes API enabled, wait until
    /// its watches have listed and feed the directory, then keep it fed;
    /// poll every node daemon once; start polling and the planner.
    pub async fn start(
        cfg: SchedConfig,
        token: Option<Token>,
        listener: TcpListener,
    ) -> Result<Server> {
        let local = listener.local_addr().map_err(Error::Serve)?;
        let kube = cfg.kubernetes.clone();
        let sched = Sched::with_token(cfg, token)?;
        if kube.enabled {
            let client = crate::k8s::client(kube.url.as_deref()).await?;
            let glue = crate::k8s::Glue::start(client);
            tokio::time::timeout(KUBE_READY, glue.ready())
                .await
                .map_err(|_| Error::KubeTimeout(KUBE_READY))??;
            crate::k8s::sync_once(sched.directory(), &glue, false).await;
            crate::k8s::spawn(
                sched.directory().clone(),
                glue,
                Duration::from_secs_f64(kube.sync_secs.max(1.0)),
                kube.publish_labels,
            );
        }
        sched.poll().await;
        sched.spawn_polling();
        sched.spawn_planner();
        eprintln!(
            "breakfs sched: serving the extender on http://{local}{}/filter and /prioritize, watching {} node daemons",
            sched.config().prefix,
            sched.node_entries().len()
        );
        Ok(Server {
            sched,
            listener,
            local,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The service.
    pub fn sched(&self) -> &Arc<Sched> {
        &self.sched
    }

    /// Serve the extender until `shutdown` fires; calls under way then get
    /// [`SHUTDOWN_GRACE`] to finish.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let serving = crate::http::serve(self.listener, self.sched, shutdown.clone());
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = serving => r,
            _ = grace => {
                eprintln!("breakfs sched: calls still under way after {SHUTDOWN_GRACE:?}; stopping");
                Ok(())
            }
        }
    }
}
