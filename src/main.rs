//! The `breakfs` command: argument parsing and wiring of the crates.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use breakfs_fetch::{ClientOptions, Store};
use breakfs_index::{ImageRef, Platform, Reference};
use breakfs_refactor::{PlanOptions, Progress, RefactorOptions, ReportTable, WriterOptions};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod mountcmd;
mod node;
mod record;
mod schedcmd;
mod verifycmd;

/// breakfs: fast container deployment on edge clouds.
///
/// Images are named like skopeo names them: `oci:DIR[:TAG]` for an OCI
/// image layout on disk, `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` for a
/// registry.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rewrite images into low-redundancy, lazily mountable layers.
    ///
    /// Each source image is written to DEST under its own tag. Without
    /// --joint, images are refactored one after the other and each reuses
    /// every layer already in DEST (any tag of the layout or repository)
    /// whose files are all in it unchanged: refactor v1 today, v2 next week
    /// into the same DEST, and v2 shares v1's layers. With --joint, the set
    /// is refactored at once so that files common to several images are
    /// stored once.
    ///
    /// The output is a standard OCI image with eStargz-compatible gzip
    /// layers: any registry stores it, any runtime runs it, and
    /// `breakfs mount` fetches only what is read.
    ///
    /// Examples:
    ///   breakfs refactor --to oci:/srv/out oci:/srv/app:v1
    ///   breakfs refactor --to oci:/srv/out oci:/srv/app:v2
    ///   breakfs refactor --plain-http --to docker://edge-reg:5000 docker://reg:5000/library/redis:7
    ///   breakfs refactor --joint --to oci:/srv/all oci:/a:v1 oci:/b:v1
    ///   breakfs refactor --profile 'python3 -c "import json"' --to oci:/srv/out oci:/srv/py:v1
    #[command(verbatim_doc_comment)]
    Refactor(RefactorArgs),
    /// Show an image: manifest, layers, entries, TOCs, and sharing with other tags.
    Inspect(InspectArgs),
    /// Run a shaping TCP proxy: delay and bandwidth per direction, shared by
    /// all connections, to stand in for a slow link (no netem needed).
    ///
    /// Example: a 50 ms, 50 Mbit/s link to a local registry:
    ///   breakfs shape --listen 127.0.0.1:6000 --upstream 127.0.0.1:5000 --rtt-ms 50 --mbit 50
    /// One 20 ms, 200 Mbit/s link to two hosts of a far site (shared bandwidth):
    ///   breakfs shape --route 127.0.0.1:6001=127.0.0.1:7001 \
    ///       --route 127.0.0.1:6002=127.0.0.1:7002 --rtt-ms 20 --mbit 200
    ///
    /// SIGUSR1 lifts the shaping (bytes pass at once, open connections
    /// included) and SIGUSR2 puts it back: measure through the slow link,
    /// then check the results without waiting on it.
    #[command(verbatim_doc_comment)]
    Shape(ShapeArgs),
    /// Mount an image read-only over FUSE, lazily.
    ///
    /// The tree is there as soon as the metadata arrives (for eStargz
    /// layers, as `breakfs refactor` writes them, only the TOCs); file
    /// contents are fetched when read, in parallel Range requests, and the
    /// rest of the image is fetched in the background. Layers without a TOC
    /// (plain gzip images) are fetched whole first. Everything fetched is
    /// verified and kept in the content store (--cache), so a second mount
    /// of an image, or of another version sharing layers, fetches only what
    /// is new. Put overlayfs on top to give a container a writable rootfs.
    ///
    /// The command returns once the mount answers and keeps serving it in
    /// the background; `breakfs umount MOUNTPOINT` stops it.
    ///
    /// Examples:
    ///   breakfs mount --plain-http docker://127.0.0.1:5000/library/redis:v1 /mnt/redis
    ///   breakfs mount oci:/srv/out:v1 /mnt/app && ls /mnt/app
    ///   breakfs status /mnt/app
    #[command(verbatim_doc_comment)]
    Mount(mountcmd::MountArgs),
    /// Unmount a breakfs mount and stop its process.
    Umount(mountcmd::UmountArgs),
    /// Show a mount: hydration, bytes fetched by source, reads; or, with no
    /// mountpoint, the node daemon's mounts and containerd snapshots.
    Status(mountcmd::StatusArgs),
    /// Pull an image into a plain directory, files written in parallel as
    /// their chunks arrive (BREAK's parallel extraction).
    ///
    /// Example:
    ///   breakfs pull --plain-http --extract /srv/rootfs docker://127.0.0.1:5000/library/redis:v1
    #[command(verbatim_doc_comment)]
    Pull(mountcmd::PullArgs),
    /// Run the node daemon: one per edge node, owning the content store.
    ///
    /// All mounts of the node go through it (`breakfs mount --node`, or
    /// automatically when its control socket /run/breakfs/node.sock is
    /// there), so they share one cache and its peers. It fetches every
    /// chunk from its own store, then from peer nodes that hold it (best
    /// measured link first), then from the cloud registry, checking every
    /// byte; serves what it holds to peers over the OCI distribution API
    /// (`skopeo copy docker://NODE:PORT/REPO:TAG` works against it);
    /// publishes GET /cache/index, /measurements and /metrics; prefetches
    /// on POST /prefetch at background priority; and keeps the store
    /// within --budget. With --relay HOST on each node of an edge whose
    /// nodes have uplinks of their own, a layer no peer holds comes from
    /// registry HOST over this node's link and its peers' links at once.
    ///
    /// Examples:
    ///   breakfs node --listen 0.0.0.0:7480 --cache /var/lib/breakfs/store --budget 20GiB \
    ///       --peer http://10.0.0.2:7480 --peer http://10.0.0.3:7480
    ///   breakfs node --peer http://10.0.0.2:7480 --peer http://10.0.0.3:7480 \
    ///       --relay registry.example.com
    ///   breakfs node --config /etc/breakfs/node.toml
    ///   curl -X POST -d '{"images":["docker://reg:5000/app:v2"]}' http://127.0.0.1:7480/prefetch
    #[command(verbatim_doc_comment)]
    Node(node::NodeArgs),
    /// Run the scheduler score service: a kube-scheduler extender.
    ///
    /// kube-scheduler calls POST {prefix}/filter and {prefix}/prioritize
    /// (k8s.io/kube-scheduler/extender/v1, Nodes or NodeNames form); the
    /// service filters out nodes that break the pod's limits
    /// (breakfs.io/limit-delay in ms, breakfs.io/limit-bandwidth in Mbit/s,
    /// as annotations or labels) or lack cache space for the missing layers,
    /// and scores the rest by the expected time to get the image (layers on
    /// the node, at a peer of its cluster, or in the cloud, over measured
    /// links), layer locality, balanced allocation and least requested.
    /// GET {prefix}/plan?image=REF&node=NAME says where each layer should
    /// come from. It polls each node daemon's /cache/index and /measurements.
    ///
    /// Examples:
    ///   breakfs sched --listen 0.0.0.0:7490 --plain-http \
    ///       --node edge-1=http://10.0.0.1:7480@east --node edge-2=http://10.0.0.2:7480@east
    ///   breakfs sched --config /etc/breakfs/sched.yaml
    #[command(verbatim_doc_comment)]
    Sched(schedcmd::SchedArgs),
    /// Check a content store end to end: every blob and chunk against its
    /// digest, every kept range against its layer's TOC record (each chunk
    /// in it inflated and checked), every record in meta/, and temp files
    /// left by killed processes.
    ///
    /// Exits non-zero when something is corrupt and --repair was not
    /// given; --repair removes what is corrupt or left over, so that it is
    /// fetched again when needed. Safe while a node daemon or mounts use
    /// the store (what they write meanwhile is left alone). A kill or a
    /// crash leaves nothing corrupt (writes are atomic); run it after a
    /// power loss or a disk error, or `breakfs node --verify`.
    ///
    /// Examples:
    ///   breakfs verify --cache /var/lib/breakfs/store
    ///   breakfs verify --repair --cache ~/.cache/breakfs/store
    #[command(verbatim_doc_comment)]
    Verify(verifycmd::VerifyArgs),
    /// The mount holder a node daemon with --keep-mounts starts: it keeps
    /// the daemon's FUSE connections across its restarts.
    #[command(hide = true)]
    FuseHolder(node::FuseHolderArgs),
}

