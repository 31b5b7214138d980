//! `breakfs node`: the node daemon. One per edge node, it owns the content
//! store, fetches through one scheduler for all its mounts and prefetches
//! (store → peers → with `--relay`, the least loaded of its own and its
//! peers' registry links → cloud), serves what it holds to peers over the
//! OCI distribution API (and relays registry ranges for them), publishes
//! its cache index, measurements and metrics, and mounts images on request
//! (`breakfs mount --node`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use breakfs_fetch::budget::Budget;
use breakfs_fetch::guard::{self, Token};
use breakfs_fetch::metrics::PromText;
use breakfs_fetch::peer::{Links, PeerSource, Peers};
use breakfs_fetch::prefetch::Prefetcher;
use breakfs_fetch::relay::{Relay, RelaySource};
use breakfs_fetch::server::{NodeService, Served};
use breakfs_fetch::{CloudSource, ContentStore, FetchOptions, Fetcher, LocalSource, Source};
use breakfs_fs::{MountOptions, Mounted, StatusRecord};
use breakfs_index::ImageRef;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::ClientArgs;

/// The control socket a node listens on unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/breakfs/node.sock";

/// The line the daemon prints on stdout once it serves.
const READY: &str = "BREAKFS-NODE-READY";

#[derive(Args)]
pub struct NodeArgs {
    /// A TOML file with any of the settings below (flags win over it):
    /// listen, socket, advertise, cache, budget, peers, learn_peers, relay,
    /// plain_http, prefetch_rate, deadline, parallel, token_file,
    /// registry_timeout, verify.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve peers, the scheduler and OCI clients on
    /// [default: 0.0.0.0:7480; port 0 picks a free one].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The local control socket for `breakfs mount --node`
    /// [default: /run/breakfs/node.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The URL peers reach this node at [default: http://LISTEN].
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// The content store [default: /var/lib/breakfs/store].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Keep the store within this size (e.g. 20GiB, 500MB); least valuable
    /// layers are evicted first.
    #[arg(long, value_name = "SIZE")]
    budget: Option<String>,
    /// A peer node (http://HOST:PORT); repeat for several. More are learned
    /// from the cache indexes peers publish.
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// Ask only the configured peers; do not add the peers they know (for
    /// networks where a node is reached at a different address from each
    /// place: NAT, proxies, shaped links).
    #[arg(long)]
    no_learn_peers: bool,
    /// Stripe cold pulls from registry HOST (as image references name it,
    /// e.g. registry.example.com or 10.0.0.9:5000) over peers' registry
    /// links; repeat for several registries. A layer no peer holds then
    /// comes over this node's own link and, at once, through the peers that
    /// relay for HOST too: each range request goes over the least loaded
    /// link, and every chunk is checked as from any source (the registry
    /// itself stays the fallback). The node also relays ranges from HOST
    /// for its peers, over its own registry link, keeping nothing. Worth it
    /// where each node has an uplink of its own; off by default (nodes
    /// sharing one uplink gain nothing). With --token-file, relay requests
    /// must carry the token, and this node sends its own: give the nodes of
    /// an edge the same token file.
    #[arg(long = "relay", value_name = "HOST")]
    relay: Vec<String>,
    /// Background work (hydration, prefetch) at most this many bytes per
    /// second, from any source (e.g. 2MiB: below this node's share of the
    /// cloud link); on-demand reads always go first.
    #[arg(long, value_name = "SIZE")]
    prefetch_rate: Option<String>,
    /// Seconds a read waits for a missing chunk before it fails with EIO.
    #[arg(long)]
    deadline: Option<u64>,
    /// Parallel range requests.
    #[arg(long)]
    parallel: Option<usize>,
    /// A file holding a secret: requests that change the node's state over
    /// TCP (`POST /prefetch`, mount control) must then carry it as
    /// `Authorization: Bearer SECRET`; reads of content-addressed data stay
    /// open to peers. Without it, mount control is served on the control
    /// socket only.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Check every byte of the store before serving and remove what is
    /// corrupt (`breakfs verify --repair`): after a power loss or a disk
    /// error. A killed daemon needs none of it.
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// The config file.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeConfig {
    listen: Option<String>,
    socket: Option<PathBuf>,
    advertise: Option<String>,
    cache: Option<PathBuf>,
    budget: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    learn_peers: Option<bool>,
    #[serde(default)]
    relay: Vec<String>,
    plain_http: Option<bool>,
    prefetch_rate: Option<String>,
    deadline: Option<u64>,
    parallel: Option<usize>,
    token_file: Option<PathBuf>,
    registry_timeout: Option<u64>,
    verify: Option<bool>,
}

