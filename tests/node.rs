//! `breakfs node`: the cooperative cache across edge nodes, with real
//! daemons on loopback, a real docker-registry as the cloud (behind a
//! counting proxy, to prove what it was asked), real FUSE mounts and
//! skopeo as an OCI client of a node.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::mount::{
    Mount, Shaper, assert_same, breakfs, corpus, files_of, hex_sha256, ok, original_tree,
    refactor_into,
};
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;
use crate::support::tree;

/// A node daemon on a free loopback port with its own cache; stopped on drop.
pub(crate) struct Node {
    child: Option<Child>,
    pub(crate) url: String,
    pub(crate) socket: PathBuf,
    pub(crate) cache: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Node {
    pub(crate) fn start(dir: &Path, peers: &[&str], extra: &[&str]) -> Node {
        Node::start_at(dir, None, peers, extra)
    }

    /// Start on `port` if given (peers can be named before they run).
    pub(crate) fn start_at(dir: &Path, port: Option<u16>, peers: &[&str], extra: &[&str]) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<String> = vec![
            "--plain-http".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        for p in peers {
            args.push("--peer".into());
            args.push(p.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut n = Node {
            child: None,
            url: String::new(),
            socket: dir.join("node.sock"),
            cache: dir.join("cache"),
            dir: dir.to_path_buf(),
            args,
            log: dir.join("node.log"),
        };
        n.spawn(port);
        n
    }

    /// Start (again), on `port` if given (a restart keeps its address).
    fn spawn(&mut self, port: Option<u16>) {
        let mut args = self.args.clone();
        if let Some(p) = port {
            let i = args.iter().position(|a| a == "--listen").unwrap();
            args[i + 1] = format!("127.0.0.1:{p}");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = breakfs()
            .arg("node")
            .arg("--cache")
            .arg(&self.cache)
            .arg("--socket")
            .arg(&self.socket)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("BREAKFS-NODE-READY ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => self.url = url,
            Err(_) => panic!("the node daemon did not start: {}", self.log_text()),
        }
        self.child = Some(child);
    }

    /// The daemon's process id (0 once stopped).
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn control(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// `GET PATH` (on the node's TCP address) as text.
    pub(crate) fn get(&self, path: &str) -> String {
        ok(Command::new("curl")
            .args(["-sSf", "--max-time", "30"])
            .arg(format!("{}{path}", self.url)))
    }

    pub(crate) fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path)).unwrap()
    }

    pub(crate) fn post(&self, path: &str, body: &str) -> String {
        ok(Command::new("curl")
            .args([
                "-sSf",
                "--max-time",
                "30",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ])
            .arg(format!("{}{path}", self.url)))
    }

    /// Mount `reference` through this node.
    pub(crate) fn mount(&self, reference: &str, point: &Path) -> Mount {
        Mount::new(
            reference,
            point,
            &self.dir.join("unused-cache"),
            &["--node", &self.control()],
        )
    }

    /// SIGTERM and wait for the exit status.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        ok(Command::new("kill").arg(c.id().to_string()));
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "the node daemon did not stop: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again (after `stop` or `sigkill`) on the same port with the
    /// same cache, its mounts left as they are.
    pub(crate) fn start_again(&mut self) {
        let port = self.port();
        self.spawn(Some(port));
    }

    /// SIGKILL, then start again on the same port with the same cache.
    pub(crate) fn restart_after_kill(&mut self) {
        let port = self.port();
        self.sigkill();
        // A killed daemon leaves its mounts dead: detach them.
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            if line.contains(" - fuse.breakfs ") && line.contains(&self.dir.display().to_string()) {
                let mp = line.split(' ').nth(4).unwrap();
                let _ = Command::new("umount").arg("-l").arg(mp).status();
            }
        }
        self.spawn(Some(port));
    }

    /// Wait until the node has polled the cache index of each of `peers`
    /// (it knows what they hold and whether they relay). A poll's round
    /// trip is recorded in the same step that stores the index, with no
    /// await between: a link with an RTT is a peer whose index is held.
    pub(crate) fn wait_for_peers(&self, peers: &[&str]) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.json("/measurements");
            if peers.iter().all(|u| m["links"][u]["rtt_ms"].is_number()) {
                return;
            }
            assert!(
                Instant::now() < until,
                "the node never polled its peers' indexes: {m}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every layer of manifest `digest` is a whole blob here.
    pub(crate) fn wait_whole(&self, layers: &[String]) {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let idx = self.json("/cache/index");
            let held: Vec<String> = idx["blobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["digest"].as_str().unwrap().to_string())
                .collect();
            if layers.iter().all(|l| held.contains(l)) {
                return;
            }
            assert!(
                Instant::now() < until,
                "the node never held every layer whole: {idx}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The layer digests of `reference` (from `skopeo inspect`).
pub(crate) fn layers_of(reference: &str) -> Vec<String> {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(reference));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

/// Read every file under `root`, returning content hashes by path.
fn hash_all(root: &Path) -> Vec<(String, String)> {
    files_of(root)
        .into_iter()
        .map(|(p, _)| {
            let b = std::fs::read(root.join(&p)).unwrap_or_else(|e| panic!("reading {p}: {e}"));
            (p, hex_sha256(&b))
        })
        .collect()
}

/// Parse a Prometheus text page into (name{labels}, value) samples.
pub(crate) fn parse_metrics(page: &str) -> Vec<(String, f64)> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let v: f64 = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (k.to_string(), v)
        })
        .collect()
}

pub(crate) fn metric(samples: &[(String, f64)], key: &str) -> f64 {
    samples
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no sample {key}"))
        .1
}

#[test]
fn a_peer_serves_a_hydrated_image_without_the_registry_and_to_skopeo() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    let repo = format!("refactored/{}", img.family);
    let reference = format!("docker://{}/{repo}:{}", proxy.host(), img.tag);
    let layers = layers_of(&reference);

    let a = Node::start(&tmp.path().join("a"), &[], &[]);
    let c = Node::start(&tmp.path().join("c"), &[], &[]);
    {
        let m = a.mount(&reference, &tmp.path().join("mnt-a"));
        m.wait_hydrated();
        a.wait_whole(&layers);
    }
    let b = Node::start(&tmp.path().join("b"), &[&a.url, &c.url], &[]);
    // B learns what A holds from A's index.
    b.wait_for_peers(&[&a.url, &c.url]);
    proxy.reset();
    let m = b.mount(&reference, &tmp.path().join("mnt-b"));
    let hashes = hash_all(&m.point);
    assert!(hashes.len() > 100, "{} files", hashes.len());
    let blob_requests = proxy.blob_requests();
    assert!(
        blob_requests.is_empty(),
        "the registry was asked for blobs while a peer held them: {blob_requests:?}"
    );
    let expected = original_tree(img);
    assert_same(&expected, &tree::snapshot(&m.point).unwrap(), "B's mount");

    // B's metrics: bytes came from the peer, none from the cloud.
    let samples = parse_metrics(&b.get("/metrics"));
    let peer = metric(&samples, "breakfs_fetch_bytes_total{source=\"peer\"}");
    assert!(peer > 100_000.0, "peer bytes {peer}");
    assert!(metric(&samples, "breakfs_cache_misses_total") > 0.0);
    assert!(
        metric(
            &samples,
            "breakfs_fetch_duration_seconds_count{source=\"peer\"}"
        ) > 0.0
    );
    let ratio_key = samples
        .iter()
        .find(|(k, _)| k.starts_with("breakfs_mount_hydration_ratio{"))
        .unwrap_or_else(|| panic!("no hydration gauge"));
    assert!(ratio_key.1 > 0.0 && ratio_key.1 <= 1.0, "{ratio_key:?}");
    for key in [
        "breakfs_cache_bytes",
        "breakfs_cache_evictions_total",
        "breakfs_cache_hits_total",
    ] {
        assert!(samples.iter().any(|(k, _)| k == key), "no {key}");
    }
    let measured = b.json("/measurements");
    assert!(
        measured["links"][&a.url]["rtt_ms"].as_f64().is_some(),
        "no RTT measured to A: {measured}"
    );
    // Stopping B unmounts its mount cleanly.
    let point = m.point.clone();
    let mut b = b;
    assert!(b.stop().success(), "{}", b.log_text());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", point.display())),
        "B's mount outlived B"
    );
    drop(m);

    // skopeo copies the image from A alone (the registry is not asked).
    proxy.reset();
    let host = a.url.trim_start_matches("http://");
    let copied = tmp.path().join("copied");
    ok(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/{repo}:{}", img.tag))
        .arg(format!("oci:{}:copy", copied.display())));
    // A's cloud probe (`GET /v2/` every 3 s, for the link's RTT) may fall
    // in this window; nothing of the image may.
    let asked: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET /v2/ "))
        .collect();
    assert!(asked.is_empty(), "{asked:?}");
    let out = tmp.path().join("umoci-copied");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:copy", copied.display()))
        .arg(&out));
    assert_same(
        &expected,
        &tree::snapshot(&out.join("rootfs")).unwrap(),
        "skopeo copy from node A",
    );
}

