//! Load (issue 7, item 4), small: 64 readers doing random reads over one
//! mount, cold and warm; 8 node daemons pulling one image from one peer at
//! once; 1,000 `/prioritize` calls at once against `breakfs sched` watching
//! 1,000 nodes. No error, every byte right, peak memory under a stated
//! bound, and a hang fails naming what hung. No timing asserts: the figures
//! are `cargo bench --bench load`'s.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use breakfs_index::Digest;
use serde_json::json;

use crate::mount::{Mount, breakfs, ok};
use crate::node::Node;
use crate::sched::SchedProc;
use crate::support::images::{Layer, T, noise, tar_of, write_image};
use crate::support::load::{
    FakeNodes, ReadLoad, check_blobs, fleet, metric, peak_rss_mib, prioritize_body, random_reads,
    regular_files, storm,
};
use crate::support::proxy::CountingProxy;
use crate::support::registry::TestRegistry;

/// Peak RSS any one process may reach in these tests, MiB (generous: the
/// node daemons peak under 100 MiB here, the scheduler with 1,000 nodes
/// near 200-330 MiB).
const RSS_BOUND_MIB: f64 = 512.0;

/// The layers (digest, size) of `reference` in its registry.
pub(crate) fn manifest_layers(reference: &str) -> Vec<(String, u64)> {
    let m = ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", reference]));
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The (soft, hard) limits of open files of process `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .unwrap();
    let mut n = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    (n.next().unwrap(), n.next().unwrap())
}

/// A small image of incompressible files (about 16 MB in three layers: a
/// file of three 4 MiB chunks, six of 0.5-1 MiB, 600 small ones),
/// refactored into a registry of its own, reached through a proxy that
/// counts what it is asked.
struct SmallImage {
    proxy: CountingProxy,
    _reg: TestRegistry,
    /// `docker://PROXY/load/app:v1`.
    reference: String,
    /// The original, as an OCI layout (tag `v1`).
    layout: PathBuf,
    /// Its layers in the registry: digest, size.
    layers: Vec<(String, u64)>,
}

impl SmallImage {
    fn publish(dir: &Path) -> SmallImage {
        let reg = TestRegistry::start();
        let (pushed, layout) = small_image(&reg, dir);
        let proxy = CountingProxy::start(&reg.host());
        SmallImage {
            layers: manifest_layers(&pushed),
            reference: pushed.replace(&reg.host(), &proxy.host()),
            proxy,
            _reg: reg,
            layout,
        }
    }

    fn digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.0.clone()).collect()
    }
}

/// Fail when a process named `what` peaked over [`RSS_BOUND_MIB`].
fn assert_bounded(what: &str, peak_mib: f64) {
    assert!(
        peak_mib < RSS_BOUND_MIB,
        "{what} peaked at {peak_mib:.0} MiB (bound {RSS_BOUND_MIB})"
    );
}

/// [`SmallImage`]'s files refactored into `reg` as `load/app:v1`: its
/// reference there, and the original's layout under `dir`.
fn small_image(reg: &TestRegistry, dir: &Path) -> (String, PathBuf) {
    let big: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("opt/app/lib{i}.so"),
                noise(i as u64 + 1, (512 << 10) + i * 100_000),
            )
        })
        .collect();
    let small: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| {
            (
                format!("usr/share/app/{i}.txt"),
                noise(i as u64 + 100, 100 + i * 37),
            )
        })
        .collect();
    let data = vec![("srv/data.bin".to_string(), noise(7, 9 << 20))];
    let layer = |dirs: &[&'static str], files: &[(String, Vec<u8>)]| {
        let mut entries: Vec<T> = dirs.iter().map(|d| T::Dir(d)).collect();
        entries.extend(files.iter().map(|(p, b)| T::File(p, b, 0o644)));
        Layer::gzip(tar_of(&entries))
    };
    let layout = dir.join("layout");
    write_image(
        &layout,
        "v1",
        &[
            layer(&["opt/", "opt/app/"], &big),
            layer(&["usr/", "usr/share/", "usr/share/app/"], &small),
            layer(&["srv/"], &data),
        ],
    );
    let dest = reg.reference("load/app:v1");
    ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(dir.join("work"))
        .args(["--to", &dest])
        .arg(format!("oci:{}:v1", layout.display())));
    (dest, layout)
}

