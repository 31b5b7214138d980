//! `breakfs mount`, `umount`, `status` and `pull --extract`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use breakfs_fetch::guard::Token;
use breakfs_fetch::{ContentStore, FetchOptions};
use breakfs_fs::{MountOptions, OpenedImage, StatusRecord};
use breakfs_index::ImageRef;
use breakfs_node::MountRequest;
use clap::Args;

use crate::ClientArgs;

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The content store (shared by all mounts and pulls of this user).
    #[arg(long, env = "BREAKFS_STORE", default_value_os_t = crate::user_cache("store", "/var/lib/breakfs/store".into()))]
    cache: PathBuf,
    /// Seconds a read waits for a missing chunk before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    deadline: u64,
    /// Parallel range requests.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// A read's range request also takes queued background chunks stored
    /// next to it, up to this many KiB in all (files stored together are
    /// often read together, so a start-up waits on fewer round trips over
    /// a slow link; 0 turns it off).
    #[arg(long, default_value_t = 256)]
    neighbor_kib: u64,
    #[command(flatten)]
    client: ClientArgs,
}

impl StoreArgs {
    fn fetch_options(&self) -> FetchOptions {
        let deadline = Duration::from_secs(self.deadline.max(1));
        FetchOptions {
            workers: self.parallel.max(1),
            background_workers: (self.parallel / 4).max(1),
            deadline,
            attempt_timeout: (deadline / 3).max(Duration::from_secs(1)),
            neighbor_window: self.neighbor_kib << 10,
            ..FetchOptions::default()
        }
    }

    async fn open(&self, image: &str) -> Result<OpenedImage> {
        let reference = ImageRef::parse(image)?;
        let store = Arc::new(ContentStore::open(&self.cache)?);
        let client = self.client.options()?;
        let opened =
            breakfs_fs::open_image(&reference, store, &client, self.fetch_options()).await?;
        Ok(opened)
    }
}

#[derive(Args)]
pub struct MountArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Stay in the foreground (logs on stderr; Ctrl-C unmounts).
    #[arg(long)]
    foreground: bool,
    /// Do not fetch the rest of the image in the background.
    #[arg(long)]
    no_hydrate: bool,
    /// Do not fetch a program's interpreter and libraries (ELF DT_NEEDED,
    /// #! lines) as soon as the program is first read.
    #[arg(long)]
    no_dependency_prefetch: bool,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Mount through this node daemon (`unix:/run/breakfs/node.sock`, or
    /// `http://HOST:PORT` of a local daemon), sharing its cache and peers.
    /// Without it, the daemon's default socket is used when a daemon
    /// answers there.
    #[arg(long, env = "BREAKFS_NODE", value_name = "URL")]
    node: Option<String>,
    /// The node's token file (its --token-file), for mount control over TCP.
    #[arg(long, env = "BREAKFS_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Mount in a process of its own even when a node daemon runs.
    #[arg(long, conflicts_with = "node")]
    standalone: bool,
    /// The image.
    #[arg(value_name = "REF")]
    image: String,
    /// An existing directory to mount on.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
}

pub async fn run_mount(a: MountArgs) -> Result<()> {
    let abs = breakfs_fs::check_mountpoint(&a.mountpoint)?;
    let node = a.node.clone().or_else(|| {
        let sock = Path::new(breakfs_node::DEFAULT_SOCKET);
        (!a.standalone && std::os::unix::net::UnixStream::connect(sock).is_ok())
            .then(|| format!("unix:{}", sock.display()))
    });
    if let Some(node) = node {
        return mount_via_node(&node, &a, &abs).await;
    }
    if !a.foreground {
        return background(&a, &abs);
    }
    let started = Instant::now();
    eprintln!("breakfs: opening {}", a.image);
    let opened = a.store.open(&a.image).await?;
    let opts = MountOptions {
        hydrate: !a.no_hydrate,
        threads: a.threads,
        dependency_prefetch: !a.no_dependency_prefetch,
    };
    breakfs_node::run_standalone(opened, &abs, &opts, &a.image, started).await?;
    Ok(())
}

