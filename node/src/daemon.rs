//! The node daemon: one per edge node, it owns the content store, fetches
//! through one scheduler for all its mounts and prefetches, serves what it
//! holds to peers (and relays registry ranges for them), publishes its
//! cache index, measurements and metrics, and mounts images on request.
//!
//! [`Node::start`] builds it over listeners the caller bound (and binds
//! the snapshotter socket, if configured) and starts its loops; [`Node::serve`] serves until the shutdown token is cancelled,
//! then stops every server and loop, unmounts its mounts and returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakfs_fetch::budget::Budget;
use breakfs_fetch::guard::Token;
use breakfs_fetch::{ClientOptions, CloudSource, ContentStore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ControlSocket, Listeners};
use crate::peer::Links;
use crate::server::NodeService;
use crate::snapshotter::Snapshotter;
use crate::{Error, Result};

/// How long open connections get to finish once the node stops.
const DRAIN: Duration = Duration::from_secs(5);

/// A started node daemon.
pub struct Node {
    svc: Arc<NodeService>,
    tcp: tokio::net::TcpListener,
    control: ControlSocket,
    token: Option<Token>,
    local: SocketAddr,
    /// containerd's snapshots API and its socket, if configured.
    snapshotter: Option<(Snapshotter, ControlSocket)>,
    shutdown: CancellationToken,
}

/// Run a node daemon with `config` on `listeners` until `shutdown` is
/// cancelled.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<()> {
    Node::start(config, listeners, shutdown)
        .await?
        .serve()
        .await
}

impl Node {
    /// Open the store, assemble the source chain and start the node's
    /// loops (peer polling, cloud probe, budget saving, status records),
    /// all stopping on `shutdown`.
    pub async fn start(
        config: Config,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<Node> {
        let Listeners { tcp, control } = listeners;
        let local = tcp
            .local_addr()
            .map_err(|e| Error::io("reading the listener's address", e))?;
        let url = config.advertise.clone().unwrap_or_else(|| {
            let host = if local.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                local.ip().to_string()
            };
            format!("http://{host}:{}", local.port())
        });
        let control_url = format!("unix:{}", control.path.display());
        let (svc, budget, links) =
            crate::chain::build(&config, &url, control_url, &shutdown).await?;
        let snapshotter = match &config.snapshotter_socket {
            Some(path) => {
                // containerd's shims mount the directories the snapshots
                // name from their own working directory: name them whole.
                let root = config.cache.join("snapshotter");
                let root = std::path::absolute(&root).map_err(|e| {
                    Error::io(
                        format!("resolving the snapshot directory {}", root.display()),
                        e,
                    )
                })?;
                Some((
                    Snapshotter::open(&root, svc.clone())?,
                    ControlSocket::bind(path)?,
                ))
            }
            None => None,
        };
        if let Some(keep) = &config.keep_mounts {
            take_over_mounts(&svc, keep, &config.cache, &shutdown);
        }
        if let Some(b) = budget {
            spawn_budget_saver(b, svc.store.clone(), shutdown.clone());
        }
        spawn_cloud_probe(
            svc.cloud.clone(),
            links,
            config.client.clone(),
            shutdown.clone(),
        );
        spawn_status_writer(svc.clone(), shutdown.clone());
        eprintln!(
            "breakfs node: serving {url} (listening on {local}), control socket {}{}, store {}{}{}{}",
            control.path.display(),
            snapshotter
                .as_ref()
                .map(|(s, sock)| format!(
                    ", containerd snapshotter on {} (snapshots in {})",
                    sock.path.display(),
                    s.root().display()
                ))
                .unwrap_or_default(),
            config.cache.display(),
            config
                .budget
                .map(|b| format!(", budget {} MB", b / 1_000_000))
                .unwrap_or_default(),
            if config.token.is_some() {
                ", control over TCP with the bearer token"
            } else {
                ""
            },
            if config.relay.is_empty() {
                String::new()
            } else {
                format!(", relaying for {}", config.relay.join(", "))
            }
        );
        Ok(Node {
            svc,
            tcp,
            control,
            token: config.token,
            local,
            snapshotter,
            shutdown,
        })
    }

    /// The URL peers reach this node at.
    pub fn url(&self) -> &str {
        &self.svc.node_url
    }

