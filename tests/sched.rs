//! `breakfs sched`: the kube-scheduler extender protocol, spoken to over
//! HTTP as kube-scheduler does, scoring real node daemons (one holding the
//! image, one half of it, one far away behind a slow link) that publish
//! their caches and measurements.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::mount::{Shaper, breakfs, corpus, ok, refactor_into};
use crate::node::{Node, layers_of};
use crate::support::registry::TestRegistry;

/// `breakfs sched` on a free loopback port: the process and its URL;
/// killed on drop.
pub(crate) struct SchedProc(pub(crate) Child, pub(crate) String);

impl SchedProc {
    pub(crate) fn start(args: &[String]) -> SchedProc {
        SchedProc::spawn(breakfs(), args)
    }

    /// [`SchedProc::start`] under a soft limit of `n` open files (what
    /// systemd and containerd give a service unless told otherwise).
    pub(crate) fn start_with_soft_nofile(n: u64, args: &[String]) -> SchedProc {
        let mut prlimit = Command::new("prlimit");
        prlimit
            .arg(format!("--nofile={n}:"))
            .arg(env!("CARGO_BIN_EXE_breakfs"))
            .env("BREAKFS_RUN_DIR", crate::mount::run_dir());
        SchedProc::spawn(prlimit, args)
    }

