//! `breakfs node`: the node daemon's flags, merged with its config file
//! ([`Settings`]); the listeners bound, SIGINT/SIGTERM wired to its
//! shutdown token, and systemd told when it is ready (the daemon is
//! `breakfs-node`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use breakfs_node::{ControlSocket, Listeners, Node, Settings};
use clap::Args;

use crate::ClientArgs;

/// The line the daemon prints on stdout once it serves.
const READY: &str = "BREAKFS-NODE-READY";

#[derive(Args)]
pub struct NodeArgs {
    /// A TOML file with any of the settings below (flags win over it):
    /// listen, socket, advertise, cache, budget, peers, learn_peers, relay,
    /// plain_http, prefetch_rate, deadline, parallel, token_file,
    /// registry_timeout, verify, snapshotter_socket, keep_mounts (seconds).
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
    /// Background requests keep each source's queuing delay (its round
    /// trip beyond its best) under MS milliseconds: a delay-based window per
    /// source that shrinks when another node's reads fill a shared link
    /// [default: 25; 0: off].
    #[arg(long, value_name = "MS")]
    background_target: Option<u64>,
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
    /// Keep mounts served across restarts of this daemon (SIGTERM and
    /// start, or a crash and restart): a small holder process (`breakfs
    /// fuse-holder`, its log in CACHE/holder/) keeps their FUSE
    /// connections, the next daemon serves them on, and readers never see
    /// an error. Mounts no daemon serves for SECS seconds are unmounted
    /// [default without SECS: 600]. Under systemd give the unit
    /// KillMode=process, so that a restart spares the holder.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "600")]
    keep_mounts: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

impl NodeArgs {
    /// The flags as settings (an unset flag leaves the config file's).
    fn settings(&self) -> Settings {
        Settings {
            listen: self.listen.clone(),
            socket: self.socket.clone(),
            advertise: self.advertise.clone(),
            cache: self.cache.clone(),
            budget: self.budget.clone(),
            peers: self.peers.clone(),
            learn_peers: self.no_learn_peers.then_some(false),
            relay: self.relay.clone(),
            plain_http: self.client.plain_http.then_some(true),
            prefetch_rate: self.prefetch_rate.clone(),
            background_target_ms: self.background_target,
            deadline: self.deadline,
            parallel: self.parallel,
            token_file: self.token_file.clone(),
            registry_timeout: self.client.registry_timeout,
            verify: self.verify.then_some(true),
            snapshotter_socket: self.snapshotter_socket.clone(),
            keep_mounts: self.keep_mounts,
        }
    }
}

pub async fn run_node(a: NodeArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => Settings::from_file(p)?,
        None => Settings::default(),
    };
    let mut s = a.settings().over(file).resolve(a.client.options()?)?;
    if let Some(keep) = &mut s.config.keep_mounts {
        let exe =
            std::env::current_exe().context("finding this program to start the mount holder")?;
        keep.holder = vec![exe.into(), "fuse-holder".into()];
    }
    // Catch SIGTERM before saying READY: systemd may stop us at once.
    let shutdown = breakfs_node::shutdown_on_stop_signals(|| {
        let _ = breakfs_node::notify::notify("STOPPING=1");
    })?;
    let tcp = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("listening on {} (choose another with --listen)", s.listen))?;
    let control = ControlSocket::bind(&s.socket)?;
    let keeps_mounts = s.config.keep_mounts.is_some();
    let node = Node::start(s.config, Listeners { tcp, control }, shutdown).await?;
    println!("{READY} {}", node.url());
    if let Err(e) = breakfs_node::notify::notify("READY=1") {
        tracing::warn!(
            "telling systemd we are ready: {e}",
            e = breakfs_index::Causes(&e)
        );
    }
    node.serve().await?;
    if keeps_mounts {
        // Its mounts are left to the holder: end now, before the runtime
        // drops the reads still waiting for a fetch (fuser answers a
        // dropped request with EIO; the next daemon gets it resent).
        std::process::exit(0);
    }
    Ok(())
}

/// `breakfs fuse-holder SOCKET SECS`, started by the daemon.
#[derive(Args)]
pub struct FuseHolderArgs {
    /// The holder's socket.
    socket: PathBuf,
    /// Seconds to keep mounts no daemon serves.
    secs: u64,
}

pub fn run_fuse_holder(a: &FuseHolderArgs) -> std::process::ExitCode {
    match breakfs_node::run_holder(&a.socket, std::time::Duration::from_secs(a.secs)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breakfs fuse-holder: {}", breakfs_index::Causes(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