/// `20GiB`, `500MB`, `64k`, `1048576`: a size in bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size like 20GiB, 500MB or 1048576"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" => 1073741824.0,
        "t" | "tb" => 1e12,
        "tib" => 1099511627776.0,
        u => bail!("{s:?}: unknown unit {u:?} (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"),
    };
    Ok((n * mult) as u64)
}

/// The settings after merging file and flags.
struct Settings {
    listen: String,
    socket: PathBuf,
    advertise: Option<String>,
    cache: PathBuf,
    budget: Option<u64>,
    peers: Vec<String>,
    learn_peers: bool,
    relay: Vec<String>,
    plain_http: bool,
    prefetch_rate: Option<u64>,
    deadline: u64,
    parallel: usize,
    token: Option<Token>,
    registry_timeout: Option<u64>,
    verify: bool,
}

fn settings(a: &NodeArgs) -> Result<Settings> {
    let file: NodeConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the node config {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing the node config {}", p.display()))?
        }
        None => NodeConfig::default(),
    };
    let budget = a.budget.clone().or(file.budget);
    let rate = a.prefetch_rate.clone().or(file.prefetch_rate);
    let mut peers = file.peers;
    peers.extend(a.peers.iter().cloned());
    let mut relay = file.relay;
    relay.extend(a.relay.iter().cloned());
    if let Some(bad) = relay
        .iter()
        .find(|h| h.trim().is_empty() || h.contains('/'))
    {
        bail!(
            "--relay {bad:?}: name a registry host as image references do \
             (registry.example.com, 10.0.0.9:5000), without a scheme or path"
        );
    }
    Ok(Settings {
        listen: a
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:7480".into()),
        socket: a
            .socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        advertise: a.advertise.clone().or(file.advertise),
        cache: a
            .cache
            .clone()
            .or(file.cache)
            .unwrap_or_else(|| PathBuf::from("/var/lib/breakfs/store")),
        budget: budget
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("--budget")?,
        peers,
        learn_peers: !a.no_learn_peers && file.learn_peers.unwrap_or(true),
        relay,
        plain_http: a.client.plain_http || file.plain_http.unwrap_or(false),
        prefetch_rate: rate
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("--prefetch-rate")?,
        deadline: a.deadline.or(file.deadline).unwrap_or(30).max(1),
        parallel: a.parallel.or(file.parallel).unwrap_or(8).max(1),
        token: a
            .token_file
            .clone()
            .or(file.token_file)
            .map(|p| Token::from_file(&p))
            .transpose()
            .context("--token-file")?,
        registry_timeout: a.client.registry_timeout.or(file.registry_timeout),
        verify: a.verify || file.verify.unwrap_or(false),
    })
}

/// A mount the daemon serves.
struct NodeMount {
    m: Mounted,
    /// Its layers, and whether each was indexed whole.
    layers: Vec<(breakfs_index::Digest, bool)>,
    /// Bytes read as of the last status tick.
    reads_seen: std::sync::atomic::AtomicU64,
}

/// The daemon's own state beside the peer service.
struct Daemon {
    svc: Arc<NodeService>,
    client: breakfs_fetch::ClientOptions,
    mounts: Mutex<BTreeMap<PathBuf, NodeMount>>,
    /// How clients reach the control API (`unix:PATH`).
    control: String,
}

