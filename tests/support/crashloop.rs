//! The crash loop: a real `breakfs node` with a small budget (so that it
//! evicts) and a paced background rate (so that hydration and prefetch
//! last), an image mounted through it and another prefetched, sometimes a
//! standalone `breakfs mount` process with a store of its own beside it;
//! readers on the mounts; then SIGKILL to the daemon, the mount process or
//! both at a random moment. After each kill: the dead mountpoint refuses a
//! new mount with a clear error, `breakfs verify` finds nothing corrupt in
//! either store, the restarted daemon's store holds no leftovers (opening
//! it removed them), and new mounts read every file exactly as `umoci
//! unpack` wrote it. Shared by the integration test (a few iterations)
//! and `cargo bench --bench crash` (many), which reports the figures.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

use super::tree::{self, CompareOptions};

/// An image to mount, with the tree `umoci unpack` makes of it.
pub struct Image {
    /// `docker://HOST/REPO:TAG`.
    pub reference: String,
    /// The tree to compare mounts with.
    pub expected: BTreeMap<String, tree::Node>,
}

/// How the loop runs.
pub struct Options {
    /// The breakfs binary.
    pub breakfs: PathBuf,
    /// `BREAKFS_RUN_DIR` (status records of the mounts).
    pub run_dir: PathBuf,
    /// A fresh directory for the stores, mountpoints and logs.
    pub dir: PathBuf,
    /// At least two images: one is mounted, another prefetched.
    pub images: Vec<Image>,
    /// Kills.
    pub iterations: usize,
    /// Seeds the choices (image, victim, moment).
    pub seed: u64,
    /// The node's --budget, in bytes.
    pub budget: u64,
    /// The node's --prefetch-rate.
    pub prefetch_rate: String,
    /// Kills land within this long after the mounts answer.
    pub max_delay: Duration,
    /// What tree comparisons leave out (paths eStargz adds).
    pub compare: CompareOptions,
}

impl Options {
    /// The loop as the suite and the benchmark run it: one image both
    /// refactored (`refactored`: eStargz, lazy chunks, kept ranges, layers
    /// assembled whole) and as built (`built`: plain gzip, whole blobs
    /// indexed into chunks), the same tree either way; a budget of 1.05
    /// times the image's compressed and uncompressed bytes (one image
    /// hydrated fits, parts of both do not: the node evicts as it
    /// prefetches the other); background work paced at 8 MiB/s (hydration
    /// and prefetch last seconds); kills within 2 s.
    #[allow(clippy::too_many_arguments)]
    pub fn one_image_two_forms(
        breakfs: PathBuf,
        run_dir: PathBuf,
        dir: PathBuf,
        refactored: &str,
        built: &str,
        expected: BTreeMap<String, tree::Node>,
        image_bytes: u64,
        iterations: usize,
        seed: u64,
    ) -> Options {
        Options {
            breakfs,
            run_dir,
            dir,
            images: [refactored, built]
                .into_iter()
                .map(|r| Image {
                    reference: r.to_string(),
                    expected: expected.clone(),
                })
                .collect(),
            iterations,
            seed,
            budget: image_bytes * 21 / 20,
            prefetch_rate: "8MiB".into(),
            max_delay: Duration::from_millis(2000),
            compare: CompareOptions {
                // What eStargz adds to a refactored image.
                ignore_paths: [
                    "stargz.index.json",
                    ".prefetch.landmark",
                    ".no.prefetch.landmark",
                ]
                .map(String::from)
                .to_vec(),
                ignore_root_mtime: true,
                ..CompareOptions::default()
            },
        }
    }
}

/// What the loop saw.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub iterations: usize,
    /// Kills by victim: `node`, `mount`, `node+mount`.
    pub victims: BTreeMap<&'static str, usize>,
    /// Kills by what was under way at that moment (a kill counts under
    /// each): `hydration`, `prefetch`, `eviction`, `mount hydration`, `idle`.
    pub phases: BTreeMap<&'static str, usize>,
    /// Layers the node evicted, over all its lives.
    pub evictions: u64,
    /// Temp files of killed processes found before a restart (removed by
    /// the next open).
    pub leftover_temps: usize,
    /// Other leftovers found before a restart (ranges of a layer just
    /// assembled whole).
    pub leftover_other: usize,
    /// Corrupt findings of `breakfs verify`, with where.
    pub corrupt: Vec<String>,
    /// Seconds of each `breakfs verify` of a killed store.
    pub verify_secs: Vec<f64>,
    /// Seconds from a kill until the restarted daemon serves a mount again.
    pub recover_secs: Vec<f64>,
    /// Seconds to read back a whole image after a restart.
    pub read_secs: Vec<f64>,
    /// Files compared with the original trees.
    pub files_compared: usize,
    /// Largest store seen right after a restart (at most the budget).
    pub max_store_after_restart: u64,
}