#[test]
fn sixty_four_readers_get_the_original_bytes_cold_and_warm() {
    let tmp = tempfile::tempdir().unwrap();
    let image = SmallImage::publish(tmp.path());
    let reference = image.reference.clone();
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", image.layout.display()))
        .arg(tmp.path().join("umoci")));
    let original = tmp.path().join("umoci/rootfs");
    let files = regular_files(&original).unwrap();
    let node = Node::start(&tmp.path().join("node"), &[], &[]);
    let control = node.control();
    let mount = |name: &str| {
        Mount::new(
            &reference,
            &tmp.path().join(name),
            &tmp.path().join("unused-cache"),
            &[
                "--node",
                &control,
                "--no-hydrate",
                "--no-dependency-prefetch",
            ],
        )
    };
    let load = |seed| ReadLoad {
        threads: 64,
        reads_per_thread: 25,
        seed,
        stall: Duration::from_secs(90),
    };

    // Cold: nothing of the image in the node's store.
    let cold = {
        let m = mount("cold");
        random_reads(&m.point, &original, &files, &load(1)).unwrap()
    };
    cold.ensure_clean("64 readers, cold").unwrap();
    // Warm: the whole image in the store, a new mount (empty page cache).
    node.post("/prefetch", &json!({ "images": [reference] }).to_string());
    node.wait_whole(&image.digests());
    let warm = {
        let m = mount("warm");
        random_reads(&m.point, &original, &files, &load(2)).unwrap()
    };
    warm.ensure_clean("64 readers, warm").unwrap();

    let peak = peak_rss_mib(node.pid()).unwrap();
    for (what, r) in [("cold", &cold), ("warm", &warm)] {
        eprintln!(
            "load: {what}: {} reads of {} files, {:.1} MB, p50 {:.2} ms, p99 {:.2} ms, {:.1} s",
            r.reads,
            r.files_touched,
            r.bytes as f64 / 1e6,
            r.quantile(0.5).as_secs_f64() * 1e3,
            r.quantile(0.99).as_secs_f64() * 1e3,
            r.secs
        );
    }
    eprintln!("load: node daemon peak RSS {peak:.0} MiB");
    assert_bounded("the node daemon serving the mount", peak);
}