#[derive(Args)]
struct ShapeArgs {
    /// Address to listen on.
    #[arg(long, requires = "upstream")]
    listen: Option<std::net::SocketAddr>,
    /// Address to forward to.
    #[arg(long, requires = "listen")]
    upstream: Option<std::net::SocketAddr>,
    /// Another route through the same link, LISTEN=UPSTREAM (repeatable):
    /// every route shares the link's bandwidth.
    #[arg(long = "route", value_name = "LISTEN=UPSTREAM", value_parser = parse_route)]
    routes: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Round-trip time added, in milliseconds (half each way).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Bandwidth in Mbit/s in each direction (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    mbit: u64,
    /// Bandwidth toward the upstream, if different from --mbit.
    #[arg(long)]
    up_mbit: Option<u64>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Talk plain HTTP to registries (also BREAKFS_PLAIN_HTTP=1).
    #[arg(long, env = "BREAKFS_PLAIN_HTTP", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    plain_http: bool,
    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Reach registry HOST at ADDR instead (a mirror, or this site's path
    /// to it); images keep their names. Repeatable.
    #[arg(long = "registry-endpoint", value_name = "HOST=ADDR", value_parser = parse_endpoint)]
    endpoints: Vec<(String, String)>,
    /// Seconds to connect to a registry, and the longest it may take to
    /// answer or stall mid-body; a body must also average 8 KiB/s after
    /// that long [default: 30].
    #[arg(long, value_name = "SECS")]
    registry_timeout: Option<u64>,
}

fn parse_endpoint(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((h, a)) if !h.trim().is_empty() && !a.trim().is_empty() => {
            Ok((h.trim().to_string(), a.trim().to_string()))
        }
        _ => Err(format!(
            "{s:?} is not HOST=ADDR, like registry.example.com=10.0.0.5:5000"
        )),
    }
}

impl ClientArgs {
    fn options(&self) -> Result<ClientOptions> {
        Ok(ClientOptions {
            plain_http: self.plain_http,
            platform: Platform::parse(&self.platform)?,
            endpoints: self.endpoints.iter().cloned().collect(),
            timeout: self
                .registry_timeout
                .map_or(ClientOptions::default().timeout, |s| {
                    std::time::Duration::from_secs(s.max(1))
                }),
            ..ClientOptions::default()
        })
    }
}

#[derive(Args)]
struct RefactorArgs {
    /// Destination: oci:DIR[:TAG], docker://HOST[:PORT]/REPO[:TAG], or
    /// docker://HOST[:PORT] to keep each source's repository path under HOST.
    /// Each image gets its source's tag (a layout fed from several
    /// repositories tags them NAME-TAG).
    #[arg(long = "to", value_name = "DEST")]
    to: String,
    /// Refactor all sources at once (shared layers across the set).
    #[arg(long)]
    joint: bool,
    /// Most layers an output image may have (overlayfs stops near 128).
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u64).range(2..=120))]
    max_layers: u64,
    /// Treat files equal in all but mtime as one (keeps the first published
    /// mtime and reports how many it changed), like reproducible-build
    /// timestamp rewriting. Off by default: output is exact.
    #[arg(long)]
    relax_mtime: bool,
    /// Deflate level of the new layers (0-9, libdeflate's scale).
    #[arg(long, default_value_t = WriterOptions::default().level, value_parser = clap::value_parser!(u32).range(0..=9))]
    level: u32,
    /// Chunk size for big files, in KiB (each chunk is its own gzip member).
    #[arg(long, default_value_t = 4096)]
    chunk_kib: u64,
    /// Work directory for decompressed source layers (reused across runs).
    #[arg(long, env = "BREAKFS_WORK")]
    work_dir: Option<PathBuf>,
    /// Print the table as JSON lines instead.
    #[arg(long)]
    json: bool,
    /// Run this shell command once in each source image (as root, with the
    /// image's /bin/sh, chrooted into an overlay of the image) and lay the
    /// files it reads first in each new layer, in the order it read them,
    /// before the eStargz prefetch landmark: a lazy mount (breakfs,
    /// stargz-snapshotter) fetches them at once. Nothing is written if the
    /// command fails.
    #[arg(long, value_name = "CMD")]
    profile: Option<String>,
    /// Seconds the --profile command may run: a server still running then
    /// is stopped, and what it read until then is the profile.
    #[arg(long, value_name = "SECS", default_value_t = 60, requires = "profile")]
    profile_secs: u64,
    /// Also publish binary deltas (zstd) of each changed file against the
    /// destination's earlier version of it, as an OCI artifact beside the
    /// image (tag sha256-HEX): a node that ran the earlier version fetches
    /// the deltas instead of the files. Costs refactoring time (seconds
    /// per changed image); runtimes without breakfs ignore the artifact.
    #[arg(long)]
    deltas: bool,
    #[command(flatten)]
    client: ClientArgs,
    /// Source images.
    #[arg(required = true, value_name = "SRC")]
    sources: Vec<String>,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The image.
    #[arg(value_name = "REF")]
    image: String,
}

