//! Remote (lazy) layers of the containerd snapshotter, with a real
//! containerd 1.6, `ctr-remote` (stargz-snapshotter 0.12) and a real
//! docker-registry behind a counting proxy: `ctr-remote image rpull` of a
//! refactored image asks the registry for TOC ranges only, `ctr run` runs
//! its real command over one lazy FUSE mount per layer, and the rootfs
//! equals `umoci unpack` of the original; a second image sharing layers
//! mounts and fetches nothing twice; plain gzip and eStargz images pull
//! and run (an eStargz image lazily with rpull, its whiteouts and opaque
//! dir honoured by overlayfs); bad labels are refused or fall back, named;
//! a container reading over lazy layers survives restarts of the daemon.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use breakfs_node::snapshots_api::snapshots as pb;

use crate::mount::{assert_same, corpus, ok, original_tree, refactor_into};
use crate::node::{Node, metric, parse_metrics};
use crate::snapshotter::{
    PLUGIN, containerd_with, listed, refused, run, runtime, snapshotter_node, wait_for,
};
use crate::snapshotter_status::busybox_image;
use crate::support::containerd::{NAMESPACE, PULL_TIMEOUT, TestContainerd, output_with_timeout};
use crate::support::corpus::CorpusImage;
use crate::support::images::{estargz_layer, write_image};
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;
use crate::support::tree;

/// A registry behind a counting proxy, a node daemon serving the
/// snapshots API and a containerd using it.
///
/// Fields drop in order: the daemons stop before their work directory
/// goes (it went first, and a node still writing left it behind in /tmp).
pub(crate) struct Lab {
    pub(crate) reg: TestRegistry,
    pub(crate) proxy: CountingProxy,
    pub(crate) node: Node,
    pub(crate) ctrd: TestContainerd,
    pub(crate) sock: PathBuf,
    pub(crate) work: tempfile::TempDir,
}

impl Lab {
    pub(crate) fn start() -> Lab {
        Lab::start_with(&[])
    }

    /// [`start`](Self::start) with more flags for the node daemon.
    pub(crate) fn start_with(node_flags: &[&str]) -> Lab {
        let work = tempfile::Builder::new()
            .prefix("lazy")
            .tempdir_in("/tmp")
            .unwrap();
        let reg = TestRegistry::start();
        let proxy = CountingProxy::start(&reg.host());
        let sock = work.path().join("snap.sock");
        let node = snapshotter_node(work.path(), node_flags);
        let ctrd = containerd_with(&sock);
        Lab {
            work,
            reg,
            proxy,
            node,
            ctrd,
            sock,
        }
    }

