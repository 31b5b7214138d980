//! The edge testbed: deployments replayed on K clusters × N nodes, each
//! strategy measured from the deployment decision until a real command of
//! the image has run to completion in its rootfs.
//!
//! * the cloud: a real `docker-registry` holding the corpus images in
//!   original and refactored form (refactored jointly, as BREAK refactors
//!   the set of images a registry serves), reached by every cluster through
//!   its own `breakfs shape` link (default 50 ms RTT, 100 Mbit/s, shared by
//!   the cluster's nodes);
//! * node to node: one shaped link per pair of clusters (and one inside
//!   each), default 1 ms / 1 Gbit/s inside a cluster and 20 ms / 200 Mbit/s
//!   across;
//! * the workload: the IBM trace sample's deployments (a client's run of
//!   blob requests for a repository), repositories mapped onto corpus
//!   families by popularity, the version advancing with trace time (v1,
//!   then the point release, then v2: version updates), clients onto
//!   clusters, arrivals at the trace's times scaled into `--replay-secs`
//!   (deployments overlap, as they do);
//! * strategies, each from empty caches on the same deployments:
//!   **docker-like** (layers downloaded one by one through the link, each
//!   extracted in turn into its own directory, the rootfs an overlay of
//!   them, as overlay2 does; per-node layer store; least-loaded node),
//!   **containerd** (the real one, one per node: `ctr image pull
//!   --plain-http` through the link and `ctr run`; least-loaded node),
//!   **lazy-cloud** (`breakfs mount --standalone` of the original image,
//!   cloud only, per-node cache; least-loaded node), **breakfs** (a
//!   `breakfs node` per node with every other node as a peer over the
//!   shaped links, the refactored images, `breakfs sched` placing each pod
//!   and planning prefetch), and the ablations.
//!
//! Each deployment's rootfs is checked against the original image (content
//! hashes of sampled files, from `umoci unpack`); the run fails on any
//! difference. Set-up work is cached outside the repository (refactored
//! layouts keyed by the sources of the refactor and index crates, reference
//! hashes by image digest).
//! `cargo bench --bench testbed -- --help` lists the settings; writes
//! target/bench-testbed.md and target/bench-testbed.svg.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/containerd.rs"]
#[allow(dead_code)]
mod containerd;
#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use corpus::CorpusImage;
use harness::{
    Env, Node, NodeMount, Shaper, detach_under, is_mountpoint, run, run_chroot, skopeo_copy,
};
use registry::TestRegistry;
use sha2::{Digest as _, Sha256};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    ensure!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted: stopping and cleaning up"
    );
    Ok(())
}

/// Stop (and clean up) on SIGINT and SIGTERM: the run's own processes
/// (nodes, links, registry, containerd, commands) get SIGTERM at once, so
/// that deployments in flight fail fast; then every guard cleans up.
pub fn catch_interrupts() {
    std::thread::spawn(|| {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let me = std::process::id().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let parent = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .map(str::trim);
            if parent == Some(me.as_str())
                && let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    });
    let handler = nix::sys::signal::SigHandler::Handler(on_interrupt);
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(sig, handler) };
    }
}

/// The testbed's settings (see `USAGE`).
pub struct Opts {
    /// Clusters.
    pub clusters: usize,
    /// Nodes per cluster.
    pub nodes: usize,
    /// Corpus families.
    pub families: Vec<String>,
    /// Deployments replayed.
    pub deployments: usize,
    /// Clients onto clusters.
    pub seed: u64,
    /// Cluster ↔ registry round trip, ms.
    pub cloud_rtt: u64,
    /// Cluster ↔ registry bandwidth, Mbit/s, shared by the cluster.
    pub cloud_mbit: u64,
    /// Node ↔ node inside a cluster, ms.
    pub peer_rtt: u64,
    /// Node ↔ node inside a cluster, Mbit/s.
    pub peer_mbit: u64,
    /// Node ↔ node across clusters, ms.
    pub cross_rtt: u64,
    /// Node ↔ node across clusters, Mbit/s (one link per pair of clusters).
    pub cross_mbit: u64,
    /// The trace's arrivals scaled into this many seconds.
    pub replay_secs: f64,
    /// What to run, in order.
    pub strategies: Vec<Strategy>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            clusters: 4,
            nodes: 4,
            families: corpus::FAMILIES
                .iter()
                .map(|f| f.name.to_string())
                .collect(),
            deployments: 32,
            seed: 1,
            cloud_rtt: 50,
            cloud_mbit: 100,
            peer_rtt: 1,
            peer_mbit: 1000,
            cross_rtt: 20,
            cross_mbit: 200,
            replay_secs: 60.0,
            strategies: Strategy::ALL.to_vec(),
        }
    }
}

/// How deployments get their images.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Strategy {
    /// Layers pulled one by one and extracted, overlay2-style.
    DockerLike,
    /// The real containerd: `ctr image pull` + `ctr run`.
    Containerd,
    /// A lazy mount of the original image from the cloud only.
    LazyCloud,
    /// Everything: refactored images, peers, prefetch, placement.
    Breakfs,
    /// Ablations: breakfs without one of its parts.
    /// The original images.
    NoRefactor,
    /// No peer nodes.
    NoPeers,
    /// No prefetch planner.
    NoPrefetch,
    /// Least-loaded placement instead of `breakfs sched`.
    NoSched,
    /// A variant (not run unless asked for): each mount also hydrates its
    /// image in the background (the node's default).
    Hydrate,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::DockerLike => "docker-like",
            Strategy::Containerd => "containerd",
            Strategy::LazyCloud => "lazy-cloud",
            Strategy::Breakfs => "breakfs",
            Strategy::NoRefactor => "breakfs without refactoring",
            Strategy::NoPeers => "breakfs without peers",
            Strategy::NoPrefetch => "breakfs without prefetch",
            Strategy::NoSched => "breakfs without the scheduler",
            Strategy::Hydrate => "breakfs with hydration",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Strategy::NoRefactor => "no-refactor",
            Strategy::NoPeers => "no-peers",
            Strategy::NoPrefetch => "no-prefetch",
            Strategy::NoSched => "no-sched",
            Strategy::Hydrate => "hydrate",
            s => s.name(),
        }
    }

    /// Every strategy, in the order they run.
    pub const ALL: [Strategy; 8] = [
        Strategy::DockerLike,
        Strategy::Containerd,
        Strategy::LazyCloud,
        Strategy::Breakfs,
        Strategy::NoRefactor,
        Strategy::NoPeers,
        Strategy::NoPrefetch,
        Strategy::NoSched,
    ];

    /// A strategy by its flag (`docker-like`, `no-peers`, ...).
    pub fn parse(s: &str) -> Result<Strategy> {
        let known = || Strategy::ALL.into_iter().chain([Strategy::Hydrate]);
        known().find(|x| x.flag() == s).ok_or_else(|| {
            let names: Vec<&str> = known().map(|x| x.flag()).collect();
            anyhow!("unknown strategy {s:?}: {}", names.join(", "))
        })
    }
}

const USAGE: &str = "cargo bench --bench testbed -- [OPTIONS]

Replays deployments from the IBM trace sample on K clusters x N nodes and
measures each strategy's time to ready (decision -> the image's command has
run in its rootfs), bytes from the cloud and from peers, and cache use.

  --clusters K          clusters [4]
  --nodes N             nodes per cluster [4]
  --families a,b        corpus families [all: python,postgres,nginx,redis,httpd,node,openjdk,mariadb]
  --deployments D       deployments replayed [32]
  --replay-secs S       the trace's arrivals scaled into S seconds [60]
  --seed S              clients onto clusters [1]
  --cloud-rtt MS        cluster <-> registry round trip [50]
  --cloud-mbit M        cluster <-> registry bandwidth, shared by the cluster [100]
  --peer-rtt MS         node <-> node inside a cluster [1]
  --peer-mbit M         [1000]
  --cross-rtt MS        node <-> node across clusters [20]
  --cross-mbit M        [200]
  --strategies s,t      docker-like,containerd,lazy-cloud,breakfs,no-refactor,no-peers,no-prefetch,no-sched [all]
                        and hydrate (breakfs whose mounts hydrate in the background, not in the default set)

