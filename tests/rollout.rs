//! Rollouts: the nodes of one cluster start the same new image at once,
//! and the cloud link (a real docker-registry behind a counting proxy)
//! carries each chunk about once: a node asks its peers directly which
//! chunks they have or are fetching, and waits on a peer's fetch instead
//! of fetching again; nodes that want a layer none holds split its stripes
//! among themselves; a peer killed while others wait on it costs no read.
//! The image's config and TOCs go the same way: read from the cloud once
//! for the cluster, and a peer killed while it reads one costs no mount.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::mount::{
    Mount, Shaper, assert_same, corpus, files_of, original_tree, refactor_into, umoci_tree,
};
use crate::node::{Node, metric, parse_metrics};
use crate::support::proxy::CountingProxy;
use crate::support::registry::{TestRegistry, free_port};
use crate::support::tree;

/// Mount `reference` through `node`, lazily: no hydration and no
/// dependency prefetch, so that only what is read is fetched.
pub(crate) fn lazy_mount(node: &Node, reference: &str, point: &Path, cache: &Path) -> Mount {
    lazy_mount_through(&node.control(), reference, point, cache)
}

/// [`lazy_mount`] through the node at `control`.
fn lazy_mount_through(control: &str, reference: &str, point: &Path, cache: &Path) -> Mount {
    Mount::new(
        reference,
        point,
        cache,
        &[
            "--node",
            control,
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

/// Wait until each of `nodes` has polled all the others.
fn polled(nodes: &[Node]) {
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    for n in nodes {
        let others: Vec<&str> = urls
            .iter()
            .filter(|u| **u != n.url)
            .map(|u| u.as_str())
            .collect();
        n.wait_for_peers(&others);
    }
}

fn sample(node: &Node, key: &str) -> f64 {
    metric(&parse_metrics(&node.get("/metrics")), key)
}

/// The bytes one fresh node alone (under `dir`) takes from the cloud
/// (counted at `proxy`) to read the whole tree of `reference`, checked
/// against `expected`.
fn alone_bytes(
    dir: &Path,
    reference: &str,
    expected: &BTreeMap<String, tree::Node>,
    proxy: &CountingProxy,
) -> u64 {
    let before = proxy.bytes_down();
    let alone = Node::start(&dir.join("alone"), &[], &[]);
    let m = lazy_mount(
        &alone,
        reference,
        &dir.join("mnt-alone"),
        &dir.join("c-alone"),
    );
    assert_same(expected, &tree::snapshot(&m.point).unwrap(), "alone");
    assert_eq!(m.status()["reads"]["reads_failed"], 0);
    drop(m);
    proxy.bytes_down() - before
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
    let expected = original_tree(img);

    // One node alone, fresh.
    let one = alone_bytes(tmp.path(), &reference, &expected, &proxy);

    // Four fresh nodes of one cluster, none holding the image, start it
    // at once and read the same files.
    const N: usize = 4;
    let nodes = cluster(&tmp.path().join("cluster"), N);
    polled(&nodes);
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
            ["holder", "fetching", "claimed", "deciding", "here"]
                .map(|f| metric(&s, &format!("breakfs_rollout_chunks_total{{from=\"{f}\"}}"))),
        );
    }
    eprintln!(
        "cloud bytes: one node alone {one}, {N} nodes at once {all} ({:.2}x); \
         chunks per node from holder/fetching/claimed/deciding/here: {froms:?}",
        all as f64 / one as f64
    );
    assert!(
        all as f64 <= 1.2 * one as f64,
        "{N} nodes at once took {all} bytes from the cloud, one alone {one}"
    );
    // They did wait on each other's fetches, not only take finished chunks.
    let waited: f64 = froms.iter().map(|f| f[1] + f[2] + f[3]).sum();
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

    // All three read it at once: one node fetches it from the cloud (the
    // owner of its stripe, or the one ranked higher among those deciding),
    // the others wait on that fetch, directly or through each other.
    let readers: Vec<_> = mounts
        .iter()
        .map(|m| {
            let p = m.point.join(&big);
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    let here = "breakfs_rollout_chunks_total{from=\"here\"}";
    let waits = |k: usize| sample(&nodes[k], "breakfs_peer_waits");
    let served = |k: usize| sample(&nodes[k], "breakfs_peer_waits_total{outcome=\"served\"}");
    let until = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let fetcher = (0..3).find(|&k| sample(&nodes[k], here) >= 1.0);
        if let Some(k) = fetcher
            && waits(k) >= 1.0
            && (0..3).map(waits).sum::<f64>() >= 2.0
        {
            break k;
        }
        assert!(
            (0..3).all(|k| served(k) == 0.0),
            "the fetch of {big} ended before both others waited on it"
        );
        assert!(
            Instant::now() < until,
            "the nodes never waited on each other's fetch of {big}: {}",
            nodes[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let survivors: Vec<usize> = (0..3).filter(|&k| k != victim).collect();
    nodes[victim].sigkill();
    // Its mount died with it.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mounts[victim].point)
        .status();
    for (k, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap();
        if k == victim {
            continue;
        }
        let got = got
            .unwrap_or_else(|e| panic!("reading {big} on node {k}: {e}\n{}", nodes[k].log_text()));
        assert!(got == want, "{big} read wrong on node {k}");
    }
    let mut cloud = 0.0;
    for &i in &survivors {
        assert_eq!(
            mounts[i].status()["reads"]["reads_failed"],
            0,
            "node {i}: {}",
            nodes[i].log_text()
        );
        let n = &nodes[i];
        let waited: f64 = ["fetching", "claimed", "deciding"]
            .iter()
            .map(|f| sample(n, &format!("breakfs_rollout_chunks_total{{from=\"{f}\"}}")))
            .sum();
        assert!(waited >= 1.0, "node {i} never waited on a peer");
        cloud += sample(n, "breakfs_fetch_bytes_total{source=\"cloud\"}");
    }
    // The killed node's fetch came again from the cloud.
    assert!(cloud > 0.0);
    // The whole image still reads right on a survivor (the link lifted:
    // its speed mattered for the fetch in flight only).
    link.lift();
    assert_same(
        &expected,
        &tree::snapshot(&mounts[survivors[0]].point).unwrap(),
        "a survivor after its peer died",
    );
}

#[test]
fn nodes_split_a_new_layer_and_a_killed_owner_costs_no_read() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    // A slow cloud link, so that a stripe taken on is in flight a while.
    let link = Shaper::start(&proxy.host(), 10, 16);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    let expected = original_tree(img);

    // A alone first: what one node takes from the cloud for the tree.
    let one = alone_bytes(tmp.path(), &reference, &expected, &proxy);

    // Three nodes mount the image; A reads the tree, B and C wait for A's
    // questions: the stripes they own they take on and fetch, A takes them
    // from them.
    let mut nodes = cluster(&tmp.path().join("cluster"), 3);
    polled(&nodes);
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
    let before = proxy.bytes_down();
    let a_reader = {
        let p = mounts[0].point.clone();
        std::thread::spawn(move || tree::snapshot(&p))
    };
    // Once A waits on a stripe a peer took on, kill that peer.
    let claims = "breakfs_rollout_claims_total";
    let until = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let taker = [1, 2].into_iter().find(|&k| {
            sample(&nodes[k], claims) >= 1.0 && sample(&nodes[k], "breakfs_peer_waits") >= 1.0
        });
        if let Some(k) = taker {
            break k;
        }
        assert!(
            !a_reader.is_finished(),
            "A read the whole tree and never waited on a stripe a peer took on"
        );
        assert!(Instant::now() < until, "no peer took a stripe on");
        std::thread::sleep(Duration::from_millis(10));
    };
    nodes[victim].sigkill();
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mounts[victim].point)
        .status();
    let got = a_reader.join().unwrap().unwrap();
    assert_same(&expected, &got, "A after the peer it waited on died");
    assert_eq!(
        mounts[0].status()["reads"]["reads_failed"],
        0,
        "{}",
        nodes[0].log_text()
    );
    assert!(sample(&nodes[0], "breakfs_rollout_chunks_total{from=\"claimed\"}") >= 1.0);
    // The survivor that did not read reads it all now, from A mostly.
    let other = 3 - victim;
    assert_same(
        &expected,
        &tree::snapshot(&mounts[other].point).unwrap(),
        "the other survivor",
    );
    assert_eq!(mounts[other].status()["reads"]["reads_failed"], 0);
    let all = proxy.bytes_down() - before;
    eprintln!(
        "cloud bytes: one node alone {one}, the cluster with a peer killed {all} ({:.2}x)",
        all as f64 / one as f64
    );
    // The killed peer's stripe in flight came again from the cloud; the
    // rest once.
    assert!(
        all as f64 <= 1.5 * one as f64,
        "the cluster took {all} bytes from the cloud, one node alone {one}"
    );
}

#[test]
fn chunks_whose_owner_has_nothing_to_say_or_died_are_asked_of_every_peer() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let proxy = CountingProxy::start(&reg.host());
    let link = Shaper::start(&proxy.host(), 4, 400);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    let expected = original_tree(img);

    let one = alone_bytes(tmp.path(), &reference, &expected, &proxy);

    // Four nodes know each other; A and B mount the image, then read it
    // at once. Each chunk's owner among the four is asked first: C mounts
    // nothing (it has nothing to say of its stripes), D died after the
    // mounts (it does not answer). Their stripes are asked of every peer,
    // and A and B split them between themselves.
    let mut nodes = cluster(&tmp.path().join("cluster"), 4);
    polled(&nodes);
    let before = proxy.bytes_down();
    let mounts: Vec<Mount> = (0..2)
        .map(|i| {
            lazy_mount(
                &nodes[i],
                &reference,
                &tmp.path().join(format!("mnt{i}")),
                &tmp.path().join(format!("c{i}")),
            )
        })
        .collect();
    let asked_before: Vec<f64> = (0..2)
        .map(|i| sample(&nodes[i], "breakfs_rollout_failed_questions_total"))
        .collect();
    nodes[3].sigkill();
    let readers: Vec<_> = mounts
        .into_iter()
        .map(|m| {
            std::thread::spawn(move || {
                let got = tree::snapshot(&m.point).unwrap();
                (m, got)
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (m, got) = r.join().unwrap();
        assert_same(&expected, &got, &format!("node {i}"));
        assert_eq!(
            m.status()["reads"]["reads_failed"],
            0,
            "node {i}: {}",
            nodes[i].log_text()
        );
        let failed = sample(&nodes[i], "breakfs_rollout_failed_questions_total");
        assert!(
            failed > asked_before[i],
            "node {i} never asked the dead owner"
        );
    }
    let all = proxy.bytes_down() - before;
    let from_peers: f64 = (0..2)
        .flat_map(|i| {
            ["holder", "fetching", "claimed", "deciding"].map(|f| {
                sample(
                    &nodes[i],
                    &format!("breakfs_rollout_chunks_total{{from=\"{f}\"}}"),
                )
            })
        })
        .sum();
    eprintln!(
        "cloud bytes: one node alone {one}, two of four at once {all} ({:.2}x); \
         chunks from a peer {from_peers}",
        all as f64 / one as f64
    );
    assert!(
        from_peers > 0.0,
        "A and B never took a chunk from each other"
    );
    assert!(
        all as f64 <= 1.2 * one as f64,
        "two nodes at once took {all} bytes from the cloud, one alone {one}"
    );
}

/// Mount `reference` through each node of `controls` at once (each mount
/// in a thread of its own, released together); each mount, or the panic
/// of its `breakfs mount`.
fn mount_all_at_once(
    controls: &[String],
    reference: &str,
    dir: &Path,
) -> Vec<std::thread::Result<Mount>> {
    let start = std::sync::Barrier::new(controls.len());
    std::thread::scope(|s| {
        let threads: Vec<_> = controls
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    lazy_mount_through(
                        n,
                        reference,
                        &dir.join(format!("mnt{i}")),
                        &dir.join(format!("c{i}")),
                    )
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join()).collect()
    })
}

/// Per layer of `layers` (digest, size), how many TOC reads the registry
/// saw: range requests that end at the blob's end (a TOC read's first,
/// of the tail the manifest says or a guess; a TOC bigger than a guess
/// costs a second, which ends where the first began).
fn toc_reads(proxy: &CountingProxy, layers: &[(String, u64)]) -> Vec<usize> {
    let seen = proxy.requests_with_ranges();
    layers
        .iter()
        .map(|(digest, size)| {
            let end = format!("-{}", size - 1);
            seen.iter()
                .filter(|(line, range)| {
                    line.contains(digest.as_str())
                        && range.as_ref().is_some_and(|r| r.ends_with(&end))
                })
                .count()
        })
        .collect()
}

#[test]
fn a_cluster_mounting_one_image_at_once_reads_each_toc_from_the_cloud_once() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let layers = crate::load::manifest_layers(
        &reg.reference(&format!("refactored/{}:{}", img.family, img.tag)),
    );
    let proxy = CountingProxy::start(&reg.host());
    // A cloud link slow enough that the nodes' metadata reads overlap.
    let link = Shaper::start(&proxy.host(), 20, 50);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);

    const N: usize = 4;
    let nodes = cluster(&tmp.path().join("cluster"), N);
    polled(&nodes);
    proxy.reset();
    let controls: Vec<String> = nodes.iter().map(Node::control).collect();
    let mounts: Vec<Mount> = mount_all_at_once(&controls, &reference, tmp.path())
        .into_iter()
        .map(|m| m.unwrap())
        .collect();
    // Every node sees the whole tree.
    let want = files_of(&mounts[0].point);
    assert!(!want.is_empty());
    for (i, m) in mounts.iter().enumerate() {
        assert_eq!(files_of(&m.point), want, "node {i}");
    }
    let reads = toc_reads(&proxy, &layers);
    let tail_reads: usize = reads.iter().sum();
    eprintln!("TOC reads at the registry per layer: {reads:?}");
    assert!(
        reads.iter().all(|&k| k == 1),
        "{N} nodes mounting at once read the TOCs of {} layers {reads:?} times from the cloud",
        layers.len()
    );
    assert_eq!(tail_reads, layers.len());
    // The config too: one whole-blob read (the layers are read by range).
    let whole: Vec<String> = proxy
        .requests_with_ranges()
        .into_iter()
        .filter(|(line, range)| line.contains("/blobs/sha256:") && range.is_none())
        .map(|(line, _)| line)
        .collect();
    assert_eq!(whole.len(), 1, "blobs read whole: {whole:?}");
    // The others took them from a peer: from a holder, a read under way,
    // or the one ranked first among those deciding at once.
    let shared: f64 = nodes
        .iter()
        .flat_map(|n| {
            ["holder", "fetching", "deciding"]
                .map(|f| sample(n, &format!("breakfs_rollout_meta_total{{from=\"{f}\"}}")))
        })
        .sum();
    assert!(
        shared >= ((N - 1) * (layers.len() + 1)) as f64,
        "the nodes took {shared} configs and TOCs from each other"
    );
}

#[test]
fn the_peer_reading_a_toc_killed_mid_read_costs_the_others_no_mount() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    // A slow cloud link: the TOC reads take seconds, peers wait on them.
    let link = Shaper::start(&reg.host(), 10, 2);
    let reference = format!("docker://{}/refactored/{}:{}", link.1, img.family, img.tag);
    umoci_tree(img, &tmp.path().join("umoci"));

    const N: usize = 3;
    let mut nodes = cluster(&tmp.path().join("cluster"), N);
    polled(&nodes);
    let waits = |n: &Node| sample(n, "breakfs_rollout_meta_waits");
    let controls: Vec<String> = nodes.iter().map(Node::control).collect();
    let (victim, mounted) = std::thread::scope(|s| {
        let mounter = s.spawn(|| mount_all_at_once(&controls, &reference, tmp.path()));
        // Once peers wait on a node's read of a config or TOC, kill it.
        let until = Instant::now() + Duration::from_secs(60);
        let victim = loop {
            if let Some(k) = (0..N).find(|&k| waits(&nodes[k]) >= 1.0) {
                break k;
            }
            assert!(
                !mounter.is_finished(),
                "the mounts ended and no node waited on another's metadata read"
            );
            assert!(Instant::now() < until, "no node waited on another's read");
            std::thread::sleep(Duration::from_millis(10));
        };
        nodes[victim].sigkill();
        (victim, mounter.join().unwrap())
    });
    let survivors: Vec<usize> = (0..N).filter(|&k| k != victim).collect();
    let mut mounts = Vec::new();
    for (k, m) in mounted.into_iter().enumerate() {
        match m {
            Ok(m) => mounts.push((k, m)),
            Err(_) if k == victim => {}
            Err(_) => panic!("node {k}'s mount failed: {}", nodes[k].log_text()),
        }
    }
    // The victim's mount (if it came up before the kill) died with it.
    for (k, m) in &mounts {
        if *k == victim {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&m.point)
                .status();
        }
    }
    let failed: f64 = survivors
        .iter()
        .map(|&k| sample(&nodes[k], "breakfs_rollout_meta_total{from=\"failed\"}"))
        .sum();
    assert!(
        failed >= 1.0,
        "no survivor's wait on the killed node failed"
    );
    // The survivors' trees (from TOCs checked by their digests) agree,
    // and a file reads right on each. Not the whole tree: over this slow
    // link that would outlast the read deadline, with or without a kill.
    let rootfs = tmp.path().join("umoci/rootfs");
    let alive: Vec<&(usize, Mount)> = mounts.iter().filter(|(k, _)| *k != victim).collect();
    let listing = files_of(&alive[0].1.point);
    let (small, _) = listing
        .iter()
        .filter(|(_, size)| (1000..100_000).contains(size))
        .min_by_key(|(_, size)| *size)
        .unwrap();
    let want = std::fs::read(rootfs.join(small)).unwrap();
    for (k, m) in alive {
        assert_eq!(files_of(&m.point), listing, "node {k}'s tree");
        let got = std::fs::read(m.point.join(small)).unwrap();
        assert!(got == want, "{small} read wrong on node {k}");
        assert_eq!(m.status()["reads"]["reads_failed"], 0, "node {k}");
    }
}