    /// `REPO:TAG` as containerd and the node reach it: through the proxy.
    pub(crate) fn name(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.proxy.host())
    }

    /// Fail with both daemons' logs.
    pub(crate) fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\ncontainerd log:\n{}\nnode log:\n{}",
            self.ctrd.log(),
            self.node.log_text()
        )
    }

    fn ctr_remote(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(self.ctrd.address())
            .args(["--namespace", NAMESPACE])
            .args(args);
        let out = output_with_timeout(&mut cmd, PULL_TIMEOUT).unwrap();
        if !out.status.success() {
            self.fail(&format!(
                "ctr-remote {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        out
    }

    /// `ctr-remote image rpull --plain-http --snapshotter breakfs`.
    pub(crate) fn rpull(&self, reference: &str) {
        self.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            PLUGIN,
            reference,
        ]);
    }

    fn pull(&self, reference: &str) {
        if let Err(e) = self.ctrd.pull_plain_http(reference) {
            self.fail(&format!("{e:#}"));
        }
    }

    /// Remove image `reference` and let containerd's GC remove what it used.
    pub(crate) fn remove(&self, reference: &str) {
        ok(self.ctrd.ctr().args(["image", "rm", "--sync", reference]));
    }

    /// The layer digests of `repo_tag`, asked of the registry directly
    /// (not through the proxy).
    pub(crate) fn layers(&self, repo_tag: &str) -> Vec<String> {
        let raw = ok(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{repo_tag}", self.reg.host()),
        ]));
        let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }

    /// Requests of layer blobs since the last reset, with their ranges.
    fn layer_requests(&self, layers: &[String]) -> Vec<(String, Option<String>)> {
        self.proxy
            .requests_with_ranges()
            .into_iter()
            .filter(|(l, _)| layers.iter().any(|d| l.contains(d.as_str())))
            .collect()
    }

    /// The rootfs of the pulled `repo_tag` as containerd sees it: a view
    /// of its top snapshot, mounted with the command `ctr snapshot view
    /// --target` prints.
    fn rootfs(&self, repo_tag: &str, name: &str) -> BTreeMap<String, tree::Node> {
        let config = ok(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{repo_tag}", self.reg.host()),
        ]));
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        let mut top = String::new();
        for d in config["rootfs"]["diff_ids"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            top = if top.is_empty() {
                d.to_string()
            } else {
                breakfs_index::Digest::of(format!("{top} {d}").as_bytes()).to_string()
            };
        }
        let target = self.work.path().join(name);
        std::fs::create_dir(&target).unwrap();
        let snap = |args: &[&str]| {
            let mut c = self.ctrd.ctr();
            c.args(["snapshot", "--snapshotter", PLUGIN]).args(args);
            c.output().unwrap()
        };
        let t = target.to_string_lossy();
        let view = snap(&["view", "--target", &t, name, &top]);
        if !view.status.success() {
            self.fail(&format!(
                "ctr snapshot view of {top}: {}",
                String::from_utf8_lossy(&view.stderr)
            ));
        }
        let mount = String::from_utf8_lossy(&view.stdout).into_owned();
        ok(Command::new("sh").arg("-c").arg(mount.trim()));
        let got = tree::snapshot(&target);
        ok(Command::new("umount").arg(&target));
        // ctr's lease ends with the command: containerd's GC may have
        // taken the view already.
        let rm = snap(&["rm", name]);
        assert!(
            rm.status.success() || String::from_utf8_lossy(&rm.stderr).contains("not found"),
            "{rm:?}"
        );
        got.unwrap()
    }

    /// The lazy layer mounts the daemon serves now.
    pub(crate) fn layer_mounts(&self) -> BTreeSet<String> {
        let root = self.node.cache.join("snapshotter/l");
        let root = root.canonicalize().unwrap_or(root);
        let prefix = format!("{}/", root.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse"))
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    fn lazy_lines(&self) -> usize {
        self.node
            .log_text()
            .lines()
            .filter(|l| l.contains("is served lazily as snapshot"))
            .count()
    }
}

/// Whole-blob GETs (no Range) among `reqs`.
fn whole(reqs: &[(String, Option<String>)]) -> Vec<&String> {
    reqs.iter()
        .filter(|(l, r)| l.starts_with("GET ") && r.is_none())
        .map(|(l, _)| l)
        .collect()
}

/// Bytes asked for by the ranges of `reqs` (`bytes=A-B`).
fn range_bytes(reqs: &[(String, Option<String>)]) -> u64 {
    reqs.iter()
        .filter_map(|(_, r)| r.as_deref()?.strip_prefix("bytes=")?.split_once('-'))
        .filter_map(|(a, b)| Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?))
        .sum()
}

fn build(images: &[CorpusImage], tag: &str) -> CorpusImage {
    images
        .iter()
        .find(|i| i.family == "redis" && i.tag == tag)
        .unwrap()
        .clone()
}

