//! What the benchmarks that run real node daemons share: the temp
//! setting, `breakfs shape` in front of the registry, refactored images
//! pushed to it, `breakfs node` processes and mounts through them, each
//! stopped or unmounted when dropped.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

use super::corpus::CorpusImage;
use super::registry::TestRegistry;

pub const BREAKFS: &str = env!("CARGO_BIN_EXE_breakfs");

pub struct Env {
    pub tmp: PathBuf,
    /// `BREAKFS_RUN_DIR` of every breakfs command (status records).
    pub run_dir: PathBuf,
    /// `HOST:PORT` of the shaping proxy in front of the registry.
    pub link: String,
}

impl Env {
    pub fn breakfs(&self) -> Command {
        let mut c = Command::new(BREAKFS);
        c.env("BREAKFS_RUN_DIR", &self.run_dir)
            .env_remove("BREAKFS_STORE")
            .stdin(Stdio::null());
        c
    }

    /// A new, empty directory under the temp dir.
    pub fn fresh(&self, name: &str) -> Result<PathBuf> {
        let p = self.tmp.join(name);
        if p.exists() {
            ensure!(
                !mounted_under(&p),
                "{} still has a mount in it",
                p.display()
            );
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }
}

/// A fresh temp dir (named `prefix...`) and an [`Env`] in it whose link
/// is `reg` itself, unshaped. Keep the dir until everything in it is gone.
pub fn direct_env(prefix: &str, reg: &TestRegistry) -> Result<(tempfile::TempDir, Env)> {
    let tmpdir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        link: reg.host(),
    };
    std::fs::create_dir_all(&env.run_dir)?;
    Ok((tmpdir, env))
}

/// `umoci unpack` of `image` into a fresh directory under the temp dir:
/// the rootfs, to compare mounts with.
pub fn umoci_rootfs(env: &Env, image: &CorpusImage) -> Result<PathBuf> {
    let unpacked = env.fresh("umoci")?.join("tree");
    run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{}", image.layout.display(), image.tag))
            .arg(&unpacked),
        "umoci unpack",
    )?;
    Ok(unpacked.join("rootfs"))
}

