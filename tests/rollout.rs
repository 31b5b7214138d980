//! Rollouts: the nodes of one cluster start the same new image at once,
//! and the cloud link (a real docker-registry behind a counting proxy)
//! carries each chunk about once: a node asks its peers directly which
//! chunks they have or are fetching, and waits on a peer's fetch instead
//! of fetching again; a peer killed while others wait on it costs no read.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::mount::{Mount, Shaper, assert_same, corpus, files_of, refactor_into, umoci_tree};
use crate::node::{Node, metric, parse_metrics};
use crate::support::proxy::CountingProxy;
use crate::support::registry::{TestRegistry, free_port};
use crate::support::tree;

/// Mount `reference` through `node`, lazily: no hydration and no
/// dependency prefetch, so that only what is read is fetched.
fn lazy_mount(node: &Node, reference: &str, point: &Path, cache: &Path) -> Mount {
    let control = node.control();
    Mount::new(
        reference,
        point,
        cache,
        &[
            "--node",
            &control,
            "--no-hydrate",
            "--no-dependency-prefetch",
        ],
    )
}

/// `n` nodes under `dir`, each a peer of all the others.
fn cluster(dir: &Path, n: usize) -> Vec<Node> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    (0..n)
        .map(|i| {
            let peers: Vec<&str> = (0..n)
                .filter(|&k| k != i)
                .map(|k| urls[k].as_str())
                .collect();
            Node::start_at(&dir.join(format!("n{i}")), Some(ports[i]), &peers, &[])
        })
        .collect()
}

fn sample(node: &Node, key: &str) -> f64 {
    metric(&parse_metrics(&node.get("/metrics")), key)
}

#[test]
fn a_cluster_starting_one_image_at_once_fetches_it_from_the_cloud_about_once() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    // One cloud link for everybody, a little slower than loopback.
    let link = Shaper::start(&proxy.host(), 4, 400);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    let expected = umoci_tree(img, &tmp.path().join("umoci"));

    // One node alone, fresh.
    let before = proxy.bytes_down();
    let alone = Node::start(&tmp.path().join("alone"), &[], &[]);
    {
        let m = lazy_mount(
            &alone,
            &reference,
            &tmp.path().join("mnt-alone"),
            &tmp.path().join("c-alone"),
        );
        assert_same(&expected, &tree::snapshot(&m.point).unwrap(), "alone");
        assert_eq!(m.status()["reads"]["reads_failed"], 0);
    }
    let one = proxy.bytes_down() - before;
    drop(alone);

    // Four fresh nodes of one cluster, none holding the image, start it
    // at once and read the same files.
    const N: usize = 4;
    let nodes = cluster(&tmp.path().join("cluster"), N);
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    for n in &nodes {
        let others: Vec<&str> = urls
            .iter()
            .filter(|u| **u != n.url)
            .map(|u| u.as_str())
            .collect();
        n.wait_for_peers(&others);
    }
    let before = proxy.bytes_down();
    let readers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let m = lazy_mount(
                n,
                &reference,
                &tmp.path().join(format!("mnt{i}")),
                &tmp.path().join(format!("c{i}")),
            );
            std::thread::spawn(move || {
                let got = tree::snapshot(&m.point).unwrap();
                (m, got)
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (m, got) = r.join().unwrap();
        assert_same(&expected, &got, &format!("node {i} of the cluster"));
        assert_eq!(m.status()["reads"]["reads_failed"], 0, "node {i}");
    }
    let all = proxy.bytes_down() - before;
    let mut froms = Vec::new();
    for n in &nodes {
        let s = parse_metrics(&n.get("/metrics"));
        froms.push(
            ["holder", "fetching", "deciding", "here"]
                .map(|f| metric(&s, &format!("breakfs_rollout_chunks_total{{from=\"{f}\"}}"))),
        );
    }
    eprintln!(
        "cloud bytes: one node alone {one}, {N} nodes at once {all} ({:.2}x); \
         chunks per node from holder/fetching/deciding/here: {froms:?}",
        all as f64 / one as f64
    );
    assert!(
        all as f64 <= 1.2 * one as f64,
        "{N} nodes at once took {all} bytes from the cloud, one alone {one}"
    );
    // They did wait on each other's fetches, not only take finished chunks.
    let waited: f64 = froms.iter().map(|f| f[1] + f[2]).sum();
    assert!(waited > 0.0, "no node waited on a peer's fetch: {froms:?}");
}

#[test]
fn a_peer_killed_while_others_wait_on_its_fetch_costs_no_read() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    // A slow cloud link, so that a fetch is in flight long enough.
    let link = Shaper::start(&reg.host(), 10, 8);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    let expected = umoci_tree(img, &tmp.path().join("umoci"));

    let mut nodes = cluster(&tmp.path().join("cluster"), 3);
    let mounts: Vec<Mount> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            lazy_mount(
                n,
                &reference,
                &tmp.path().join(format!("mnt{i}")),
                &tmp.path().join(format!("c{i}")),
            )
        })
        .collect();
    // The largest file: its first chunk takes seconds over the link.
    let (big, size) = files_of(&mounts[0].point)
        .into_iter()
        .max_by_key(|(_, s)| *s)
        .unwrap();
    assert!(size > 500_000, "{big} is {size} bytes");
    let want = std::fs::read(tmp.path().join("umoci/rootfs").join(&big)).unwrap();

    // A starts reading it; once A fetches it from the cloud, B and C read
    // it too and wait on A's fetch.
    let a_reader = {
        let p = mounts[0].point.join(&big);
        std::thread::spawn(move || std::fs::read(p))
    };
    let until = Instant::now() + Duration::from_secs(60);
    let here = "breakfs_rollout_chunks_total{from=\"here\"}";
    while sample(&nodes[0], here) < 1.0 {
        assert!(Instant::now() < until, "A never fetched {big}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let readers = [1, 2].map(|i| {
        let p = mounts[i].point.join(&big);
        std::thread::spawn(move || std::fs::read(p))
    });
    let until = Instant::now() + Duration::from_secs(60);
    while sample(&nodes[0], "breakfs_peer_waits") < 2.0 {
        let served = sample(&nodes[0], "breakfs_peer_waits_total{outcome=\"served\"}");
        assert!(
            served == 0.0,
            "A's fetch ended before both B and C waited on it"
        );
        assert!(
            Instant::now() < until,
            "B and C never waited on A's fetch: {}",
            nodes[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[0].sigkill();
    let _ = a_reader.join();
    // A's mount died with it.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mounts[0].point)
        .status();

    for (k, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap().unwrap_or_else(|e| {
            panic!(
                "reading {big} on node {}: {e}\n{}",
                k + 1,
                nodes[k + 1].log_text()
            )
        });
        assert!(got == want, "{big} read wrong on node {}", k + 1);
    }
    for i in [1, 2] {
        assert_eq!(
            mounts[i].status()["reads"]["reads_failed"],
            0,
            "node {i}: {}",
            nodes[i].log_text()
        );
        let n = &nodes[i];
        assert!(sample(n, "breakfs_rollout_chunks_total{from=\"fetching\"}") >= 1.0);
        assert!(sample(n, "breakfs_fetch_bytes_total{source=\"cloud\"}") > 0.0);
    }
    // The whole image still reads right on B.
    assert_same(
        &expected,
        &tree::snapshot(&mounts[1].point).unwrap(),
        "B after its peer died",
    );
}