/// Acceptance 1 and 3: rpull of a refactored image fetches TOC ranges
/// only and mounts nothing; `ctr run` runs its command over lazy layer
/// mounts (one per layer) and fetches part of the layers; the rootfs
/// equals umoci's; a second image sharing layers asks nothing for the
/// shared layers at rpull, mounts only its own, and no range is fetched
/// twice; removing the images unmounts every layer.
#[test]
fn rpull_of_refactored_images_is_lazy_and_shares_layers() {
    let images = corpus();
    let (v1, point) = (build(&images, "v1"), build(&images, "point"));
    let lab = Lab::start();
    refactor_into(
        &lab.reg,
        &[v1.clone(), point.clone()],
        &lab.work.path().join("refactor"),
    );
    let (v1_repo, point_repo) = ("refactored/redis:v1", "refactored/redis:point");
    let v1_layers = lab.layers(v1_repo);
    let point_layers = lab.layers(point_repo);
    let shared: Vec<String> = point_layers
        .iter()
        .filter(|d| v1_layers.contains(d))
        .cloned()
        .collect();
    assert!(!shared.is_empty(), "v1 and point share no layer");
    let v1_ref = lab.name(v1_repo);

    lab.proxy.reset();
    lab.rpull(&v1_ref);
    let pulled = lab.layer_requests(&v1_layers);
    let rpull_down = lab.proxy.bytes_down();
    assert!(
        whole(&pulled).is_empty(),
        "whole layer GETs at rpull: {pulled:?}"
    );
    assert!(!pulled.is_empty(), "no TOC was read");
    assert_eq!(lab.lazy_lines(), v1_layers.len(), "{}", lab.node.log_text());
    assert!(lab.layer_mounts().is_empty(), "rpull mounted layers");
    let m = parse_metrics(&lab.node.get("/metrics"));
    assert_eq!(
        metric(&m, "breakfs_snapshot_layer_prepares_total{path=\"lazy\"}"),
        v1_layers.len() as f64
    );
    assert_eq!(
        metric(&m, "breakfs_snapshots{kind=\"committed\",remote=\"true\"}"),
        v1_layers.len() as f64
    );
    let committed = listed(&lab.sock)
        .into_iter()
        .filter(|(_, k)| *k == pb::Kind::Committed as i32)
        .count();
    assert_eq!(committed, v1_layers.len());

    lab.proxy.reset();
    let out = run(
        &lab.ctrd,
        &lab.node,
        &v1_ref,
        &["redis-server", "--version"],
    );
    assert!(out.contains("Redis server v="), "{out}");
    let ran = lab.layer_requests(&v1_layers);
    let total: u64 = v1.layers.iter().map(|l| l.size).sum();
    let read = range_bytes(&ran);
    assert!(whole(&ran).is_empty(), "whole layer GETs at run: {ran:?}");
    assert!(
        read < total / 2,
        "the run fetched {read} of {total} layer bytes"
    );
    eprintln!(
        "rpull of {v1_ref} ({} layers): {} layer requests (all ranges), {} bytes asked, {rpull_down} bytes down \
         in all; run: {} range requests, {read} of {total} bytes",
        v1_layers.len(),
        pulled.len(),
        range_bytes(&pulled),
        ran.len()
    );
    let mounts_v1 = lab.layer_mounts();
    assert_eq!(mounts_v1.len(), v1_layers.len(), "{mounts_v1:?}");

    let expected = original_tree(&v1);
    assert_same(
        &expected,
        &lab.rootfs(v1_repo, "root-v1"),
        "rpull of refactored v1",
    );

    // The second image: its shared layers are neither asked for nor
    // mounted again.
    let point_ref = lab.name(point_repo);
    let before = lab.proxy.requests_with_ranges();
    lab.proxy.reset();
    lab.rpull(&point_ref);
    let asked = lab.layer_requests(&shared);
    assert!(
        asked.is_empty(),
        "shared layers asked again at rpull: {asked:?}"
    );
    assert!(whole(&lab.layer_requests(&point_layers)).is_empty());
    let out = run(
        &lab.ctrd,
        &lab.node,
        &point_ref,
        &["redis-server", "--version"],
    );
    assert!(out.contains("Redis server v="), "{out}");
    let mounts_both = lab.layer_mounts();
    let new: Vec<_> = mounts_both.difference(&mounts_v1).collect();
    let own = point_layers.len() - shared.len();
    assert_eq!(new.len(), own, "new mounts {new:?} for {own} own layers");
    assert!(mounts_v1.is_subset(&mounts_both));
    let mut seen = BTreeSet::new();
    for (l, r) in before.iter().chain(&lab.proxy.requests_with_ranges()) {
        if let Some(r) = r
            && l.contains("/blobs/")
        {
            assert!(
                seen.insert((l.clone(), r.clone())),
                "fetched twice: {l} {r}"
            );
        }
    }

    // The last remote snapshot of a layer takes its mount with it.
    lab.remove(&v1_ref);
    lab.remove(&point_ref);
    wait_for(Duration::from_secs(30), "the snapshots are removed", || {
        listed(&lab.sock).is_empty()
    });
    assert!(lab.layer_mounts().is_empty(), "{:?}", lab.layer_mounts());
}

