//! Lazy-mount benchmark over the Debian corpus, against a real
//! docker-registry reached only through a shaping proxy (50 ms RTT,
//! 50 Mbit/s each way) with a byte counter in front of it:
//!
//! * laziness: time to tree and bytes fetched by a `--no-hydrate` mount,
//!   before and after `ls -lR` of the whole tree, against the image's
//!   compressed size;
//! * deployment: `breakfs mount` + overlayfs + the image's real command,
//!   `breakfs pull --extract` + the command, and a lazy mount of the
//!   original (plain gzip) image, against skopeo copy + umoci unpack + the
//!   command (medians of several runs, fresh caches each);
//! * read speed of a hydrated mount against a local unpacked rootfs, cold
//!   (page cache dropped) and warm, the two read in turns; the same for a
//!   mount with FUSE passthrough (`BREAKFS_PASSTHROUGH=1`, docs/reads.md),
//!   with the opens that passed through to backing files and the disk
//!   their whole-file copies took; the same mount with its pushes into
//!   the page cache off (`BREAKFS_PUSH=0`), beside the files it pushed;
//!   and the mount process's RSS.
//!
//! A big image, `all-v1` ("all-v1 (stacked)" in the report), has the
//! layers of the v1 images of every corpus family stacked into one image
//! (over 10,000 entries, more than any one family has): it gets the
//! laziness, read-speed and RSS measurements but no deployments (it has no
//! single command).
//!
//! `cargo bench --bench mount -- [FAMILY...] [all-v1] [--runs N]` (default
//! families redis nginx python and all-v1, 3 runs); writes the tables to
//! stdout and to target/bench-mount.md. `--runs 0` runs no deployments
//! (laziness, reads and RSS only) and writes its report as `mount-reads`
//! (docs/results/mount-reads.md), leaving the full report alone. Needs
//! root, FUSE, overlayfs, skopeo, umoci and docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use breakfs_shape::{LinkShape, run_shaping_proxy};
use corpus::{Build, CorpusImage, IMAGE_PATH};
use harness::{
    Machine, blob_path, is_mountpoint, layout_layers, mb, median, mounted_under, run, run_chroot,
};
use registry::TestRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BREAKFS: &str = env!("CARGO_BIN_EXE_breakfs");
const RTT_MS: u64 = 50;
const MBIT: u64 = 50;
const DEFAULT_FAMILIES: &[&str] = &["redis", "nginx", "python"];
const HYDRATION_LIMIT: Duration = Duration::from_secs(600);
const READ_ROUNDS: usize = 3;
const WARM_READS: usize = 5;
/// The stacked image: its name (in paths, repositories and its tag) and
/// its title in the report.
const STACKED: &str = "all-v1";
const STACKED_TITLE: &str = "all-v1 (stacked)";

fn main() -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    let mut stacked = false;
    let mut runs = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("--runs wants a number (0: no deployments)"))?;
            }
            STACKED => stacked = true,
            other => names.push(corpus::family(other)?.name),
        }
    }
    if names.is_empty() && !stacked {
        names.extend(DEFAULT_FAMILIES);
        stacked = true;
    }
    ensure!(
        std::fs::metadata("/proc/self")?.uid() == 0,
        "the mount benchmark needs root (FUSE, overlayfs, chroot, drop_caches)"
    );
    // The stacked image needs the v1 image of every family.
    let all: Vec<&str> = corpus::FAMILIES.iter().map(|f| f.name).collect();
    let built: Vec<CorpusImage> = corpus::build_families(if stacked { &all } else { &names })?
        .into_iter()
        .filter(|i| i.build == Build::V1)
        .collect();
    let images: Vec<&CorpusImage> = names
        .iter()
        .filter_map(|n| built.iter().find(|i| i.family == *n))
        .collect();

    // Declared first so that it is removed last, after every guard below.
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-bench-mount")
        .tempdir()?;
    let reg = TestRegistry::start();
    let link = Link::start(reg.host().parse()?)?;
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        registry: reg.host(),
        link,
    };
    std::fs::create_dir_all(&env.run_dir)?;
    eprintln!(
        "mount bench: registry {} behind counter {} → shaping proxy ({RTT_MS} ms RTT, {MBIT} Mbit/s); {runs} runs per deployment",
        env.registry, env.link.addr
    );

    // A failed image is reported, and fails the bench, after the others ran.
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for image in images {
        let started = Instant::now();
        match bench_image(
            &env,
            image,
            image.family,
            &format!("{} v1", image.family),
            runs,
        )
        .with_context(|| format!("benchmarking {}", image.reference))
        {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("mount bench: {} failed: {e:#}", image.family);
                failures.push((image.family.to_string(), format!("{e:#}")));
            }
        }
        eprintln!(
            "mount bench: {} done in {:.0}s",
            image.family,
            started.elapsed().as_secs_f64()
        );
    }
    if stacked {
        let started = Instant::now();
        let result = stack_images(&env, &built).and_then(|(image, layout)| {
            let r = bench_image(&env, &image, STACKED_TITLE, STACKED_TITLE, 0)
                .with_context(|| format!("benchmarking {}", image.reference));
            env.discard(&layout);
            r
        });
        match result {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("mount bench: {STACKED} failed: {e:#}");
                failures.push((STACKED_TITLE.to_string(), format!("{e:#}")));
            }
        }
        eprintln!(
            "mount bench: {STACKED} done in {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
    let md = markdown(&reports, &failures, runs)?;
    if runs == 0 {
        harness::write_report_of("mount", "mount-reads", &md)?;
    } else {
        harness::write_report("mount", &md)?;
    }
    drop(env);
    drop(reg);
    drop(tmpdir);
    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|f| f.0.as_str()).collect();
        bail!("the mount bench failed for {}", names.join(", "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The link: counter → shaping proxy → registry, in this process.

/// A byte-counting forwarder in front of a shaping proxy in front of the
/// registry, served by a runtime of its own; stopped when dropped.
struct Link {
    rt: Option<tokio::runtime::Runtime>,
    stop: watch::Sender<bool>,
    /// Where clients connect (the counter).
    addr: SocketAddr,
    /// Bytes delivered to clients (registry → client), HTTP headers included.
    down: Arc<AtomicU64>,
}

impl Link {
    fn start(registry: SocketAddr) -> Result<Link> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = watch::channel(false);
        let down = Arc::new(AtomicU64::new(0));
        let addr = rt.block_on(async {
            let shaper = TcpListener::bind("127.0.0.1:0").await?;
            let shaper_addr = shaper.local_addr()?;
            let shape = LinkShape::from_rtt_mbit(RTT_MS, MBIT);
            tokio::spawn(run_shaping_proxy(
                shaper,
                registry,
                shape,
                shape,
                stopped.clone(),
            ));
            let counter = TcpListener::bind("127.0.0.1:0").await?;
            let addr = counter.local_addr()?;
            tokio::spawn(run_counter(counter, shaper_addr, down.clone(), stopped));
            anyhow::Ok(addr)
        })?;
        Ok(Link {
            rt: Some(rt),
            stop,
            addr,
            down,
        })
    }

    fn bytes(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Forward every connection on `listener` to `upstream`, adding the bytes
/// that come back to `down`.
async fn run_counter(
    listener: TcpListener,
    upstream: SocketAddr,
    down: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let client = tokio::select! {
            a = listener.accept() => match a {
                Ok((c, _)) => c,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let down = down.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            };
            let back = async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    down.fetch_add(n as u64, Ordering::Relaxed);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, back);
        });
    }
}

