//! `breakfs mount`, `umount`, `status` and `pull --extract`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use breakfs_fetch::{ContentStore, FetchOptions};
use breakfs_fs::{MountOptions, OpenedImage, StatusRecord};
use breakfs_index::ImageRef;
use clap::Args;

use crate::ClientArgs;

/// The line a backgrounded mount prints when it answers.
const READY: &str = "BREAKFS-MOUNT-READY";

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The content store (shared by all mounts and pulls of this user).
    #[arg(long, env = "BREAKFS_STORE", default_value_os_t = default_store())]
    cache: PathBuf,
    /// Seconds a read waits for a missing chunk before it fails with EIO.
    #[arg(long, default_value_t = 30)]
    deadline: u64,
    /// Parallel range requests.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// A read's range request also takes queued background chunks stored
    /// next to it, up to this many KiB in all (files stored together are
    /// often read together: 256 gave python's start-up 18 waits instead of
    /// 44 through a 50 ms link; 0 turns it off).
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

fn default_store() -> PathBuf {
    if let Some(c) = std::env::var_os("BREAKFS_CACHE") {
        return PathBuf::from(c).join("store");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/breakfs/store"),
        None => PathBuf::from("/var/lib/breakfs/store"),
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
        let sock = Path::new(crate::node::DEFAULT_SOCKET);
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
    let mounted = breakfs_fs::mount(opened, &abs, &opts)?;
    // Answer one request through the kernel before saying we are ready.
    let probe = abs.clone();
    tokio::task::spawn_blocking(move || std::fs::metadata(probe))
        .await?
        .context("the new mount does not answer")?;
    let info = mounted.status();
    breakfs_fs::write_status(&info)?;
    eprintln!(
        "breakfs: mounted {} at {} in {:.2}s: {} paths, {} MB of files, {} lazy and {} whole layers",
        a.image,
        abs.display(),
        started.elapsed().as_secs_f64(),
        info.paths,
        info.file_bytes / 1_000_000,
        info.lazy_layers,
        info.whole_layers
    );
    println!("{READY}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut was_hydrated = false;
    loop {
        let stop = tokio::select! {
            _ = tokio::signal::ctrl_c() => true,
            _ = term.recv() => true,
            _ = tick.tick() => false,
        };
        if stop {
            // Unmount by path first: a busy mount (an overlay or an open
            // file on it) says EBUSY and keeps being served, instead of
            // being cut off under its users.
            match nix::mount::umount(&abs) {
                Ok(()) => break,
                Err(nix::errno::Errno::EBUSY) => {
                    eprintln!(
                        "breakfs: {} is busy (an overlay or an open file uses it); still serving it",
                        abs.display()
                    );
                    continue;
                }
                Err(e) => {
                    eprintln!("breakfs: unmounting {}: {e}", abs.display());
                    break;
                }
            }
        }
        let s = mounted.status();
        if s.hydrated && !was_hydrated {
            was_hydrated = true;
            eprintln!(
                "breakfs: {} fully hydrated after {:.1}s",
                a.image,
                started.elapsed().as_secs_f64()
            );
        }
        if let Err(e) = breakfs_fs::write_status(&s) {
            tracing::warn!("writing the status record: {e}");
        }
        if !breakfs_fs::is_mountpoint(&abs) {
            eprintln!("breakfs: {} was unmounted", abs.display());
            break;
        }
    }
    breakfs_fs::remove_status(&abs);
    if breakfs_fs::is_mountpoint(&abs) {
        mounted.unmount()?;
    } else {
        // An overlay keeps its own reference to a lower layer: serve it
        // until the kernel ends the session, not cut it off.
        eprintln!(
            "breakfs: unmounted {}; serving until its last user (e.g. an overlay) lets go",
            abs.display()
        );
        tokio::task::spawn_blocking(move || mounted.wait()).await??;
    }
    eprintln!("breakfs: {} done", abs.display());
    Ok(())
}

/// An HTTP client for node `node` (`unix:PATH`, an absolute socket path, or
/// `http://HOST:PORT`) and the base URL to use with it; it carries the
/// bearer token in `token_file`, if given.
pub fn node_client(node: &str, token_file: Option<&Path>) -> Result<(reqwest::Client, String)> {
    let sock = node
        .strip_prefix("unix:")
        .or_else(|| node.starts_with('/').then_some(node));
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(600));
    if let Some(p) = token_file {
        let token = breakfs_fetch::guard::Token::from_file(p).context("--token-file")?;
        let mut headers = reqwest::header::HeaderMap::new();
        let mut value = reqwest::header::HeaderValue::from_str(&token.bearer())
            .context("the token cannot travel in an HTTP header")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
        b = b.default_headers(headers);
    }
    Ok(match sock {
        Some(path) => (
            b.unix_socket(path)
                .build()
                .context("building the node client")?,
            "http://breakfs-node".to_string(),
        ),
        None => (
            b.build().context("building the node client")?,
            node.trim_end_matches('/').to_string(),
        ),
    })
}

/// Ask node daemon `node` to mount the image; returns once it answers.
async fn mount_via_node(node: &str, a: &MountArgs, abs: &Path) -> Result<()> {
    let (client, base) = node_client(node, a.token_file.as_deref())?;
    let req = crate::node::MountRequest {
        image: a.image.clone(),
        mountpoint: abs.to_path_buf(),
        hydrate: !a.no_hydrate,
        dependency_prefetch: !a.no_dependency_prefetch,
        threads: Some(a.threads),
    };
    let resp = client
        .post(format!("{base}/mounts"))
        .json(&req)
        .send()
        .await
        .with_context(|| format!("asking the node daemon at {node} to mount (is it running?)"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "the node daemon at {node} could not mount {}: {}",
            a.image,
            body.trim()
        );
    }
    let rec: StatusRecord = serde_json::from_str(&body).context("the node daemon's answer")?;
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
    use std::os::unix::process::CommandExt;
    let logs = a.store.cache.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("creating the log directory {}", logs.display()))?;
    let key = breakfs_index::Digest::of(abs.to_string_lossy().as_bytes());
    let log_path = logs.join(format!("mount-{}.log", &key.hex()[..16]));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the breakfs executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mount process")?;
    let out = child.stdout.take().context("mount process output")?;
    let mut lines = BufReader::new(out).lines();
    let ready = lines.any(|l| l.map(|l| l == READY).unwrap_or(false));
    if ready {
        println!(
            "mounted {} at {} (pid {}, log {}); `breakfs umount {}` to unmount",
            a.image,
            abs.display(),
            child.id(),
            log_path.display(),
            abs.display()
        );
        return Ok(());
    }
    let status = child.wait()?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "mounting {} failed ({status}):\n{}",
        a.image,
        tail.join("\n")
    );
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
    // A mount whose process died cannot be resolved (ENOTCONN): take the
    // path as given then.
    let abs = a
        .mountpoint
        .canonicalize()
        .or_else(|_| std::path::absolute(&a.mountpoint))
        .with_context(|| format!("resolving {}", a.mountpoint.display()))?;
    if !breakfs_fs::is_mountpoint(&abs) {
        breakfs_fs::remove_status(&abs);
        bail!("nothing is mounted on {}", abs.display());
    }
    if let Ok(s) = breakfs_fs::read_status(&abs)
        && let Some(node) = &s.node
        && process_alive(s.pid)
    {
        let (client, base) = node_client(node, a.token_file.as_deref())?;
        let resp = client
            .delete(format!("{base}/mounts"))
            .query(&[("mountpoint", &abs)])
            .send()
            .await
            .with_context(|| format!("asking the node daemon at {node} to unmount"))?;
        let ok = resp.status().is_success();
        let body = resp.text().await.unwrap_or_default();
        if !ok {
            bail!("{}", body.trim());
        }
        return Ok(());
    }
    if let Ok(s) = breakfs_fs::read_status(&abs)
        && s.node.is_none()
        && process_alive(s.pid)
    {
        let pid = nix::unistd::Pid::from_raw(s.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling the mount process {}", s.pid))?;
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until && breakfs_fs::is_mountpoint(&abs) && process_alive(s.pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !breakfs_fs::is_mountpoint(&abs) {
            if process_alive(s.pid) {
                eprintln!(
                    "unmounted {}; its process {} keeps serving the users still holding it \
                     (an overlay) and exits when they let go",
                    abs.display(),
                    s.pid
                );
            }
            return Ok(());
        }
        if process_alive(s.pid) {
            bail!(
                "{} is busy: a process has a file open or its working directory there; \
                 stop it first (or `umount -l {}` to detach it anyway)",
                abs.display(),
                abs.display()
            );
        }
    }
    // No live mount process (killed): detach the dead mount.
    nix::mount::umount2(&abs, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", abs.display()))?;
    breakfs_fs::remove_status(&abs);
    Ok(())
}

/// Whether process `pid` runs (a zombie does not).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x'))
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the record as JSON.
    #[arg(long)]
    json: bool,
    /// The mountpoint.
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
}

pub fn run_status(a: StatusArgs) -> Result<()> {
    let s: StatusRecord = breakfs_fs::read_status(&a.mountpoint)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let alive = process_alive(s.pid);
    let pct = if s.chunk_bytes == 0 {
        100.0
    } else {
        100.0 * s.hydrated_bytes as f64 / s.chunk_bytes as f64
    };
    println!("image      {} ({})", s.image, s.manifest);
    println!(
        "mounted    {} by pid {}{}",
        s.mountpoint.display(),
        s.pid,
        if alive { "" } else { " (not running!)" }
    );
    println!("store      {}", s.cache.display());
    println!(
        "tree       {} paths, {:.1} MB of files; {} lazy and {} whole layers",
        s.paths,
        s.file_bytes as f64 / 1e6,
        s.lazy_layers,
        s.whole_layers
    );
    println!(
        "hydration  {pct:.1}% ({:.1} of {:.1} MB){}",
        s.hydrated_bytes as f64 / 1e6,
        s.chunk_bytes as f64 / 1e6,
        if s.hydrated { ", complete" } else { "" }
    );
    println!(
        "reads      {:.1} MB read; {} reads from the store, {} waited for a fetch, {} failed",
        s.reads.bytes_read as f64 / 1e6,
        s.reads.reads_local,
        s.reads.reads_waited,
        s.reads.reads_failed
    );
    for (name, st) in &s.fetch.sources {
        println!(
            "fetched    {:.1} MB from {name} in {} requests ({} failed)",
            st.bytes as f64 / 1e6,
            st.requests,
            st.failures
        );
    }
    println!(
        "verified   {} chunks ({:.1} MB), {} digest failures, {} queued",
        s.fetch.chunks_stored,
        s.fetch.chunk_bytes_stored as f64 / 1e6,
        s.fetch.digest_failures,
        s.fetch.queued
    );
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
    let total = opened.tree.file_bytes();
    let done = Arc::new(AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("extracting {}", a.image));
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let r = breakfs_fs::extract(&opened, &a.extract, done.clone()).await;
    ticker.abort();
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