/// Acceptance 2: `ctr image pull` of a plain gzip image and of an eStargz
/// image (`ctr-remote image convert --estargz --oci`) work and run (the
/// ordinary path); rpull of the eStargz image is lazy, and overlayfs
/// honours its whiteouts and opaque dir on the FUSE lower dirs: the
/// rootfs equals umoci's of the original.
#[test]
fn plain_and_estargz_images_pull_and_run_and_estargz_rpulls_lazily() {
    let images = corpus();
    let v1 = build(&images, "v1");
    let lab = Lab::start();
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", v1.layout.display()),
        &format!("docker://{}/plain/redis:v1", lab.reg.host()),
    ]));
    let plain = lab.name("plain/redis:v1");
    lab.pull(&plain);
    let out = run(&lab.ctrd, &lab.node, &plain, &["redis-server", "--version"]);
    assert!(out.contains("Redis server v="), "{out}");
    assert_eq!(lab.lazy_lines(), 0);

    let esgz = lab.name("esgz/redis:v1");
    lab.ctr_remote(&["image", "convert", "--estargz", "--oci", &plain, &esgz]);
    ok(lab
        .ctrd
        .ctr()
        .args(["image", "push", "--plain-http", &esgz]));
    lab.remove(&esgz);
    lab.pull(&esgz);
    let out = run(&lab.ctrd, &lab.node, &esgz, &["redis-server", "--version"]);
    assert!(out.contains("Redis server v="), "{out}");
    assert_eq!(lab.lazy_lines(), 0, "ctr image pull sets no remote labels");
    lab.remove(&esgz);
    lab.remove(&plain);
    wait_for(Duration::from_secs(30), "the snapshots are removed", || {
        listed(&lab.sock).is_empty()
    });

    let layers = lab.layers("esgz/redis:v1");
    lab.proxy.reset();
    lab.rpull(&esgz);
    let pulled = lab.layer_requests(&layers);
    assert!(
        whole(&pulled).is_empty(),
        "whole layer GETs at rpull: {pulled:?}"
    );
    assert_eq!(lab.lazy_lines(), layers.len(), "{}", lab.node.log_text());
    let out = run(&lab.ctrd, &lab.node, &esgz, &["redis-server", "--version"]);
    assert!(out.contains("Redis server v="), "{out}");
    let ran = lab.layer_requests(&layers);
    assert!(whole(&ran).is_empty(), "whole layer GETs at run: {ran:?}");
    let got = lab.rootfs("esgz/redis:v1", "root-esgz");
    for gone in &v1.removed {
        let rel = gone.trim_start_matches('/');
        assert!(!got.contains_key(rel), "{gone} was deleted by a whiteout");
    }
    let expected = original_tree(&v1);
    assert_same(&expected, &got, "rpull of the eStargz image");
}

