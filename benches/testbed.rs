//! The edge testbed: deployments replayed on K clusters × N nodes, each
//! strategy measured from the deployment decision until a real command of
//! the image has run to completion in its rootfs.
//!
//! * the cloud: a real `docker-registry` holding the corpus images in
//!   original and refactored form, reached by every cluster through its own
//!   `breakfs shape` link (default 50 ms RTT, 100 Mbit/s, shared by the
//!   cluster's nodes);
//! * the workload: the IBM trace sample's deployments in order (a client's
//!   run of blob requests for a repository), repositories mapped onto corpus
//!   families by popularity, the version advancing with trace time (v1, then
//!   the point release, then v2: version updates), clients onto clusters;
//! * strategies, each from empty caches on the same deployments:
//!   **docker-like** (layers downloaded one by one through the link, each
//!   extracted in turn into its own directory, the rootfs an overlay of
//!   them, as overlay2 does; per-node layer store; least-loaded node),
//!   **containerd** (the real one, one per node: `ctr image pull
//!   --plain-http` through the link and `ctr run`; least-loaded node),
//!   **lazy-cloud** (`breakfs mount --standalone` of the original image,
//!   cloud only, per-node cache; least-loaded node), **breakfs** (a
//!   `breakfs node` per node with its cluster's nodes as peers, the
//!   refactored images, `breakfs sched` placing each pod and planning
//!   prefetch).
//!
//! Each deployment's rootfs is checked against the original image (content
//! hashes of sampled files, from `umoci unpack`); the run fails on any
//! difference. `cargo bench --bench testbed -- [--clusters K] [--nodes N]
//! [--families a,b] [--deployments D] [--seed S] [--cloud-rtt MS]
//! [--cloud-mbit M] [--strategies s,t]`; writes target/bench-testbed.md.
//!
//! First cut: deployments run one at a time; the ablations are not in
//! yet; peer links are plain loopback (not shaped).
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

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use corpus::CorpusImage;
use harness::{
    Env, Node, NodeMount, Published, Shaper, detach_under, is_mountpoint, publish, run, run_chroot,
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

struct Opts {
    clusters: usize,
    nodes: usize,
    families: Vec<String>,
    deployments: usize,
    seed: u64,
    cloud_rtt: u64,
    cloud_mbit: u64,
    strategies: Vec<Strategy>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Strategy {
    DockerLike,
    Containerd,
    LazyCloud,
    Breakfs,
    /// Ablations: breakfs without one of its parts.
    NoRefactor,
    NoPeers,
    NoPrefetch,
    NoSched,
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
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Strategy::NoRefactor => "no-refactor",
            Strategy::NoPeers => "no-peers",
            Strategy::NoPrefetch => "no-prefetch",
            Strategy::NoSched => "no-sched",
            s => s.name(),
        }
    }

    const ALL: [Strategy; 8] = [
        Strategy::DockerLike,
        Strategy::Containerd,
        Strategy::LazyCloud,
        Strategy::Breakfs,
        Strategy::NoRefactor,
        Strategy::NoPeers,
        Strategy::NoPrefetch,
        Strategy::NoSched,
    ];
    fn parse(s: &str) -> Result<Strategy> {
        Strategy::ALL
            .into_iter()
            .find(|x| x.flag() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Strategy::ALL.iter().map(|x| x.flag()).collect();
                anyhow!("unknown strategy {s:?}: {}", names.join(", "))
            })
    }
}

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        clusters: 4,
        nodes: 4,
        families: corpus::FAMILIES
            .iter()
            .map(|f| f.name.to_string())
            .collect(),
        deployments: 40,
        seed: 1,
        cloud_rtt: 50,
        cloud_mbit: 100,
        strategies: Strategy::ALL.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow!("{a} wants a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| anyhow!("{a} wants a number, not {v:?}"))
        };
        match a.as_str() {
            "--bench" => {}
            "--clusters" => o.clusters = num(val()?)? as usize,
            "--nodes" => o.nodes = num(val()?)? as usize,
            "--deployments" => o.deployments = num(val()?)? as usize,
            "--seed" => o.seed = num(val()?)?,
            "--cloud-rtt" => o.cloud_rtt = num(val()?)?,
            "--cloud-mbit" => o.cloud_mbit = num(val()?)?,
            "--families" => o.families = val()?.split(',').map(String::from).collect(),
            "--strategies" => {
                o.strategies = val()?
                    .split(',')
                    .map(Strategy::parse)
                    .collect::<Result<_>>()?
            }
            other => bail!(
                "unknown argument {other:?}: --clusters K --nodes N --families a,b --deployments D \
                 --seed S --cloud-rtt MS --cloud-mbit M --strategies docker-like,containerd,lazy-cloud,breakfs,no-refactor,no-peers,no-prefetch,no-sched"
            ),
        }
    }
    ensure!(
        o.clusters > 0 && o.nodes > 0 && o.deployments > 0,
        "--clusters, --nodes and --deployments must be positive"
    );
    Ok(o)
}

