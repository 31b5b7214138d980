//! One mount's lifecycle, the same for a standalone mount process and a
//! node daemon's mounts: mount and answer one request through the kernel;
//! unmount by path (a busy mount says EBUSY and keeps being served instead
//! of being cut off under its users); then serve until the kernel ends the
//! session (an overlay keeps its own reference to a lower layer). Also the
//! client side, `breakfs umount`: ask the daemon, or stop the mount
//! process, or detach a dead mount.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use breakfs_fetch::guard::Token;
use breakfs_fs::{MountOptions, Mounted, OpenedImage, StatusRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::node_client;
use crate::{Error, Result};

/// Mount `opened` at `abs`, wait until a request through the kernel is
/// answered, and write the first status record (`node`: the daemon that
/// serves it, if any).
pub async fn mount_and_probe(
    opened: OpenedImage,
    abs: &Path,
    opts: &MountOptions,
    node: Option<String>,
) -> Result<(Mounted, StatusRecord)> {
    // The mount and its FUSE handshake block: off the runtime's threads.
    let mounted = {
        let (at, opts) = (abs.to_path_buf(), opts.clone());
        tokio::task::spawn_blocking(move || breakfs_fs::mount(opened, &at, &opts))
            .await
            .map_err(|e| Error::Control(format!("the mount task failed: {e}")))??
    };
    probe(mounted, abs, node).await
}

/// Wait until a request through the kernel to `mounted` at `abs` is
/// answered, and write its first status record (`node`: the daemon that
/// serves it, if any).
pub(crate) async fn probe(
    mounted: Mounted,
    abs: &Path,
    node: Option<String>,
) -> Result<(Mounted, StatusRecord)> {
    let probe = abs.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::metadata(probe))
        .await
        .map_err(|e| Error::io("the new mount does not answer", e.into()))?
        .map_err(|e| Error::io("the new mount does not answer", e))?;
    let mut rec = mounted.status();
    rec.node = node;
    breakfs_fs::write_status(&rec)?;
    Ok((mounted, rec))
}

/// Unmount `abs` by path; [`Error::Busy`] while a process uses it.
pub fn unmount_path(abs: &Path) -> Result<()> {
    match nix::mount::umount(abs) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(Error::Busy {
            mountpoint: abs.to_path_buf(),
        }),
        Err(source) => Err(Error::Unmount {
            mountpoint: abs.to_path_buf(),
            source,
        }),
    }
}

/// A mount whose status record is gone, being let go.
pub struct Ending {
    mounted: Mounted,
    detached: bool,
}

/// Start ending the session of `mounted` at `abs`: its status record goes
/// at once.
pub fn end_session(mounted: Mounted, abs: &Path) -> Ending {
    breakfs_fs::remove_status(abs);
    Ending {
        mounted,
        detached: !breakfs_fs::is_mountpoint(abs),
    }
}

impl Ending {
    /// Whether the path is unmounted already (the session may live on
    /// under an overlay).
    pub fn detached(&self) -> bool {
        self.detached
    }

    /// Unmount it if it is still mounted; else serve until its last user
    /// lets go.
    pub async fn finish(self) -> Result<()> {
        if !self.detached {
            return Ok(self.mounted.unmount()?);
        }
        let mounted = self.mounted;
        tokio::task::spawn_blocking(move || mounted.wait())
            .await
            .map_err(|e| Error::io("serving a mount until its session ends", e.into()))??;
        Ok(())
    }
}

/// The line a standalone mount process prints on stdout once its mount
/// answers ([`run_standalone`]; [`spawn_mount_process`] waits for it).
pub const MOUNT_READY: &str = "BREAKFS-MOUNT-READY";

/// A standalone mount process in the foreground: mount `opened` (the image
/// `image`, opened since `started`) at `abs`, say [`MOUNT_READY`] once it
/// answers, and serve it until SIGINT/SIGTERM unmounts it or it is
/// unmounted from outside ([`serve_mount`]).
pub async fn run_standalone(
    opened: OpenedImage,
    abs: &Path,
    opts: &MountOptions,
    image: &str,
    started: Instant,
) -> Result<()> {
    // Stop requests from SIGINT/SIGTERM, caught before saying READY.
    let stops = stop_signals()?;
    let (mounted, info) = mount_and_probe(opened, abs, opts, None).await?;
    // No one takes a standalone mount's first reads: stop recording them
    // (listed files are pushed into the page cache only once it stops).
    if let Some(r) = &mounted.recorder {
        r.stop();
    }
    eprintln!(
        "breakfs: mounted {image} at {} in {:.2}s: {} paths, {} MB of files, {} lazy and {} whole layers",
        abs.display(),
        started.elapsed().as_secs_f64(),
        info.paths,
        info.file_bytes / 1_000_000,
        info.lazy_layers,
        info.whole_layers
    );
    println!("{MOUNT_READY}");
    serve_mount(mounted, abs, image, started, stops).await
}