// ---------------------------------------------------------------------------
// Running things.

struct Env {
    tmp: PathBuf,
    /// `BREAKFS_RUN_DIR` of every breakfs command (status records).
    run_dir: PathBuf,
    /// The registry, direct (for pushing).
    registry: String,
    link: Link,
}

impl Env {
    fn breakfs(&self) -> Command {
        let mut c = Command::new(BREAKFS);
        c.env("BREAKFS_RUN_DIR", &self.run_dir)
            .env_remove("BREAKFS_STORE")
            .stdin(Stdio::null());
        c
    }

    /// `docker://COUNTER/REPO` : the image as seen through the slow link.
    fn remote(&self, repo: &str) -> String {
        format!("docker://{}/{repo}", self.link.addr)
    }

    /// A new, empty directory under the temp dir.
    fn fresh(&self, name: &str) -> Result<PathBuf> {
        let p = self.tmp.join(name);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    /// Remove a directory under the temp dir, unless something is mounted in it.
    fn discard(&self, p: &Path) {
        if !mounted_under(p) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn secs_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Run the image's command in a chroot of an overlayfs over `lower` (upper
/// and work dirs on a tmpfs), all in new mount and pid namespaces: the
/// overlay and the tmpfs go away with the namespace, before the caller
/// unmounts `lower`.
fn run_overlay(lower: &Path, scratch: &Path, command: &[String]) -> Result<()> {
    const SCRIPT: &str = r#"set -e
mount -t tmpfs tmpfs "$2"
mkdir "$2/upper" "$2/work"
mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$3"
mount -t proc proc "$3/proc"
root="$3"
shift 3
cd /
exec chroot "$root" "$@""#;
    let rw = scratch.join("rw");
    let root = scratch.join("root");
    std::fs::create_dir_all(&rw)?;
    std::fs::create_dir_all(&root)?;
    run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args(["sh", "-c", SCRIPT, "sh"])
            .arg(lower)
            .arg(&rw)
            .arg(&root)
            .args(command)
            .env_clear()
            .env("PATH", IMAGE_PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8"),
        &format!(
            "{command:?} in a chroot of an overlay on {}",
            lower.display()
        ),
    )
    .map(|_| ())
}

/// A live `breakfs mount`; unmounted (`breakfs umount`, then by force if
/// that fails) when dropped.
struct Mounted<'a> {
    env: &'a Env,
    mountpoint: PathBuf,
    pid: u32,
    done: bool,
}

impl<'a> Mounted<'a> {
    fn mount(
        env: &'a Env,
        reference: &str,
        cache: &Path,
        mountpoint: &Path,
        hydrate: bool,
    ) -> Result<Mounted<'a>> {
        Mounted::mount_with(env, reference, cache, mountpoint, hydrate, &[])
    }

    /// [`Mounted::mount`] with `vars` in the mount's environment.
    fn mount_with(
        env: &'a Env,
        reference: &str,
        cache: &Path,
        mountpoint: &Path,
        hydrate: bool,
        vars: &[(&str, &str)],
    ) -> Result<Mounted<'a>> {
        let mut cmd = env.breakfs();
        cmd.envs(vars.iter().copied());
        cmd.arg("mount")
            .arg("--cache")
            .arg(cache)
            .arg("--plain-http");
        if !hydrate {
            cmd.arg("--no-hydrate");
        }
        cmd.arg(reference).arg(mountpoint);
        let mountpoint = mountpoint.canonicalize()?;
        let result = run(&mut cmd, &format!("breakfs mount {reference}"));
        // Guard the mount even if the command failed half-way.
        let mut m = Mounted {
            env,
            mountpoint,
            pid: 0,
            done: false,
        };
        result?;
        m.pid = m.status()?["pid"]
            .as_u64()
            .ok_or_else(|| anyhow!("the status record of {} has no pid", reference))?
            as u32;
        Ok(m)
    }