pub async fn run_node(a: NodeArgs) -> Result<()> {
    let s = settings(&a)?;
    // Catch SIGTERM before saying READY: systemd may stop us at once.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ctrl_c = tokio::signal::ctrl_c();
    let mut client = a.client.options()?;
    client.plain_http = s.plain_http;
    if let Some(t) = s.registry_timeout {
        client.timeout = Duration::from_secs(t.max(1));
    }
    let store = Arc::new(
        ContentStore::open(&s.cache)
            .with_context(|| format!("opening the content store {}", s.cache.display()))?,
    );
    if s.verify {
        let cache = s.cache.clone();
        let report = tokio::task::spawn_blocking(move || breakfs_fetch::verify_store(&cache, true))
            .await?
            .with_context(|| format!("verifying the content store {}", s.cache.display()))?;
        eprintln!("breakfs node: {report}");
    }
    let budget = s.budget.map(|limit| {
        let b = Arc::new(Budget::new(limit, &store));
        store.set_budget(b.clone());
        b
    });
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {} (choose another with --listen)", s.listen))?;
    let local = listener.local_addr()?;
    let url = s.advertise.clone().unwrap_or_else(|| {
        let host = if local.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            local.ip().to_string()
        };
        format!("http://{host}:{}", local.port())
    });
    let links = Arc::new(Links::default());
    let peers = Peers::new(&url, &s.peers, links.clone())?;
    peers.set_learning(s.learn_peers);
    peers.spawn_polling(Duration::from_secs(2));
    let cloud = Arc::new(CloudSource::new());
    {
        let links = links.clone();
        cloud.on_transfer(Arc::new(move |_, bytes, secs| {
            links.transfer("cloud", bytes, secs)
        }));
    }
    let deadline = Duration::from_secs(s.deadline);
    let opts = FetchOptions {
        workers: s.parallel,
        background_workers: (s.parallel / 4).max(1),
        deadline,
        attempt_timeout: (deadline / 3).max(Duration::from_secs(1)),
        keep_ranges: true,
        background_rate: s.prefetch_rate,
        ..FetchOptions::default()
    };
    let relay = Relay::new(&s.relay, &client, s.token.clone());
    {
        let links = links.clone();
        relay.on_transfer(Arc::new(move |link, bytes, secs| {
            links.transfer(link, bytes, secs)
        }));
    }
    let mut sources: Vec<Arc<dyn Source>> = vec![
        Arc::new(LocalSource {
            store: store.clone(),
        }),
        Arc::new(PeerSource {
            peers: peers.clone(),
        }),
    ];
    if !s.relay.is_empty() {
        sources.push(Arc::new(RelaySource {
            relay: relay.clone(),
            peers: peers.clone(),
            cloud: cloud.clone(),
        }));
    }
    sources.push(cloud.clone());
    if let Some(b) = &budget {
        let (peers, links) = (peers.clone(), links.clone());
        b.set_refetchable(Box::new(move |layer| {
            peers.someone_holds(layer) || links.ok_within("cloud", 120.0)
        }));
        let (b, store) = (b.clone(), store.clone());
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
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
    let fetcher = Fetcher::new(store.clone(), sources, opts);
    let prefetcher = Prefetcher::new(fetcher.clone(), cloud.clone(), client.clone());
    let svc = Arc::new(NodeService {
        store,
        fetcher,
        cloud: cloud.clone(),
        peers,
        prefetcher,
        node_url: url.clone(),
        budget: s.budget,
        served: Served::default(),
        metrics_hook: Mutex::new(None),
        relay,
    });
    spawn_cloud_probe(cloud, links, client.clone());
    let daemon = Arc::new(Daemon {
        svc: svc.clone(),
        client,
        mounts: Mutex::new(BTreeMap::new()),
        control: format!("unix:{}", s.socket.display()),
    });
    {
        let d = Arc::downgrade(&daemon);
        *svc.metrics_hook.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Box::new(move |p: &mut PromText| {
                if let Some(d) = d.upgrade() {
                    d.mount_metrics(p);
                }
            }));
    }
    // The control socket's permissions guard it; over TCP, mount control
    // needs the token, and without one it is not served there.
    let tcp_mounts = match &s.token {
        Some(t) => guard::require_token(control_routes(daemon.clone()), Some(t.clone()), "node"),
        None => Router::new().route("/mounts", any(mounts_over_tcp)),
    };
    let tcp_app = breakfs_fetch::server::routes(svc.clone(), s.token.clone()).merge(tcp_mounts);
    let app =
        breakfs_fetch::server::routes(svc.clone(), None).merge(control_routes(daemon.clone()));
    let unix = bind_socket(&s.socket)?;
    let tcp = tokio::spawn(async move { axum::serve(listener, tcp_app).await });
    let uds = tokio::spawn(async move { axum::serve(unix, app).await });
    {
        let d = daemon.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.write_statuses();
            }
        });
    }
    eprintln!(
        "breakfs node: serving {url} (listening on {local}), control socket {}, store {}{}{}{}",
        s.socket.display(),
        s.cache.display(),
        s.budget
            .map(|b| format!(", budget {} MB", b / 1_000_000))
            .unwrap_or_default(),
        if s.token.is_some() {
            ", control over TCP with the bearer token"
        } else {
            ""
        },
        if s.relay.is_empty() {
            String::new()
        } else {
            format!(", relaying for {}", s.relay.join(", "))
        }
    );
    println!("{READY} {url}");
    if let Err(e) = crate::notify::notify("READY=1") {
        tracing::warn!("telling systemd we are ready: {e}");
    }
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
        r = tcp => { eprintln!("breakfs node: the TCP server stopped: {r:?}"); }
        r = uds => { eprintln!("breakfs node: the control socket stopped: {r:?}"); }
    }
    let _ = crate::notify::notify("STOPPING=1");
    eprintln!("breakfs node: stopping; unmounting its mounts");
    daemon.unmount_all().await;
    let _ = std::fs::remove_file(&s.socket);
    eprintln!("breakfs node: stopped");
    Ok(())
}