#[test]
fn eight_nodes_pull_one_image_from_one_peer_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let image = SmallImage::publish(tmp.path());
    let (reference, proxy, digests) = (&image.reference, &image.proxy, image.digests());

    let holder = Node::start(&tmp.path().join("holder"), &[], &[]);
    holder.post("/prefetch", &json!({ "images": [reference] }).to_string());
    holder.wait_whole(&digests);
    let pullers: Vec<Node> = (0..8)
        .map(|i| Node::start(&tmp.path().join(format!("puller{i}")), &[&holder.url], &[]))
        .collect();
    // Each puller has read the holder's index (its first poll timed it).
    let until = Instant::now() + Duration::from_secs(30);
    for p in &pullers {
        while p.json("/measurements")["links"][&holder.url]["rtt_ms"].is_null() {
            assert!(Instant::now() < until, "a puller never polled the holder");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    proxy.reset();

    let body = json!({ "images": [reference] }).to_string();
    std::thread::scope(|s| {
        for p in &pullers {
            s.spawn(|| p.post("/prefetch", &body));
        }
    });
    let until = Instant::now() + Duration::from_secs(180);
    for (i, p) in pullers.iter().enumerate() {
        loop {
            let tasks = p.json("/prefetch");
            let task = tasks.as_object().and_then(|t| t.values().next().cloned());
            if let Some(t) = &task
                && t["finished"] == true
            {
                assert!(t["error"].is_null(), "puller {i}'s pull failed: {t}");
                break;
            }
            assert!(
                Instant::now() < until,
                "puller {i} hung: its pull has not finished after 180 s: {tasks}\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let mut cloud = 0.0;
    for (i, p) in pullers.iter().enumerate() {
        check_blobs(&p.cache, &image.layers).unwrap_or_else(|e| panic!("puller {i}: {e:#}"));
        cloud += metric(
            &p.get("/metrics"),
            "breakfs_fetch_bytes_total{source=\"cloud\"}",
        );
    }
    let from_registry: Vec<String> = proxy
        .blob_requests()
        .into_iter()
        .filter(|r| digests.iter().any(|d| r.contains(d.as_str())))
        .collect();
    assert!(
        from_registry.is_empty(),
        "layers were pulled from the registry while the peer held them: {from_registry:?}"
    );
    let peak = peak_rss_mib(holder.pid()).unwrap();
    let pullers_peak = pullers
        .iter()
        .map(|p| peak_rss_mib(p.pid()).unwrap())
        .fold(0.0, f64::max);
    let asked = proxy.requests();
    eprintln!(
        "load: 8 pullers: cloud bytes {cloud:.0}; the registry got {} requests, {} for blobs; peak RSS holder {peak:.0} MiB, pullers {pullers_peak:.0} MiB",
        asked.len(),
        proxy.blob_requests().len()
    );
    assert_bounded("the holder", peak);
    assert_bounded("a puller", pullers_peak);
}

#[test]
fn a_thousand_prioritize_calls_at_once_over_a_thousand_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let small = SmallImage::publish(tmp.path());
    let proxy = &small.proxy;
    let image = small.reference.trim_start_matches("docker://");
    let layers: Vec<(Digest, u64)> = small
        .layers
        .iter()
        .map(|(d, s)| (Digest::parse(d).unwrap(), *s))
        .collect();
    let nodes = fleet(1000, 4, 500, 5000, &layers, 7);
    let fake = FakeNodes::start(&nodes, Duration::from_millis(5)).unwrap();
    let config = tmp.path().join("sched.yaml");
    std::fs::write(&config, fake.sched_config(&nodes, 2.0)).unwrap();
    // Under the soft limit of open files a service gets by default: the
    // scheduler raises it (1,000 calls and 1,000 polls need more).
    let sched =
        SchedProc::start_with_soft_nofile(1024, &["--config".into(), config.display().to_string()]);
    let (soft, hard) = nofile(sched.0.id());
    // (Where the hard limit is 1,024 too there is nothing to raise.)
    assert!(
        soft > 1024 || hard <= 1024,
        "breakfs sched kept a soft limit of {soft} open files (hard: {hard})"
    );
    proxy.reset();

    let url = format!("{}/prioritize", sched.1);
    let body = prioritize_body(image, &nodes);
    let report = storm(&url, &body, 1000, Duration::from_secs(120)).unwrap();
    // The answer once the storm is over: every call must have had it.
    let reference = storm(&url, &body, 1, Duration::from_secs(30)).unwrap();
    let expected = reference.answers.keys().next().unwrap().clone();
    let manifests = proxy
        .requests()
        .iter()
        .filter(|r| r.contains("/manifests/"))
        .count();
    let peak = peak_rss_mib(sched.0.id()).unwrap();
    eprintln!(
        "load: 1,000 calls at once: {} ok, {} errors, {} distinct answers, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, {:.1} s; registry asked for the manifest {manifests} times; polls open at once at most {}; sched peak RSS {peak:.0} MiB",
        report.ok,
        report.errors,
        report.answers.len(),
        report.quantile(0.5).as_secs_f64() * 1e3,
        report.quantile(0.99).as_secs_f64() * 1e3,
        report.quantile(1.0).as_secs_f64() * 1e3,
        report.secs,
        fake.most_open()
    );
    assert_eq!(report.errors, 0, "calls failed: {:?}", report.samples);
    // The scheduler polls at most 128 nodes at once (each poll holds the
    // node's index until it is a view).
    assert!(
        fake.most_open() <= 128,
        "{} polls were open at once",
        fake.most_open()
    );
    assert!(
        manifests <= 2,
        "the registry was asked for the manifest {manifests} times: once is enough"
    );
    assert_eq!(
        report.wrong(&expected),
        0,
        "answers other than the scheduler's settled one: {:?}",
        report.answers
    );
    assert_bounded("breakfs sched", peak);
}