/// `NAME` under the user's cache: `$BREAKFS_CACHE/NAME`, else
/// `~/.cache/breakfs/NAME`, else `fallback`.
fn user_cache(name: &str, fallback: PathBuf) -> PathBuf {
    if let Some(c) = std::env::var_os("BREAKFS_CACHE") {
        return PathBuf::from(c).join(name);
    }
    std::env::var_os("HOME").map_or(fallback, |h| {
        PathBuf::from(h).join(".cache/breakfs").join(name)
    })
}

/// Progress bars on stderr, one per stage.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn stage(&self, message: &str, total: u64) {
        let Ok(mut guard) = self.bar.lock() else {
            return;
        };
        if let Some(b) = guard.take() {
            b.finish_and_clear();
        }
        let b = if total > 0 {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        } else {
            let b = ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        };
        b.set_message(message.to_string());
        *guard = Some(b);
    }

    fn advance(&self, n: u64) {
        if let Ok(guard) = self.bar.lock()
            && let Some(b) = guard.as_ref()
        {
            b.inc(n);
        }
    }
}

impl Bars {
    fn done(&self) {
        if let Ok(mut guard) = self.bar.lock()
            && let Some(b) = guard.take()
        {
            b.finish_and_clear();
        }
    }
}

async fn run_refactor(a: RefactorArgs) -> Result<()> {
    // `docker://HOST`: each source keeps its repository path under HOST.
    let dest = match a.to.strip_prefix("docker://") {
        Some(host) if !host.is_empty() && !host.contains('/') => ImageRef::Registry {
            host: host.to_string(),
            repo: "_".to_string(),
            reference: Reference::Tag("latest".to_string()),
        },
        _ => ImageRef::parse(&a.to).context("parsing --to")?,
    };
    let sources = a
        .sources
        .iter()
        .map(|s| ImageRef::parse(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut opts = RefactorOptions {
        plan: PlanOptions {
            max_layers: a.max_layers as usize,
            relax_mtime: a.relax_mtime,
            joint: a.joint,
            ..PlanOptions::default()
        },
        writer: WriterOptions {
            chunk_size: a.chunk_kib.max(4) * 1024,
            level: a.level,
            ..WriterOptions::default()
        },
        client: a.client.options()?,
        work_dir: a
            .work_dir
            .clone()
            .unwrap_or_else(|| user_cache("work", std::env::temp_dir().join("breakfs-work"))),
        deltas: a.deltas,
    };
    let bars = Bars {
        bar: Mutex::new(None),
    };
    if let Some(cmd) = &a.profile {
        let limit = std::time::Duration::from_secs(a.profile_secs.max(1));
        let mut seen = std::collections::HashSet::new();
        for src in &sources {
            bars.stage(&format!("recording {cmd:?} in {src}"), 0);
            let rec = record::record(src, &opts.client, cmd, &opts.work_dir, limit).await;
            bars.done();
            let rec = rec?;
            eprintln!(
                "breakfs: --profile: {cmd:?} read {} files of {src}{}",
                rec.paths.len(),
                if rec.timed_out {
                    format!(" (still running after {} s: stopped)", limit.as_secs())
                } else {
                    String::new()
                }
            );
            // One order for all sources: the first source's, then what
            // the others read besides.
            for p in rec.paths {
                if seen.insert(p.clone()) {
                    opts.writer.prefetch.push(p);
                }
            }
        }
    }
    let result = breakfs_refactor::refactor(&sources, &dest, &opts, &bars).await;
    bars.done();
    let reports = result.with_context(|| format!("refactoring into {dest}"))?;
    if a.json {
        for r in &reports {
            println!(
                "{}",
                serde_json::to_string(r).context("printing the report")?
            );
        }
    } else {
        print!("{}", ReportTable(&reports));
    }
    Ok(())
}

async fn run_inspect(a: InspectArgs) -> Result<()> {
    let r = ImageRef::parse(&a.image)?;
    let opts = a.client.options()?;
    let store = Store::open(&r, &opts).await?;
    print!("{}", breakfs_fs::inspect(&store, &r).await?);
    Ok(())
}

fn parse_route(s: &str) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let (l, u) = s.split_once('=').ok_or_else(|| {
        format!("{s:?} is not LISTEN=UPSTREAM, like 127.0.0.1:6001=127.0.0.1:7001")
    })?;
    let addr = |a: &str| {
        a.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{a:?} in {s:?} is not HOST:PORT: {e}"))
    };
    Ok((addr(l)?, addr(u)?))
}

async fn run_shape(a: ShapeArgs) -> Result<()> {
    let mut routes = a.routes;
    if let (Some(l), Some(u)) = (a.listen, a.upstream) {
        routes.insert(0, (l, u));
    }
    if routes.is_empty() {
        bail!("breakfs shape needs --listen ADDR --upstream ADDR, or --route LISTEN=UPSTREAM");
    }
    breakfs_shape::run(breakfs_shape::Link {
        routes,
        rtt_ms: a.rtt_ms,
        mbit: a.mbit,
        up_mbit: a.up_mbit.unwrap_or(a.mbit),
    })
    .await?;
    Ok(())
}

/// Restore the default SIGPIPE action (Rust ignores it), so that
/// `breakfs inspect ... | head` ends quietly like other Unix tools instead
/// of panicking on a closed stdout. Only for the commands that print and
/// end: with the default action, a write to a socket whose peer hung up
/// kills the process, and that killed node daemons whose peers gave up on
/// a slow read (their mounts then answered ENOTCONN).
#[allow(unsafe_code)]
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installs the default disposition, no handler code runs;
    // called once at start, before any thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Raise the soft limit of open files to the hard one, as Go programs do at
/// start. systemd and containerd give a service a soft limit of 1,024: a
/// node serving mounts and peers, or the scheduler polling a thousand
/// nodes while kube-scheduler calls it, needs more (found by the load
/// test: 1,000 extender calls at once under that limit left 122 without an
/// answer for two minutes, and the image's resolution failed with EMFILE).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Linux refuses more than fs.nr_open (1,048,576 by default).
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}