/// A backgrounded mount process, serving.
pub struct MountProcess {
    /// Its process id.
    pub pid: u32,
    /// Its log file (its stderr).
    pub log: PathBuf,
}

/// Start `command`, a standalone mount of `image` at `abs` in the
/// foreground ([`run_standalone`]), as a detached child (its own process
/// group, stderr to a log file under `logs`); wait until it says
/// [`MOUNT_READY`], or fails (the error carries its log's last lines); then
/// leave it running.
pub fn spawn_mount_process(
    mut command: Command,
    logs: &Path,
    image: &str,
    abs: &Path,
) -> Result<MountProcess> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(logs)
        .map_err(|e| Error::io(format!("creating the log directory {}", logs.display()), e))?;
    let key = breakfs_index::Digest::of(abs.to_string_lossy().as_bytes());
    let log_path = logs.join(format!("mount-{}.log", &key.hex()[..16]));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the mount process", e))?;
    let ready = match child.stdout.take() {
        Some(out) => BufReader::new(out)
            .lines()
            .any(|l| l.is_ok_and(|l| l == MOUNT_READY)),
        None => false,
    };
    if ready {
        return Ok(MountProcess {
            pid: child.id(),
            log: log_path,
        });
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for the mount process", e))?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(Error::MountProcess {
        image: image.to_string(),
        status,
        log_tail: tail.join("\n"),
    })
}

/// Serve the standalone mount `mounted` of `image` at `abs`: its status
/// record every second, until a request on `stop` unmounts it (a busy
/// mount keeps being served until the next one) or it is unmounted from
/// outside; then until the kernel ends its session.
pub async fn serve_mount(
    mounted: Mounted,
    abs: &Path,
    image: &str,
    started: Instant,
    mut stop: mpsc::Receiver<()>,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut was_hydrated = false;
    loop {
        let stopping = tokio::select! {
            r = stop.recv() => r.is_some(),
            _ = tick.tick() => false,
        };
        if stopping {
            match unmount_path(abs) {
                Ok(()) => break,
                Err(Error::Busy { .. }) => {
                    eprintln!(
                        "breakfs: {} is busy (an overlay or an open file uses it); still serving it",
                        abs.display()
                    );
                    continue;
                }
                Err(e) => {
                    eprintln!("breakfs: {}", breakfs_index::Causes(&e));
                    break;
                }
            }
        }
        let s = mounted.status();
        if s.hydrated && !was_hydrated {
            was_hydrated = true;
            eprintln!(
                "breakfs: {image} fully hydrated after {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        if let Err(e) = breakfs_fs::write_status(&s) {
            tracing::warn!(
                "writing the status record: {e}",
                e = breakfs_index::Causes(&e)
            );
        }
        if !breakfs_fs::is_mountpoint(abs) {
            eprintln!("breakfs: {} was unmounted", abs.display());
            break;
        }
    }
    let ending = end_session(mounted, abs);
    if ending.detached() {
        eprintln!(
            "breakfs: unmounted {}; serving until its last user (e.g. an overlay) lets go",
            abs.display()
        );
    }
    ending.finish().await?;
    eprintln!("breakfs: {} done", abs.display());
    Ok(())
}

/// SIGINT and SIGTERM, each one request on the receiver (the standalone
/// mount tries to unmount on each; the daemon stops on the first).
pub fn stop_signals() -> Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let what = "listening for SIGINT and SIGTERM";
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io(what, e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io(what, e))?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// A shutdown token cancelled on the first SIGINT or SIGTERM, after
/// `on_stop` ran (a daemon tells systemd it is stopping).
pub fn shutdown_on_stop_signals(
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<CancellationToken> {
    let mut stops = stop_signals()?;
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        stops.recv().await;
        on_stop();
        cancel.cancel();
    });
    Ok(shutdown)
}