Needs root (FUSE, overlayfs, chroot), docker-registry, skopeo, umoci,
containerd. Ctrl-C stops and cleans up. Writes target/bench-testbed.md and
target/bench-testbed.svg.";

fn parse_opts() -> Result<Option<Opts>> {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} wants a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| anyhow!("{a} wants a number, not {v:?}"))
        };
        match a.as_str() {
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--clusters" => o.clusters = num(val()?)? as usize,
            "--nodes" => o.nodes = num(val()?)? as usize,
            "--deployments" => o.deployments = num(val()?)? as usize,
            "--replay-secs" => o.replay_secs = num(val()?)? as f64,
            "--seed" => o.seed = num(val()?)?,
            "--cloud-rtt" => o.cloud_rtt = num(val()?)?,
            "--cloud-mbit" => o.cloud_mbit = num(val()?)?,
            "--peer-rtt" => o.peer_rtt = num(val()?)?,
            "--peer-mbit" => o.peer_mbit = num(val()?)?,
            "--cross-rtt" => o.cross_rtt = num(val()?)?,
            "--cross-mbit" => o.cross_mbit = num(val()?)?,
            "--families" => o.families = val()?.split(',').map(String::from).collect(),
            "--strategies" => {
                o.strategies = val()?
                    .split(',')
                    .map(Strategy::parse)
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    ensure!(
        o.clusters > 0 && o.nodes > 0 && o.deployments > 0,
        "--clusters, --nodes and --deployments must be positive"
    );
    Ok(Some(o))
}

// ---------------------------------------------------------------------------
// The workload.

/// One deployment: which image, from which cluster, when (seconds after
/// the replay starts).
#[derive(Clone, Debug)]
pub struct Deployment {
    /// The cluster it is deployed in.
    pub cluster: usize,
    /// Index into the images.
    pub image: usize,
    /// Seconds after the replay starts.
    pub at: f64,
}

/// `2017-06-20 00:00:03.589` as seconds (day of month included: the
/// sample spans days of one month).
fn trace_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim().split_once(' ')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let m: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    Some(day * 86400.0 + h * 3600.0 + m * 60.0 + s)
}

/// The trace's deployments mapped onto the images (`images` sorted by
/// family then tag v1, point, v2).
fn workload(o: &Opts, images: &[CorpusImage]) -> Result<Vec<Deployment>> {
    // The project's shared copy, else the one in the repository (a clean
    // clone has only that).
    let path = [
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/ibm-dal09-blobs-sample.csv"
        ),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ibm-dal09-blobs-sample.csv"
        ),
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .ok_or_else(|| anyhow!("the IBM trace sample is missing from tests/data"))?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| *h == n)
            .ok_or_else(|| anyhow!("{path} has no column {n}"))
    };
    let (uri, client, ts) = (
        col("http.request.uri")?,
        col("http.request.remoteaddr")?,
        col("timestamp")?,
    );
    let mut rows: Vec<(String, String, String)> = lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let parts: Vec<&str> = f.get(uri)?.split('/').collect();
            (parts.len() >= 5).then(|| {
                (
                    f[ts].to_string(),
                    f[client].to_string(),
                    parts[1..parts.len() - 2].join("/"),
                )
            })
        })
        .collect();
    rows.sort();
    // Runs of a client's requests for one repository, at their first request.
    let mut runs: Vec<(f64, String, String)> = Vec::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for (t, c, repo) in &rows {
        if last.get(c) != Some(repo) {
            let secs = trace_secs(t).ok_or_else(|| anyhow!("{path}: bad timestamp {t:?}"))?;
            runs.push((secs, c.clone(), repo.clone()));
            last.insert(c.clone(), repo.clone());
        }
    }
    // Repositories by popularity onto families; clients onto clusters.
    let mut pop: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, r) in &runs {
        *pop.entry(r).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = pop.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let families: Vec<&str> = o.families.iter().map(String::as_str).collect();
    let fam_of: HashMap<&str, usize> = ranked
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (*r, i % families.len()))
        .collect();
    let mut rng = o.seed.max(1) * 0x9E37_79B9_7F4A_7C15;
    let mut clients: Vec<&str> = runs.iter().map(|(_, c, _)| c.as_str()).collect();
    clients.sort();
    clients.dedup();
    let cluster_of: HashMap<&str, usize> = clients
        .into_iter()
        .map(|c| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (c, (rng % o.clusters as u64) as usize)
        })
        .collect();
    let n = o.deployments.min(runs.len());
    let (t0, t1) = (runs[0].0, runs[n - 1].0);
    let scale = if t1 > t0 {
        o.replay_secs / (t1 - t0)
    } else {
        0.0
    };
    runs.iter()
        .take(n)
        .enumerate()
        .map(|(i, (t, c, r))| {
            let family = families[fam_of[r.as_str()]];
            // The version advances with trace time: v1, point, v2.
            let tag = ["v1", "point", "v2"][(i * 3 / n).min(2)];
            let image = images
                .iter()
                .position(|im| im.family == family && im.tag == tag)
                .ok_or_else(|| anyhow!("the corpus has no {family}:{tag}"))?;
            Ok(Deployment {
                cluster: cluster_of[c.as_str()],
                image,
                at: (t - t0) * scale,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Set-up, cached outside the repository.

/// `$BREAKFS_TESTBED_CACHE`, or ~/.cache/breakfs/testbed.
fn cache_root() -> PathBuf {
    std::env::var_os("BREAKFS_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/breakfs/testbed")
        })
}

/// A refactored image in the registry.
pub struct Refactored {
    /// Its bytes (layers).
    pub size: u64,
    /// Its layers (digest, size).
    pub layers: Vec<(String, u64)>,
}

/// `root/KIND-KEY`, made by `build` (into a fresh directory) unless a
/// finished one is there. Keeps the newest other one of the same kind (a
/// second configuration, the test suite's or the benchmark's), drops
/// older ones.
fn cached_dir(kind: &str, key: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = cache_root();
    let dir = root.join(format!("{kind}-{key}"));
    if dir.join("done").exists() {
        return Ok(dir);
    }
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{kind}-"))
        })
        .filter(|e| e.path().join("done").exists())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    others.sort();
    others.pop();
    for (_, p) in others {
        let _ = std::fs::remove_dir_all(p);
    }
    let fresh = root.join(format!(".{kind}-{key}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh)?;
    if let Err(e) = build(&fresh) {
        let _ = std::fs::remove_dir_all(&fresh);
        return Err(e);
    }
    std::fs::write(fresh.join("done"), b"")?;
    // Another run may have made the same meanwhile: keep one.
    if std::fs::rename(&fresh, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&fresh);
    }
    Ok(dir)
}

/// Fill the registry: the originals at `orig/FAMILY:TAG` and the images
/// refactored jointly (`breakfs refactor --joint`, as BREAK refactors the
/// set of images a registry serves) at `refactored/FAMILY:TAG`. The
/// refactored layout and then the registry's storage are cached, keyed by
/// the refactoring's sources and the images' digests.
fn fill_registry(
    env: &Env,
    reg: &mut TestRegistry,
    images: &[CorpusImage],
) -> Result<Vec<Refactored>> {
    let mut key = Sha256::new();
    refactor_sources(&mut key, Path::new(env!("CARGO_MANIFEST_DIR")))?;
    for im in images {
        key.update(im.manifest_digest.as_bytes());
    }
    let key = &hex::encode(key.finalize())[..16];
    let layout = cached_dir("joint", key, |fresh| {
        let work = env.tmp.join("joint-work");
        eprintln!(
            "testbed: refactoring {} images jointly (cached for the next run)",
            images.len()
        );
        let r = run(
            env.breakfs()
                .args(["refactor", "--joint", "--work-dir"])
                .arg(&work)
                .arg("--to")
                .arg(format!("oci:{}", fresh.display()))
                .args(images.iter().map(|i| i.reference.clone())),
            "breakfs refactor --joint",
        );
        let _ = std::fs::remove_dir_all(&work);
        r.map(|_| ())
    })?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let tags: Vec<String> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(String::from)
        .collect();
    let jobs: Vec<(&CorpusImage, String)> = images
        .iter()
        .map(|im| {
            // `refactor --joint` names a tag FAMILY-TAG, or TAG when every
            // image is of one family.
            let want = format!("{}-{}", im.family, im.tag);
            let tag = tags
                .iter()
                .find(|t| **t == want)
                .or_else(|| tags.iter().find(|t| **t == im.tag))
                .ok_or_else(|| anyhow!("the joint layout has no tag {want} (it has {tags:?})"))?;
            Ok((im, tag.clone()))
        })
        .collect::<Result<_>>()?;
    let storage = reg.storage_dir();
    let mut pushed = false;
    let cached = cached_dir("registry", key, |fresh| {
        eprintln!(
            "testbed: pushing {} original and {} refactored images (cached for the next run)",
            images.len(),
            images.len()
        );
        push_originals(reg, images)?;
        // One at a time: the images share layers, and the registry's
        // filesystem driver fails concurrent uploads of one blob.
        for (im, tag) in &jobs {
            check_interrupt()?;
            skopeo_copy(
                &format!("oci:{}:{tag}", layout.display()),
                &reg.reference(&format!("refactored/{}:{}", im.family, im.tag)),
            )?;
        }
        pushed = true;
        copy_tree(&storage, &fresh.join("storage"))
    })?;
    if !pushed {
        // The cached storage, hard-linked (the registry never rewrites a
        // blob), under a restarted registry.
        reg.kill();
        let _ = std::fs::remove_dir_all(&storage);
        copy_tree(&cached.join("storage"), &storage)?;
        reg.restart();
    }
    jobs.iter()
        .map(|(_, tag)| {
            let layers = harness::layout_layers(&layout, tag)?;
            Ok(Refactored {
                size: layers.iter().map(|l| l.1).sum(),
                layers,
            })
        })
        .collect()
}

/// Hash what the refactored images depend on: the sources of the refactor
/// and index crates (the layer and TOC formats) and Cargo.lock. A rebuild
/// for any other change (the node daemon, this benchmark) keeps the cached
/// joint refactoring and registry, which take minutes to redo.
fn refactor_sources(key: &mut Sha256, root: &Path) -> Result<()> {
    let mut files = vec![root.join("Cargo.lock")];
    let mut dirs = vec![root.join("refactor"), root.join("index")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        key.update(f.strip_prefix(root)?.to_string_lossy().as_bytes());
        key.update(sha256_file(&f)?.as_bytes());
    }
    Ok(())
}

/// `cp -al FROM TO` (hard links), or a real copy across file systems.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let linked = Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(to)
        .stderr(Stdio::null())
        .status()?;
    if !linked.success() {
        let _ = std::fs::remove_dir_all(to);
        run(
            Command::new("cp").arg("-a").arg(from).arg(to),
            "copying the registry storage",
        )?;
    }
    Ok(())
}

