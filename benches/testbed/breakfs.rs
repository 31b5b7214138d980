//! The breakfs strategy and its ablations: a `breakfs node` per node with
//! the others as peers over the shaped links, `breakfs sched` placing each
//! pod and planning prefetch.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::harness::{self, Env, Node, NodeMount, run};
use super::interrupt::{INTERRUPTED, check_interrupt};
use super::opts::Strategy;
use super::replay::replay_then;
use super::strategies::{curl, ready_on_mount};
use super::workload::Deployment;
use super::world::{LeastLoaded, Outcome, PeerLinks, World, background_rate, distinct_bytes};

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

pub fn run_breakfs(
    w: &World,
    deps: &[Deployment],
    dir: &Path,
    variant: Strategy,
) -> Result<Outcome> {
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
    let estimates: Mutex<Vec<Option<f64>>> = Mutex::new(vec![None; deps.len()]);
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
            // The placement feeds popularity, for the prefetch planner;
            // the answer is the estimator's expected fetch time there.
            let plan = curl(
                &format!("{}/plan?image={image_ref}&node={best}", sched.url),
                &[],
                None,
            );
            if variant != Strategy::NoSched
                && let Ok(body) = plan
                && let Ok(e) = serde_json::from_slice::<serde_json::Value>(&body)
            {
                estimates.lock().unwrap()[i] = e["fetch_secs"].as_f64();
            }
            let n: usize = best.trim_start_matches('n').parse()?;
            let cdir = dir.join(format!("c{i}"));
            // Mounts fetch what is read (lazy, like the eStargz baselines); whole
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
        estimates: estimates.into_inner().unwrap(),
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