    /// The mount's status record (`breakfs status --json`).
    fn status(&self) -> Result<serde_json::Value> {
        let out = run(
            self.env
                .breakfs()
                .args(["status", "--json"])
                .arg(&self.mountpoint),
            "breakfs status --json",
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// A status record written after `t` (they are written every second).
    fn status_after(&self, t: SystemTime) -> Result<serde_json::Value> {
        let t = t.duration_since(UNIX_EPOCH)?.as_secs();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status()?;
            if s["updated"].as_u64().is_some_and(|u| u > t) {
                return Ok(s);
            }
            ensure!(
                Instant::now() < until,
                "the status record of {} is not updated",
                self.mountpoint.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resident memory of the mount process, in bytes.
    fn rss(&self) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{}/status", self.pid))?;
        Ok(kb * 1024)
    }

    /// Poll the status record until it says hydrated; that record.
    fn wait_hydrated(&self, limit: Duration) -> Result<serde_json::Value> {
        let until = Instant::now() + limit;
        loop {
            let s = self.status()?;
            if s["hydrated"].as_bool() == Some(true) {
                return Ok(s);
            }
            ensure!(
                Instant::now() < until,
                "{} was not hydrated after {}s: {} of {} bytes",
                self.mountpoint.display(),
                limit.as_secs(),
                s["hydrated_bytes"],
                s["chunk_bytes"]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn umount(mut self) -> Result<()> {
        self.done = true;
        self.force_umount()
    }

    fn force_umount(&mut self) -> Result<()> {
        let r = run(
            self.env.breakfs().arg("umount").arg(&self.mountpoint),
            "breakfs umount",
        );
        // `breakfs umount` returns once the path is unmounted; the mount
        // process exits just after (later still on a loaded machine).
        let until = Instant::now() + Duration::from_secs(10);
        while r.is_ok() && self.alive() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !is_mountpoint(&self.mountpoint) && !self.alive() {
            return r.map(|_| ());
        }
        if self.alive() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        if is_mountpoint(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        bail!(
            "breakfs umount {} left the mount or its process (pid {}) behind: {r:?}",
            self.mountpoint.display(),
            self.pid
        )
    }

    fn alive(&self) -> bool {
        self.pid != 0 && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.force_umount();
        }
    }
}

/// Bytes fetched from registries, by the mount's own counters.
fn fetched_by_sources(status: &serde_json::Value) -> u64 {
    status["fetch"]["sources"]
        .as_object()
        .map(|m| m.values().filter_map(|s| s["bytes"].as_u64()).sum())
        .unwrap_or(0)
}

/// Bytes of the eStargz TOC members and footers of the layers: the least
/// a mount must fetch to show the tree.
fn toc_bytes(layout: &Path, layers: &[(String, u64)]) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut total = 0;
    for (digest, size) in layers {
        let mut f = std::fs::File::open(blob_path(layout, digest)?)?;
        let mut want = (64 * 1024).min(*size);
        loop {
            let mut tail = vec![0u8; want as usize];
            f.seek(SeekFrom::Start(size - want))?;
            f.read_exact(&mut tail)?;
            match breakfs_index::Toc::read_from_blob_tail(&tail, *size)
                .with_context(|| format!("reading the TOC of {digest}"))?
            {
                breakfs_index::TailRead::Toc(t) => {
                    total += size - t.toc_offset;
                    break;
                }
                breakfs_index::TailRead::NeedTail(n) if n > want && n <= *size => want = n,
                breakfs_index::TailRead::NeedTail(n) => {
                    bail!("layer {digest} asks for a {n}-byte tail of {size} bytes")
                }
            }
        }
    }
    Ok(total)
}

/// Bytes of the files in `dir` (not recursive).
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

/// The load average over 1, 5 and 15 minutes.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

/// The cargo profile this bench was built with (its target directory).
fn build_profile() -> &'static str {
    match std::env::current_exe() {
        Ok(p) if p.components().any(|c| c.as_os_str() == "release") => "release",
        Ok(_) => "dev",
        Err(_) => "?",
    }
}

fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"), "sync")?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// What a walk read: bytes of regular files, regular files, all entries.
#[derive(Default, Clone, Copy)]
struct Walked {
    bytes: u64,
    files: u64,
    entries: u64,
}

/// Read every regular file under `root` fully with a 1 MiB buffer, without
/// following symlinks.
fn read_tree(root: &Path) -> Result<Walked> {
    let mut w = Walked::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            w.entries += 1;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let p = e.path();
                let mut f =
                    std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                loop {
                    let n = f
                        .read(&mut buf)
                        .with_context(|| format!("reading {}", p.display()))?;
                    if n == 0 {
                        break;
                    }
                    w.bytes += n as u64;
                }
                w.files += 1;
            }
        }
    }
    Ok(w)
}

/// Read speeds of one tree: median MB/s cold and warm, and what it read.
struct Speed {
    cold: f64,
    warm: f64,
    walked: Walked,
}

/// Read each tree of `roots` `READ_ROUNDS` times cold (caches dropped
/// before), each followed by `WARM_READS` warm reads, the trees taking
/// turns round by round so that all see the same load: median MB/s of
/// each kind per tree (a warm read takes tens of milliseconds, so one
/// alone is noisy).
fn read_speeds(roots: &[&Path]) -> Result<Vec<Speed>> {
    let mut cold = vec![Vec::new(); roots.len()];
    let mut warm = vec![Vec::new(); roots.len()];
    let mut walked = vec![Walked::default(); roots.len()];
    for _ in 0..READ_ROUNDS {
        for (i, root) in roots.iter().enumerate() {
            drop_caches()?;
            let t = Instant::now();
            let c = read_tree(root)?;
            cold[i].push(c.bytes as f64 / 1e6 / secs_since(t));
            for _ in 0..WARM_READS {
                let t = Instant::now();
                let w = read_tree(root)?;
                warm[i].push(w.bytes as f64 / 1e6 / secs_since(t));
                ensure!(
                    c.bytes == w.bytes,
                    "{} read {} bytes cold but {} warm",
                    root.display(),
                    c.bytes,
                    w.bytes
                );
            }
            walked[i] = c;
        }
    }
    Ok((0..roots.len())
        .map(|i| Speed {
            cold: median(&cold[i]),
            warm: median(&warm[i]),
            walked: walked[i],
        })
        .collect())
}

// ---------------------------------------------------------------------------
// The stacked image.

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The manifest and config of `tag` in an OCI layout.
fn layout_image(layout: &Path, tag: &str) -> Result<(serde_json::Value, serde_json::Value)> {
    let manifest = harness::layout_manifest(layout, tag)?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(blob_path(
        layout,
        manifest["config"]["digest"].as_str().unwrap_or_default(),
    )?)?)?;
    Ok((manifest, config))
}

/// Write `data` as a blob of `layout`; its descriptor's digest and size.
fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, u64)> {
    use sha2::Digest as _;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
    std::fs::write(blob_path(layout, &digest)?, data)?;
    Ok((digest, data.len() as u64))
}