/// `f` over `items` on `threads` threads, results in order.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicU64::new(0);
    let out: Mutex<Vec<Option<Result<R>>>> = Mutex::new(items.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= items.len() || INTERRUPTED.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = f(&items[i]);
                    out.lock().unwrap()[i] = Some(r);
                }
            });
        }
    });
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("interrupted: stopping and cleaning up"))))
        .collect()
}

/// The originals, one family (repository) per thread.
fn push_originals(reg: &TestRegistry, images: &[CorpusImage]) -> Result<()> {
    let families: Vec<Vec<&CorpusImage>> = {
        let mut by: BTreeMap<&str, Vec<&CorpusImage>> = BTreeMap::new();
        for im in images {
            by.entry(im.family).or_default().push(im);
        }
        by.into_values().collect()
    };
    parallel(&families, 3, |fam| {
        for im in fam {
            skopeo_copy(
                &format!("oci:{}:{}", im.layout.display(), im.tag),
                &reg.reference(&format!("orig/{}:{}", im.family, im.tag)),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Honesty: sampled content hashes of each original image.

/// Paths and hashes of sampled regular files of the unpacked original.
struct Reference {
    files: Vec<(PathBuf, String)>,
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The reference hashes of `image`, cached by its manifest digest.
fn reference(env: &Env, image: &CorpusImage, samples: usize) -> Result<Reference> {
    let cached = cache_root().join("refs").join(format!(
        "{}-{samples}.txt",
        image.manifest_digest.trim_start_matches("sha256:")
    ));
    if let Ok(text) = std::fs::read_to_string(&cached) {
        let files: Vec<(PathBuf, String)> = text
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, p)| (PathBuf::from(p), h.to_string()))
            .collect();
        if !files.is_empty() {
            return Ok(Reference { files });
        }
    }
    let r = unpack_reference(env, image, samples)?;
    if let Some(d) = cached.parent() {
        std::fs::create_dir_all(d)?;
    }
    let text: String = r
        .files
        .iter()
        .map(|(p, h)| format!("{h}  {}\n", p.display()))
        .collect();
    let partial = cached.with_extension("partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, &cached)?;
    Ok(r)
}

fn unpack_reference(env: &Env, image: &CorpusImage, samples: usize) -> Result<Reference> {
    let dir = env.tmp.join(format!("ref-{}-{}", image.family, image.tag));
    run(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{}", image.layout.display(), image.tag))
            .arg(&dir),
        "umoci unpack of the original",
    )?;
    let rootfs = dir.join("rootfs");
    let mut all = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                all.push(e.path());
            }
        }
    }
    all.sort();
    // Every k-th file, and the biggest ones.
    let step = (all.len() / samples.max(1)).max(1);
    let mut chosen: Vec<PathBuf> = all.iter().step_by(step).cloned().collect();
    let mut by_size = all.clone();
    by_size.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    chosen.extend(by_size.into_iter().take(3));
    chosen.sort();
    chosen.dedup();
    let files = chosen
        .into_iter()
        .map(|p| {
            let h = sha256_file(&p)?;
            Ok((p.strip_prefix(&rootfs)?.to_path_buf(), h))
        })
        .collect::<Result<_>>()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Reference { files })
}

fn verify(rootfs: &Path, r: &Reference, what: &str) -> Result<()> {
    for (p, want) in &r.files {
        let got =
            sha256_file(&rootfs.join(p)).with_context(|| format!("{what}: /{}", p.display()))?;
        ensure!(
            got == *want,
            "{what}: /{} differs from the original image (sha256 {got}, want {want})",
            p.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Mounts and the container's writable layer.

/// An overlay over `lower` (colon-separated) at `dir/rootfs`, with the
/// container's upper and work dirs: what runtimes give a container.
struct Overlay {
    rootfs: PathBuf,
}

impl Overlay {
    fn mount(dir: &Path, lower: &str) -> Result<Overlay> {
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(d)?;
        }
        run(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={lower},upperdir={},workdir={}",
                    upper.display(),
                    work.display()
                ))
                .arg(&rootfs),
            "mounting the container's overlay",
        )?;
        Ok(Overlay { rootfs })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if is_mountpoint(&self.rootfs) {
            let _ = Command::new("umount").arg("-l").arg(&self.rootfs).status();
        }
    }
}

// ---------------------------------------------------------------------------
// docker-like: one layer at a time, each extracted into its own directory.

/// GET `url` with curl into `out` (or stdout), with extra headers.
fn curl(url: &str, headers: &[&str], out: Option<&Path>) -> Result<Vec<u8>> {
    let mut c = Command::new("curl");
    c.args(["-sSfL", "--max-time", "600"]);
    for h in headers {
        c.args(["-H", h]);
    }
    if let Some(o) = out {
        c.arg("-o").arg(o);
    }
    let o = c
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    ensure!(
        o.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(o.stdout)
}

/// The layer digests of `repo:tag` at `host`, and the manifest's size.
fn manifest_layers(host: &str, repo: &str, tag: &str) -> Result<(Vec<String>, u64)> {
    let body = curl(
        &format!("http://{host}/v2/{repo}/manifests/{tag}"),
        &[
            "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        ],
        None,
    )?;
    let m: serde_json::Value = serde_json::from_slice(&body)?;
    let layers = m["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("{repo}:{tag}: the manifest has no layers"))?
        .iter()
        .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
        .collect();
    Ok((layers, body.len() as u64))
}

/// Extract a layer tar (gzip or not) into `dir` in overlayfs' format:
/// whiteouts become 0/0 character devices, opaque markers an xattr.
fn extract_layer(blob: &Path, dir: &Path) -> Result<()> {
    let f = std::fs::File::open(blob)?;
    let mut head = [0u8; 2];
    let gz = {
        let mut g = std::fs::File::open(blob)?;
        g.read_exact(&mut head).is_ok() && head == [0x1f, 0x8b]
    };
    let reader: Box<dyn std::io::Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    for e in ar.entries()? {
        let mut e = e?;
        let path = e.path()?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == ".wh..wh..opq" {
            let d = dir.join(path.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&d)?;
            xattr::set(&d, "trusted.overlay.opaque", b"y")?;
        } else if let Some(gone) = name.strip_prefix(".wh.") {
            let target = dir.join(path.parent().unwrap_or(Path::new(""))).join(gone);
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p)?;
            }
            run(
                Command::new("mknod").arg(&target).args(["c", "0", "0"]),
                "mknod of a whiteout",
            )?;
        } else {
            e.unpack_in(dir)
                .with_context(|| format!("extracting {}", path.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One strategy over the workload.

/// What a strategy did over the whole workload.
pub struct Outcome {
    /// Seconds to ready, per deployment.
    pub secs: Vec<f64>,
    /// Bytes from the registry, all nodes.
    pub cloud: u64,
    /// Bytes from peer nodes.
    pub peer: u64,
    /// Bytes the nodes' caches (layer stores) use at the end.
    pub cache: u64,
}

struct World<'a> {
    o: &'a Opts,
    env: &'a Env,
    reg: &'a TestRegistry,
    links: &'a [Shaper],
    images: &'a [CorpusImage],
    refs: &'a [Reference],
    refactored: &'a [Refactored],
}

impl Outcome {
    /// The outcome of a strategy whose nodes keep their layers in
    /// `dir/nodeN/SUB` and fetch only from the cloud.
    fn with_node_dirs(w: &World, dir: &Path, sub: &str, secs: Vec<f64>, cloud: u64) -> Outcome {
        let cache = (0..w.o.clusters * w.o.nodes)
            .map(|n| disk_bytes(&dir.join(format!("node{n}/{sub}"))))
            .sum();
        Outcome {
            secs,
            cloud,
            peer: 0,
            cache,
        }
    }
}

/// Node choice by the default scheduler's least-requested with equal
/// pods: the node of `cluster` with the fewest deployments so far.
struct LeastLoaded(Mutex<Vec<usize>>);

impl LeastLoaded {
    fn new(o: &Opts) -> LeastLoaded {
        LeastLoaded(Mutex::new(vec![0; o.clusters * o.nodes]))
    }

    fn pick(&self, o: &Opts, cluster: usize) -> usize {
        let mut load = self.0.lock().unwrap();
        let range = cluster * o.nodes..(cluster + 1) * o.nodes;
        let n = range
            .clone()
            .min_by_key(|&n| (load[n], n))
            .unwrap_or(range.start);
        load[n] += 1;
        n
    }
}

/// One lock per key: work on one thing (a layer on a node) at a time.
struct Gates<K>(Mutex<HashMap<K, Arc<Mutex<()>>>>);

impl<K: std::hash::Hash + Eq> Gates<K> {
    fn new() -> Gates<K> {
        Gates(Mutex::new(HashMap::new()))
    }

    fn gate(&self, key: K) -> Arc<Mutex<()>> {
        self.0.lock().unwrap().entry(key).or_default().clone()
    }
}

/// Every deployment of a replay reaching its ready point (or failing).
struct AllReady<'h> {
    n: usize,
    count: Mutex<usize>,
    cv: std::sync::Condvar,
    /// Run once when the last deployment is ready (or failed), before any
    /// is let go to its check.
    at_all_ready: &'h (dyn Fn() + Sync),
    released: AtomicBool,
}

impl AllReady<'_> {
    fn arrive(&self) {
        let last = {
            let mut c = self.count.lock().unwrap();
            *c += 1;
            *c == self.n
        };
        if last {
            (self.at_all_ready)();
            self.released.store(true, Ordering::SeqCst);
        }
        let _c = self.count.lock().unwrap();
        self.cv.notify_all();
    }

    fn arrive_and_wait(&self) {
        self.arrive();
        let mut c = self.count.lock().unwrap();
        while !self.released.load(Ordering::SeqCst) && !INTERRUPTED.load(Ordering::SeqCst) {
            c = self
                .cv
                .wait_timeout(c, Duration::from_millis(200))
                .unwrap()
                .0;
        }
    }
}

/// One deployment's clock: started at the decision, read when the image's
/// command has run.
struct Ready<'a> {
    t: Instant,
    secs: Mutex<Option<f64>>,
    all: &'a AllReady<'a>,
    what: &'a str,
    i: usize,
    d: &'a Deployment,
}

impl Ready<'_> {
    /// The deployment is ready: record the time, then hold it (mounts up)
    /// until every deployment is, so that the checks against the original
    /// images and the clean-up run after the measured part (they would
    /// otherwise take CPU and link from deployments still starting).
    fn now(&self) -> f64 {
        let secs = self.t.elapsed().as_secs_f64();
        *self.secs.lock().unwrap() = Some(secs);
        let k = *self.all.count.lock().unwrap() + 1;
        eprintln!(
            "testbed: {} deployment {} (cluster {}, arrived at {:.1} s) ready in {secs:.2} s [{k}/{}]",
            self.what, self.i, self.d.cluster, self.d.at, self.all.n
        );
        self.all.arrive_and_wait();
        secs
    }
}

/// Run `deploy` for every deployment at its arrival time, each on its own
/// thread (deployments overlap as they arrive); `deploy` calls
/// [`Ready::now`] when the image's command has run, then checks and
/// cleans up. Returns the seconds to ready.
fn replay(
    w: &World,
    what: &str,
    deps: &[Deployment],
    deploy: impl Fn(usize, &Deployment, &Ready) -> Result<()> + Sync,
) -> Result<Vec<f64>> {
    replay_then(w, what, deps, deploy, &|| {})
}

/// [`replay`], running `at_all_ready` once every deployment is ready and
/// before any is checked (the checks read files, which a lazy mount
/// fetches: measure before them). Once every deployment is ready the
/// cloud links are lifted (nothing is measured any more), so the checks
/// and what `at_all_ready` waits for do not wait on them.
fn replay_then(
    w: &World,
    what: &str,
    deps: &[Deployment],
    deploy: impl Fn(usize, &Deployment, &Ready) -> Result<()> + Sync,
    at_all_ready: &(dyn Fn() + Sync),
) -> Result<Vec<f64>> {
    let start = Instant::now();
    let hook = || {
        eprintln!(
            "testbed: {what}: every deployment ready {:.0} s after the first arrived; links lifted for the checks",
            start.elapsed().as_secs_f64()
        );
        for l in w.links {
            l.lift();
        }
        at_all_ready();
        eprintln!("testbed: {what}: checking every rootfs against the original image");
    };
    let all = AllReady {
        n: deps.len(),
        count: Mutex::new(0),
        cv: std::sync::Condvar::new(),
        at_all_ready: &hook,
        released: AtomicBool::new(false),
    };
    let results: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = deps
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (deploy, all) = (&deploy, &all);
                s.spawn(move || {
                    let due = start + Duration::from_secs_f64(d.at);
                    while Instant::now() < due && !INTERRUPTED.load(Ordering::SeqCst) {
                        std::thread::sleep((due - Instant::now()).min(Duration::from_millis(100)));
                    }
                    let ready = Ready {
                        t: Instant::now(),
                        secs: Mutex::new(None),
                        all,
                        what,
                        i,
                        d,
                    };
                    let r = check_interrupt().and_then(|()| deploy(i, d, &ready));
                    let secs = *ready.secs.lock().unwrap();
                    if secs.is_none() {
                        all.arrive(); // failed before it was ready
                    }
                    r.with_context(|| format!("{what} deployment {i}"))?;
                    secs.ok_or_else(|| anyhow!("{what} deployment {i} never became ready"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a deployment thread panicked")))
            })
            .collect()
    });
    eprintln!(
        "testbed: {what}: checked and cleaned up {:.0} s after the first arrived",
        start.elapsed().as_secs_f64()
    );
    results.into_iter().collect()
}

/// Bytes under `p` on disk (`du -sb`).
fn disk_bytes(p: &Path) -> u64 {
    Command::new("du")
        .arg("-sb")
        .arg(p)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn run_docker_like(w: &World, deps: &[Deployment], dir: &Path) -> Result<Outcome> {
    let load = LeastLoaded::new(w.o);
    let cloud = AtomicU64::new(0);
    // One download of a layer per node at a time; the others wait for it.
    let layer_gates = Gates::new();
    let secs = replay(w, "docker-like", deps, |i, d, ready| {
        let node = load.pick(w.o, d.cluster);
        let store = dir.join(format!("node{node}/layers"));
        std::fs::create_dir_all(&store)?;
        let image = &w.images[d.image];
        let repo = format!("orig/{}", image.family);
        let host = &w.links[d.cluster].addr;
        let (layers, mbytes) = manifest_layers(host, &repo, &image.tag)?;
        cloud.fetch_add(mbytes, Ordering::SeqCst);
        let mut lower = Vec::new();
        for digest in &layers {
            let gate = layer_gates.gate((node, digest.clone()));
            let _held = gate.lock().unwrap();
            let hex = digest.trim_start_matches("sha256:");
            let ldir = store.join(hex);
            let done = store.join(format!("{hex}.done"));
            if !done.exists() {
                check_interrupt()?;
                let blob = store.join(format!("{hex}.blob"));
                curl(
                    &format!("http://{host}/v2/{repo}/blobs/{digest}"),
                    &[],
                    Some(&blob),
                )?;
                cloud.fetch_add(std::fs::metadata(&blob)?.len(), Ordering::SeqCst);
                let _ = std::fs::remove_dir_all(&ldir);
                std::fs::create_dir_all(&ldir)?;
                extract_layer(&blob, &ldir)?;
                std::fs::remove_file(&blob)?;
                std::fs::write(&done, b"")?;
            }
            lower.push(ldir);
        }
        // overlayfs lists the top layer first.
        let lowerdirs: Vec<String> = lower
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let cdir = dir.join(format!("c{i}"));
        let ov = Overlay::mount(&cdir, &lowerdirs.join(":"))?;
        run_chroot(&ov.rootfs, &image.command)?;
        ready.now();
        verify(
            &ov.rootfs,
            &w.refs[d.image],
            &format!("docker-like deployment {i}"),
        )?;
        drop(ov);
        let _ = std::fs::remove_dir_all(&cdir);
        Ok(())
    })?;
    Ok(Outcome::with_node_dirs(
        w,
        dir,
        "layers",
        secs,
        cloud.into_inner(),
    ))
}

/// The rest of a deployment once its image is mounted at `m`: the
/// container's overlay, the command, ready; then the check against the
/// original and the clean-up. Returns the bytes the mount fetched until
/// ready.
fn ready_on_mount(
    w: &World,
    m: NodeMount,
    cdir: &Path,
    d: &Deployment,
    ready: &Ready,
    what: &str,
) -> Result<u64> {
    let image = &w.images[d.image];
    let ov = Overlay::mount(cdir, &m.point.display().to_string())?;
    run_chroot(&ov.rootfs, &image.command)?;
    // What the deployment fetched (the check below fetches more).
    let bytes = m.fetched_bytes();
    ready.now();
    verify(&ov.rootfs, &w.refs[d.image], what).with_context(|| {
        format!(
            "the image mount {} is {}mounted, the container's overlay {}",
            m.point.display(),
            if is_mountpoint(&m.point) {
                ""
            } else {
                "no longer "
            },
            if is_mountpoint(&ov.rootfs) {
                "is still there"
            } else {
                "is gone"
            }
        )
    })?;
    drop(ov);
    drop(m);
    let _ = std::fs::remove_dir_all(cdir);
    Ok(bytes)
}

/// containerd itself, one per node: `ctr image pull --plain-http` through
/// the cluster's link, then `ctr run` of the command (runc). Cloud bytes:
/// the image's layers the node did not hold yet (containerd keeps pulled
/// content).
fn run_containerd(w: &World, deps: &[Deployment], dir: &Path) -> Result<Outcome> {
    let nodes: Vec<containerd::TestContainerd> = (0..w.o.clusters * w.o.nodes)
        .map(|_| {
            containerd::TestContainerd::start_with(containerd::ContainerdOptions {
                parent: Some(dir.to_path_buf()),
                ..Default::default()
            })
        })
        .collect::<Result<_>>()?;
    let held: Mutex<Vec<HashSet<String>>> = Mutex::new(vec![Default::default(); nodes.len()]);
    // Two pulls of one image on one node at once: the second waits.
    let pulls = Gates::new();
    let load = LeastLoaded::new(w.o);
    let cloud = AtomicU64::new(0);
    let secs = replay(w, "containerd", deps, |i, d, ready| {
        let n = load.pick(w.o, d.cluster);
        let image = &w.images[d.image];
        let reference = format!(
            "{}/orig/{}:{}",
            w.links[d.cluster].addr, image.family, image.tag
        );
        {
            let gate = pulls.gate((n, d.image));
            let _held = gate.lock().unwrap();
            nodes[n]
                .pull_plain_http_within(&reference, Duration::from_secs(900))
                .with_context(|| format!("containerd log:\n{}", nodes[n].log()))?;
        }
        let args: Vec<&str> = image.command.iter().map(String::as_str).collect();
        let o = nodes[n].run(&reference, &args)?;
        ensure!(
            o.status.success(),
            "ctr run {reference} {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        ready.now();
        let view = dir.join(format!("c{i}"));
        std::fs::create_dir_all(&view)?;
        {
            let m = nodes[n].mount_image(&reference, &view)?;
            verify(
                m.path(),
                &w.refs[d.image],
                &format!("containerd deployment {i}"),
            )?;
        }
        let _ = std::fs::remove_dir_all(&view);
        let layers = harness::layout_layers(&image.layout, &image.tag)?;
        let mut held = held.lock().unwrap();
        let new: u64 = layers
            .into_iter()
            .filter(|(digest, _)| held[n].insert(digest.clone()))
            .map(|(_, size)| size)
            .sum();
        cloud.fetch_add(new, Ordering::SeqCst);
        Ok(())
    })?;
    let cache = nodes
        .iter()
        .map(|c| disk_bytes(&c.root().join("io.containerd.content.v1.content")))
        .sum();
    Ok(Outcome {
        secs,
        cloud: cloud.into_inner(),
        peer: 0,
        cache,
    })
}

fn run_lazy_cloud(w: &World, deps: &[Deployment], dir: &Path) -> Result<Outcome> {
    let load = LeastLoaded::new(w.o);
    let cloud = AtomicU64::new(0);
    let secs = replay(w, "lazy-cloud", deps, |i, d, ready| {
        let node = load.pick(w.o, d.cluster);
        let image = &w.images[d.image];
        let reference = format!(
            "docker://{}/orig/{}:{}",
            w.links[d.cluster].addr, image.family, image.tag
        );
        let cdir = dir.join(format!("c{i}"));
        let args = vec![
            "--standalone".to_string(),
            "--no-hydrate".to_string(),
            "--cache".to_string(),
            dir.join(format!("node{node}/store")).display().to_string(),
        ];
        let m = NodeMount::with_args(w.env, &args, &reference, &cdir.join("image"))?;
        let bytes = ready_on_mount(w, m, &cdir, d, ready, &format!("lazy-cloud deployment {i}"))?;
        cloud.fetch_add(bytes, Ordering::SeqCst);
        Ok(())
    })?;
    Ok(Outcome::with_node_dirs(
        w,
        dir,
        "store",
        secs,
        cloud.into_inner(),
    ))
}

/// `breakfs sched` over the nodes; stopped when dropped.
struct SchedProc {
    child: Child,
    url: String,
}

impl SchedProc {
    /// With `cache_sum`, the prefetch planner runs every 5 s.
    fn start(
        env: &Env,
        nodes: &[(String, String, usize)],
        cache_sum: Option<u64>,
    ) -> Result<SchedProc> {
        let mut c = env.breakfs();
        c.args(["sched", "--plain-http", "--listen", "127.0.0.1:0"]);
        if let Some(sum) = cache_sum {
            c.args(["--cache-sum-size", &sum.to_string(), "--plan-secs", "5"]);
        }
        for (name, url, cluster) in nodes {
            c.arg("--node").arg(format!("{name}={url}@c{cluster}"));
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting breakfs sched")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(u) = l.strip_prefix("BREAKFS-SCHED-READY ") {
                    let _ = tx.send(u.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("breakfs sched did not say it was ready"))?;
        Ok(SchedProc { child, url })
    }

    /// The node the extender scores best among `names`.
    fn best(&self, pod: &str, image: &str, names: &[String]) -> Result<String> {
        let body = serde_json::json!({
            "Pod": {"metadata": {"name": pod},
                    "spec": {"containers": [{"name": "app", "image": image}]}},
            "NodeNames": names,
        });
        let scores: Vec<serde_json::Value> = serde_json::from_str(&run(
            Command::new("curl")
                .args([
                    "-sSf",
                    "--max-time",
                    "30",
                    "-H",
                    "Content-Type: application/json",
                ])
                .arg("-d")
                .arg(body.to_string())
                .arg(format!("{}/prioritize", self.url)),
            "POST /prioritize",
        )?)?;
        Ok(scores
            .iter()
            .max_by_key(|s| s["Score"].as_i64().unwrap_or(0))
            .and_then(|s| s["Host"].as_str())
            .ok_or_else(|| anyhow!("sched returned no scores"))?
            .to_string())
    }

    /// Stop it now (SIGKILL; its planner sends nothing more); dropping it
    /// reaps it.
    fn stop(&self) {
        harness::signal_child(&self.child, nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for SchedProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shaped node-to-node links: for each pair of clusters (client
/// cluster, serving cluster) one link, with a route to each serving node.
/// `url(x, m)` is node `m` as nodes of cluster `x` reach it.
struct PeerLinks {
    shapers: Vec<Shaper>,
    urls: Vec<Vec<String>>,
}

impl PeerLinks {
    fn start(o: &Opts, ports: &[u16]) -> Result<PeerLinks> {
        let mut shapers = Vec::new();
        let mut urls = vec![vec![String::new(); ports.len()]; o.clusters];
        for (x, row) in urls.iter_mut().enumerate() {
            for y in 0..o.clusters {
                let serving: Vec<usize> = (y * o.nodes..(y + 1) * o.nodes).collect();
                let upstreams: Vec<String> = serving
                    .iter()
                    .map(|&m| format!("127.0.0.1:{}", ports[m]))
                    .collect();
                let (rtt, mbit) = if x == y {
                    (o.peer_rtt, o.peer_mbit)
                } else {
                    (o.cross_rtt, o.cross_mbit)
                };
                let s = Shaper::routes(&upstreams, rtt, mbit)?;
                for (&m, a) in serving.iter().zip(&s.addrs) {
                    row[m] = format!("http://{a}");
                }
                shapers.push(s);
            }
        }
        Ok(PeerLinks { shapers, urls })
    }
}

fn run_breakfs(w: &World, deps: &[Deployment], dir: &Path, variant: Strategy) -> Result<Outcome> {
    let o = w.o;
    let repo = if variant == Strategy::NoRefactor {
        "orig"
    } else {
        "refactored"
    };
    // Ports chosen first, so that each node starts knowing its peers.
    let ports: Vec<u16> = (0..o.clusters * o.nodes)
        .map(|_| harness::reserve_port())
        .collect();
    let peer_links = if variant == Strategy::NoPeers {
        None
    } else {
        Some(PeerLinks::start(o, &ports)?)
    };
    let mut nodes: Vec<Node> = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let c = n / o.nodes;
        let ndir = dir.join(format!("node{n}"));
        std::fs::create_dir_all(&ndir)?;
        // The node reaches the registry through its cluster's link and
        // every other node through the shaped peer links; it learns no
        // other addresses (they would bypass the shaping).
        let mut extra: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--prefetch-rate".into(),
            background_rate(o).to_string(),
            "--no-learn-peers".into(),
            "--registry-endpoint".into(),
            format!("{}={}", w.reg.host(), w.links[c].addr),
        ];
        if let Some(pl) = &peer_links {
            for (m, url) in pl.urls[c].iter().enumerate() {
                if m != n {
                    extra.push("--peer".into());
                    extra.push(url.clone());
                }
            }
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        nodes.push(Node::start(w.env, &ndir, &extra, "warn")?);
    }
    let entries: Vec<(String, String, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(n, node)| (format!("n{n}"), node.url.clone(), n / o.nodes))
        .collect();
    // The planner may keep a quarter of the distinct bytes per cluster.
    let cache_sum = (variant != Strategy::NoPrefetch).then_some(distinct_bytes(w.refactored) / 4);
    let sched = SchedProc::start(w.env, &entries, cache_sum)?;
    let load = LeastLoaded::new(o);
    let name = variant.name();
    // Bytes moved once every deployment is ready and the nodes' background
    // work (planned prefetch, hydration) has gone quiet, before the checks
    // (which read sampled files and so fetch more).
    // Every pod is placed by then: the planner stops (prefetch for pods
    // that never come is not counted), the peer links are lifted like the
    // cloud's, and what the nodes were asked to do finishes.
    let measured: Mutex<Option<(u64, u64)>> = Mutex::new(None);
    let at_all_ready = || {
        sched.stop();
        for l in peer_links.iter().flat_map(|p| &p.shapers) {
            l.lift();
        }
        *measured.lock().unwrap() = Some(bytes_when_quiet(&nodes));
    };
    let secs = replay_then(
        w,
        name,
        deps,
        |i, d, ready| {
            let image = &w.images[d.image];
            // Everyone names the image by the registry's own address; each
            // node reaches it through its cluster's link.
            let image_ref = format!("{}/{repo}/{}:{}", w.reg.host(), image.family, image.tag);
            let names: Vec<String> = (d.cluster * o.nodes..(d.cluster + 1) * o.nodes)
                .map(|n| format!("n{n}"))
                .collect();
            let best = if variant == Strategy::NoSched {
                format!("n{}", load.pick(o, d.cluster))
            } else {
                sched.best(&format!("d{i}"), &image_ref, &names)?
            };
            // The placement feeds popularity, for the prefetch planner.
            let _ = curl(
                &format!("{}/plan?image={image_ref}&node={best}", sched.url),
                &[],
                None,
            );
            let n: usize = best.trim_start_matches('n').parse()?;
            let cdir = dir.join(format!("c{i}"));
            // Mounts fetch what is read (lazy, like lazy-cloud); whole
            // layers come from the planner's prefetch (and, with `hydrate`,
            // from each mount's background hydration).
            let mut args = vec![
                "--node".to_string(),
                format!("unix:{}", nodes[n].socket.display()),
            ];
            if variant != Strategy::Hydrate {
                args.push("--no-hydrate".to_string());
            }
            let m = NodeMount::with_args(
                w.env,
                &args,
                &format!("docker://{image_ref}"),
                &cdir.join("image"),
            )?;
            ready_on_mount(w, m, &cdir, d, ready, &format!("{name} deployment {i}"))?;
            Ok(())
        },
        &at_all_ready,
    );
    if secs.is_err() && !INTERRUPTED.load(Ordering::SeqCst) {
        // A node that died mid-run leaves its mounts answering ENOTCONN:
        // say which did, and how (not when the run was interrupted: the
        // nodes were told to stop then).
        for (n, node) in nodes.iter_mut().enumerate() {
            if let Some(c) = node.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                eprintln!("testbed: {name}: node {n} had exited before the teardown: {status}");
            }
        }
    }
    let secs = secs?;
    check_interrupt()?;
    let (cloud, peer) = measured
        .into_inner()
        .unwrap()
        .ok_or_else(|| anyhow!("{name}: the bytes moved were not measured"))?;
    let cache = nodes.iter().map(|n| n.store_bytes().unwrap_or(0)).sum();
    drop(sched);
    for n in &nodes {
        n.ask_to_stop();
    }
    drop(nodes);
    drop(peer_links);
    Ok(Outcome {
        secs,
        cloud,
        peer,
        cache,
    })
}

/// Bytes the nodes fetched from the cloud and from peers, read once their
/// background work (hydration, planned prefetch) has been quiet for 6 s,
/// at most 30 s after the call: what the deployments and the work they set
/// off moved (the planner would go on filling the clusters' caches for
/// deployments that never come).
fn bytes_when_quiet(nodes: &[Node]) -> (u64, u64) {
    let moved = || -> (u64, u64) {
        nodes.iter().fold((0, 0), |(c, p), n| {
            (
                c + n.source_bytes("cloud").unwrap_or(0.0) as u64,
                p + n.source_bytes("peer").unwrap_or(0.0) as u64,
            )
        })
    };
    let mut last = moved();
    let mut quiet = 0;
    let until = Instant::now() + Duration::from_secs(30);
    while quiet < 6 && Instant::now() < until && !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
        let now = moved();
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    last
}

/// Each node's background budget (bytes/s, any source): half the
/// cluster's cloud link, shared by its nodes.
fn background_rate(o: &Opts) -> u64 {
    o.cloud_mbit * 1_000_000 / 8 / 2 / o.nodes.max(1) as u64
}

/// Bytes of the distinct layers of `images`.
fn distinct_bytes(images: &[Refactored]) -> u64 {
    let distinct: HashMap<&str, u64> = images
        .iter()
        .flat_map(|r| r.layers.iter().map(|(d, size)| (d.as_str(), *size)))
        .collect();
    distinct.values().sum()
}

// ---------------------------------------------------------------------------

/// An SVG strip plot of each strategy's times to ready (one dot per
/// deployment, a bar at the median), log-scaled seconds.
fn svg_plot(results: &[(Strategy, Outcome)]) -> String {
    let (w, row, left, top) = (760.0, 34.0, 230.0, 20.0);
    let h = top * 2.0 + row * results.len() as f64 + 30.0;
    let all = results.iter().flat_map(|(_, v)| v.secs.iter().copied());
    let lo = all.clone().fold(f64::MAX, f64::min).max(0.01);
    let hi = all.fold(0.0, f64::max).max(lo * 2.0);
    let (l0, l1) = (lo.log10().floor(), hi.log10().ceil());
    let x = |secs: f64| left + (secs.max(1e-6).log10() - l0) / (l1 - l0) * (w - left - 20.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let bottom = top + row * results.len() as f64;
    let mut d = l0;
    while d <= l1 {
        let v = 10f64.powf(d);
        let xv = x(v);
        out.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>\n\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v} s</text>\n",
            bottom + 16.0
        ));
        d += 1.0;
    }
    for (i, (s, v)) in results.iter().enumerate() {
        let y = top + row * (i as f64 + 0.5);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 10.0,
            y + 4.0,
            s.name()
        ));
        for (k, secs) in v.secs.iter().enumerate() {
            let jitter = ((k * 7919) % 11) as f64 - 5.0;
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#3060c0\" fill-opacity=\"0.5\"/>\n",
                x(*secs),
                y + jitter
            ));
        }
        let mut t: Vec<f64> = v.secs.clone();
        let m = median(&mut t);
        out.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#c03030\" stroke-width=\"3\"/>\n",
            x(m),
            y - 12.0,
            y + 12.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"{:.1}\">time to ready per deployment (dots), median (red bar); log scale</text>\n</svg>\n",
        h - 4.0
    ));
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// This machine, for the report.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} × {cpu}, {mem_gib:.0} GiB RAM, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

/// The node logs of a failed strategy, kept in target/testbed-logs/FLAG.
fn keep_logs(dir: &Path, flag: &str) {
    let keep = Path::new("target/testbed-logs").join(flag);
    let _ = std::fs::remove_dir_all(&keep);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let log = e.path().join("node.log");
        if log.exists() && std::fs::create_dir_all(&keep).is_ok() {
            let name = format!("{}.log", e.file_name().to_string_lossy());
            let _ = std::fs::copy(&log, keep.join(name));
        }
    }
    if keep.exists() {
        eprintln!(
            "testbed: the node logs of the failed strategy are in {}",
            keep.display()
        );
    }
}

