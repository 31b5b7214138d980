//! A private, real containerd for tests: its own `--root`, `--state`,
//! socket and config in a temp dir, so it never touches the host's
//! containerd, and everything it started is killed and unmounted on drop.
//!
//! What works in this sandbox (Debian 12: containerd 1.6.20, ctr 1.6.20,
//! runc 1.1.5, cgroup v1, root on ext4), found by experiment:
//! * config `version = 2` with the CRI plugin and the aufs/btrfs/zfs/
//!   devmapper snapshotters disabled (the others cannot work here and only
//!   add log noise); the CRI plugin only when a test asks for it
//!   ([`ContainerdOptions::cri`]): it runs without a CNI setup (its
//!   network is not ready, which only pods with their own network
//!   namespace need) and keeps its pods and containers in the `k8s.io`
//!   namespace;
//! * both the `overlayfs` and the `native` snapshotter unpack and run;
//!   overlayfs is used when `ctr plugins ls` reports it `ok`, else native
//!   (overlayfs is skipped when the root dir itself is on overlayfs);
//! * the default runtime `io.containerd.runc.v2` with runc under cgroup v1
//!   needs no extra flags: `ctr run --rm REF ID ARGS...` prints the
//!   container's stdout and exits with the container's exit status (1 with
//!   a message on stderr when runc cannot start the process);
//! * `ctr image pull --plain-http REF` pulls from a plain-HTTP registry
//!   on loopback; no hosts dir is needed;
//! * cgroups land in `/sys/fs/cgroup/*/breakfs-test/ID` (the namespace
//!   name), so container ids are made unique per process and call;
//! * `ctr image mount --snapshotter S REF DIR` gives the merged rootfs
//!   read-only, `ctr image unmount --rm DIR` undoes it;
//! * containerd's tar applier sets a hardlink entry's own mode, owner,
//!   times and xattrs on the shared inode (and its chown drops
//!   `security.capability`), so a layer whose link entries do not repeat the
//!   target's metadata unpacks differently in containerd than in umoci;
//! * a shim of a killed container stays a zombie for a moment until init
//!   reaps it; nothing is left running after drop.
//!
//! Timings here: start to first `ctr version` answer about 0.1 s, pull of a
//! one-layer 300 KiB image 0.15-0.3 s, `ctr run --rm` of a static binary
//! 0.2-0.5 s.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The containerd namespace every test image and container lives in.
pub const NAMESPACE: &str = "breakfs-test";

/// The namespace of the CRI plugin's images, pods and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// How long a pull may take before it counts as hung.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `ctr run` may take before the container is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

/// How to start a [`TestContainerd`].
#[derive(Clone, Debug, Default)]
pub struct ContainerdOptions {
    /// Snapshotter for pulls and runs; `None` picks overlayfs when it works
    /// here, else native.
    pub snapshotter: Option<String>,
    /// TOML appended to the generated config (e.g. a `[proxy_plugins.x]`).
    pub extra_config: String,
    /// Where its temp dir goes (default /tmp); keep it short: its socket
    /// path must fit in 108 bytes.
    pub parent: Option<PathBuf>,
    /// Files for the config's top-level `imports` (drop-ins).
    pub imports: Vec<PathBuf>,
    /// Load the CRI plugin (configured through `extra_config`'s
    /// `[plugins."io.containerd.grpc.v1.cri"]` or an import), serving the
    /// CRI on the containerd socket; it runs without a CNI setup.
    pub cri: bool,
}

/// A running private containerd; killed with its shims on drop.
pub struct TestContainerd {
    child: Child,
    dir: tempfile::TempDir,
    snapshotter: String,
}

impl TestContainerd {
    /// Start one with the default options.
    pub fn start() -> Result<TestContainerd> {
        Self::start_with(ContainerdOptions::default())
    }

    /// Start one with `opts`; waits until it answers `ctr version`.
    pub fn start_with(opts: ContainerdOptions) -> Result<TestContainerd> {
        // Socket paths are limited to 108 bytes: keep the dir short.
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in(opts.parent.as_deref().unwrap_or(Path::new("/tmp")))
            .context("creating a temp dir for containerd")?;
        let d = dir.path();
        let imports: Vec<String> = opts
            .imports
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
imports = [{imports}]
disabled_plugins = [
  {cri}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

{extra}
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            opt = d.join("opt").display(),
            imports = imports.join(", "),
            cri = if opts.cri {
                ""
            } else {
                r#""io.containerd.grpc.v1.cri","#
            },
            extra = opts.extra_config,
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).context("writing the containerd config")?;
        let log = std::fs::File::create(d.join("containerd.log"))
            .context("creating the containerd log")?;
        let log2 = log
            .try_clone()
            .context("cloning the containerd log handle")?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .context("cannot start containerd (apt-get install containerd runc)")?;
        let mut c = TestContainerd {
            child,
            dir,
            snapshotter: String::new(),
        };
        c.wait_ready(Duration::from_secs(30))?;
        c.snapshotter = match opts.snapshotter {
            Some(s) => s,
            None if c.plugin_ok("io.containerd.snapshotter.v1", "overlayfs")? => "overlayfs".into(),
            None => "native".into(),
        };
        Ok(c)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().context("polling containerd")? {
                bail!(
                    "containerd exited with {st} at start; its log:\n{}",
                    self.log()
                );
            }
            let mut cmd = self.ctr_bare();
            cmd.arg("version");
            if let Ok(out) = output_with_timeout(&mut cmd, Duration::from_secs(5))
                && out.status.success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer `ctr version` within {limit:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `ctr plugins ls` lists plugin `id` of `type_` with status ok.
    pub fn plugin_ok(&self, type_: &str, id: &str) -> Result<bool> {
        let out = self.ctr_checked(&["plugins", "ls"], Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 3 && f[0] == type_ && f[1] == id && f.last() == Some(&"ok")
        }))
    }