/// Stack the layers of `images` into one OCI image (bottom first, image
/// after image, skipping a layer whose digest is already in the stack) in
/// a new layout under the temp dir, its layer blobs hard-linked (or copied)
/// from the sources; the image (no command: it has no single one) and the
/// layout directory.
fn stack_images(env: &Env, images: &[CorpusImage]) -> Result<(CorpusImage, PathBuf)> {
    use serde_json::json;
    let started = Instant::now();
    let layout = env.fresh(&format!("{STACKED}-layout"))?;
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut history = Vec::new();
    let mut layers = Vec::new();
    let mut packages = Vec::new();
    let mut created = String::new();
    let mut families = Vec::new();
    for image in images {
        let (manifest, config) = layout_image(&image.layout, &image.tag)
            .with_context(|| format!("reading {}", image.reference))?;
        let descs = manifest["layers"].as_array().cloned().unwrap_or_default();
        let ids = config["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            !descs.is_empty() && descs.len() == ids.len(),
            "{}: {} layers but {} diff_ids",
            image.reference,
            descs.len(),
            ids.len()
        );
        // The history entries of the layers (empty-layer steps left out).
        let steps: Vec<&serde_json::Value> = config["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["empty_layer"].as_bool() != Some(true))
            .collect();
        let when = config["created"].as_str().unwrap_or_default();
        if when > created.as_str() {
            created = when.to_string();
        }
        for (i, (desc, diff_id)) in descs.iter().zip(&ids).enumerate() {
            let digest = desc["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("{}: a layer has no digest", image.reference))?;
            if descriptors
                .iter()
                .any(|d: &serde_json::Value| d["digest"] == digest)
            {
                continue;
            }
            let (src, dst) = (
                blob_path(&image.layout, digest)?,
                blob_path(&layout, digest)?,
            );
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst)
                    .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            }
            descriptors.push(json!({
                "mediaType": desc["mediaType"],
                "digest": digest,
                "size": desc["size"],
            }));
            diff_ids.push(diff_id.clone());
            let mut info = image
                .layers
                .iter()
                .find(|l| l.digest == digest)
                .cloned()
                .ok_or_else(|| anyhow!("{}: no layer info for {digest}", image.reference))?;
            info.name = format!("{}/{}", image.family, info.name);
            history.push(json!({
                "created": steps.get(i).map_or(json!(when), |h| h["created"].clone()),
                "created_by": steps.get(i).map_or(json!(""), |h| h["created_by"].clone()),
                "comment": format!("breakfs mount bench: layer {} of {} {}", i + 1, image.family, image.tag),
            }));
            layers.push(info);
        }
        packages.extend(image.packages.iter().cloned());
        families.push(image.family);
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Env": [format!("PATH={IMAGE_PATH}")],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let (config_digest, config_size) = write_blob(&layout, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = write_blob(&layout, &serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": STACKED},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    // Valid for the tools: skopeo reads it back as we wrote it (the umoci
    // unpack of the read-speed comparison then checks every diff_id).
    let reference = format!("oci:{}:{STACKED}", layout.display());
    let inspected: serde_json::Value = serde_json::from_str(&run(
        Command::new("skopeo").arg("inspect").arg(&reference),
        "skopeo inspect of the stacked image",
    )?)?;
    let seen: Vec<&str> = inspected["Layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .collect();
    let wrote: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    ensure!(
        seen == wrote && inspected["Architecture"] == "amd64" && inspected["Os"] == "linux",
        "skopeo inspect of {reference} does not show the image written: {inspected}"
    );
    let image = CorpusImage {
        family: STACKED,
        build: Build::V1,
        layout: layout.clone(),
        tag: STACKED.to_string(),
        reference,
        command: Vec::new(),
        packages,
        manifest_digest,
        layers,
        removed: Vec::new(),
        opaque_dir: String::new(),
        xattr_path: String::new(),
        xattr_name: String::new(),
        xattr_value: Vec::new(),
        build_seconds: secs_since(started),
        cache_hit: false,
    };
    eprintln!(
        "mount bench: {STACKED}: stacked {} layers of {} ({:.1} MB) in {:.1}s",
        image.layers.len(),
        families.join(", "),
        mb(image.compressed_size()),
        image.build_seconds
    );
    Ok((image, layout))
}

// ---------------------------------------------------------------------------
// One image.

/// One deployment run: total seconds, its parts, bytes over the link.
#[derive(Clone)]
struct Deploy {
    total: f64,
    parts: Vec<(&'static str, f64)>,
    fetched: u64,
    /// For mounts, from the status record after the command: reads that
    /// waited for a fetch, and range requests made.
    waits: Option<(u64, u64)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Baseline,
    Mount,
    MountNoHydrate,
    Pull,
    MountOriginal,
}

impl Way {
    const ALL: [Way; 5] = [
        Way::Baseline,
        Way::Mount,
        Way::MountNoHydrate,
        Way::Pull,
        Way::MountOriginal,
    ];

    fn label(self) -> &'static str {
        match self {
            Way::Baseline => "baseline: skopeo copy (original) + umoci unpack + command",
            Way::Mount => "breakfs mount (refactored) + overlayfs + command",
            Way::MountNoHydrate => "breakfs mount --no-hydrate (refactored) + overlayfs + command",
            Way::Pull => "breakfs pull --extract (refactored) + command",
            Way::MountOriginal => {
                "breakfs mount (original, whole gzip layers) + overlayfs + command"
            }
        }
    }

    fn target(self) -> Option<f64> {
        match self {
            Way::Mount => Some(0.35),
            Way::Pull => Some(0.8),
            _ => None,
        }
    }
}

struct Report {
    /// The summary's name of the image, and its section's title.
    family: String,
    title: String,
    original_size: u64,
    original_layers: usize,
    refactored_size: u64,
    refactored_layers: usize,
    refactor_seconds: f64,
    /// TOC members and footers of the refactored layers.
    toc_bytes: u64,
    // Laziness.
    tree_seconds: f64,
    tree_bytes: u64,
    ls_seconds: f64,
    ls_bytes: u64,
    ls_source_bytes: u64,
    lazy_paths: u64,
    lazy_layers: u64,
    // Deployment, per way.
    deploys: Vec<(Way, Vec<Deploy>)>,
    // Read speed.
    hydrate_seconds: f64,
    entries: u64,
    file_bytes: u64,
    rss_hydrated: u64,
    rss_after_reads: u64,
    /// Reads that reached breakfs from the read-speed mount.
    daemon_reads: u64,
    /// Its files pushed into the page cache ahead of the walks, their
    /// bytes, and pushes the kernel missed (fs/src/push.rs).
    pushed_files: u64,
    pushed_bytes: u64,
    pushes_missed: u64,
    /// The same mount with pushes off (`BREAKFS_PUSH=0`): reads that
    /// reached breakfs, MB/s cold and warm.
    nopush_daemon_reads: u64,
    nopush_cold: f64,
    nopush_warm: f64,
    /// The passthrough mount: opens passed through to backing files, reads
    /// that reached breakfs, MB/s cold and warm.
    passthrough_opens: u64,
    passthrough_daemon_reads: u64,
    passthrough_cold: f64,
    passthrough_warm: f64,
    /// The load average (1, 5, 15 min) before the read walks and after.
    read_load: String,
    /// Chunk bytes in the passthrough mount's store beyond the image's own
    /// chunks: the whole-file copies that back big files.
    whole_copies: u64,
    mount_cold: f64,
    mount_warm: f64,
    local_cold: f64,
    local_warm: f64,
    read_bytes: u64,
    read_files: u64,
    /// Entries (every kind) the walks met in the mount and in the rootfs.
    read_entries: u64,
    local_entries: u64,
    local_files: u64,
}

/// Benchmark `image`, named `name` in the report's summary and `title` in
/// its section, with `runs` deployment runs per way (0: no deployments).
fn bench_image(
    env: &Env,
    image: &CorpusImage,
    name: &str,
    title: &str,
    runs: usize,
) -> Result<Report> {
    let fam = image.family;
    let orig_repo = format!("bench/{fam}:original");
    let ref_repo = format!("bench/{fam}:estargz");

    // Publish both forms, directly (not through the link).
    eprintln!("mount bench: {fam}: pushing the original and the refactored image");
    run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(&image.reference)
            .arg(format!("docker://{}/{orig_repo}", env.registry)),
        "skopeo copy of the original to the registry",
    )?;
    let layout = env.fresh(&format!("{fam}-refactored"))?;
    let work = env.tmp.join(format!("{fam}-work"));
    let t = Instant::now();
    run(
        env.breakfs()
            .args(["refactor", "--work-dir"])
            .arg(&work)
            .arg("--to")
            .arg(format!("oci:{}", layout.display()))
            .arg(&image.reference),
        "breakfs refactor",
    )?;
    let refactor_seconds = secs_since(t);
    env.discard(&work);
    let layers = layout_layers(&layout, &image.tag)?;
    let refactored_size = layers.iter().map(|l| l.1).sum();
    let refactored_layers = layers.len();
    let toc_bytes = toc_bytes(&layout, &layers)?;
    run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{}", layout.display(), image.tag))
            .arg(format!("docker://{}/{ref_repo}", env.registry)),
        "skopeo copy of the refactored image to the registry",
    )?;
    let orig_remote = env.remote(&orig_repo);
    let ref_remote = env.remote(&ref_repo);

    // Laziness: a --no-hydrate mount, then ls -lR.
    eprintln!("mount bench: {fam}: laziness");
    let cache = env.fresh(&format!("{fam}-lazy-cache"))?;
    let mnt = env.fresh(&format!("{fam}-lazy-mnt"))?;
    let b0 = env.link.bytes();
    let t = Instant::now();
    let m = Mounted::mount(env, &ref_remote, &cache, &mnt, false)?;
    let tree_seconds = secs_since(t);
    let tree_bytes = env.link.bytes() - b0;
    let t = Instant::now();
    run(
        Command::new("ls")
            .arg("-lR")
            .arg(&mnt)
            .stdout(Stdio::null()),
        "ls -lR of the mount",
    )?;
    let ls_seconds = secs_since(t);
    let ls_bytes = env.link.bytes() - b0;
    let st = m.status_after(SystemTime::now())?;
    let ls_source_bytes = fetched_by_sources(&st);
    let lazy_paths = st["paths"].as_u64().unwrap_or(0);
    let lazy_layers = st["lazy_layers"].as_u64().unwrap_or(0);
    m.umount()?;
    env.discard(&cache);
    env.discard(&mnt);

    // Deployment: the ways interleaved, run by run.
    let mut deploys: Vec<(Way, Vec<Deploy>)> = Way::ALL
        .iter()
        .filter(|_| runs > 0)
        .map(|&w| (w, Vec::new()))
        .collect();
    for r in 0..runs {
        for (way, results) in deploys.iter_mut() {
            let d = deploy(env, image, *way, &orig_remote, &ref_remote)
                .with_context(|| format!("deployment run {} of {:?}", r + 1, way.label()))?;
            eprintln!(
                "mount bench: {fam}: run {}: {}: {:.2}s ({:.1} MB over the link)",
                r + 1,
                way.label(),
                d.total,
                d.fetched as f64 / 1e6
            );
            results.push(d);
        }
    }

    // Read speed: a hydrated mount against the unpacked rootfs, read in
    // turns.
    eprintln!("mount bench: {fam}: read speed");
    // A rootfs no command has run in (python writes __pycache__ files).
    let bundle = env.tmp.join(format!("{fam}-bundle"));
    run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{}", image.layout.display(), image.tag))
            .arg(&bundle),
        "umoci unpack",
    )?;
    let cache = env.fresh(&format!("{fam}-read-cache"))?;
    let mnt = env.fresh(&format!("{fam}-read-mnt"))?;
    let t = Instant::now();
    let m = Mounted::mount(env, &ref_remote, &cache, &mnt, true)?;
    let st = m.wait_hydrated(HYDRATION_LIMIT)?;
    let hydrate_seconds = secs_since(t);
    let entries = st["paths"].as_u64().unwrap_or(0);
    let file_bytes = st["file_bytes"].as_u64().unwrap_or(0);
    let chunk_bytes = st["chunk_bytes"].as_u64().unwrap_or(0);
    let rss_hydrated = m.rss()?;
    // The same image with FUSE passthrough (docs/reads.md), from a copy of
    // the hydrated store: nothing to fetch, only its whole-file copies to
    // write.
    let (cache_pt, mnt_pt, m_pt) = mount_copy(
        env,
        &ref_remote,
        &cache,
        &format!("{fam}-read-pt"),
        ("BREAKFS_PASSTHROUGH", "1"),
    )?;
    // And with pushes into the page cache off, as before them.
    let (cache_np, mnt_np, m_np) = mount_copy(
        env,
        &ref_remote,
        &cache,
        &format!("{fam}-read-np"),
        ("BREAKFS_PUSH", "0"),
    )?;
    let whole_copies = dir_bytes(&cache_pt.join("chunks/sha256"))?.saturating_sub(chunk_bytes);
    let load_before = load_average();
    let speeds = read_speeds(&[&mnt, &mnt_pt, &mnt_np, &bundle.join("rootfs")])?;
    let read_load = format!("{load_before} → {}", load_average());
    let (mount, pt, np, local) = (&speeds[0], &speeds[1], &speeds[2], &speeds[3]);
    let (mount_cold, mount_warm, walked_mount) = (mount.cold, mount.warm, mount.walked);
    let (local_cold, local_warm, walked_local) = (local.cold, local.warm, local.walked);
    let rss_after_reads = m.rss()?;
    let st = m.status_after(SystemTime::now())?;
    let daemon_reads = st["reads"]["reads_local"].as_u64().unwrap_or(0)
        + st["reads"]["reads_waited"].as_u64().unwrap_or(0);
    let pushed_files = st["reads"]["pushed_files"].as_u64().unwrap_or(0);
    let pushed_bytes = st["reads"]["pushed_bytes"].as_u64().unwrap_or(0);
    let pushes_missed = st["reads"]["pushes_missed"].as_u64().unwrap_or(0);
    let st = m_np.status_after(SystemTime::now())?;
    let nopush_daemon_reads = st["reads"]["reads_local"].as_u64().unwrap_or(0)
        + st["reads"]["reads_waited"].as_u64().unwrap_or(0);
    let st = m_pt.status_after(SystemTime::now())?;
    let passthrough_opens = st["reads"]["passthrough_opens"].as_u64().unwrap_or(0);
    let passthrough_daemon_reads = st["reads"]["reads_local"].as_u64().unwrap_or(0)
        + st["reads"]["reads_waited"].as_u64().unwrap_or(0);
    m.umount()?;
    m_pt.umount()?;
    m_np.umount()?;
    env.discard(&cache_np);
    env.discard(&mnt_np);
    env.discard(&cache);
    env.discard(&mnt);
    env.discard(&cache_pt);
    env.discard(&mnt_pt);
    ensure!(
        np.walked.bytes == walked_local.bytes,
        "the mount of {fam} without pushes read {} bytes, its unpacked rootfs {}",
        np.walked.bytes,
        walked_local.bytes
    );
    ensure!(
        pt.walked.bytes == walked_local.bytes,
        "the passthrough mount of {fam} read {} bytes, its unpacked rootfs {}",
        pt.walked.bytes,
        walked_local.bytes
    );
    ensure!(
        walked_mount.bytes == walked_local.bytes,
        "the mount of {fam} holds {} bytes in {} files, its unpacked rootfs {} bytes in {} files",
        walked_mount.bytes,
        walked_mount.files,
        walked_local.bytes,
        walked_local.files
    );
    env.discard(&bundle);
    env.discard(&layout);

    Ok(Report {
        family: name.to_string(),
        title: title.to_string(),
        original_size: image.compressed_size(),
        original_layers: image.layers.len(),
        refactored_size,
        refactored_layers,
        refactor_seconds,
        toc_bytes,
        tree_seconds,
        tree_bytes,
        ls_seconds,
        ls_bytes,
        ls_source_bytes,
        lazy_paths,
        lazy_layers,
        deploys,
        hydrate_seconds,
        entries,
        file_bytes,
        rss_hydrated,
        rss_after_reads,
        passthrough_opens,
        daemon_reads,
        pushed_files,
        pushed_bytes,
        pushes_missed,
        nopush_daemon_reads,
        nopush_cold: np.cold,
        nopush_warm: np.warm,
        passthrough_daemon_reads,
        passthrough_cold: pt.cold,
        passthrough_warm: pt.warm,
        read_load,
        whole_copies,
        mount_cold,
        mount_warm,
        local_cold,
        local_warm,
        read_bytes: walked_mount.bytes,
        read_files: walked_mount.files,
        read_entries: walked_mount.entries,
        local_entries: walked_local.entries,
        local_files: walked_local.files,
    })
}