/// Ask node daemon `node` to mount the image; returns once it answers.
async fn mount_via_node(node: &str, a: &MountArgs, abs: &Path) -> Result<()> {
    let token = token_of(a.token_file.as_deref())?;
    let req = MountRequest {
        image: a.image.clone(),
        mountpoint: abs.to_path_buf(),
        hydrate: !a.no_hydrate,
        dependency_prefetch: !a.no_dependency_prefetch,
        threads: Some(a.threads),
    };
    let rec = breakfs_node::mount_through(node, token.as_ref(), &req).await?;
    println!(
        "mounted {} at {} through the node daemon {node}: {} paths, {} lazy and {} whole layers; \
         `breakfs umount {}` to unmount",
        a.image,
        abs.display(),
        rec.paths,
        rec.lazy_layers,
        rec.whole_layers,
        abs.display()
    );
    Ok(())
}

/// Start the mount again in the foreground as a detached child, wait until
/// it answers (or fails), then leave it running.
fn background(a: &MountArgs, abs: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding the breakfs executable")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--foreground");
    let logs = a.store.cache.join("logs");
    let p = breakfs_node::spawn_mount_process(command, &logs, &a.image, abs)?;
    println!(
        "mounted {} at {} (pid {}, log {}); `breakfs umount {}` to unmount",
        a.image,
        abs.display(),
        p.pid,
        p.log.display(),
        abs.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct UmountArgs {
    /// The mountpoint.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
    /// The node's token file (its --token-file), for mount control over TCP.
    #[arg(long, env = "BREAKFS_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

pub async fn run_umount(a: UmountArgs) -> Result<()> {
    if let Some(note) = breakfs_node::unmount(&a.mountpoint, a.token_file.as_deref()).await? {
        eprintln!("{note}");
    }
    Ok(())
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the record as JSON.
    #[arg(long)]
    json: bool,
    /// The node daemon to ask when no MOUNTPOINT is given
    /// (`unix:/run/breakfs/node.sock`, or `http://HOST:PORT` with
    /// --token-file).
    #[arg(long, env = "BREAKFS_NODE", value_name = "URL", default_value_t = format!("unix:{}", breakfs_node::DEFAULT_SOCKET))]
    node: String,
    /// The node's token file (its --token-file), for asking over TCP.
    #[arg(long, env = "BREAKFS_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The mountpoint; without it, the node daemon's mounts and the
    /// containerd snapshots it holds, with their hydration.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: Option<PathBuf>,
}

pub async fn run_status(a: StatusArgs) -> Result<()> {
    let Some(mountpoint) = &a.mountpoint else {
        return node_status(&a).await;
    };
    let s: StatusRecord = breakfs_fs::read_status(mountpoint)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", breakfs_node::status_report(&s));
    Ok(())
}

/// The token in `--token-file`, if given.
fn token_of(file: Option<&Path>) -> Result<Option<Token>> {
    file.map(Token::from_file)
        .transpose()
        .context("--token-file")
}

/// `breakfs status` without a mountpoint: what the node daemon serves.
async fn node_status(a: &StatusArgs) -> Result<()> {
    let token = token_of(a.token_file.as_deref())?;
    let s = breakfs_node::node_status(&a.node, token.as_ref()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", breakfs_node::node_report(&s));
    Ok(())
}

#[derive(Args)]
pub struct PullArgs {
    /// Write the image's tree into this directory (new or empty).
    #[arg(long, value_name = "DIR", required = true)]
    extract: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// The image.
    #[arg(value_name = "REF")]
    image: String,
}

pub async fn run_pull(a: PullArgs) -> Result<()> {
    let started = Instant::now();
    let opened = a.store.open(&a.image).await?;
    let bar = indicatif::ProgressBar::new(opened.tree.file_bytes());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("extracting {}", a.image));
    let r = breakfs_fs::extract_reporting(&opened, &a.extract, Duration::from_millis(100), |n| {
        bar.set_position(n)
    })
    .await;
    bar.finish_and_clear();
    let stats = r?;
    let fetched: u64 = opened
        .fetcher
        .stats()
        .sources
        .values()
        .map(|s| s.bytes)
        .sum();
    println!(
        "extracted {} to {}: {} paths, {:.1} MB of content in {:.2}s ({:.1} MB fetched)",
        a.image,
        a.extract.display(),
        stats.paths,
        stats.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        fetched as f64 / 1e6
    );
    Ok(())
}
