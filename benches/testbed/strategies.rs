//! The strategies without breakfs' node daemon: docker-like (layers
//! downloaded and extracted one by one, overlay2-style), the real
//! containerd, and the eStargz baselines (the originals converted by
//! `ctr-remote`, mounted lazily from the cloud only); and what a lazily
//! mounted image needs to be ready.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};

use super::containerd;
use super::estargz::Conversion;
use super::harness::{self, NodeMount, is_mountpoint, run, run_chroot};
use super::interrupt::check_interrupt;
use super::reference::verify;
use super::replay::{Ready, replay};
use super::workload::Deployment;
use super::world::{LeastLoaded, Outcome, World, disk_bytes};

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
pub fn curl(url: &str, headers: &[&str], out: Option<&Path>) -> Result<Vec<u8>> {
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

pub fn run_docker_like(w: &World, deps: &[Deployment], dir: &Path) -> Result<Outcome> {
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
pub fn ready_on_mount(
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
pub fn run_containerd(w: &World, deps: &[Deployment], dir: &Path) -> Result<Outcome> {
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
        estimates: Vec::new(),
    })
}

/// The eStargz baselines: the original converted per layer by
/// `ctr-remote` (`conversion`), mounted lazily from the cloud only by
/// `breakfs mount --standalone --no-hydrate` with a per-node cache. The
/// mount reads the TOCs and fetches what is read, and, for an optimized
/// image, each layer's landmarked region at mount, as stargz-snapshotter
/// does. Cloud bytes: what each mount fetched until ready.
pub fn run_estargz(
    w: &World,
    deps: &[Deployment],
    dir: &Path,
    conversion: Conversion,
) -> Result<Outcome> {
    let load = LeastLoaded::new(w.o);
    let cloud = AtomicU64::new(0);
    let what = conversion.prefix();
    let secs = replay(w, what, deps, |i, d, ready| {
        let node = load.pick(w.o, d.cluster);
        let image = &w.images[d.image];
        let reference = format!(
            "docker://{}/{what}/{}:{}",
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
        let bytes = ready_on_mount(w, m, &cdir, d, ready, &format!("{what} deployment {i}"))?;
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