    /// `breakfs sched` by `cmd` (the binary or a wrapper that runs it).
    fn spawn(mut cmd: Command, args: &[String]) -> SchedProc {
        let mut child = cmd
            .args(["sched", "--plain-http", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("BREAKFS-SCHED-READY ")
            .unwrap_or_else(|| panic!("breakfs sched did not start: {line:?}"))
            .to_string();
        SchedProc(child, url)
    }

    /// POST `body` to `path`: (status, body).
    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "30",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
            ])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("{}{path}", self.1))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_string())
    }

    fn json(&self, path: &str, body: &Value) -> Value {
        let (code, text) = self.post(path, &body.to_string());
        assert_eq!(code, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for SchedProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(image: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "annotations": annotations,
                     "uid": "1234", "creationTimestamp": null},
        "spec": {"schedulerName": "breakfs", "containers": [{"name": "app", "image": image,
                 "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]},
        "status": {"phase": "Pending"}
    })
}

fn node_obj(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_extender_ranks_full_half_and_far_nodes_and_plans_from_peers() {
    let images = corpus();
    let v1: Vec<_> = images.iter().filter(|i| i.tag == "v1").cloned().collect();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, &v1, &tmp.path().join("work"));
    let (redis, nginx) = (&refs[0], &refs[1]);
    let layers = layers_of(redis);
    assert!(layers.len() >= 2, "{layers:?}");

    // full holds the image, half holds half its layers, far is behind a
    // 200 ms link to the registry and holds another image.
    let full = Node::start(&tmp.path().join("full"), &[], &[]);
    let half = Node::start(&tmp.path().join("half"), &[], &[]);
    let far = Node::start(&tmp.path().join("far"), &[], &[]);
    full.post("/prefetch", &json!({"images": [redis]}).to_string());
    let some: Vec<&String> = layers.iter().take(layers.len() / 2).collect();
    half.post(
        "/prefetch",
        &json!({"image": redis, "layers": some}).to_string(),
    );
    let slow = Shaper::start(&reg.host(), 200, 100);
    far.post(
        "/prefetch",
        &json!({"images": [nginx.replace(&reg.host(), &slow.1)]}).to_string(),
    );
    full.wait_whole(&layers);
    half.wait_whole(&some.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    wait_for("the far node's RTT to the registry", || {
        far.json("/measurements")["links"]["cloud"]["rtt_ms"]
            .as_f64()
            .is_some_and(|r| r > 150.0)
    });

    let sched = SchedProc::start(&[
        "--cache-sum-size".into(),
        "1Gi".into(),
        "--plan-secs".into(),
        "1".into(),
        "--node".into(),
        format!("full={}@edge", full.url),
        "--node".into(),
        format!("half={}@edge", half.url),
        "--node".into(),
        format!("far={}@edge", far.url),
    ]);
    let image = redis.trim_start_matches("docker://");
    let names = json!(["full", "half", "far", "unwatched"]);
    // The scheduler learns the nodes' measurements by polling them: until
    // its first poll of the far node, nothing is known to filter it on.
    let limited = pod(image, json!({"breakfs.io/limit-delay": "100"}));
    wait_for("the scheduler to know the far node's link", || {
        let r = sched.json(
            "/filter",
            &json!({"Pod": limited.clone(), "NodeNames": names.clone()}),
        );
        r["FailedNodes"]["far"].is_string()
    });

    // NodeNames form, no limits: everything passes; every field is there.
    let r = sched.json(
        "/filter",
        &json!({"Pod": pod(image, json!({})), "NodeNames": names}),
    );
    assert_eq!(r["NodeNames"], names, "{r}");
    assert_eq!(r["FailedNodes"], json!({}), "{r}");
    assert_eq!(r["FailedAndUnresolvableNodes"], json!({}), "{r}");
    assert_eq!(r["Error"], "", "{r}");
    assert!(r.get("Nodes").is_none(), "{r}");

    // The pod's delay limit filters the far node, saying why.
    let limited = pod(image, json!({"breakfs.io/limit-delay": "100"}));
    let r = sched.json("/filter", &json!({"Pod": limited, "NodeNames": names}));
    assert_eq!(r["NodeNames"], json!(["full", "half", "unwatched"]), "{r}");
    let why = r["FailedNodes"]["far"].as_str().unwrap();
    assert!(why.contains("ms") && why.contains("limit-delay"), "{why}");
    // The talk's label works too.
    let mut labelled = pod(image, json!({}));
    labelled["metadata"]["labels"] = json!({"limit_delay": "100"});
    let r = sched.json("/filter", &json!({"Pod": labelled, "NodeNames": names}));
    assert!(r["FailedNodes"]["far"].is_string(), "{r}");

    // Nodes form: the passing nodes come back whole, unknown fields kept.
    let list = json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {},
        "items": [node_obj("full"), node_obj("half"), node_obj("far")]});
    let limited = pod(image, json!({"breakfs.io/limit-delay": "100"}));
    let r = sched.json(
        "/filter",
        &json!({"Pod": limited, "Nodes": list, "Future": true}),
    );
    assert_eq!(r["Nodes"]["kind"], "NodeList", "{r}");
    assert_eq!(
        r["Nodes"]["items"],
        json!([node_obj("full"), node_obj("half")]),
        "{r}"
    );
    assert!(r.get("NodeNames").is_none(), "{r}");

    // Prioritize: full > half > far, scores within 0..10.
    for args in [
        json!({"Pod": pod(image, json!({})), "NodeNames": ["full", "half", "far"]}),
        json!({"Pod": pod(image, json!({})), "Nodes": list}),
    ] {
        let r = sched.json("/prioritize", &args);
        let score = |h: &str| {
            r.as_array()
                .unwrap()
                .iter()
                .find(|p| p["Host"] == h)
                .unwrap_or_else(|| panic!("{h} not in {r}"))["Score"]
                .as_i64()
                .unwrap()
        };
        assert!(
            (0..=10).contains(&score("full")) && (0..=10).contains(&score("far")),
            "{r}"
        );
        assert!(
            score("full") > score("half") && score("half") > score("far"),
            "{r}"
        );
    }

    // The plan sends the half holder to the full holder for what it lacks.
    let out = ok(Command::new("curl")
        .args(["-sSf", "-G"])
        .arg(format!("{}/plan", sched.1))
        .args([
            "--data-urlencode",
            &format!("image={image}"),
            "--data-urlencode",
            "node=half",
        ]));
    let plan: Value = serde_json::from_str(&out).unwrap();
    for l in plan["plan"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap().to_string();
        let expected = if some.contains(&&d) {
            json!("local")
        } else {
            json!("peer")
        };
        assert_eq!(l["from"], expected, "{plan}");
        if expected == "peer" {
            assert_eq!(l["node"], "full", "{plan}");
        }
    }

    // The placement made the image's layers popular: the planner puts a
    // second copy of each in the cluster (the first is on full already).
    wait_for("second copies of the image's layers in the cluster", || {
        let held: Vec<Value> = [&full, &half, &far]
            .iter()
            .map(|n| n.json("/cache/index"))
            .collect();
        layers.iter().all(|l| {
            held.iter()
                .filter(|i| {
                    i["blobs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|b| b["digest"] == l.as_str())
                })
                .count()
                >= 2
        })
    });

    // Bad bodies get 400 with a reason, and the service keeps serving.
    for bad in [
        "{",
        "[]",
        "{}",
        "{\"Pod\": 5}",
        "{\"NodeNames\": [\"a\"]}",
        "\u{1}garbage",
    ] {
        let (code, text) = sched.post("/filter", bad);
        assert_eq!(code, 400, "{bad:?}: {text}");
        assert!(text.contains("ExtenderArgs"), "{text}");
    }
    let r = sched.json(
        "/prioritize",
        &json!({"Pod": pod(image, json!({})), "NodeNames": ["a"]}),
    );
    // Alone it is the best candidate, whatever its parts: 10.
    assert_eq!(r, json!([{"Host": "a", "Score": 10}]));
}