fn main() -> std::process::ExitCode {
    raise_open_files_limit();
    let cli = Cli::parse();
    // `refactor --profile` runs a command over overlayfs on a breakfs
    // mount: fuser's warnings about the ioctls overlayfs tries are noise.
    let default_log = match &cli.command {
        Command::Refactor(_) => "warn,fuser=error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BREAKFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::FuseHolder(a) = &cli.command {
        // A small process of its own: no async runtime.
        return node::run_fuse_holder(a);
    }
    if matches!(cli.command, Command::Inspect(_) | Command::Status(_)) {
        default_sigpipe();
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "breakfs: cannot start the async runtime: {}",
                breakfs_index::Causes(&e)
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Refactor(a) => run_refactor(a).await,
            Command::Inspect(a) => run_inspect(a).await,
            Command::Shape(a) => run_shape(a).await,
            Command::Mount(a) => mountcmd::run_mount(a).await,
            Command::Umount(a) => mountcmd::run_umount(a).await,
            Command::Status(a) => mountcmd::run_status(a).await,
            Command::Pull(a) => mountcmd::run_pull(a).await,
            Command::Node(a) => node::run_node(a).await,
            Command::Sched(a) => schedcmd::run_sched(a).await,
            Command::Verify(a) => verifycmd::run_verify(a).await,
            Command::FuseHolder(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line (`what: cause: cause`):
            // library errors leave their source out of their own message.
            eprintln!("breakfs: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