// ---------------------------------------------------------------------------
// The workload.

/// One deployment: which image, from which cluster.
#[derive(Clone, Debug)]
struct Deployment {
    cluster: usize,
    image: usize,
}

/// The trace's deployments mapped onto the images (`images` sorted by
/// family then tag v1, point, v2).
fn workload(o: &Opts, images: &[CorpusImage]) -> Result<Vec<Deployment>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/ibm-dal09-blobs-sample.csv"
    );
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
    // Runs of a client's requests for one repository.
    let mut runs: Vec<(String, String)> = Vec::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for (_, c, repo) in &rows {
        if last.get(c) != Some(repo) {
            runs.push((c.clone(), repo.clone()));
            last.insert(c.clone(), repo.clone());
        }
    }
    // Repositories by popularity onto families; clients onto clusters.
    let mut pop: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, r) in &runs {
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
    let mut clients: Vec<&str> = runs.iter().map(|(c, _)| c.as_str()).collect();
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
    runs.iter()
        .take(n)
        .enumerate()
        .map(|(i, (c, r))| {
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
            })
        })
        .collect()
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

fn reference(env: &Env, image: &CorpusImage, samples: usize) -> Result<Reference> {
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

struct Sample {
    secs: f64,
    cloud_bytes: u64,
}

struct World<'a> {
    o: &'a Opts,
    env: &'a Env,
    reg: &'a TestRegistry,
    links: &'a [Shaper],
    images: &'a [CorpusImage],
    refs: &'a [Reference],
    published: &'a [Published],
}

/// The least-loaded node of `cluster` (fewest deployments so far; the
/// default scheduler's least-requested with equal pods).
fn least_loaded(load: &mut [usize], o: &Opts, cluster: usize) -> usize {
    let range = cluster * o.nodes..(cluster + 1) * o.nodes;
    let n = range
        .clone()
        .min_by_key(|&n| (load[n], n))
        .unwrap_or(range.start);
    load[n] += 1;
    n
}