/// Acceptance 8 for remote layers: a digest the manifest does not list
/// and malformed labels are InvalidArgument and record nothing; an image
/// that does not exist, and a layer whose TOC is hostile, take the
/// ordinary path (containerd downloads: the hostile image pulls and
/// unpacks), each named in the log; nothing is mounted.
#[test]
fn bad_remote_labels_are_refused_or_fall_back_named() {
    let lab = Lab::start();
    let layout = lab.work.path().join("layout");
    let evil = "../../escaped";
    write_image(
        &layout,
        "v1",
        &[estargz_layer(&[("etc/a", b"aaaa")], |toc| {
            toc.entries[0].name = evil.into();
        })],
    );
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/hostile/toc:v1", lab.reg.host()),
    ]));
    let hostile = lab.name("hostile/toc:v1");
    let layer = lab.layers("hostile/toc:v1").remove(0);
    let missing = format!("sha256:{}", "ab".repeat(32));
    let labels = |image: &str, digest: &str, target: &str| -> std::collections::HashMap<_, _> {
        [
            ("containerd.io/snapshot.ref", target),
            ("containerd.io/snapshot/remote/stargz.reference", image),
            ("containerd.io/snapshot/remote/stargz.digest", digest),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let nowhere = lab.name("no/such-image:v1");
    runtime().block_on(async {
        let mut c = breakfs_node::snapshots_client(&lab.sock).await.unwrap();
        let prepare = |key: &str, labels| pb::PrepareSnapshotRequest {
            snapshotter: PLUGIN.into(),
            key: key.into(),
            parent: String::new(),
            labels,
        };
        refused(
            c.prepare(prepare("k1", labels(&hostile, &missing, "t1")))
                .await
                .map(drop),
            tonic::Code::InvalidArgument,
            "does not list layer",
        );
        refused(
            c.prepare(prepare("k2", labels(&hostile, "sha256:nothex", "t2")))
                .await
                .map(drop),
            tonic::Code::InvalidArgument,
            "not a digest",
        );
        refused(
            c.prepare(prepare("k3", labels("no-host-or-repo", &layer, "t3")))
                .await
                .map(drop),
            tonic::Code::InvalidArgument,
            "not an image reference",
        );
        // Unreachable image: the ordinary path, a bind mount to unpack into.
        let m = c
            .prepare(prepare("k4", labels(&nowhere, &missing, "t4")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.mounts[0].r#type, "bind");
    });
    assert_eq!(
        listed(&lab.sock),
        [("k4".to_string(), pb::Kind::Active as i32)],
        "a refused prepare recorded something"
    );
    let log = lab.node.log_text();
    assert!(
        log.contains(&nowhere) && log.contains("cannot be resolved now"),
        "{log}"
    );

    // The hostile TOC: rpull falls back, containerd downloads and unpacks.
    lab.rpull(&hostile);
    assert_eq!(lab.lazy_lines(), 0);
    let log = lab.node.log_text();
    assert!(
        log.contains(&layer) && log.contains("TOC is refused") && log.contains(evil),
        "{log}"
    );
    let got = lab.rootfs("hostile/toc:v1", "root-hostile");
    assert!(got.contains_key("etc/a"), "{:?}", got.keys());
    // /metrics counts the fallbacks by reason, and no lazy prepare.
    let m = parse_metrics(&lab.node.get("/metrics"));
    let fallbacks = |r: &str| {
        metric(
            &m,
            &format!("breakfs_snapshot_lazy_fallbacks_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(fallbacks("unresolved"), 1.0);
    assert!(fallbacks("toc_refused") >= 1.0);
    assert_eq!(
        metric(&m, "breakfs_snapshot_layer_prepares_total{path=\"lazy\"}"),
        0.0
    );
    assert!(lab.layer_mounts().is_empty());
}

/// Acceptance 5: a container reading files in a loop over lazy layer
/// mounts (new files too: its first pass is still fetching them) sees no
/// failed read across 10 restarts of the node daemon (5 SIGTERM, 5
/// SIGKILL, each followed by a start) with `--keep-mounts`; afterwards
/// the snapshots are all listed, a new container runs, and removing the
/// image leaves no mount.
#[test]
fn a_container_reads_on_across_daemon_restarts() {
    let images = corpus();
    let v1 = build(&images, "v1");
    let mut lab = Lab::start_with(&["--keep-mounts", "120"]);
    refactor_into(&lab.reg, &[v1], &lab.work.path().join("refactor"));
    let reference = lab.name("refactored/redis:v1");
    lab.rpull(&reference);
    let out_dir = lab.work.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // Each file read bumps /out/n; a failed read is appended to /out/fail.
    // Every file is read once in the first pass (through lazy fetches),
    // then again and again.
    let script = "n=0; while :; do for f in $(find /usr /etc /lib -type f | sort); do \
                  if cat \"$f\" >/dev/null 2>/out/err; then n=$((n+1)); echo $n >/out/n; \
                  else echo \"$f\" >>/out/fail; cat /out/err >>/out/fail; fi; done; \
                  echo pass >>/out/passes; done";
    // runc's state of a container outlives a failed run: a fresh ID.
    let id = format!("reader-{}", std::process::id());
    let mount = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out_dir.display()
    );
    ok(lab.ctrd.ctr().args([
        "run",
        "-d",
        "--snapshotter",
        PLUGIN,
        "--mount",
        &mount,
        &reference,
        &id,
        "sh",
        "-c",
        script,
    ]));
    let read_count = || -> u64 {
        std::fs::read_to_string(out_dir.join("n"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let fails = || std::fs::read_to_string(out_dir.join("fail")).unwrap_or_default();
    wait_for(Duration::from_secs(120), "the reader reads", || {
        read_count() > 0
    });
    let snapshots = listed(&lab.sock);
    let mut first_pass_restarts = 0;
    for round in 0..10 {
        let before = read_count();
        if std::fs::read_to_string(out_dir.join("passes")).is_err() {
            first_pass_restarts += 1;
        }
        if round % 2 == 0 {
            let st = lab.node.stop();
            assert!(st.success(), "round {round}: the daemon exited {st}");
        } else {
            lab.node.sigkill();
        }
        lab.node.start_again();
        wait_for(
            Duration::from_secs(120),
            &format!("round {round}: the reader reads on"),
            || read_count() >= before + 20 || !fails().is_empty(),
        );
        assert!(
            fails().is_empty(),
            "round {round}: failed reads:\n{}\nnode log:\n{}",
            fails(),
            lab.node.log_text()
        );
    }
    eprintln!(
        "10 restarts: {} files read, {first_pass_restarts} restarts during the first pass, 0 failed",
        read_count()
    );
    assert!(
        first_pass_restarts > 0,
        "every restart came after the first pass: no new file was read across a restart"
    );
    assert_eq!(
        listed(&lab.sock),
        snapshots,
        "snapshots lost across restarts"
    );
    // containerd redials the restarted daemon's socket after its gRPC
    // back-off: wait for that, not for a time.
    let mut listed_by_ctr = String::new();
    wait_for(
        Duration::from_secs(60),
        "containerd reaches the restarted snapshotter",
        || {
            let out = lab
                .ctrd
                .ctr()
                .args(["snapshots", "--snapshotter", PLUGIN, "ls"])
                .output()
                .unwrap();
            listed_by_ctr = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
        },
    );
    for (key, _) in &snapshots {
        // The daemon's keys are containerd's `NAMESPACE/N/NAME`; ctr shows NAME.
        let name = key.rsplit('/').next().unwrap_or(key);
        assert!(
            listed_by_ctr.lines().any(|l| l.starts_with(name)),
            "ctr lists no {name}: {listed_by_ctr}"
        );
    }
    let out = run(
        &lab.ctrd,
        &lab.node,
        &reference,
        &["redis-server", "--version"],
    );
    assert!(out.contains("Redis server v="), "{out}");

    ok(lab.ctrd.ctr().args(["task", "kill", "-s", "SIGKILL", &id]));
    wait_for(Duration::from_secs(30), "the reader stops", || {
        ok(lab.ctrd.ctr().args(["task", "ls"]))
            .lines()
            .all(|l| !l.starts_with(&id))
            || lab
                .ctrd
                .ctr()
                .args(["task", "delete", &id])
                .output()
                .is_ok_and(|o| o.status.success())
    });
    let _ = lab.ctrd.ctr().args(["task", "delete", &id]).output();
    ok(lab.ctrd.ctr().args(["container", "rm", &id]));
    lab.remove(&reference);
    wait_for(Duration::from_secs(30), "the snapshots are removed", || {
        listed(&lab.sock).is_empty()
    });
    assert!(lab.layer_mounts().is_empty(), "{:?}", lab.layer_mounts());
}

/// Acceptance 4: 50 cycles of rpull, run, `ctr image rm` and containerd's
/// GC over two small refactored images (busybox and 3 MiB of their own
/// random bytes each, which the container reads) leave no layer mount,
/// overlay, snapshot or shim behind after any cycle, and the store stays
/// within the node's budget of 6 MiB: one image's chunks (about 5 MB)
/// fit, not with their ranges too (which then give way), nor both images'
/// (so cycles evict what earlier ones fetched); the 3 MiB file, more than
/// half the budget, always reads.
#[test]
fn fifty_pull_run_remove_cycles_leave_nothing_and_keep_the_budget() {
    use rand::{Rng as _, SeedableRng as _};

    let work = tempfile::Builder::new()
        .prefix("gc")
        .tempdir_in("/tmp")
        .unwrap();
    let busybox = crate::cri::busybox_static(work.path());
    let budget: u64 = 6 << 20;
    let mut lab = Lab::start_with(&["--budget", &budget.to_string()]);
    let mut refs = Vec::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for name in ["a", "b"] {
        let mut blob = vec![0u8; 3 << 20];
        rng.fill_bytes(&mut blob);
        let files: &[(&str, &[u8])] = &[("data/blob", &blob)];
        refs.push(busybox_image(
            &lab,
            work.path(),
            &busybox,
            &format!("gc/{name}:v1"),
            &[files],
        ));
    }
    let store = lab.node.cache.clone();
    let mut max = 0;
    for cycle in 0..50 {
        let reference = &refs[cycle % 2];
        lab.rpull(reference);
        let out = lab
            .ctrd
            .run(reference, &["busybox", "sha256sum", "/data/blob"])
            .unwrap();
        if !out.status.success() {
            lab.fail(&format!(
                "cycle {cycle}: the container exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        lab.remove(reference);
        wait_for(
            Duration::from_secs(30),
            &format!("cycle {cycle}: the snapshots are removed"),
            || listed(&lab.sock).is_empty(),
        );
        assert!(
            lab.layer_mounts().is_empty(),
            "cycle {cycle}: layer mounts left: {:?}",
            lab.layer_mounts()
        );
        assert!(
            lab.ctrd.mounts_below_dir().is_empty(),
            "cycle {cycle}: containerd mounts left: {:?}",
            lab.ctrd.mounts_below_dir()
        );
        wait_for(
            Duration::from_secs(30),
            &format!("cycle {cycle}: the shims exit"),
            || lab.ctrd.shim_pids().is_empty(),
        );
        let chunk = crate::node::max_chunk(&store);
        let held = crate::node::store_bytes(&store);
        max = max.max(held);
        assert!(
            held <= budget + chunk,
            "cycle {cycle}: the store holds {held} bytes, over the budget {budget} by more than a chunk ({chunk})"
        );
    }
    let snaps = std::fs::read_dir(lab.node.cache.join("snapshotter/snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(snaps, 0, "snapshot dirs left");
    let m = parse_metrics(&lab.node.get("/metrics"));
    assert!(
        metric(&m, "breakfs_cache_evictions_total") > 0.0,
        "nothing was evicted"
    );
    eprintln!("50 cycles: store at most {max} bytes of a {budget}-byte budget; nothing left");
    lab.node.stop();
}