/// A finished run: the strategies' outcomes and the Markdown report.
pub struct Report {
    /// Each strategy's outcome, in the order run.
    pub results: Vec<(Strategy, Outcome)>,
    /// The report: settings, machine, table.
    pub markdown: String,
    /// The strip plot of times to ready.
    pub svg: String,
    /// Deployments replayed.
    pub deployments: usize,
}

/// The whole benchmark with `o`, in a temp dir of its own (removed after).
pub fn run_testbed(o: &Opts) -> Result<Report> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the testbed needs root (FUSE mounts, overlayfs, chroot)"
    );
    let started = Instant::now();
    let families: Vec<&str> = o.families.iter().map(String::as_str).collect();
    let order = |t: &str| ["v1", "point", "v2"].iter().position(|x| *x == t);
    let mut images = corpus::build_families(&families)?;
    images.sort_by(|a, b| (a.family, order(&a.tag)).cmp(&(b.family, order(&b.tag))));
    let deps = workload(o, &images)?;
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-testbed")
        .tempdir()?;
    eprintln!("testbed: working in {}", tmpdir.path().display());
    let result = (|| {
        let mut reg = TestRegistry::start();
        let env = Env {
            tmp: tmpdir.path().to_path_buf(),
            run_dir: tmpdir.path().join("run"),
            link: reg.host(),
        };
        std::fs::create_dir_all(&env.run_dir)?;
        check_interrupt()?;
        let refactored = fill_registry(&env, &mut reg, &images)?;
        let refs = parallel(&images, 2, |im| reference(&env, im, 40))?;
        check_interrupt()?;
        let links: Vec<Shaper> = (0..o.clusters)
            .map(|_| Shaper::start(&reg.host(), o.cloud_rtt, o.cloud_mbit))
            .collect::<Result<_>>()?;
        let setup_secs = started.elapsed().as_secs_f64();
        eprintln!(
            "testbed: {} deployments of {} images on {} × {} nodes, set up in {setup_secs:.0} s",
            deps.len(),
            images.len(),
            o.clusters,
            o.nodes,
        );
        let w = World {
            o,
            env: &env,
            reg: &reg,
            links: &links,
            images: &images,
            refs: &refs,
            refactored: &refactored,
        };
        let work = strategies_dir(&env.tmp)?;
        let mut results: Vec<(Strategy, Outcome)> = Vec::new();
        for s in &o.strategies {
            check_interrupt()?;
            let dir = work.join(s.flag());
            std::fs::create_dir_all(&dir)?;
            for l in &links {
                l.put_back();
            }
            let t = Instant::now();
            let r = match s {
                Strategy::DockerLike => run_docker_like(&w, &deps, &dir),
                Strategy::Containerd => run_containerd(&w, &deps, &dir),
                Strategy::LazyCloud => run_lazy_cloud(&w, &deps, &dir),
                v => run_breakfs(&w, &deps, &dir, *v),
            };
            detach_under(&dir);
            if r.is_err() {
                keep_logs(&dir, s.flag());
            }
            let _ = std::fs::remove_dir_all(&dir);
            let r = r.with_context(|| format!("strategy {}", s.name()))?;
            eprintln!(
                "testbed: strategy {} done in {:.0} s: median time to ready {:.2} s, {:.0} MB from the cloud, {:.0} MB from peers, caches {:.0} MB",
                s.name(),
                t.elapsed().as_secs_f64(),
                median(&mut r.secs.clone()),
                r.cloud as f64 / 1e6,
                r.peer as f64 / 1e6,
                r.cache as f64 / 1e6,
            );
            results.push((*s, r));
        }
        let markdown = report(
            o,
            &deps,
            &images,
            &refactored,
            &results,
            setup_secs,
            started,
        );
        let svg = svg_plot(&results);
        Ok(Report {
            results,
            markdown,
            svg,
            deployments: deps.len(),
        })
    })();
    detach_under(tmpdir.path());
    drop(tmpdir);
    // Interrupted, whatever failed first failed for that reason.
    result.map_err(|e: anyhow::Error| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            e.context("interrupted: stopped and cleaned up")
        } else {
            e
        }
    })
}