    /// The containerd socket.
    pub fn address(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// containerd's `--root` (content store, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The temp dir holding config, root, state and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The snapshotter pulls and runs use.
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_bare(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.address());
        cmd
    }

    /// `ctr --address SOCK -n breakfs-test`, ready for a subcommand.
    pub fn ctr(&self) -> Command {
        self.ctr_in(NAMESPACE)
    }

    /// `ctr --address SOCK -n NAMESPACE`, ready for a subcommand.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut cmd = self.ctr_bare();
        cmd.args(["--namespace", namespace]);
        cmd
    }

    /// Run `ctr ... ARGS` and fail unless it exits 0 within `limit`.
    pub fn ctr_checked(&self, args: &[&str], limit: Duration) -> Result<Output> {
        self.ctr_checked_in(NAMESPACE, args, limit)
    }

    /// [`ctr_checked`](Self::ctr_checked) in `namespace`.
    pub fn ctr_checked_in(
        &self,
        namespace: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<Output> {
        let mut cmd = self.ctr_in(namespace);
        cmd.args(args);
        let out = output_with_timeout(&mut cmd, limit)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed with {}:\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Pull and unpack `reference` (`127.0.0.1:PORT/repo:tag`) over plain HTTP.
    pub fn pull_plain_http(&self, reference: &str) -> Result<()> {
        self.pull_plain_http_within(reference, PULL_TIMEOUT)
    }

    /// [`pull_plain_http`](Self::pull_plain_http) with a time limit (slow,
    /// shared links).
    pub fn pull_plain_http_within(&self, reference: &str, limit: Duration) -> Result<()> {
        let snap = format!("--snapshotter={}", self.snapshotter);
        self.ctr_checked(&["image", "pull", "--plain-http", &snap, reference], limit)
            .with_context(|| format!("pulling {reference} into the test containerd"))?;
        Ok(())
    }

    /// Run `args` in a new container of the pulled image `reference` and
    /// remove it afterwards; the output carries the container's exit status.
    pub fn run(&self, reference: &str, args: &[&str]) -> Result<Output> {
        self.run_with_timeout(reference, args, RUN_TIMEOUT)
    }

    /// [`run`](Self::run) with a time limit; on timeout the container is
    /// killed and removed and an error returned.
    pub fn run_with_timeout(
        &self,
        reference: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<Output> {
        let id = format!(
            "breakfs-{}-{}",
            std::process::id(),
            CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm", "--snapshotter", &self.snapshotter])
            .arg(reference)
            .arg(&id)
            .args(args);
        match output_with_timeout(&mut cmd, limit) {
            Ok(out) => Ok(out),
            Err(e) => {
                self.remove_container(&id);
                Err(e).with_context(|| format!("running {args:?} in {reference}"))
            }
        }
    }

    /// Mount the merged rootfs of the pulled image `reference` read-only at
    /// `target` (`ctr image mount`); unmounted when the guard drops.
    pub fn mount_image(&self, reference: &str, target: &Path) -> Result<ImageMount<'_>> {
        let snap = format!("--snapshotter={}", self.snapshotter);
        let target_s = target.to_string_lossy();
        self.ctr_checked(
            &["image", "mount", &snap, reference, &target_s],
            PULL_TIMEOUT,
        )
        .with_context(|| format!("mounting {reference} at {target_s}"))?;
        Ok(ImageMount {
            ctrd: self,
            target: target.to_path_buf(),
        })
    }

    /// Kill and delete container `id` and its task, ignoring failures.
    fn remove_container(&self, id: &str) {
        self.remove_container_in(NAMESPACE, id);
    }

    fn remove_container_in(&self, ns: &str, id: &str) {
        let t = Duration::from_secs(10);
        let _ = self.ctr_checked_in(ns, &["task", "kill", "--signal", "SIGKILL", id], t);
        let _ = self.ctr_checked_in(ns, &["task", "delete", "--force", id], t);
        let _ = self.ctr_checked_in(ns, &["container", "delete", id], t);
    }

    /// The pids of the shims this containerd started that still run.
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.address();
        let sock = sock.as_os_str().as_encoded_bytes();
        let mut pids = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
            if is_shim && args.windows(2).any(|w| w[0] == b"-address" && w[1] == sock) {
                pids.push(pid);
            }
        }
        pids
    }

    /// The mount points below its temp dir, deepest first.
    pub fn mounts_below_dir(&self) -> Vec<String> {
        let prefix = format!("{}/", self.dir.path().display());
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        for ns in [NAMESPACE, CRI_NAMESPACE] {
            let ls = self.ctr_checked_in(ns, &["task", "ls", "--quiet"], Duration::from_secs(10));
            if let Ok(out) = ls {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    self.remove_container_in(ns, id);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.shim_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for m in self.mounts_below_dir() {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}

/// An image rootfs mounted by [`TestContainerd::mount_image`].
pub struct ImageMount<'a> {
    ctrd: &'a TestContainerd,
    target: PathBuf,
}

impl ImageMount<'_> {
    /// Where the rootfs is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for ImageMount<'_> {
    fn drop(&mut self) {
        let target = self.target.to_string_lossy();
        let unmounted = self.ctrd.ctr_checked(
            &["image", "unmount", "--rm", &target],
            Duration::from_secs(30),
        );
        if unmounted.is_err() {
            let _ = Command::new("umount").args(["-l", &target]).status();
        }
    }
}

/// Run `cmd` with stdin closed, capturing stdout and stderr; kill it and
/// fail if it is still running after `limit`.
pub fn output_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err_t = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("waiting for {cmd:?}"))?
        {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {limit:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