/// A mount of `reference` from a copy of the hydrated store `cache`, with
/// `var` in its environment, hydrated: the copy, the mountpoint, the mount.
fn mount_copy<'a>(
    env: &'a Env,
    reference: &str,
    cache: &Path,
    name: &str,
    var: (&str, &str),
) -> Result<(PathBuf, PathBuf, Mounted<'a>)> {
    let copy = env.fresh(&format!("{name}-cache"))?;
    run(
        Command::new("cp").arg("-a").arg(cache.join(".")).arg(&copy),
        "copying the hydrated store",
    )?;
    let mnt = env.fresh(&format!("{name}-mnt"))?;
    let m = Mounted::mount_with(env, reference, &copy, &mnt, true, &[var])?;
    m.wait_hydrated(HYDRATION_LIMIT)?;
    Ok((copy, mnt, m))
}

/// One deployment of `image` the given way, from a fresh cache.
fn deploy(
    env: &Env,
    image: &CorpusImage,
    way: Way,
    orig_remote: &str,
    ref_remote: &str,
) -> Result<Deploy> {
    let fam = image.family;
    let b0 = env.link.bytes();
    let dir = env.fresh(&format!("{fam}-deploy"))?;
    let mut parts = Vec::new();
    let start = Instant::now();
    match way {
        Way::Baseline => {
            let oci = dir.join("oci");
            run(
                Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(orig_remote)
                    .arg(format!("oci:{}:{}", oci.display(), image.tag)),
                "skopeo copy from the registry",
            )?;
            parts.push(("skopeo copy", secs_since(start)));
            let t = Instant::now();
            let bundle = dir.join("bundle");
            run(
                Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:{}", oci.display(), image.tag))
                    .arg(&bundle),
                "umoci unpack",
            )?;
            parts.push(("umoci unpack", secs_since(t)));
            let t = Instant::now();
            run_chroot(&bundle.join("rootfs"), &image.command)?;
            parts.push(("command", secs_since(t)));
        }
        Way::Mount | Way::MountNoHydrate | Way::MountOriginal => {
            let cache = dir.join("cache");
            let mnt = dir.join("mnt");
            std::fs::create_dir_all(&mnt)?;
            let reference = if way == Way::MountOriginal {
                orig_remote
            } else {
                ref_remote
            };
            let m = Mounted::mount(env, reference, &cache, &mnt, way != Way::MountNoHydrate)?;
            parts.push(("mount ready", secs_since(start)));
            let t = Instant::now();
            run_overlay(&m.mountpoint, &dir.join("overlay"), &image.command)?;
            parts.push(("command", secs_since(t)));
            let total = secs_since(start);
            let fetched = env.link.bytes() - b0;
            let st = m.status_after(SystemTime::now())?;
            let requests = st["fetch"]["sources"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s["requests"].as_u64()).sum())
                .unwrap_or(0);
            let waited = st["reads"]["reads_waited"].as_u64().unwrap_or(0);
            m.umount()?;
            env.discard(&dir);
            return Ok(Deploy {
                total,
                parts,
                fetched,
                waits: Some((waited, requests)),
            });
        }
        Way::Pull => {
            let rootfs = dir.join("rootfs");
            run(
                env.breakfs()
                    .arg("pull")
                    .arg("--extract")
                    .arg(&rootfs)
                    .arg("--cache")
                    .arg(dir.join("cache"))
                    .arg("--plain-http")
                    .arg(ref_remote),
                "breakfs pull --extract",
            )?;
            parts.push(("pull --extract", secs_since(start)));
            let t = Instant::now();
            run_chroot(&rootfs, &image.command)?;
            parts.push(("command", secs_since(t)));
        }
    }
    let total = secs_since(start);
    let fetched = env.link.bytes() - b0;
    env.discard(&dir);
    Ok(Deploy {
        total,
        parts,
        fetched,
        waits: None,
    })
}