/// `breakfs umount`: unmount the breakfs mount at `mountpoint`, through
/// the daemon that serves it (with `token_file` for control over TCP), or
/// by stopping its mount process; a mount whose process died is detached.
/// Returns a note for the user, if any.
pub async fn unmount(mountpoint: &Path, token_file: Option<&Path>) -> Result<Option<String>> {
    // A mount whose process died cannot be resolved (ENOTCONN): take the
    // path as given then.
    let abs = mountpoint
        .canonicalize()
        .or_else(|_| std::path::absolute(mountpoint))
        .map_err(|e| Error::io(format!("resolving {}", mountpoint.display()), e))?;
    if !breakfs_fs::is_mountpoint(&abs) {
        breakfs_fs::remove_status(&abs);
        return Err(Error::NotMounted(abs));
    }
    if let Some((fstype, device)) = breakfs_fs::mount_type(&abs)
        && !breakfs_fs::is_breakfs_type(&fstype, &device)
    {
        return Err(Error::NotBreakfs {
            mountpoint: abs,
            fstype,
            device,
        });
    }
    if let Ok(s) = breakfs_fs::read_status(&abs)
        && process_alive(s.pid)
    {
        match &s.node {
            Some(node) => {
                let token = token_file.map(Token::from_file).transpose()?;
                ask_to_unmount(node, token.as_ref(), &abs).await?;
                return Ok(None);
            }
            None => {
                if let Some(note) = stop_mount_process(s.pid, &abs).await? {
                    return Ok(Some(note));
                }
                if !breakfs_fs::is_mountpoint(&abs) {
                    return Ok(None);
                }
            }
        }
    }
    // No live mount process (killed): detach the dead mount.
    nix::mount::umount2(&abs, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
        Error::Unmount {
            mountpoint: abs.clone(),
            source,
        }
    })?;
    breakfs_fs::remove_status(&abs);
    Ok(None)
}

/// Ask daemon `node` to unmount `abs`.
async fn ask_to_unmount(node: &str, token: Option<&Token>, abs: &PathBuf) -> Result<()> {
    let (client, base) = node_client(node, token)?;
    let resp = client
        .delete(format!("{base}/mounts"))
        .query(&[("mountpoint", abs)])
        .send()
        .await
        .map_err(|source| Error::Client {
            what: format!("asking the node daemon at {node} to unmount"),
            source,
        })?;
    let ok = resp.status().is_success();
    let body = resp.text().await.unwrap_or_default();
    if !ok {
        return Err(Error::Control(body.trim().to_string()));
    }
    Ok(())
}

/// SIGTERM the mount process `pid` serving `abs` and wait until the path
/// is unmounted or the process gone; a note when the process serves on
/// (an overlay holds the mount).
async fn stop_mount_process(pid: u32, abs: &Path) -> Result<Option<String>> {
    let target = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM).map_err(|e| {
        Error::io(
            format!("signalling the mount process {pid}"),
            std::io::Error::from(e),
        )
    })?;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && breakfs_fs::is_mountpoint(abs) && process_alive(pid) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !breakfs_fs::is_mountpoint(abs) {
        if process_alive(pid) {
            return Ok(Some(format!(
                "unmounted {}; its process {pid} keeps serving the users still holding it \
                 (an overlay) and exits when they let go",
                abs.display()
            )));
        }
        return Ok(None);
    }
    if process_alive(pid) {
        return Err(Error::Busy {
            mountpoint: abs.to_path_buf(),
        });
    }
    Ok(None)
}

/// Whether process `pid` runs (a zombie does not).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x'))
}

/// `breakfs status`'s text for a mount's status record: hydration, bytes
/// fetched by source, reads, and whether the serving process still runs.
pub fn status_report(s: &StatusRecord) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let alive = process_alive(s.pid);
    let pct = if s.chunk_bytes == 0 {
        100.0
    } else {
        100.0 * s.hydrated_bytes as f64 / s.chunk_bytes as f64
    };
    let _ = writeln!(out, "image      {} ({})", s.image, s.manifest);
    let _ = writeln!(
        out,
        "mounted    {} by pid {}{}",
        s.mountpoint.display(),
        s.pid,
        if alive { "" } else { " (not running!)" }
    );
    let _ = writeln!(out, "store      {}", s.cache.display());
    let _ = writeln!(
        out,
        "tree       {} paths, {:.1} MB of files; {} lazy and {} whole layers",
        s.paths,
        s.file_bytes as f64 / 1e6,
        s.lazy_layers,
        s.whole_layers
    );
    let _ = writeln!(
        out,
        "hydration  {pct:.1}% ({:.1} of {:.1} MB){}",
        s.hydrated_bytes as f64 / 1e6,
        s.chunk_bytes as f64 / 1e6,
        if s.hydrated { ", complete" } else { "" }
    );
    let _ = writeln!(
        out,
        "reads      {:.1} MB read; {} reads from the store, {} waited for a fetch, {} failed",
        s.reads.bytes_read as f64 / 1e6,
        s.reads.reads_local,
        s.reads.reads_waited,
        s.reads.reads_failed
    );
    for (name, st) in &s.fetch.sources {
        let _ = writeln!(
            out,
            "fetched    {:.1} MB from {name} in {} requests ({} failed)",
            st.bytes as f64 / 1e6,
            st.requests,
            st.failures
        );
    }
    let _ = writeln!(
        out,
        "verified   {} chunks ({:.1} MB), {} digest failures, {} queued",
        s.fetch.chunks_stored,
        s.fetch.chunk_bytes_stored as f64 / 1e6,
        s.fetch.digest_failures,
        s.fetch.queued
    );
    out
}