/// A seed from `BREAKFS_CRASH_SEED`, else from the clock (stated in every
/// failure, so that a failing run can be repeated).
pub fn seed_from_env() -> u64 {
    std::env::var("BREAKFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

struct Ctx<'a> {
    o: &'a Options,
    node_dir: PathBuf,
    node_cache: PathBuf,
    socket: PathBuf,
    solo_cache: PathBuf,
    node_point: PathBuf,
    solo_point: PathBuf,
}

impl Ctx<'_> {
    fn breakfs(&self) -> Command {
        let mut c = Command::new(&self.o.breakfs);
        c.env("BREAKFS_RUN_DIR", &self.o.run_dir)
            .env_remove("BREAKFS_STORE")
            .env_remove("BREAKFS_NODE")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&std::ffi::OsStr]) -> Result<String> {
        let out = self.breakfs().args(args).output()?;
        ensure!(
            out.status.success(),
            "breakfs {:?} failed ({}): {}{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_node(&self) -> Result<NodeProc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_dir.join("node.log"))?;
        let mut child = self
            .breakfs()
            .arg("node")
            .args(["--plain-http", "--listen", "127.0.0.1:0", "--cache"])
            .arg(&self.node_cache)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--budget", &self.o.budget.to_string()])
            .args(["--prefetch-rate", &self.o.prefetch_rate])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting breakfs node")?;
        let out = child.stdout.take().context("no stdout from breakfs node")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("BREAKFS-NODE-READY ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut node = NodeProc { child, url: None };
        node.url = rx.recv_timeout(Duration::from_secs(30)).ok();
        ensure!(
            node.url.is_some(),
            "the node daemon did not start; its log:\n{}",
            self.node_log()
        );
        Ok(node)
    }

    fn node_log(&self) -> String {
        let log = std::fs::read_to_string(self.node_dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn solo_log(&self) -> String {
        std::fs::read_dir(self.solo_cache.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// Mount through the node, or standalone on its own store.
    fn mount(&self, reference: &str, solo: bool) -> Result<()> {
        let out = self.mount_command(reference, solo)?.output()?;
        ensure!(
            out.status.success(),
            "breakfs mount {reference} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn mount_command(&self, reference: &str, solo: bool) -> Result<Command> {
        let (point, how): (&Path, Vec<String>) = if solo {
            let cache = self.solo_cache.display().to_string();
            (
                &self.solo_point,
                vec!["--standalone".into(), "--cache".into(), cache],
            )
        } else {
            let node = format!("unix:{}", self.socket.display());
            (&self.node_point, vec!["--node".into(), node])
        };
        std::fs::create_dir_all(point)?;
        let mut c = self.breakfs();
        c.args(["mount", "--plain-http"])
            .args(&how)
            .arg(reference)
            .arg(point);
        Ok(c)
    }

    fn status(&self, point: &Path) -> Result<serde_json::Value> {
        let out = self.run(&["status".as_ref(), "--json".as_ref(), point.as_os_str()])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Unmount, detaching a dead mount; the mountpoint is free after.
    fn unmount(&self, point: &Path) {
        let _ = self.breakfs().arg("umount").arg(point).output();
        if is_mountpoint(point) {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
    }

    /// `breakfs verify --json` of a store: its findings as (severity, path: reason).
    fn verify(&self, cache: &Path) -> Result<Vec<(String, String)>> {
        let out = self
            .breakfs()
            .args(["verify", "--json", "--cache"])
            .arg(cache)
            .output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "breakfs verify of {} printed no report ({}): {}",
                cache.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let findings: Vec<(String, String)> = report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                (
                    f["severity"].as_str().unwrap_or_default().to_string(),
                    format!(
                        "{}: {}",
                        f["path"].as_str().unwrap_or_default(),
                        f["reason"].as_str().unwrap_or_default()
                    ),
                )
            })
            .collect();
        let corrupt = findings.iter().any(|(s, _)| s == "corrupt");
        ensure!(
            corrupt != out.status.success(),
            "breakfs verify exited {} with {} corrupt findings",
            out.status,
            findings.iter().filter(|(s, _)| s == "corrupt").count()
        );
        Ok(findings)
    }

    /// Read every file of `image` through the mount at `point` and compare
    /// the tree with the original; the number of files.
    fn read_back(&self, point: &Path, image: &Image) -> Result<usize> {
        let got = tree::snapshot(point)?;
        let diff = tree::compare(&image.expected, &got, &self.o.compare);
        ensure!(
            diff.is_empty(),
            "the mount of {} differs from umoci unpack in {} places, first: {:?}",
            image.reference,
            diff.len(),
            &diff[..diff.len().min(5)]
        );
        Ok(got.values().filter(|n| n.kind == tree::Kind::File).count())
    }
}

struct NodeProc {
    child: Child,
    url: Option<String>,
}

impl NodeProc {
    fn url(&self) -> &str {
        self.url.as_deref().unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<String> {
        curl(&["-sSf", "--max-time", "10", &format!("{}{path}", self.url())])
    }

    fn metric(&self, name: &str) -> f64 {
        let page = self.get("/metrics").unwrap_or_default();
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl").args(args).output()?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_mountpoint(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p.to_string_lossy()))
}

/// Read files under `root` in a random order until `stop`, ignoring
/// errors (the mount dies under the readers).
fn spawn_reader(root: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut files = Vec::new();
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                match e.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(e.path()),
                    Ok(t) if t.is_file() => files.push(e.path()),
                    _ => {}
                }
            }
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        while !stop.load(Ordering::Relaxed) && !files.is_empty() {
            let f = &files[rng.random_range(..files.len())];
            let _ = std::fs::read(f);
        }
    })
}

/// Run the loop; fails at the first wrong byte, corrupt entry or stuck
/// step, naming the seed and the iteration.
pub fn run(o: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    ensure!(o.images.len() >= 2, "the crash loop needs two images");
    let ctx = Ctx {
        o,
        node_dir: o.dir.join("node"),
        node_cache: o.dir.join("node/cache"),
        socket: o.dir.join("node/node.sock"),
        solo_cache: o.dir.join("solo-cache"),
        node_point: o.dir.join("mnt-node"),
        solo_point: o.dir.join("mnt-solo"),
    };
    std::fs::create_dir_all(&ctx.node_dir)?;
    let mut report = Report {
        seed: o.seed,
        ..Report::default()
    };
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let mut node = ctx.start_node()?;
    let result = (|| -> Result<()> {
        for i in 0..o.iterations {
            iteration(&ctx, &mut node, &mut rng, &mut report)
                .with_context(|| format!("crash loop iteration {i} (seed {})", o.seed))?;
            report.iterations = i + 1;
            progress(&format!(
                "iteration {}/{}: {:?} {:?}",
                i + 1,
                o.iterations,
                report.victims,
                report.phases
            ));
        }
        Ok(())
    })();
    ctx.unmount(&ctx.node_point);
    ctx.unmount(&ctx.solo_point);
    report.evictions += node.metric("breakfs_cache_evictions_total") as u64;
    drop(node);
    result.map_err(|e| anyhow!("{e:#}\nnode log (last lines):\n{}", ctx.node_log()))?;
    Ok(report)
}

fn iteration(
    ctx: &Ctx,
    node: &mut NodeProc,
    rng: &mut SmallRng,
    report: &mut Report,
) -> Result<()> {
    let o = ctx.o;
    let mounted = rng.random_range(..o.images.len());
    let prefetched = (mounted + 1 + rng.random_range(..o.images.len() - 1)) % o.images.len();
    let victim: &'static str = match rng.random_range(0..4) {
        0 | 1 => "node",
        2 => "mount",
        _ => "node+mount",
    };
    let kill_node = victim.contains("node");
    let solo = victim.contains("mount");
    let evictions_before = node.metric("breakfs_cache_evictions_total");
    // The work to interrupt: a standalone mount first, then a mount
    // through the node left in flight (the kill may land while the node
    // reads TOCs, or fetches and indexes whole layers), a prefetch of the
    // other image, readers.
    if solo {
        ctx.mount(&o.images[mounted].reference, true)?;
    }
    let mut node_mount = ctx
        .mount_command(&o.images[mounted].reference, false)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    if rng.random_ratio(2, 3) {
        // The images are local OCI layouts (`oci:`), which the node takes
        // from its control socket only, not over TCP.
        let body = serde_json::json!({"images": [o.images[prefetched].reference]}).to_string();
        let socket = ctx.socket.display().to_string();
        curl(&[
            "-sSf",
            "--max-time",
            "10",
            "--unix-socket",
            &socket,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            "http://localhost/prefetch",
        ])?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = vec![spawn_reader(
        ctx.node_point.clone(),
        rng.random(),
        stop.clone(),
    )];
    if solo {
        readers.push(spawn_reader(
            ctx.solo_point.clone(),
            rng.random(),
            stop.clone(),
        ));
    }
    std::thread::sleep(Duration::from_millis(
        rng.random_range(..(o.max_delay.as_millis() as u64).max(1)),
    ));

    // What is under way, just before the kill.
    let mut phases: Vec<&'static str> = Vec::new();
    match node_mount.try_wait()? {
        None => phases.push("mounting"),
        Some(st) => {
            ensure!(
                st.success(),
                "mounting {} through the node failed",
                o.images[mounted].reference
            );
            if ctx.status(&ctx.node_point)?["hydrated"] == false {
                phases.push("hydration");
            }
        }
    }
    let tasks: serde_json::Value = serde_json::from_str(&node.get("/prefetch")?)?;
    if tasks
        .as_object()
        .is_some_and(|t| t.values().any(|t| t["finished"] == false))
    {
        phases.push("prefetch");
    }
    let evictions = node.metric("breakfs_cache_evictions_total");
    if evictions > evictions_before {
        phases.push("eviction");
    }
    if solo && ctx.status(&ctx.solo_point)?["hydrated"] == false {
        phases.push("mount hydration");
    }
    if phases.is_empty() {
        phases.push("idle");
    }
    let solo_pid = if solo {
        ctx.status(&ctx.solo_point)?["pid"].as_u64()
    } else {
        None
    };

    // The kill.
    let killed_at = Instant::now();
    if kill_node {
        report.evictions += evictions as u64;
        node.kill();
    }
    if let Some(pid) = solo_pid {
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status()?;
        ensure!(
            killed.success(),
            "the standalone mount process {pid} had exited before its kill; its log:\n{}",
            ctx.solo_log()
        );
    }
    *report.victims.entry(victim).or_default() += 1;
    for p in &phases {
        *report.phases.entry(p).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    // A mount request in flight fails with its daemon, or completes.
    let wait_mount = Instant::now() + Duration::from_secs(60);
    while node_mount.try_wait()?.is_none() {
        ensure!(
            Instant::now() < wait_mount,
            "breakfs mount through the node did not return"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A dead mountpoint refuses a new mount, saying what to do (the
    // kernel may still answer a stat of it from its attribute cache).
    let dead = if kill_node {
        &ctx.node_point
    } else {
        &ctx.solo_point
    };
    if is_mountpoint(dead) {
        let out = ctx
            .breakfs()
            .args(["mount", "--plain-http", "--node", "unix:/nonexistent"])
            .arg(&o.images[mounted].reference)
            .arg(dead)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(&format!("breakfs umount {}", dead.display())),
            "mounting on the dead mountpoint {} did not say what to do: {err}",
            dead.display()
        );
    }

    // The stores check out (a live one too); leftovers are counted.
    let began = Instant::now();
    let mut stores = vec![&ctx.node_cache];
    if solo {
        stores.push(&ctx.solo_cache);
    }
    for cache in stores {
        for (severity, what) in ctx.verify(cache)? {
            if severity == "corrupt" {
                report.corrupt.push(format!("{}: {what}", cache.display()));
            } else if what.starts_with("tmp/") {
                report.leftover_temps += 1;
            } else {
                report.leftover_other += 1;
            }
        }
    }
    report.verify_secs.push(began.elapsed().as_secs_f64());
    ensure!(
        report.corrupt.is_empty(),
        "breakfs verify found corrupt entries after killing {victim} during {phases:?}: {:?}",
        report.corrupt
    );

    // Restart what was killed; mount again and read everything.
    ctx.unmount(&ctx.node_point);
    ctx.unmount(&ctx.solo_point);
    if kill_node {
        *node = ctx.start_node()?;
        let findings = ctx.verify(&ctx.node_cache)?;
        ensure!(
            findings.is_empty(),
            "the restarted daemon's store is not clean (opening it should remove what a \
             killed process left): {findings:?}"
        );
        let used = serde_json::from_str::<serde_json::Value>(&node.get("/cache/index")?)?["used"]
            .as_u64()
            .unwrap_or(0);
        report.max_store_after_restart = report.max_store_after_restart.max(used);
        ensure!(
            used <= o.budget,
            "the restarted daemon's store holds {used} bytes, over its budget of {}",
            o.budget
        );
    }
    let image = &o.images[mounted];
    ctx.mount(&image.reference, false)?;
    if kill_node {
        report.recover_secs.push(killed_at.elapsed().as_secs_f64());
    }
    let began = Instant::now();
    report.files_compared += ctx.read_back(&ctx.node_point, image)?;
    report.read_secs.push(began.elapsed().as_secs_f64());
    ctx.unmount(&ctx.node_point);
    if solo {
        ctx.mount(&image.reference, true)?;
        report.files_compared += ctx.read_back(&ctx.solo_point, image)?;
        ctx.unmount(&ctx.solo_point);
        let corrupt: Vec<_> = ctx
            .verify(&ctx.solo_cache)?
            .into_iter()
            .filter(|(s, _)| s == "corrupt")
            .collect();
        ensure!(
            corrupt.is_empty(),
            "the standalone store after a remount: {corrupt:?}"
        );
    }
    if !kill_node {
        // The daemon lives on: what it kept of its own fetches checks out
        // while it works.
        let corrupt: Vec<_> = ctx
            .verify(&ctx.node_cache)?
            .into_iter()
            .filter(|(s, _)| s == "corrupt")
            .collect();
        if !corrupt.is_empty() {
            bail!("the live daemon's store: {corrupt:?}");
        }
    }
    Ok(())
}