// ---------------------------------------------------------------------------
// The report.

fn check(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}

/// `a / b` to two decimals, or a dash where there is nothing to compare.
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "—".to_string()
    }
}

/// The acceptance bound on the mount process's RSS for an image of
/// `RSS_BIG_ENTRIES` entries or more.
const RSS_BIG_ENTRIES: u64 = 10_000;
const RSS_LIMIT_MB: f64 = 100.0;
/// Read speed of a hydrated mount against a local rootfs: with the page
/// cache dropped, and warm.
const COLD_TARGET: f64 = 0.9;
const WARM_TARGET: f64 = 1.0;

/// The report: `reports` in order, then `failures` (image, error).
fn markdown(reports: &[Report], failures: &[(String, String)], runs: usize) -> Result<String> {
    let mut md = String::new();
    let Machine {
        cores, cpu, kernel, ..
    } = Machine::this();
    writeln!(
        md,
        "Machine: {} cores ({cpu}), Linux {}. Link: docker-registry on loopback behind \
         breakfs's shaping proxy, {RTT_MS} ms RTT and {MBIT} Mbit/s each way (shared by all \
         connections), with a byte counter in front; every fetch below crosses it. Built with \
         the `{}` profile. {}\n",
        cores,
        kernel,
        build_profile(),
        if runs == 0 {
            "No deployments in this run (`--runs 0`): laziness, reads and RSS only.".to_string()
        } else {
            format!(
                "Deployments: median of {runs} runs, fresh cache each run, the ways interleaved."
            )
        }
    )?;

    writeln!(md, "#### Summary\n")?;
    writeln!(
        md,
        "| family | entries | at tree | after ls -lR | mount / baseline | (--no-hydrate) | pull / baseline | read cold | read warm | (no push cold / warm) | (passthrough cold / warm) | RSS MB |"
    )?;
    writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in reports {
        let base = r.median(Way::Baseline);
        writeln!(
            md,
            "| {} | {} | {:.1}% | {:.1}% | {} | {} | {} | {} | {} | {} / {} | {} / {} | {:.0} |",
            r.family,
            r.entries,
            r.pct(r.tree_bytes),
            r.pct(r.ls_bytes),
            ratio(r.median(Way::Mount), base),
            ratio(r.median(Way::MountNoHydrate), base),
            ratio(r.median(Way::Pull), base),
            ratio(r.mount_cold, r.local_cold),
            ratio(r.mount_warm, r.local_warm),
            ratio(r.nopush_cold, r.local_cold),
            ratio(r.nopush_warm, r.local_warm),
            ratio(r.passthrough_cold, r.local_cold),
            ratio(r.passthrough_warm, r.local_warm),
            mb(r.rss_hydrated.max(r.rss_after_reads))
        )?;
    }
    for (image, _) in failures {
        writeln!(md, "| {image} | failed (below) | | | | | | | | | | |")?;
    }
    writeln!(
        md,
        "\nTargets: fetched < 10% of the compressed image at tree and after ls -lR; mount / baseline ≤ 0.35; pull / baseline ≤ 0.8; read cold (page cache dropped) ≥ {COLD_TARGET} and warm ≥ {WARM_TARGET} of a local rootfs."
    )?;
    if reports.iter().any(|r| r.deploys.is_empty()) {
        writeln!(
            md,
            "\n{STACKED_TITLE}: the layers of the v1 images of all {} corpus families ({}) stacked into one image, bottom first, family after family; no deployments (it has no single command).",
            corpus::FAMILIES.len(),
            corpus::FAMILIES
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    match reports.iter().max_by_key(|r| r.entries) {
        Some(big) if big.entries >= RSS_BIG_ENTRIES => {
            let rss = mb(big.rss_hydrated.max(big.rss_after_reads));
            writeln!(
                md,
                "\nMount process RSS for an image of ≥ 10,000 entries ({}, {} entries): {:.1} MB hydrated, {:.1} MB after reading every file; target ≤ {RSS_LIMIT_MB:.0} MB {}.",
                big.family,
                big.entries,
                mb(big.rss_hydrated),
                mb(big.rss_after_reads),
                check(rss <= RSS_LIMIT_MB)
            )?;
        }
        Some(big) => {
            writeln!(
                md,
                "\nNo image of this run has 10,000 entries or more (largest: {} with {}, RSS {:.1} MB).",
                big.family,
                big.entries,
                mb(big.rss_hydrated.max(big.rss_after_reads))
            )?;
        }
        None => {}
    }

    for r in reports {
        writeln!(
            md,
            "\n#### {}: original {:.1} MB in {} layers; refactored {:.1} MB in {} layers ({} lazy; refactored in {:.1}s); {} entries, {:.1} MB of files\n",
            r.title,
            mb(r.original_size),
            r.original_layers,
            mb(r.refactored_size),
            r.refactored_layers,
            r.lazy_layers,
            r.refactor_seconds,
            r.entries,
            mb(r.file_bytes)
        )?;
        writeln!(md, "| measurement | result | ratio | target | |")?;
        writeln!(md, "|---|---|---:|---:|---|")?;
        writeln!(
            md,
            "| laziness: time to tree (mount --no-hydrate until it answers, {} paths) | {:.2} s | | | |",
            r.lazy_paths, r.tree_seconds
        )?;
        writeln!(
            md,
            "| laziness: fetched at tree | {:.2} MB | {:.1}% | < 10% | {} |",
            mb(r.tree_bytes),
            r.pct(r.tree_bytes),
            check(r.pct(r.tree_bytes) < 10.0)
        )?;
        writeln!(
            md,
            "| laziness: TOCs and footers of the {} layers (least a tree needs) | {:.2} MB | {:.1}% | | |",
            r.refactored_layers,
            mb(r.toc_bytes),
            r.pct(r.toc_bytes)
        )?;
        writeln!(
            md,
            "| laziness: `ls -lR` of the whole mount | {:.2} s | | | |",
            r.ls_seconds
        )?;
        writeln!(
            md,
            "| laziness: fetched after `ls -lR` (mount's own count: {:.2} MB) | {:.2} MB | {:.1}% | < 10% | {} |",
            mb(r.ls_source_bytes),
            mb(r.ls_bytes),
            r.pct(r.ls_bytes),
            check(r.pct(r.ls_bytes) < 10.0)
        )?;
        let base = r.median(Way::Baseline);
        if r.deploys.is_empty() {
            writeln!(
                md,
                "| deploy | not measured (no single command to run) | | | |"
            )?;
        }
        for (way, ds) in &r.deploys {
            let m = median(&ds.iter().map(|d| d.total).collect::<Vec<_>>());
            let runs: Vec<String> = ds.iter().map(|d| format!("{:.2}", d.total)).collect();
            let names: Vec<&str> = ds
                .first()
                .map(|d| d.parts.iter().map(|p| p.0).collect())
                .unwrap_or_default();
            let parts: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!(
                        "{n} {:.2}",
                        median(&ds.iter().map(|d| d.parts[i].1).collect::<Vec<_>>())
                    )
                })
                .collect();
            let fetched = median(&ds.iter().map(|d| d.fetched as f64).collect::<Vec<_>>());
            let waits = ds
                .iter()
                .filter_map(|d| d.waits)
                .next_back()
                .map(|(w, r)| {
                    format!("; last run: {w} reads waited for a fetch, {r} range requests by then")
                })
                .unwrap_or_default();
            let (ratio, target, ok) = match way.target() {
                _ if *way == Way::Baseline => (String::new(), String::new(), ""),
                Some(t) => (
                    format!("{:.2}", m / base),
                    format!("≤ {t}"),
                    check(m / base <= t),
                ),
                None => (format!("{:.2}", m / base), String::new(), ""),
            };
            writeln!(
                md,
                "| deploy: {} | **{m:.2} s** median (runs {}; {}; {:.1} MB over the link{waits}) | {ratio} | {target} | {ok} |",
                way.label(),
                runs.join(", "),
                parts.join(" + "),
                fetched / 1e6
            )?;
        }
        writeln!(
            md,
            "| read: hydrated mount (hydrated {:.1} s after mount start), caches dropped (median of {READ_ROUNDS}) | {:.0} MB/s | | | |",
            r.hydrate_seconds, r.mount_cold
        )?;
        writeln!(
            md,
            "| read: umoci-unpacked rootfs of the original, caches dropped | {:.0} MB/s | | | |",
            r.local_cold
        )?;
        writeln!(
            md,
            "| read: load average (1, 5, 15 min) before the walks → after | {} | | | |",
            r.read_load
        )?;
        writeln!(
            md,
            "| read cold: mount / local ({} files, {:.1} MB) | | {:.2} | ≥ {COLD_TARGET} | {} |",
            r.read_files,
            mb(r.read_bytes),
            r.mount_cold / r.local_cold,
            check(r.mount_cold / r.local_cold >= COLD_TARGET)
        )?;
        writeln!(
            md,
            "| read warm (median of {} reads right after the cold ones): mount {:.0} MB/s, local {:.0} MB/s | | {:.2} | ≥ {WARM_TARGET} | {} |",
            READ_ROUNDS * WARM_READS,
            r.mount_warm,
            r.local_warm,
            r.mount_warm / r.local_warm,
            check(r.mount_warm / r.local_warm >= WARM_TARGET)
        )?;
        writeln!(
            md,
            "| reads: reads served by breakfs (all the walks; a warm read reaches none) | {} | | | |",
            r.daemon_reads
        )?;
        writeln!(
            md,
            "| pushes: files pushed into the page cache ahead of the walks (MB), missed by the kernel | {} ({:.1} MB), {} | | | |",
            r.pushed_files,
            mb(r.pushed_bytes),
            r.pushes_missed
        )?;
        writeln!(
            md,
            "| read with `BREAKFS_PUSH=0` (same walks, in turns): cold mount / local, {:.0} MB/s; reads served by breakfs {} | | {:.2} | | |",
            r.nopush_cold,
            r.nopush_daemon_reads,
            r.nopush_cold / r.local_cold
        )?;
        writeln!(
            md,
            "| read with `BREAKFS_PUSH=0`: warm mount / local, {:.0} MB/s | | {:.2} | | |",
            r.nopush_warm,
            r.nopush_warm / r.local_warm
        )?;
        writeln!(
            md,
            "| read with `BREAKFS_PASSTHROUGH=1` (same walks, in turns): cold mount / local, {:.0} MB/s | | {:.2} | | |",
            r.passthrough_cold,
            r.passthrough_cold / r.local_cold
        )?;
        writeln!(
            md,
            "| read with `BREAKFS_PASSTHROUGH=1`: warm mount / local, {:.0} MB/s | | {:.2} | | |",
            r.passthrough_warm,
            r.passthrough_warm / r.local_warm
        )?;
        writeln!(
            md,
            "| passthrough: opens passed through to backing files / reads served by breakfs | {} / {} | | | |",
            r.passthrough_opens, r.passthrough_daemon_reads
        )?;
        writeln!(
            md,
            "| passthrough: whole-file copies backing files of several chunks (disk beyond the image's chunks) | {:.1} MB | {:.1}% of the files' bytes | | |",
            mb(r.whole_copies),
            100.0 * r.whole_copies as f64 / r.file_bytes.max(1) as f64
        )?;
        writeln!(
            md,
            "| entries: walk of the hydrated mount / of the umoci rootfs (files) | {} ({}) / {} ({}) | | equal | {} |",
            r.read_entries,
            r.read_files,
            r.local_entries,
            r.local_files,
            check(r.read_entries == r.local_entries && r.read_files == r.local_files)
        )?;
        let rss = mb(r.rss_hydrated.max(r.rss_after_reads));
        let (target, ok) = if r.entries >= RSS_BIG_ENTRIES {
            (
                format!("≤ {RSS_LIMIT_MB:.0} MB"),
                check(rss <= RSS_LIMIT_MB),
            )
        } else {
            (String::new(), "")
        };
        writeln!(
            md,
            "| mount process RSS ({} entries): hydrated / after the reads | {:.1} / {:.1} MB | | {target} | {ok} |",
            r.entries,
            mb(r.rss_hydrated),
            mb(r.rss_after_reads)
        )?;
    }
    for (image, error) in failures {
        writeln!(md, "\n#### {image}: failed\n\n```\n{error}\n```")?;
    }
    Ok(md)
}

impl Report {
    fn median(&self, way: Way) -> f64 {
        self.deploys
            .iter()
            .find(|(w, _)| *w == way)
            .map(|(_, ds)| median(&ds.iter().map(|d| d.total).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    }

    /// `bytes` as a percentage of the refactored image's compressed size.
    fn pct(&self, bytes: u64) -> f64 {
        100.0 * bytes as f64 / self.refactored_size.max(1) as f64
    }
}
