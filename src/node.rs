//! `breakfs node`: the node daemon's flags and config file, merged into
//! a [`Config`]; the listeners bound, SIGINT/SIGTERM wired to its shutdown
//! token, and systemd told when it is ready (the daemon is `breakfs-node`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use breakfs_fetch::guard::Token;
use breakfs_node::{Config, ControlSocket, DEFAULT_SOCKET, Listeners, Node};
use clap::Args;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::ClientArgs;

/// The line the daemon prints on stdout once it serves.
const READY: &str = "BREAKFS-NODE-READY";

#[derive(Args)]
pub struct NodeArgs {
    /// A TOML file with any of the settings below (flags win over it):
    /// listen, socket, advertise, cache, budget, peers, learn_peers, relay,
    /// plain_http, prefetch_rate, deadline, parallel, token_file,
    /// registry_timeout, verify, snapshotter_socket.
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
    /// Serve containerd's snapshots API on this Unix socket, for
    /// `[proxy_plugins.breakfs] type = "snapshot"` in containerd's config
    /// (e.g. /run/breakfs/snapshotter.sock; off unless given).
    #[arg(long, value_name = "PATH")]
    snapshotter_socket: Option<PathBuf>,
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
    snapshotter_socket: Option<PathBuf>,
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
    snapshotter_socket: Option<PathBuf>,
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
            .map(breakfs_index::parse_size)
            .transpose()
            .context("--budget")?,
        peers,
        learn_peers: !a.no_learn_peers && file.learn_peers.unwrap_or(true),
        relay,
        plain_http: a.client.plain_http || file.plain_http.unwrap_or(false),
        prefetch_rate: rate
            .as_deref()
            .map(breakfs_index::parse_size)
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
        snapshotter_socket: a.snapshotter_socket.clone().or(file.snapshotter_socket),
    })
}

pub async fn run_node(a: NodeArgs) -> Result<()> {
    let s = settings(&a)?;
    // Catch SIGTERM before saying READY: systemd may stop us at once.
    let mut stops = breakfs_node::stop_signals()?;
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            stops.recv().await;
            let _ = breakfs_node::notify::notify("STOPPING=1");
            shutdown.cancel();
        });
    }
    let mut client = a.client.options()?;
    client.plain_http = s.plain_http;
    if let Some(t) = s.registry_timeout {
        client.timeout = Duration::from_secs(t.max(1));
    }
    let tcp = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {} (choose another with --listen)", s.listen))?;
    let control = ControlSocket::bind(&s.socket)?;
    let config = Config {
        advertise: s.advertise,
        cache: s.cache,
        budget: s.budget,
        peers: s.peers,
        learn_peers: s.learn_peers,
        relay: s.relay,
        client,
        prefetch_rate: s.prefetch_rate,
        deadline: Duration::from_secs(s.deadline),
        parallel: s.parallel,
        token: s.token,
        verify: s.verify,
        snapshotter_socket: s.snapshotter_socket,
    };
    let node = Node::start(config, Listeners { tcp, control }, shutdown).await?;
    println!("{READY} {}", node.url());
    if let Err(e) = breakfs_node::notify::notify("READY=1") {
        tracing::warn!("telling systemd we are ready: {e}");
    }
    node.serve().await?;
    Ok(())
}