fn run_docker_like(w: &World, deps: &[Deployment], dir: &Path) -> Result<Vec<Sample>> {
    let mut load = vec![0usize; w.o.clusters * w.o.nodes];
    let mut out = Vec::new();
    for (i, d) in deps.iter().enumerate() {
        check_interrupt()?;
        let node = least_loaded(&mut load, w.o, d.cluster);
        let store = dir.join(format!("node{node}/layers"));
        std::fs::create_dir_all(&store)?;
        let image = &w.images[d.image];
        let repo = format!("orig/{}", image.family);
        let host = &w.links[d.cluster].addr;
        let t = Instant::now();
        let mut bytes = 0u64;
        let (layers, mbytes) = manifest_layers(host, &repo, &image.tag)?;
        bytes += mbytes;
        let mut lower = Vec::new();
        for digest in &layers {
            let hex = digest.trim_start_matches("sha256:");
            let ldir = store.join(hex);
            let done = store.join(format!("{hex}.done"));
            if !done.exists() {
                let blob = store.join(format!("{hex}.blob"));
                curl(
                    &format!("http://{host}/v2/{repo}/blobs/{digest}"),
                    &[],
                    Some(&blob),
                )?;
                bytes += std::fs::metadata(&blob)?.len();
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
        let secs = t.elapsed().as_secs_f64();
        verify(
            &ov.rootfs,
            &w.refs[d.image],
            &format!("docker-like deployment {i}"),
        )?;
        drop(ov);
        let _ = std::fs::remove_dir_all(&cdir);
        out.push(Sample {
            secs,
            cloud_bytes: bytes,
        });
        progress("docker-like", i, deps.len(), secs);
    }
    Ok(out)
}

fn progress(what: &str, i: usize, n: usize, secs: f64) {
    eprintln!(
        "testbed: {what} deployment {}/{n}: ready in {secs:.2} s",
        i + 1
    );
}

/// The rest of a deployment once its image is mounted at `m`: the
/// container's overlay, the command, the time since `t`; then the check
/// against the original and the clean-up. Returns the seconds to ready
/// and the bytes the mount fetched.
fn ready_on_mount(
    w: &World,
    m: NodeMount,
    cdir: &Path,
    d: &Deployment,
    t: Instant,
    what: &str,
) -> Result<(f64, u64)> {
    let image = &w.images[d.image];
    let ov = Overlay::mount(cdir, &m.point.display().to_string())?;
    run_chroot(&ov.rootfs, &image.command)?;
    let secs = t.elapsed().as_secs_f64();
    verify(&ov.rootfs, &w.refs[d.image], what)?;
    let bytes = m.fetched_bytes();
    drop(ov);
    drop(m);
    let _ = std::fs::remove_dir_all(cdir);
    Ok((secs, bytes))
}

/// containerd itself, one per node: `ctr image pull --plain-http` through
/// the cluster's link, then `ctr run` of the command (runc). Cloud bytes:
/// the image's layers the node did not hold yet (containerd keeps pulled
/// content).
fn run_containerd(w: &World, deps: &[Deployment], dir: &Path) -> Result<Vec<Sample>> {
    let nodes: Vec<containerd::TestContainerd> = (0..w.o.clusters * w.o.nodes)
        .map(|_| containerd::TestContainerd::start())
        .collect::<Result<_>>()?;
    let mut held: Vec<std::collections::HashSet<String>> = vec![Default::default(); nodes.len()];
    let mut load = vec![0usize; nodes.len()];
    let mut out = Vec::new();
    for (i, d) in deps.iter().enumerate() {
        check_interrupt()?;
        let n = least_loaded(&mut load, w.o, d.cluster);
        let image = &w.images[d.image];
        let reference = format!(
            "{}/orig/{}:{}",
            w.links[d.cluster].addr, image.family, image.tag
        );
        let t = Instant::now();
        nodes[n]
            .pull_plain_http(&reference)
            .with_context(|| format!("containerd log:\n{}", nodes[n].log()))?;
        let args: Vec<&str> = image.command.iter().map(String::as_str).collect();
        let o = nodes[n].run(&reference, &args)?;
        ensure!(
            o.status.success(),
            "ctr run {reference} {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let secs = t.elapsed().as_secs_f64();
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
        let bytes = harness::layout_layers(&image.layout, &image.tag)?
            .into_iter()
            .filter(|(digest, _)| held[n].insert(digest.clone()))
            .map(|(_, size)| size)
            .sum();
        out.push(Sample {
            secs,
            cloud_bytes: bytes,
        });
        progress("containerd", i, deps.len(), secs);
    }
    Ok(out)
}

fn run_lazy_cloud(w: &World, deps: &[Deployment], dir: &Path) -> Result<Vec<Sample>> {
    let mut load = vec![0usize; w.o.clusters * w.o.nodes];
    let mut out = Vec::new();
    for (i, d) in deps.iter().enumerate() {
        check_interrupt()?;
        let node = least_loaded(&mut load, w.o, d.cluster);
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
        let t = Instant::now();
        let m = NodeMount::with_args(w.env, &args, &reference, &cdir.join("image"))?;
        let (secs, bytes) =
            ready_on_mount(w, m, &cdir, d, t, &format!("lazy-cloud deployment {i}"))?;
        out.push(Sample {
            secs,
            cloud_bytes: bytes,
        });
        progress("lazy-cloud", i, deps.len(), secs);
    }
    Ok(out)
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
}

impl Drop for SchedProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_breakfs(
    w: &World,
    deps: &[Deployment],
    dir: &Path,
    variant: Strategy,
) -> Result<Vec<Sample>> {
    let o = w.o;
    let repo = if variant == Strategy::NoRefactor {
        "orig"
    } else {
        "refactored"
    };
    // Ports chosen first, so that each node starts knowing its cluster's
    // peers.
    let ports: Vec<u16> = (0..o.clusters * o.nodes)
        .map(|_| registry::free_port())
        .collect();
    let url = |n: usize| format!("http://127.0.0.1:{}", ports[n]);
    let mut nodes: Vec<Node> = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let c = n / o.nodes;
        let ndir = dir.join(format!("node{n}"));
        std::fs::create_dir_all(&ndir)?;
        let mut extra: Vec<String> = vec!["--listen".into(), format!("127.0.0.1:{port}")];
        for m in c * o.nodes..(c + 1) * o.nodes {
            if m != n && variant != Strategy::NoPeers {
                extra.push("--peer".into());
                extra.push(url(m));
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
    let total: u64 = w.published.iter().map(|p| p.size).sum();
    let cache_sum = (variant != Strategy::NoPrefetch).then_some(total / o.clusters as u64);
    let sched = SchedProc::start(w.env, &entries, cache_sum)?;
    let mut load = vec![0usize; nodes.len()];
    let cloud_now = |nodes: &[Node]| -> u64 {
        nodes
            .iter()
            .map(|n| n.cloud_bytes().unwrap_or(0.0) as u64)
            .sum()
    };
    let mut out = Vec::new();
    for (i, d) in deps.iter().enumerate() {
        check_interrupt()?;
        let image = &w.images[d.image];
        let cloud_before = cloud_now(&nodes);
        // The scheduler resolves images itself (control plane, unshaped).
        let sched_ref = format!("{}/{repo}/{}:{}", w.reg.host(), image.family, image.tag);
        let names: Vec<String> = (d.cluster * o.nodes..(d.cluster + 1) * o.nodes)
            .map(|n| format!("n{n}"))
            .collect();
        let t = Instant::now();
        let body = serde_json::json!({
            "Pod": {"metadata": {"name": format!("d{i}")},
                    "spec": {"containers": [{"name": "app", "image": sched_ref}]}},
            "NodeNames": names,
        });

        let best = if variant == Strategy::NoSched {
            format!("n{}", least_loaded(&mut load, o, d.cluster))
        } else {
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
                    .arg(format!("{}/prioritize", sched.url)),
                "POST /prioritize",
            )?)?;
            scores
                .iter()
                .max_by_key(|s| s["Score"].as_i64().unwrap_or(0))
                .and_then(|s| s["Host"].as_str())
                .ok_or_else(|| anyhow!("sched returned no scores"))?
                .to_string()
        };
        // The placement feeds popularity, for the prefetch planner.
        let _ = curl(
            &format!("{}/plan?image={sched_ref}&node={best}", sched.url),
            &[],
            None,
        );
        let n: usize = best.trim_start_matches('n').parse()?;
        let reference = format!(
            "docker://{}/{repo}/{}:{}",
            w.links[d.cluster].addr, image.family, image.tag
        );
        let cdir = dir.join(format!("c{i}"));
        let args = vec![
            "--node".to_string(),
            format!("unix:{}", nodes[n].socket.display()),
        ];
        let m = NodeMount::with_args(w.env, &args, &reference, &cdir.join("image"))?;
        let what = format!("{} deployment {i}", variant.name());
        let (secs, _) = ready_on_mount(w, m, &cdir, d, t, &what)?;
        // What every node fetched from the registry meanwhile: this
        // deployment, background hydration and planned prefetch.
        out.push(Sample {
            secs,
            cloud_bytes: cloud_now(&nodes).saturating_sub(cloud_before),
        });
        progress(variant.name(), i, deps.len(), secs);
    }
    drop(sched);
    drop(nodes);
    Ok(out)
}

// ---------------------------------------------------------------------------

fn push_original(env: &Env, reg: &TestRegistry, image: &CorpusImage) -> Result<()> {
    let _ = env;
    run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{}", image.layout.display(), image.tag))
            .arg(reg.reference(&format!("orig/{}:{}", image.family, image.tag))),
        "skopeo copy of the original image to the registry",
    )?;
    Ok(())
}

/// An SVG strip plot of each strategy's times to ready (one dot per
/// deployment, a bar at the median), log-scaled seconds.
fn svg_plot(results: &[(Strategy, Vec<Sample>)]) -> String {
    let (w, row, left, top) = (760.0, 34.0, 230.0, 20.0);
    let h = top * 2.0 + row * results.len() as f64 + 30.0;
    let all = results.iter().flat_map(|(_, v)| v.iter().map(|x| x.secs));
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
        for (k, sample) in v.iter().enumerate() {
            let jitter = ((k * 7919) % 11) as f64 - 5.0;
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#3060c0\" fill-opacity=\"0.5\"/>\n",
                x(sample.secs),
                y + jitter
            ));
        }
        let mut t: Vec<f64> = v.iter().map(|x| x.secs).collect();
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

fn main() -> Result<()> {
    let o = parse_opts()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the testbed needs root (FUSE mounts, overlayfs, chroot)"
    );
    // SAFETY-free: a plain flag set from the handler.
    let handler = nix::sys::signal::SigHandler::Handler(on_interrupt);
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // The handler only stores to an atomic.
        #[allow(unsafe_code)]
        let _ = unsafe { nix::sys::signal::signal(sig, handler) };
    }
    let started = Instant::now();
    let families: Vec<&str> = o.families.iter().map(String::as_str).collect();
    let mut images = corpus::build_families(&families)?;
    images.sort_by(|a, b| {
        (
            a.family,
            ["v1", "point", "v2"].iter().position(|t| *t == a.tag),
        )
            .cmp(&(
                b.family,
                ["v1", "point", "v2"].iter().position(|t| *t == b.tag),
            ))
    });
    let deps = workload(&o, &images)?;
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-testbed")
        .tempdir()?;
    let reg = TestRegistry::start();
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        link: reg.host(),
    };
    std::fs::create_dir_all(&env.run_dir)?;
    let mut published = Vec::new();
    let mut refs = Vec::new();
    for image in &images {
        check_interrupt()?;
        push_original(&env, &reg, image)?;
        published.push(publish(&env, &reg, image)?);
        refs.push(reference(&env, image, 40)?);
    }
    let links: Vec<Shaper> = (0..o.clusters)
        .map(|_| Shaper::start(&reg.host(), o.cloud_rtt, o.cloud_mbit))
        .collect::<Result<_>>()?;
    eprintln!(
        "testbed: {} deployments of {} images on {} × {} nodes, set up in {:.0} s",
        deps.len(),
        images.len(),
        o.clusters,
        o.nodes,
        started.elapsed().as_secs_f64()
    );
    let w = World {
        o: &o,
        env: &env,
        reg: &reg,
        links: &links,
        images: &images,
        refs: &refs,
        published: &published,
    };
    let mut results: Vec<(Strategy, Vec<Sample>)> = Vec::new();
    for s in &o.strategies {
        let dir = env.tmp.join(format!("strategy-{}", s.flag()));
        std::fs::create_dir_all(&dir)?;
        let r = match s {
            Strategy::DockerLike => run_docker_like(&w, &deps, &dir),
            Strategy::Containerd => run_containerd(&w, &deps, &dir),
            Strategy::LazyCloud => run_lazy_cloud(&w, &deps, &dir),
            v => run_breakfs(&w, &deps, &dir, *v),
        };
        detach_under(&dir);
        results.push((*s, r.with_context(|| format!("strategy {}", s.name()))?));
    }
    let base = results
        .iter()
        .find(|(s, _)| *s == Strategy::DockerLike)
        .map(|(_, v)| median(&mut v.iter().map(|s| s.secs).collect::<Vec<_>>()));
    let base_bytes = results
        .iter()
        .find(|(s, _)| *s == Strategy::DockerLike)
        .map(|(_, v)| v.iter().map(|s| s.cloud_bytes).sum::<u64>());
    let mut table = String::from(
        "| strategy | median time to ready | p90 | mean | vs docker-like (median) | bytes from the cloud | vs docker-like |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (s, v) in &results {
        let mut t: Vec<f64> = v.iter().map(|x| x.secs).collect();
        let med = median(&mut t);
        let p90 = t[(t.len() * 9 / 10).min(t.len() - 1)];
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        let bytes: u64 = v.iter().map(|x| x.cloud_bytes).sum();
        table.push_str(&format!(
            "| {} | {med:.2} s | {p90:.2} s | {mean:.2} s | {} | {:.1} MB | {} |\n",
            s.name(),
            base.map_or("–".into(), |b| format!("{:.2}", med / b)),
            bytes as f64 / 1e6,
            base_bytes.map_or("–".into(), |b| format!(
                "{:.2}",
                bytes as f64 / b.max(1) as f64
            )),
        ));
    }
    let report = format!(
        "### Edge testbed (first cut)\n\n`cargo bench --bench testbed -- --clusters {} --nodes {} --deployments {} --seed {} \
         --cloud-rtt {} --cloud-mbit {} --families {}`: {} deployments of {} images (IBM trace sample order, \
         versions advancing v1 → point → v2), one at a time; each cluster reaches the registry through its own \
         link of {} ms RTT and {} Mbit/s shared by its nodes; peers over loopback. Every deployment's rootfs \
         matched the original image on sampled file hashes. Machine: {} cores. Total run {:.0} s.\n\n{table}",
        o.clusters,
        o.nodes,
        o.deployments,
        o.seed,
        o.cloud_rtt,
        o.cloud_mbit,
        o.families.join(","),
        deps.len(),
        images.len(),
        o.cloud_rtt,
        o.cloud_mbit,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64(),
    );
    println!("{report}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-testbed.md", &report)?;
    std::fs::write("target/bench-testbed.svg", svg_plot(&results))?;
    drop(links);
    drop(reg);
    detach_under(tmpdir.path());
    drop(tmpdir);
    Ok(())
}