    /// The address the TCP listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serve peers, clients and mount control until the shutdown token is
    /// cancelled (or a server fails: then the rest stop too); then unmount
    /// the node's mounts, save the budget's use records and remove the
    /// control socket.
    pub async fn serve(self) -> Result<()> {
        let Node {
            svc,
            tcp,
            control,
            token,
            snapshotter,
            shutdown,
            ..
        } = self;
        // The control socket's permissions guard it; over TCP, mount
        // control needs the token, and without one it is not served there.
        use crate::server::Origin;
        let tcp_app = crate::server::routes(svc.clone(), token.clone(), Origin::Network)
            .merge(crate::control::tcp_routes(svc.clone(), token.as_ref()));
        let unix_app = crate::server::routes(svc.clone(), None, Origin::Local)
            .merge(crate::control::routes(svc.clone()));
        let ControlSocket { listener, path } = control;
        let mut servers = tokio::task::JoinSet::new();
        let tcp =
            axum::serve(tcp, tcp_app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
        servers.spawn(async move { ("the TCP server", tcp.await) });
        let unix = axum::serve(listener, unix_app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        servers.spawn(async move { ("the control socket", unix.await) });
        let mut snapshotter_path = None;
        if let Some((snap, ControlSocket { listener, path })) = snapshotter {
            snapshotter_path = Some(path);
            let served = snap.serve(listener, shutdown.clone());
            servers.spawn(async move {
                let r = served.await.map_err(std::io::Error::other);
                ("the snapshotter socket", r)
            });
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {}
            Some(done) = servers.join_next() => match done {
                Ok((what, r)) => eprintln!("breakfs node: {what} stopped: {r:?}"),
                Err(e) => eprintln!("breakfs node: a server failed: {e}"),
            },
        }
        shutdown.cancel();
        eprintln!("breakfs node: stopping; unmounting its mounts");
        // The listeners close at once; open requests get a moment to end.
        let drained = async { while servers.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN, drained).await.is_err() {
            servers.abort_all();
        }
        svc.unmount_all();
        // The saver runs every 10 s: the uses since its last run are saved
        // here, so a restart keeps them.
        if let Some(b) = svc.store.budget().cloned() {
            let store = svc.store.clone();
            let _ = tokio::task::spawn_blocking(move || b.save(&store)).await;
        }
        let _ = std::fs::remove_file(&path);
        if let Some(p) = snapshotter_path {
            let _ = std::fs::remove_file(p);
        }
        eprintln!("breakfs node: stopped");
        Ok(())
    }
}

/// Connect to the mount holder (starting it if none runs), hand it every
/// mount from now on, and serve the mounts it kept from an earlier daemon
/// process. Without a holder the daemon serves, but its mounts end with it.
fn take_over_mounts(
    svc: &Arc<NodeService>,
    keep: &crate::KeepMounts,
    cache: &std::path::Path,
    shutdown: &CancellationToken,
) {
    let holder = crate::holder::HolderClient::start(keep, cache)
        .and_then(|h| h.take_back().map(|held| (h, held)));
    match holder {
        Ok((h, held)) => {
            if !held.is_empty() {
                eprintln!(
                    "breakfs node: taking over {} mounts from the mount holder",
                    held.len()
                );
            }
            svc.mounts.set_holder(h);
            svc.resume_held(held, keep.orphan_after, shutdown.clone());
        }
        Err(e) => tracing::error!(
            "no mount holder: {e}; mounts will end with this daemon",
            e = breakfs_index::Causes(&e)
        ),
    }
}

/// Every 10 s, save the budget's use records (every 30 s, resync it with
/// the store), until `stop`.
fn spawn_budget_saver(b: Arc<Budget>, store: Arc<ContentStore>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                _ = stop.cancelled() => return,
            }
            tick += 1;
            let (b, store) = (b.clone(), store.clone());
            let _ = tokio::task::spawn_blocking(move || {
                b.save(&store);
                if tick.is_multiple_of(3) {
                    b.resync(&store);
                }
            })
            .await;
        }
    });
}