/// Where each strategy keeps its nodes' layers, caches and containers: a
/// tmpfs of half the memory at `tmp/s` (unmounted with the rest at the
/// end), else `tmp/s` on disk. Removing the gigabytes a strategy leaves
/// takes minutes on a file system mounted with `discard` (each unlink
/// waits for the disk to discard its blocks), and the next strategy would
/// wait for it. Writing to memory rather than disk, if anything, favours
/// the strategies that write the most (docker-like and containerd
/// extract every layer).
fn strategies_dir(tmp: &Path) -> Result<PathBuf> {
    let dir = tmp.join("s");
    std::fs::create_dir_all(&dir)?;
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let mounted = mem_kb > 0
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}k,mode=0700", mem_kb / 2))
            .arg("breakfs-testbed")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
    if mounted {
        eprintln!(
            "testbed: strategies work in a tmpfs of {} GB at {}",
            mem_kb / 2 / 1_000_000,
            dir.display()
        );
    } else {
        eprintln!(
            "testbed: warning: no tmpfs at {}: strategies work on disk, and removing what each leaves may take minutes",
            dir.display()
        );
    }
    Ok(dir)
}

fn report(
    o: &Opts,
    deps: &[Deployment],
    images: &[CorpusImage],
    refactored: &[Refactored],
    results: &[(Strategy, Outcome)],
    setup_secs: f64,
    started: Instant,
) -> String {
    let med = |s: Strategy| {
        results
            .iter()
            .find(|(x, _)| *x == s)
            .map(|(_, v)| median(&mut v.secs.clone()))
    };
    let base_bytes = results
        .iter()
        .find(|(s, _)| *s == Strategy::DockerLike)
        .map(|(_, v)| v.cloud);
    let ratio = |x: f64, b: Option<f64>| b.map_or("–".into(), |b| format!("{:.2}", x / b));
    let mut table = String::from(
        "| strategy | median time to ready | p90 | mean | ÷ docker-like | ÷ containerd | ÷ lazy-cloud | from the cloud | ÷ docker-like | from peers | cache at the end |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (s, v) in results {
        let mut t = v.secs.clone();
        let m = median(&mut t);
        let p90 = t[(t.len() * 9 / 10).min(t.len() - 1)];
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        table.push_str(&format!(
            "| {} | {m:.2} s | {p90:.2} s | {mean:.2} s | {} | {} | {} | {:.0} MB | {} | {:.0} MB | {:.0} MB |\n",
            s.name(),
            ratio(m, med(Strategy::DockerLike)),
            ratio(m, med(Strategy::Containerd)),
            ratio(m, med(Strategy::LazyCloud)),
            v.cloud as f64 / 1e6,
            ratio(v.cloud as f64, base_bytes.map(|b| b.max(1) as f64)),
            v.peer as f64 / 1e6,
            v.cache as f64 / 1e6,
        ));
    }
    let orig: u64 = images
        .iter()
        .flat_map(|im| im.layers.iter().map(|l| (l.digest.as_str(), l.size)))
        .collect::<HashMap<&str, u64>>()
        .values()
        .sum();
    let per_cluster: Vec<usize> = (0..o.clusters)
        .map(|c| deps.iter().filter(|d| d.cluster == c).count())
        .collect();
    format!(
        "### Edge testbed\n\n`cargo bench --bench testbed -- --clusters {} --nodes {} --deployments {} --replay-secs {} --seed {} \
         --cloud-rtt {} --cloud-mbit {} --peer-rtt {} --peer-mbit {} --cross-rtt {} --cross-mbit {} --families {}`\n\n\
         {} deployments of {} images (the IBM trace sample's order and arrival times scaled into {} s, versions advancing \
         v1 → point → v2; deployments per cluster {:?}) on {} clusters × {} nodes. Links: each cluster reaches the \
         registry through its own {} ms / {} Mbit/s link shared by its nodes; node ↔ node {} ms / {} Mbit/s inside a \
         cluster, {} ms / {} Mbit/s across (one shared link per pair of clusters); a breakfs node's background work \
         (prefetch) at most {:.2} MB/s (half the cluster's cloud link over its nodes). The images' distinct layers are {:.0} MB \
         compressed as built, {:.0} MB refactored jointly. Seed {}. Every deployment's rootfs matched the \
         original image on sampled file hashes. Machine: {}. Set-up {:.0} s (cached parts reused), total {:.0} s.\n\n{table}",
        o.clusters,
        o.nodes,
        o.deployments,
        o.replay_secs,
        o.seed,
        o.cloud_rtt,
        o.cloud_mbit,
        o.peer_rtt,
        o.peer_mbit,
        o.cross_rtt,
        o.cross_mbit,
        o.families.join(","),
        deps.len(),
        images.len(),
        o.replay_secs,
        per_cluster,
        o.clusters,
        o.nodes,
        o.cloud_rtt,
        o.cloud_mbit,
        o.peer_rtt,
        o.peer_mbit,
        o.cross_rtt,
        o.cross_mbit,
        background_rate(o) as f64 / 1e6,
        orig as f64 / 1e6,
        distinct_bytes(refactored) as f64 / 1e6,
        o.seed,
        machine(),
        setup_secs,
        started.elapsed().as_secs_f64(),
    )
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let Some(o) = parse_opts()? else {
        println!("{USAGE}");
        return Ok(());
    };
    catch_interrupts();
    let r = run_testbed(&o)?;
    println!("{}", r.markdown);
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-testbed.md", &r.markdown)?;
    std::fs::write("target/bench-testbed.svg", &r.svg)?;
    eprintln!("testbed: wrote target/bench-testbed.md and target/bench-testbed.svg");
    Ok(())
}