#[test]
fn a_dead_or_lying_peer_never_fails_a_read_or_reaches_a_reader() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let reference = reg.reference(&format!("refactored/{}:{}", img.family, img.tag));
    let reference = format!("docker://{}", reference.trim_start_matches("docker://"));
    let layers = layers_of(&reference);
    let expected = original_tree(img);

    // Lying: A's blobs rot on disk after hydration; B detects it.
    let a = Node::start(&tmp.path().join("a"), &[], &[]);
    {
        let m = a.mount(&reference, &tmp.path().join("mnt-a"));
        m.wait_hydrated();
        a.wait_whole(&layers);
    }
    for l in &layers {
        let path = a
            .cache
            .join("blobs/sha256")
            .join(l.trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip bits in the middle of every 64 KiB: inside chunk data.
        let mut i = 32 << 10;
        while i < bytes.len() {
            bytes[i] ^= 0x55;
            i += 64 << 10;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    let b = Node::start(&tmp.path().join("b"), &[&a.url], &[]);
    b.wait_for_peers(&[&a.url]);
    let m = b.mount(&reference, &tmp.path().join("mnt-b"));
    assert_same(
        &expected,
        &tree::snapshot(&m.point).unwrap(),
        "B's mount with a lying peer",
    );
    let samples = parse_metrics(&b.get("/metrics"));
    assert!(
        metric(&samples, "breakfs_digest_failures_total") > 0.0,
        "no bad bytes were detected"
    );
    assert!(metric(&samples, "breakfs_fetch_bytes_total{source=\"cloud\"}") > 0.0);
    drop(m);
    drop(b);

    // Dead: C serves through a slow link and is killed mid-transfer.
    let mut c = Node::start(&tmp.path().join("c"), &[], &[]);
    {
        let m = c.mount(&reference, &tmp.path().join("mnt-c"));
        m.wait_hydrated();
        c.wait_whole(&layers);
    }
    let slow = Shaper::start(c.url.trim_start_matches("http://"), 20, 8);
    let slow_url = format!("http://{}", slow.1);
    let d = Node::start(&tmp.path().join("d"), &[&slow_url], &[]);
    d.wait_for_peers(&[&slow_url]);
    let m = d.mount(&reference, &tmp.path().join("mnt-d"));
    let point = m.point.clone();
    let reader = std::thread::spawn(move || tree::snapshot(&point));
    // C is killed once D has bytes from it and is still reading.
    let until = Instant::now() + Duration::from_secs(60);
    let peer_bytes = || {
        metric(
            &parse_metrics(&d.get("/metrics")),
            "breakfs_fetch_bytes_total{source=\"peer\"}",
        )
    };
    while peer_bytes() == 0.0 {
        assert!(
            !reader.is_finished(),
            "D read the whole image before any byte came from its peer C"
        );
        assert!(
            Instant::now() < until,
            "D never read from its peer C: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !reader.is_finished(),
        "D read the whole image before its peer C could be killed mid-transfer"
    );
    c.sigkill();
    let got = reader.join().unwrap().unwrap();
    assert_same(&expected, &got, "D's mount after its peer died");
    let samples = parse_metrics(&d.get("/metrics"));
    assert!(
        metric(&samples, "breakfs_fetch_bytes_total{source=\"cloud\"}") > 0.0,
        "D did not turn to the registry after its peer died"
    );
}

/// Start prefetching `images` on `node` and wait until every task finished
/// without error.
fn prefetch_all(node: &Node, images: &[String]) {
    let body = serde_json::json!({ "images": images }).to_string();
    let started: serde_json::Value = serde_json::from_str(&node.post("/prefetch", &body)).unwrap();
    assert_eq!(started["tasks"].as_array().unwrap().len(), images.len());
    wait_prefetched(node);
}

/// Wait (up to 5 minutes) until every prefetch task of `node` finished, and
/// check that each fetched all its layers without error.
pub(crate) fn wait_prefetched(node: &Node) {
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let tasks = node.json("/prefetch");
        let all: Vec<&serde_json::Value> = tasks.as_object().unwrap().values().collect();
        if all.iter().all(|t| t["finished"] == true) {
            for t in all {
                assert!(t["error"].is_null(), "prefetch failed: {t}");
                assert_eq!(t["done"], t["layers"], "{t}");
            }
            return;
        }
        assert!(Instant::now() < until, "prefetch did not finish: {tasks}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bytes of blobs, chunks and kept ranges in a store directory.
pub(crate) fn store_bytes(cache: &Path) -> u64 {
    fn sum(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flat_map(|d| d.flatten())
            // Files evicted while listing count as gone.
            .filter_map(|e| e.metadata().ok().map(|m| (e, m)))
            .map(|(e, m)| if m.is_dir() { sum(&e.path()) } else { m.len() })
            .sum()
    }
    ["blobs", "chunks", "ranges"]
        .iter()
        .map(|d| sum(&cache.join(d)))
        .sum()
}

pub(crate) fn max_chunk(cache: &Path) -> u64 {
    std::fs::read_dir(cache.join("chunks/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap_or(0)
}

#[test]
fn prefetch_fills_a_node_and_the_budget_holds_under_live_mounts() {
    let images = corpus();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, &images, &tmp.path().join("work"));

    // Prefetch alone, no mount: the node then holds every layer whole.
    let full = Node::start(&tmp.path().join("full"), &[], &[]);
    prefetch_all(&full, &refs);
    for r in &refs {
        full.wait_whole(&layers_of(r));
    }
    let set_size = store_bytes(&full.cache);
    let chunk = max_chunk(&full.cache);
    drop(full);

    // Half of that as the budget; mount and read the images one after
    // another, keeping every mount live, sampling the store all along.
    let budget = set_size / 2;
    let node = Node::start(
        &tmp.path().join("small"),
        &[],
        &["--budget", &budget.to_string()],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (cache, stop) = (node.cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(store_bytes(&cache));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        })
    };
    let mut mounts = Vec::new();
    let mut first_hashes = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let m = node.mount(r, &tmp.path().join(format!("mnt{i}")));
        let h = hash_all(&m.point);
        if i == 0 {
            first_hashes = h;
        }
        mounts.push(m);
    }
    // The first mount's chunks were evicted long ago: it still reads right.
    assert_eq!(hash_all(&mounts[0].point), first_hashes);
    let expected = original_tree(&images[0]);
    assert_same(
        &expected,
        &tree::snapshot(&mounts[0].point).unwrap(),
        "the first mount after evictions",
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max = sampler.join().unwrap();
    assert!(
        max <= budget + chunk,
        "the store reached {max} bytes, over the budget {budget} by more than a chunk ({chunk})"
    );
    let samples = parse_metrics(&node.get("/metrics"));
    assert!(metric(&samples, "breakfs_cache_evictions_total") > 0.0);
    for m in &mounts {
        assert_eq!(m.status()["reads"]["reads_failed"], 0, "{}", m.status());
    }
    eprintln!("set {set_size} bytes, budget {budget}, max sampled {max}, largest chunk {chunk}");
}

#[test]
fn sigkill_during_prefetch_never_leaves_unverified_data() {
    let images = corpus();
    let v1: Vec<_> = images.iter().filter(|i| i.tag == "v1").cloned().collect();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, &v1, &tmp.path().join("work"));
    // A slow link, so that each kill lands mid-transfer.
    let slow = Shaper::start(&reg.host(), 10, 80);
    let slow_refs: Vec<String> = refs
        .iter()
        .map(|r| r.replace(&reg.host(), &slow.1))
        .collect();
    let body = serde_json::json!({ "images": slow_refs }).to_string();
    let mut node = Node::start(&tmp.path().join("n"), &[], &[]);
    let mut rng = SmallRng::seed_from_u64(1);
    for round in 0..20 {
        node.post("/prefetch", &body);
        std::thread::sleep(Duration::from_millis(rng.random_range(150..750)));
        node.restart_after_kill();
        check_store(&node, &reg, round);
    }
    // Finally let it finish, and mount from what it kept.
    prefetch_all(&node, &slow_refs);
    check_store(&node, &reg, 20);
    for (img, r) in v1.iter().zip(&slow_refs) {
        node.wait_whole(&layers_of(r));
        let m = node.mount(r, &tmp.path().join(format!("mnt-{}", img.family)));
        let expected = original_tree(img);
        assert_same(
            &expected,
            &tree::snapshot(&m.point).unwrap(),
            "a mount after 20 kills",
        );
    }
}

/// Every blob and chunk verifies against its name, every kept range equals
/// the registry's bytes, and `/cache/index` lists exactly what is on disk.
fn check_store(node: &Node, reg: &TestRegistry, round: usize) {
    let mut on_disk = Vec::new();
    for kind in ["blobs", "chunks"] {
        for e in std::fs::read_dir(node.cache.join(kind).join("sha256"))
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap();
            assert_eq!(
                hex_sha256(&bytes),
                name,
                "round {round}: {kind}/{name} is corrupt"
            );
            if kind == "blobs" {
                on_disk.push(format!("sha256:{name}"));
            }
        }
    }
    let mut ranges_on_disk = Vec::new();
    for l in std::fs::read_dir(node.cache.join("ranges/sha256"))
        .unwrap()
        .flatten()
    {
        let layer = l.file_name().to_string_lossy().into_owned();
        let original = std::fs::read(reg.blob_data_path(&layer)).unwrap();
        let mut any = false;
        for r in std::fs::read_dir(l.path()).unwrap().flatten() {
            any = true;
            let name = r.file_name().to_string_lossy().into_owned();
            let (s, e) = name.split_once('-').unwrap();
            let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
            let bytes = std::fs::read(r.path()).unwrap();
            assert_eq!(bytes.len(), e - s, "round {round}: range {layer}/{name}");
            assert!(
                bytes == original[s..e],
                "round {round}: range {layer}/{name} differs from the blob"
            );
        }
        if any {
            ranges_on_disk.push(format!("sha256:{layer}"));
        }
    }
    on_disk.sort();
    ranges_on_disk.sort();
    let idx = node.json("/cache/index");
    let mut listed: Vec<String> = idx["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, on_disk, "round {round}: /cache/index blobs");
    let mut partial: Vec<String> = idx["partial"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_string())
        .collect();
    partial.sort();
    assert_eq!(
        partial, ranges_on_disk,
        "round {round}: /cache/index partial layers"
    );
}