/// A loopback port for a server started later: below the kernel's
/// ephemeral range (so no outgoing connection takes it meanwhile), free
/// now, and never handed out twice by this process.
pub fn reserve_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = SmallRng::seed_from_u64(seed);
    loop {
        let port = rng.random_range(20000..32000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// `breakfs shape` in front of the registry (or, with [`Shaper::routes`],
/// one link to several hosts); killed when dropped.
pub struct Shaper {
    pub child: Child,
    /// The first route's listening address.
    pub addr: String,
    /// Every route's listening address, in the order of the upstreams.
    pub addrs: Vec<String>,
}

impl Shaper {
    pub fn start(upstream: &str, rtt_ms: u64, mbit: u64) -> Result<Shaper> {
        Shaper::routes(&[upstream.to_string()], rtt_ms, mbit)
    }

    /// One shaped link of `rtt_ms` and `mbit` (shared) to each of
    /// `upstreams`, each reached at its own local address.
    pub fn routes(upstreams: &[String], rtt_ms: u64, mbit: u64) -> Result<Shaper> {
        ensure!(!upstreams.is_empty(), "a shaped link needs an upstream");
        for _ in 0..5 {
            let addrs: Vec<String> = upstreams
                .iter()
                .map(|_| format!("127.0.0.1:{}", reserve_port()))
                .collect();
            let mut c = Command::new(BREAKFS);
            c.arg("shape");
            for (a, u) in addrs.iter().zip(upstreams) {
                c.arg("--route").arg(format!("{a}={u}"));
            }
            let mut s = Shaper {
                child: c
                    .args(["--rtt-ms", &rtt_ms.to_string()])
                    .args(["--mbit", &mbit.to_string()])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting breakfs shape")?,
                addr: addrs[0].clone(),
                addrs,
            };
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if s.addrs
                    .iter()
                    .all(|a| std::net::TcpStream::connect(a).is_ok())
                {
                    return Ok(s);
                }
                if s.child.try_wait()?.is_some() {
                    break; // a port was taken meanwhile: try others
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("breakfs shape did not come up on free loopback ports")
    }
}

impl Shaper {
    /// Lift the shaping: bytes pass at once (`breakfs shape` on SIGUSR1).
    pub fn lift(&self) {
        self.signal(nix::sys::signal::Signal::SIGUSR1);
    }

    /// Put the shaping back (SIGUSR2).
    pub fn put_back(&self) {
        self.signal(nix::sys::signal::Signal::SIGUSR2);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        signal_child(&self.child, sig);
    }
}

/// Send `sig` to `child` without waiting (it is not reaped yet, so its pid
/// is still its own).
pub fn signal_child(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

impl Drop for Shaper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `cmd`; its stdout, or an error with its output.
pub fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mount points in this mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

pub fn is_mountpoint(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

pub fn mounted_under(p: &Path) -> bool {
    mount_points().iter().any(|m| m.starts_with(p))
}

/// Detach whatever is still mounted at or under `p`.
pub fn detach_under(p: &Path) {
    for m in mount_points().into_iter().filter(|m| m.starts_with(p)) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}

/// A refactored image in the registry, with its local layout.
pub struct Published {
    pub title: String,
    /// `docker://LINK/refactored/FAMILY:TAG`: as the node reaches it.
    pub remote: String,
    pub layout: PathBuf,
    pub tag: String,
    pub size: u64,
    pub layers: usize,
}

/// Refactor `image` into a layout, push it to the registry directly.
pub fn publish(env: &Env, reg: &TestRegistry, image: &CorpusImage) -> Result<Published> {
    let name = format!("{}-{}", image.family, image.tag);
    eprintln!("bench: refactoring and pushing {name}");
    let layout = env.fresh(&format!("{name}-refactored"))?;
    let work = env.tmp.join(format!("{name}-work"));
    run(
        env.breakfs()
            .args(["refactor", "--work-dir"])
            .arg(&work)
            .arg("--to")
            .arg(format!("oci:{}", layout.display()))
            .arg(&image.reference),
        "breakfs refactor",
    )?;
    let _ = std::fs::remove_dir_all(&work);
    let repo = format!("refactored/{}:{}", image.family, image.tag);
    skopeo_copy(
        &format!("oci:{}:{}", layout.display(), image.tag),
        &reg.reference(&repo),
    )?;
    let layers = layout_layers(&layout, &image.tag)?;
    Ok(Published {
        title: format!("{} {}", image.family, image.tag),
        remote: format!("docker://{}/{repo}", env.link),
        layout,
        tag: image.tag.clone(),
        size: layers.iter().map(|l| l.1).sum(),
        layers: layers.len(),
    })
}

pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| anyhow!("digest {digest:?} is not sha256"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// The manifest of `tag` in an OCI layout.
pub fn layout_manifest(layout: &Path, tag: &str) -> Result<serde_json::Value> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let m = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .ok_or_else(|| anyhow!("{} has no tag {tag}", layout.display()))?;
    Ok(serde_json::from_slice(&std::fs::read(blob_path(
        layout,
        m["digest"].as_str().unwrap_or_default(),
    )?)?)?)
}

/// The layers (digest, size) of `tag` in an OCI layout, bottom first.
pub fn layout_layers(layout: &Path, tag: &str) -> Result<Vec<(String, u64)>> {
    let manifest = layout_manifest(layout, tag)?;
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let d = l["digest"].as_str().unwrap_or_default().to_string();
            let size = l["size"]
                .as_u64()
                .ok_or_else(|| anyhow!("layer {d} has no size"))?;
            Ok((d, size))
        })
        .collect()
}

/// A `breakfs node` with a fresh cache in `dir`; stopped (SIGTERM, then
/// SIGKILL) when dropped, its leftover mounts detached.
pub struct Node {
    pub child: Option<Child>,
    pub url: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Node {
    pub fn start(env: &Env, dir: &Path, extra: &[&str], log_filter: &str) -> Result<Node> {
        Node::start_env(env, dir, extra, log_filter, &[])
    }

    /// [`Node::start`] with environment variables `vars` set for the node.
    pub fn start_env(
        env: &Env,
        dir: &Path,
        extra: &[&str],
        log_filter: &str,
        vars: &[(&str, &str)],
    ) -> Result<Node> {
        let log = dir.join("node.log");
        let socket = dir.join("node.sock");
        let mut child = env
            .breakfs()
            .arg("node")
            .args(["--plain-http", "--cache"])
            .arg(dir.join("cache"))
            .args(if extra.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("BREAKFS_LOG", log_filter)
            .env("NO_COLOR", "1")
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting breakfs node")?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from breakfs node"))?;
        let mut node = Node {
            child: Some(child),
            url: String::new(),
            socket,
            log,
            dir: dir.to_path_buf(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("BREAKFS-NODE-READY ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        node.url = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            anyhow!(
                "breakfs node did not say it was ready; its log:\n{}",
                node.log_text()
            )
        })?;
        Ok(node)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Result<String> {
        run(
            Command::new("curl")
                .args(["-sSf", "--max-time", "30"])
                .arg(format!("{}{path}", self.url)),
            &format!("GET {path} of the node"),
        )
    }

    pub fn post(&self, path: &str, body: &str) -> Result<String> {
        run(
            Command::new("curl")
                .args(["-sSf", "--max-time", "30", "-X", "POST"])
                .args(["-H", "Content-Type: application/json", "-d", body])
                .arg(format!("{}{path}", self.url)),
            &format!("POST {path} to the node"),
        )
    }

    /// Bytes the node fetched from the cloud (registries), by its metrics.
    pub fn cloud_bytes(&self) -> Result<f64> {
        self.source_bytes("cloud")
    }

    /// Bytes the node fetched from `source` (`cloud`, `peer`, `local`), by
    /// its metrics.
    pub fn source_bytes(&self, source: &str) -> Result<f64> {
        self.metric(&format!("breakfs_fetch_bytes_total{{source=\"{source}\"}}"))
    }

    /// The sample `key` (name and labels, as the page writes them) of the
    /// node's metrics; 0 when the page has none.
    pub fn metric(&self, key: &str) -> Result<f64> {
        Ok(metric_of(&self.get("/metrics")?, key))
    }

    /// Wait until the node has measured each of `peers` (it polled their
    /// cache indexes).
    pub fn wait_for_peers(&self, peers: &[String]) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let m: serde_json::Value = serde_json::from_str(&self.get("/measurements")?)?;
            if peers.iter().all(|u| m["links"][u]["rtt_ms"].is_number()) {
                return Ok(());
            }
            ensure!(
                Instant::now() < until,
                "node {} never reached its peers: {m}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Bytes the node's store uses on disk, by its cache index.
    pub fn store_bytes(&self) -> Result<u64> {
        let v: serde_json::Value = serde_json::from_str(&self.get("/cache/index")?)?;
        v["used"]
            .as_u64()
            .ok_or_else(|| anyhow!("the node's /cache/index has no \"used\""))
    }

    pub fn prefetch_tasks(&self) -> Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = serde_json::from_str(&self.get("/prefetch")?)?;
        Ok(v.as_object()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Ask the daemon to stop (SIGTERM: it unmounts its mounts and stops)
    /// without waiting; dropping it waits. Stopping many nodes: ask them
    /// all first, then drop them.
    pub fn ask_to_stop(&self) {
        if let Some(c) = &self.child {
            signal_child(c, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The sample `key` of a Prometheus `page`; 0 when the page has none.
pub fn metric_of(page: &str, key: &str) -> f64 {
    let prefix = format!("{key} ");
    page.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Fresh nodes that are each other's peers: node `i` (its cache in the
/// fresh dir `{name}{i}`) listens on `ports[i]`, reaches node `k` at
/// `http://{reach[k]}` (the port itself, or a shaped route to it), and
/// gets `extra(i)` besides; returned once each has polled all the others.
pub fn start_peers(
    env: &Env,
    name: &str,
    ports: &[u16],
    reach: &[String],
    extra: impl Fn(usize) -> Vec<String>,
) -> Result<Vec<Node>> {
    ensure!(ports.len() == reach.len(), "a route to each node");
    let others = |i: usize| -> Vec<String> {
        (0..reach.len())
            .filter(|&k| k != i)
            .map(|k| format!("http://{}", reach[k]))
            .collect()
    };
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let dir = env.fresh(&format!("{name}{i}"))?;
        let mut args = vec!["--listen".to_string(), format!("127.0.0.1:{port}")];
        for u in others(i) {
            args.extend(["--peer".to_string(), u]);
        }
        args.extend(extra(i));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes.push(Node::start(env, &dir, &args, "warn")?);
    }
    if nodes.len() > 1 {
        for (i, node) in nodes.iter().enumerate() {
            node.wait_for_peers(&others(i))?;
        }
    }
    Ok(nodes)
}

/// A bench argument that must be a positive number (`what` names it).
pub fn positive(v: Option<String>, what: &str) -> Result<u64> {
    v.and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("{what} wants a positive number"))
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ask_to_stop();
        if let Some(mut c) = self.child.take() {
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        detach_under(&self.dir);
    }
}

/// An image mounted through a node; unmounted (`breakfs umount`, then
/// `umount -l` if that left it) when dropped.
pub struct NodeMount<'a> {
    pub env: &'a Env,
    pub point: PathBuf,
}

impl<'a> NodeMount<'a> {
    /// Mount `reference` through `node` without hydration or dependency
    /// prefetch (on-demand reads only).
    pub fn mount(
        env: &'a Env,
        node: &Node,
        reference: &str,
        point: &Path,
    ) -> Result<NodeMount<'a>> {
        let args: Vec<String> = [
            "--no-hydrate",
            "--no-dependency-prefetch",
            "--node",
            &format!("unix:{}", node.socket.display()),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        NodeMount::with_args(env, &args, reference, point)
    }

    /// `breakfs mount --plain-http ARGS REFERENCE POINT`.
    pub fn with_args(
        env: &'a Env,
        args: &[String],
        reference: &str,
        point: &Path,
    ) -> Result<NodeMount<'a>> {
        std::fs::create_dir_all(point)?;
        let point = point.canonicalize()?;
        let result = run(
            env.breakfs()
                .args(["mount", "--plain-http"])
                .args(args)
                .arg(reference)
                .arg(&point),
            &format!("breakfs mount {reference}"),
        );
        // Guard the mount even if the command failed half-way.
        let m = NodeMount { env, point };
        result?;
        Ok(m)
    }

    /// Bytes the mount fetched from anything but the local store, by its
    /// status record.
    pub fn fetched_bytes(&self) -> u64 {
        let Ok(out) = run(
            self.env
                .breakfs()
                .args(["status", "--json"])
                .arg(&self.point),
            "breakfs status",
        ) else {
            return 0;
        };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["fetch"]["sources"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !k.starts_with("local"))
                    .filter_map(|(_, s)| s["bytes"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for NodeMount<'_> {
    fn drop(&mut self) {
        let _ = run(
            self.env.breakfs().arg("umount").arg(&self.point),
            "breakfs umount",
        );
        if is_mountpoint(&self.point) {
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}

/// Run the image's command in a chroot of `rootfs`, in new mount and pid
/// namespaces with /proc mounted (as `corpus::unpack_and_run` does).
pub fn run_chroot(rootfs: &Path, command: &[String]) -> Result<()> {
    let out = super::corpus::run_in_rootfs(rootfs, command)
        .with_context(|| format!("running {command:?} in a chroot of {}", rootfs.display()))?;
    ensure!(
        out.status.success(),
        "{command:?} in a chroot of {} failed ({}): {}{}",
        rootfs.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `skopeo copy FROM TO` to the plain-HTTP registry, tried three times
/// (the registry answers 500 now and then under load).
pub fn skopeo_copy(from: &str, to: &str) -> Result<()> {
    let mut tries = 0;
    loop {
        tries += 1;
        match run(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false"])
                .arg(from)
                .arg(to),
            &format!("skopeo copy {from} {to}"),
        ) {
            Ok(_) => return Ok(()),
            Err(e) if tries >= 3 => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Print the report `md` and write it to target/bench-`name`.md, and with
/// the command, machine and date above it to docs/results/`name`.md (the
/// results the README links to).
pub fn write_report(name: &str, md: &str) -> Result<()> {
    write_report_of(name, name, md)
}

/// [`write_report`] of bench `bench` under another `name` (a partial run
/// that must not replace the bench's full report).
pub fn write_report_of(bench: &str, name: &str, md: &str) -> Result<()> {
    println!("{md}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join(format!("target/bench-{name}.md"));
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("{name} bench: wrote {}", out.display());
    // cargo passes `--bench` to the bench binary: not part of the command.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let command = if args.is_empty() {
        format!("cargo bench --bench {bench}")
    } else {
        format!("cargo bench --bench {bench} -- {}", args.join(" "))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = format!(
        "# {name} benchmark\n\n* Command: `{command}`\n* Machine: {}\n* Date: {}\n\n",
        machine(),
        super::corpus::rfc3339(i64::try_from(now).unwrap_or(0)),
    );
    let results = root.join("docs/results");
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    let out = results.join(format!("{name}.md"));
    std::fs::write(&out, head + md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("{name} bench: wrote {}", out.display());
    Ok(())
}

/// This machine, for reports: cores, CPU, memory, OS and kernel.
pub fn machine() -> String {
    let m = Machine::this();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|l| l.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown OS".into());
    let cpu = if m.cpu.is_empty() {
        "unknown CPU"
    } else {
        &m.cpu
    };
    format!(
        "{} × {cpu}, {:.0} GiB RAM, {os}, Linux {}",
        m.cores,
        m.mem_kib as f64 / 1048576.0,
        m.kernel
    )
}

/// Megabytes (10^6 bytes), for reports.
pub fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// The middle value of `v` (the upper one of an even count); NaN when
/// empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

/// This machine, for reports.
pub struct Machine {
    /// CPUs available to this process.
    pub cores: usize,
    /// The CPU's model name (empty if /proc/cpuinfo has none).
    pub cpu: String,
    /// Memory, KiB (0 if /proc/meminfo says nothing).
    pub mem_kib: u64,
    /// The kernel's release.
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Machine {
        let proc_field = |file: &str, key: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(key)?.trim_start().strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: proc_field("/proc/cpuinfo", "model name"),
            mem_kib: proc_field("/proc/meminfo", "MemTotal")
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}