/// Bind the control socket, replacing a stale one (no one answering).
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another node daemon answers on {}; stop it, or give this one --socket",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))
}

/// Every 3 s, time a `GET /v2/` of each registry the node fetches from:
/// the light probe of the cloud link's RTT.
fn spawn_cloud_probe(
    cloud: Arc<CloudSource>,
    links: Arc<Links>,
    client: breakfs_fetch::ClientOptions,
) {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build();
        let Ok(http) = http else { return };
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
    });
}

/// A `POST /mounts` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    /// The image.
    pub image: String,
    /// An existing directory.
    pub mountpoint: PathBuf,
    /// Fetch the rest in the background.
    #[serde(default = "yes")]
    pub hydrate: bool,
    /// Fetch programs' libraries when they are first read.
    #[serde(default = "yes")]
    pub dependency_prefetch: bool,
    /// FUSE threads.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct MountpointQuery {
    mountpoint: PathBuf,
}

fn control_routes(d: Arc<Daemon>) -> Router {
    let r = Router::new()
        .route(
            "/mounts",
            get(list_mounts).post(add_mount).delete(remove_mount),
        )
        .with_state(d);
    guard::limit_body(r, guard::MAX_CONTROL_BODY, "")
}

async fn mounts_over_tcp() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "mount control is served on the node's control socket only (breakfs mount --node \
         unix:PATH); start the node with --token-file to allow it over TCP with a bearer token",
    )
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn list_mounts(State(d): State<Arc<Daemon>>) -> Response {
    let list: Vec<StatusRecord> = d.lock().values().map(|m| d.record(&m.m)).collect();
    axum::Json(list).into_response()
}

async fn add_mount(State(d): State<Arc<Daemon>>, body: axum::body::Bytes) -> Response {
    let req: MountRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not a mount request ({{\"image\": REF, \"mountpoint\": DIR}}): {e}"
                ),
            );
        }
    };
    match d.mount(req).await {
        Ok(rec) => axum::Json(rec).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
    }
}