/// Every 3 s, time a `GET /v2/` of each registry the node fetches from:
/// the light probe of the cloud link's RTT; until `stop`.
fn spawn_cloud_probe(
    cloud: Arc<CloudSource>,
    links: Arc<Links>,
    client: ClientOptions,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build();
        let Ok(http) = http else { return };
        let probe = async {
            loop {
                for host in cloud.registries() {
                    let scheme = if client.plain_http { "http" } else { "https" };
                    let at = client.endpoints.get(&host).unwrap_or(&host);
                    let began = std::time::Instant::now();
                    match http.get(format!("{scheme}://{at}/v2/")).send().await {
                        Ok(_) => links.rtt("cloud", began.elapsed().as_secs_f64()),
                        Err(_) => links.failure("cloud"),
                    }
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        };
        tokio::select! {
            _ = probe => {}
            _ = stop.cancelled() => {}
        }
    });
}

/// Every second, write the mounts' status records, until `stop`.
fn spawn_status_writer(svc: Arc<NodeService>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
            svc.write_statuses();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon runs in-process on `127.0.0.1:0`, answers peers and
    /// scrapers, and stops when its token is cancelled: `run` returns, the
    /// port and the control socket are gone.
    #[tokio::test]
    async fn a_node_serves_in_process_and_stops_on_its_token() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = tcp.local_addr().expect("its address");
        let sock = dir.path().join("node.sock");
        let control = ControlSocket::bind(&sock).expect("the control socket");
        let config = Config {
            budget: Some(1 << 30),
            ..Config::new(dir.path().join("store"))
        };
        let shutdown = CancellationToken::new();
        let node = tokio::spawn(run(config, Listeners { tcp, control }, shutdown.clone()));

        let http = reqwest::Client::new();
        let base = format!("http://{addr}");
        let v2 = http
            .get(format!("{base}/v2/"))
            .send()
            .await
            .expect("GET /v2/");
        assert!(v2.status().is_success(), "{v2:?}");
        assert_eq!(
            v2.headers()
                .get("Docker-Distribution-API-Version")
                .and_then(|v| v.to_str().ok()),
            Some("registry/2.0")
        );
        let index: breakfs_index::CacheIndex = http
            .get(format!("{base}/cache/index"))
            .send()
            .await
            .expect("GET /cache/index")
            .json()
            .await
            .expect("a cache index");
        assert_eq!(index.node, base);
        assert_eq!(index.budget, Some(1 << 30));
        assert!(index.blobs.is_empty() && index.partial.is_empty());
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics page");
        assert!(
            metrics.contains("breakfs_cache_budget_bytes 1073741824\n"),
            "{metrics}"
        );
        assert!(metrics.contains("breakfs_mounts 0\n"), "{metrics}");
        // Mount control is refused over TCP without a token.
        let mounts = http
            .get(format!("{base}/mounts"))
            .send()
            .await
            .expect("GET /mounts");
        assert_eq!(mounts.status(), reqwest::StatusCode::FORBIDDEN);

        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(10), node)
            .await
            .expect("run returns once the token is cancelled")
            .expect("the daemon's task");
        assert!(stopped.is_ok(), "{stopped:?}");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the port is still open after the node stopped"
        );
        assert!(!sock.exists(), "the control socket outlived the node");
    }

    /// A use recorded after the budget saver's last run is on disk once
    /// the node has stopped.
    #[tokio::test]
    async fn a_stopping_node_saves_its_budget_uses() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let control = ControlSocket::bind(&dir.path().join("node.sock")).expect("the socket");
        let config = Config {
            budget: Some(1 << 30),
            ..Config::new(dir.path().join("store"))
        };
        let shutdown = CancellationToken::new();
        let node = Node::start(config, Listeners { tcp, control }, shutdown.clone())
            .await
            .expect("the node starts");
        let store = node.svc.store.clone();
        let layer = breakfs_index::Digest::of(b"a layer");
        store.budget().expect("a budget").touch([&layer]);
        let uses = store.meta_path("budget-uses.json");
        assert!(!uses.exists(), "saved before the node stopped");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), node.serve())
            .await
            .expect("serve returns once the token is cancelled")
            .expect("the node stops cleanly");
        let saved = std::fs::read_to_string(&uses).expect("the saved use records");
        assert!(saved.contains(&layer.to_string()), "{saved}");
    }
}