async fn remove_mount(State(d): State<Arc<Daemon>>, Query(q): Query<MountpointQuery>) -> Response {
    match d.unmount(&q.mountpoint).await {
        Ok(msg) => (StatusCode::OK, format!("{msg}\n")).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

impl Daemon {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, NodeMount>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, m: &Mounted) -> StatusRecord {
        let mut r = m.status();
        r.node = Some(self.control.clone());
        r
    }

    async fn mount(&self, req: MountRequest) -> Result<StatusRecord> {
        let abs = breakfs_fs::check_mountpoint(&req.mountpoint)?;
        let reference = ImageRef::parse(&req.image)?;
        let svc = &self.svc;
        let opened =
            breakfs_fs::open_image_on(&reference, &self.client, &svc.fetcher, &svc.cloud).await?;
        let opts = MountOptions {
            hydrate: req.hydrate,
            threads: req.threads.unwrap_or(4),
            dependency_prefetch: req.dependency_prefetch,
        };
        let layers: Vec<(breakfs_index::Digest, bool)> = opened
            .image
            .layers()
            .iter()
            .zip(&opened.layers)
            .map(|(d, m)| (d.digest.clone(), *m == breakfs_fs::LayerMode::Whole))
            .collect();
        if let Some(b) = svc.store.budget() {
            b.touch(layers.iter().map(|(d, _)| d));
            b.live(layers.iter().map(|(d, w)| (d, *w)), 1);
        }
        let mounted = breakfs_fs::mount(opened, &abs, &opts)?;
        let probe = abs.clone();
        tokio::task::spawn_blocking(move || std::fs::metadata(probe))
            .await?
            .context("the new mount does not answer")?;
        let rec = self.record(&mounted);
        breakfs_fs::write_status(&rec)?;
        eprintln!("breakfs node: mounted {} at {}", req.image, abs.display());
        self.lock().insert(
            abs,
            NodeMount {
                m: mounted,
                layers,
                reads_seen: Default::default(),
            },
        );
        Ok(rec)
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<String> {
        let abs = mountpoint
            .canonicalize()
            .or_else(|_| std::path::absolute(mountpoint))
            .with_context(|| format!("resolving {}", mountpoint.display()))?;
        // Out of the map while it is unmounted: its session ends with the
        // unmount, which the status writer must not take for a failure.
        let Some(m) = self.lock().remove(&abs) else {
            bail!("this node does not serve a mount at {}", abs.display());
        };
        if let Err(e) = nix::mount::umount(&abs) {
            self.lock().insert(abs.clone(), m);
            match e {
                nix::errno::Errno::EBUSY => bail!(
                    "{} is busy: a process has a file open or its working directory there; \
                     stop it first (or `umount -l {}` to detach it anyway)",
                    abs.display(),
                    abs.display()
                ),
                e => bail!("unmounting {}: {e}", abs.display()),
            }
        }
        self.release_layers(&m);
        breakfs_fs::remove_status(&abs);
        // An overlay may still hold it: serve until the kernel ends the session.
        tokio::task::spawn_blocking(move || m.m.wait());
        eprintln!("breakfs node: unmounted {}", abs.display());
        Ok(format!("unmounted {}", abs.display()))
    }

    async fn unmount_all(&self) {
        let all: Vec<(PathBuf, NodeMount)> =
            std::mem::take(&mut *self.lock()).into_iter().collect();
        for (abs, m) in all {
            breakfs_fs::remove_status(&abs);
            if nix::mount::umount(&abs).is_err() {
                // Busy at shutdown: detach, so that the path is free for a restart.
                let _ = nix::mount::umount2(&abs, nix::mount::MntFlags::MNT_DETACH);
            }
            drop(m);
        }
    }

    /// The mount no longer pins its layers (it still holds them while an
    /// overlay keeps it, but it reads from the store then only).
    fn release_layers(&self, m: &NodeMount) {
        if let Some(b) = self.svc.store.budget() {
            b.live(m.layers.iter().map(|(d, w)| (d, *w)), -1);
        }
    }

    fn write_statuses(&self) {
        for (at, m) in self.lock().iter_mut() {
            if let Some(why) = m.m.ended() {
                tracing::error!(
                    "the mount at {} stopped serving: {why}; its readers get ENOTCONN \
                     (unmount it and mount again)",
                    at.display()
                );
            }
        }
        let recs: Vec<StatusRecord> = self.lock().values().map(|m| self.record(&m.m)).collect();
        if let Some(b) = self.svc.store.budget() {
            // Mounts being read keep their layers recent.
            for m in self.lock().values() {
                let read = m.m.reads.snapshot().bytes_read;
                if m.reads_seen
                    .swap(read, std::sync::atomic::Ordering::Relaxed)
                    != read
                {
                    b.touch(m.layers.iter().map(|(d, _)| d));
                }
            }
        }
        for r in recs {
            if let Err(e) = breakfs_fs::write_status(&r) {
                tracing::warn!(
                    "writing the status record of {}: {e}",
                    r.mountpoint.display()
                );
            }
        }
    }

    fn mount_metrics(&self, p: &mut PromText) {
        let recs: Vec<StatusRecord> = self.lock().values().map(|m| m.m.status()).collect();
        p.family("breakfs_mounts", "gauge", "Mounts this node serves.");
        p.sample("breakfs_mounts", &[], recs.len() as f64);
        p.family(
            "breakfs_mount_hydration_ratio",
            "gauge",
            "Share of a mount's file bytes held locally (1 = fully hydrated).",
        );
        for r in &recs {
            let ratio = if r.chunk_bytes == 0 {
                1.0
            } else {
                r.hydrated_bytes as f64 / r.chunk_bytes as f64
            };
            let mp = r.mountpoint.to_string_lossy();
            p.sample(
                "breakfs_mount_hydration_ratio",
                &[("mountpoint", &mp), ("image", &r.image)],
                ratio,
            );
        }
    }
}
