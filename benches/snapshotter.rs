//! The containerd snapshotter end to end, through a 50 ms / 50 Mbit/s
//! shaped link (`breakfs shape`) in front of a real docker-registry, with
//! a private containerd 1.6 per flow (its own root, state and socket) and,
//! for the breakfs flows, a fresh `breakfs node --snapshotter-socket`
//! behind its `[proxy_plugins.breakfs]`. Each flow is timed from the
//! start of the pull to the end of the command (`--version` of the
//! image's binary plus a read of the whole binary):
//!
//! * cold node: `ctr-remote image rpull --plain-http --snapshotter
//!   breakfs` of the refactored v1 + `ctr run --snapshotter breakfs`
//!   (lazy layers), against `ctr image pull --plain-http` + `ctr run` of
//!   the original gzip v1 with containerd's own overlayfs snapshotter;
//! * version update: v1 was pulled and run on the node, then v2 is
//!   deployed (timed: v2 only): the refactored v2 (refactored after v1
//!   into the same layout, so it shares v1's unchanged layers), against
//!   the originals converted per layer by `ctr-remote image convert
//!   --estargz --oci` and rpulled through the same breakfs snapshotter (no
//!   refactoring, no peers);
//! * point update, reported beside it: the same from v1 to the family's
//!   point release (the app's packages and three base packages newer: the
//!   program the image starts is new, the libraries it loads are not),
//!   refactored after v1 in a layout of its own.
//!
//! The ratios are of times measured in the same run (medians of `--runs`
//! runs, fresh node and containerd each run).
//!
//! `cargo bench --bench snapshotter -- [FAMILY...] [--runs N]` (default
//! redis, 3 runs); writes docs/results/snapshotter.md. Needs root, FUSE,
//! overlayfs, containerd 1.6, ctr, ctr-remote, runc, skopeo and
//! docker-registry.
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

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use containerd::{ContainerdOptions, NAMESPACE, PULL_TIMEOUT, TestContainerd, output_with_timeout};
use corpus::CorpusImage;
use harness::{Env, Node, Shaper, median, run, skopeo_copy};
use registry::TestRegistry;

const RTT_MS: u64 = 50;
const MBIT: u64 = 50;
const PLUGIN: &str = "breakfs";
const DEFAULT_FAMILIES: &[&str] = &["redis"];
const OVERLAY_LABEL: &str = "containerd 1.6 overlayfs, original gzip image";
const ESTARGZ_LABEL: &str = "eStargz per layer via the breakfs snapshotter";
const BREAKFS_LABEL: &str = "breakfs snapshotter, refactored image";

fn main() -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    let mut runs = 3usize;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--only" => {
                let flows = args.next().context("--only takes FLOW[,FLOW...]")?;
                let flows: Vec<String> = flows.split(',').map(str::to_string).collect();
                if let Some(f) = flows.iter().find(|f| !FLOWS.contains(&f.as_str())) {
                    bail!("unknown flow {f}: the flows are {}", FLOWS.join(", "));
                }
                only = Some(flows);
            }
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .context("--runs takes a positive number")?;
            }
            f if f.starts_with('-') => bail!("unknown flag {f}"),
            f => names.push(f.to_string()),
        }
    }
    if names.is_empty() {
        names = DEFAULT_FAMILIES.iter().map(|s| s.to_string()).collect();
    }
    let families: Vec<&str> = names.iter().map(String::as_str).collect();
    let images = corpus::build_families(&families)?;

    let reg = TestRegistry::start();
    let shaper = Shaper::start(&reg.host(), RTT_MS, MBIT)?;
    let tmpdir = tempfile::Builder::new()
        .prefix("snapbench")
        .tempdir_in("/tmp")?;
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        link: shaper.addr.clone(),
    };
    std::fs::create_dir_all(&env.run_dir)?;

    let mut rows = Vec::new();
    for fam in &families {
        let pick = |tag: &str| {
            images
                .iter()
                .find(|i| i.family == *fam && i.tag == tag)
                .cloned()
                .with_context(|| format!("the corpus has no {fam} {tag}"))
        };
        let (v1, v2, point) = (pick("v1")?, pick("v2")?, pick("point")?);
        let refs = publish(&env, &reg, &v1, &v2, &point)?;
        let command = command_of(&v1);
        let mut got = Figures::default();
        let wanted = |flow: &str| only.as_ref().is_none_or(|o| o.iter().any(|f| f == flow));
        for r in 0..runs {
            eprintln!("bench: {fam} run {}/{runs}", r + 1);
            if wanted("cold-breakfs") {
                let t = cold_breakfs(&env, &refs, &command)?;
                got.cold_breakfs.push(said(fam, "cold-breakfs", t));
            }
            if wanted("cold-overlay") {
                let t = cold_overlay(&env, &refs, &command)?;
                got.cold_overlay.push(said(fam, "cold-overlay", t));
            }
            if wanted("update-breakfs") {
                let (v1, v2) = (&refs.refactored_v1, &refs.refactored_v2);
                let t = update(&env, "update-breakfs", v1, v2, &command)?;
                got.update_breakfs.push(said(fam, "update-breakfs", t));
            }
            if wanted("update-estargz") {
                let (v1, v2) = (&refs.estargz_v1, &refs.estargz_v2);
                let t = update(&env, "update-estargz", v1, v2, &command)?;
                got.update_estargz.push(said(fam, "update-estargz", t));
            }
            if wanted("point-breakfs") {
                let (v1, pt) = (&refs.refactored_point_v1, &refs.refactored_point);
                let t = update(&env, "point-breakfs", v1, pt, &command)?;
                got.point_breakfs.push(said(fam, "point-breakfs", t));
            }
            if wanted("point-estargz") {
                let (v1, pt) = (&refs.estargz_v1, &refs.estargz_point);
                let t = update(&env, "point-estargz", v1, pt, &command)?;
                got.point_estargz.push(said(fam, "point-estargz", t));
            }
        }
        rows.push((fam.to_string(), refs, got));
    }
    drop(shaper);
    if only.is_some() {
        eprintln!("bench: some flows only (--only): no report written");
        return Ok(());
    }
    harness::write_report("snapshotter", &report(&rows, runs))?;
    Ok(())
}

/// The flows `--only` can pick.
const FLOWS: &[&str] = &[
    "cold-breakfs",
    "cold-overlay",
    "update-breakfs",
    "update-estargz",
    "point-breakfs",
    "point-estargz",
];

/// `t`, after saying it on stderr.
fn said(fam: &str, flow: &str, t: Timed) -> Timed {
    eprintln!(
        "bench: {fam} {flow}: {:.2} s (pull {:.2}), {:.2} MB from the registry",
        t.total,
        t.pull,
        t.bytes / 1e6
    );
    t
}

/// Seconds since the epoch, to line the bench's steps up with the node's
/// log (its lines carry UTC times).
fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The references of one family's images, as containerd reaches them
/// (through the shaped link), and their sizes.
struct Refs {
    original_v1: String,
    refactored_v1: String,
    refactored_v2: String,
    estargz_v1: String,
    estargz_v2: String,
    /// The refactored v1 and point, refactored in a layout of their own.
    refactored_point_v1: String,
    refactored_point: String,
    estargz_point: String,
    /// Per image: (what, compressed layer bytes, layer digests).
    sizes: Vec<(&'static str, u64, Vec<String>)>,
}

#[derive(Default)]
struct Figures {
    cold_breakfs: Vec<Timed>,
    cold_overlay: Vec<Timed>,
    update_breakfs: Vec<Timed>,
    update_estargz: Vec<Timed>,
    point_breakfs: Vec<Timed>,
    point_estargz: Vec<Timed>,
}

/// One flow's seconds: the pull alone, and pull to command done; and the
/// bytes the node fetched from the registry meanwhile (update flows; 0
/// where no node serves the flow).
#[derive(Clone, Copy)]
struct Timed {
    pull: f64,
    total: f64,
    bytes: f64,
}

impl Timed {
    fn since(start: Instant, pulled: Instant) -> Timed {
        Timed {
            pull: (pulled - start).as_secs_f64(),
            total: start.elapsed().as_secs_f64(),
            bytes: 0.0,
        }
    }
}

fn totals(v: &[Timed]) -> f64 {
    median(&v.iter().map(|t| t.total).collect::<Vec<_>>())
}

fn pulls(v: &[Timed]) -> f64 {
    median(&v.iter().map(|t| t.pull).collect::<Vec<_>>())
}

/// Median MB the node fetched from the registry.
fn megabytes(v: &[Timed]) -> f64 {
    median(&v.iter().map(|t| t.bytes / 1e6).collect::<Vec<_>>())
}

/// The image's command and a read of its whole binary, in one shell.
fn command_of(image: &CorpusImage) -> Vec<String> {
    let binary = corpus::family(image.family)
        .map(|f| f.binary)
        .unwrap_or("/usr/bin/redis-server");
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{} >/dev/null && cat {binary} >/dev/null",
            image.command.join(" ")
        ),
    ]
}

/// Push the originals, the refactored v1 and v2 (v2 refactored after v1
/// into the same layout), the refactored point (after v1, in a copy of
/// the layout as v1 left it, so that v2 is refactored as without it) and
/// the per-layer eStargz conversions of the originals to the registry,
/// directly (not through the shaped link).
fn publish(
    env: &Env,
    reg: &TestRegistry,
    v1: &CorpusImage,
    v2: &CorpusImage,
    point: &CorpusImage,
) -> Result<Refs> {
    let fam = v1.family;
    let layout = env.fresh(&format!("{fam}-refactored"))?;
    let point_layout = env.tmp.join(format!("{fam}-refactored-point"));
    let work = env.tmp.join(format!("{fam}-work"));
    let refactor = |img: &CorpusImage, layout: &std::path::Path, repo: &str| -> Result<()> {
        eprintln!("bench: refactoring {fam} {} into {repo}", img.tag);
        run(
            env.breakfs()
                .args(["refactor", "--deltas", "--work-dir"])
                .arg(&work)
                .arg("--to")
                .arg(format!("oci:{}", layout.display()))
                .arg(&img.reference),
            "breakfs refactor",
        )?;
        skopeo_copy(
            &format!("oci:{}:{}", layout.display(), img.tag),
            &reg.reference(&format!("{repo}/{fam}:{}", img.tag)),
        )?;
        // The image's delta artifact (against v1's files), under its tag.
        for tag in delta_tags(layout)? {
            skopeo_copy(
                &format!("oci:{}:{tag}", layout.display()),
                &reg.reference(&format!("{repo}/{fam}:{tag}")),
            )?;
        }
        skopeo_copy(
            &img.reference,
            &reg.reference(&format!("original/{fam}:{}", img.tag)),
        )
    };
    refactor(v1, &layout, "refactored")?;
    let _ = std::fs::remove_dir_all(&point_layout);
    run(
        Command::new("cp").arg("-a").arg(&layout).arg(&point_layout),
        "copying the refactored layout",
    )?;
    skopeo_copy(
        &format!("oci:{}:{}", point_layout.display(), v1.tag),
        &reg.reference(&format!("refactored-point/{fam}:{}", v1.tag)),
    )?;
    refactor(v2, &layout, "refactored")?;
    refactor(point, &point_layout, "refactored-point")?;
    let _ = std::fs::remove_dir_all(&work);
    // The eStargz conversions, made by ctr-remote in a containerd of
    // their own that reaches the registry directly.
    let ctrd = TestContainerd::start()?;
    for tag in ["v1", "v2", "point"] {
        let original = format!("{}/original/{fam}:{tag}", reg.host());
        let esgz = format!("{}/estargz/{fam}:{tag}", reg.host());
        eprintln!("bench: converting {original} to eStargz");
        ctrd.pull_plain_http(&original)?;
        ctr_remote(
            &ctrd,
            &["image", "convert", "--estargz", "--oci", &original, &esgz],
        )?;
        ctrd.ctr_checked(&["image", "push", "--plain-http", &esgz], PULL_TIMEOUT)?;
    }
    drop(ctrd);
    let layers = |repo: &str| -> Result<(u64, Vec<String>)> {
        let raw = run(
            Command::new("skopeo").args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{}/{repo}", reg.host()),
            ]),
            "skopeo inspect",
        )?;
        let m: serde_json::Value = serde_json::from_str(&raw)?;
        let all: Vec<&serde_json::Value> = m["layers"].as_array().into_iter().flatten().collect();
        Ok((
            all.iter().filter_map(|l| l["size"].as_u64()).sum(),
            all.iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect(),
        ))
    };
    let mut sizes = Vec::new();
    for (what, repo) in [
        ("original v1", format!("original/{fam}:v1")),
        ("original v2", format!("original/{fam}:v2")),
        ("refactored v1", format!("refactored/{fam}:v1")),
        ("refactored v2", format!("refactored/{fam}:v2")),
        ("eStargz v1", format!("estargz/{fam}:v1")),
        ("eStargz v2", format!("estargz/{fam}:v2")),
        ("original v1", format!("original/{fam}:v1")),
        ("original point", format!("original/{fam}:point")),
        (
            "refactored v1 (point's layout)",
            format!("refactored-point/{fam}:v1"),
        ),
        ("refactored point", format!("refactored-point/{fam}:point")),
        ("eStargz v1", format!("estargz/{fam}:v1")),
        ("eStargz point", format!("estargz/{fam}:point")),
    ] {
        let (bytes, digests) = layers(&repo)?;
        sizes.push((what, bytes, digests));
    }
    let at = |repo: &str| format!("{}/{repo}", env.link);
    Ok(Refs {
        original_v1: at(&format!("original/{fam}:v1")),
        refactored_v1: at(&format!("refactored/{fam}:v1")),
        refactored_v2: at(&format!("refactored/{fam}:v2")),
        estargz_v1: at(&format!("estargz/{fam}:v1")),
        estargz_v2: at(&format!("estargz/{fam}:v2")),
        refactored_point_v1: at(&format!("refactored-point/{fam}:v1")),
        refactored_point: at(&format!("refactored-point/{fam}:point")),
        estargz_point: at(&format!("estargz/{fam}:point")),
        sizes,
    })
}

/// The tags of delta artifacts (`sha256-HEX`) in the layout `layout`.
fn delta_tags(layout: &std::path::Path) -> Result<Vec<String>> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .filter(|t| breakfs_fetch::delta::is_delta_tag(t))
        .map(str::to_string)
        .collect())
}

fn ctr_remote(ctrd: &TestContainerd, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ctr-remote");
    cmd.arg("--address")
        .arg(ctrd.address())
        .args(["--namespace", NAMESPACE])
        .args(args);
    let out = output_with_timeout(&mut cmd, PULL_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "ctr-remote {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A fresh node daemon serving the snapshots API and a private containerd
/// using it; containerd goes first when dropped.
struct Lab {
    ctrd: TestContainerd,
    node: Node,
    dir: PathBuf,
    name: String,
}

impl Lab {
    fn start(env: &Env, name: &str) -> Result<Lab> {
        let dir = env.fresh(name)?;
        let sock = dir.join("snap.sock");
        let sock_arg = sock.to_string_lossy().into_owned();
        // SNAPBENCH_NODE_LOG: the node's log filter (to see where the time
        // goes: `info,breakfs_node::snapshotter=debug,breakfs_fetch=debug`).
        let filter = std::env::var("SNAPBENCH_NODE_LOG").unwrap_or_else(|_| "info".into());
        let node = Node::start(env, &dir, &["--snapshotter-socket", &sock_arg], &filter)?;
        let ctrd = TestContainerd::start_with(ContainerdOptions {
            snapshotter: Some(PLUGIN.into()),
            extra_config: format!(
                "[proxy_plugins.{PLUGIN}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                sock.display()
            ),
            ..Default::default()
        })?;
        Ok(Lab {
            ctrd,
            node,
            dir,
            name: name.to_string(),
        })
    }

    /// Copy the node's log to `$SNAPBENCH_KEEP_LOGS/NAME-N.log`, if set.
    fn keep_log(&self) {
        let Some(to) = std::env::var_os("SNAPBENCH_KEEP_LOGS") else {
            return;
        };
        let to = PathBuf::from(to);
        let _ = std::fs::create_dir_all(&to);
        let n = (1..)
            .find(|n| !to.join(format!("{}-{n}.log", self.name)).exists())
            .unwrap_or(0);
        let _ = std::fs::copy(&self.node.log, to.join(format!("{}-{n}.log", self.name)));
    }

    fn rpull(&self, reference: &str) -> Result<()> {
        ctr_remote(
            &self.ctrd,
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                PLUGIN,
                reference,
            ],
        )
        .with_context(|| self.logs())
    }

    fn run(&self, reference: &str, command: &[String]) -> Result<()> {
        run_in(&self.ctrd, reference, command).with_context(|| self.logs())
    }

    fn logs(&self) -> String {
        format!(
            "containerd log:\n{}\nnode log ({}):\n{}",
            self.ctrd.log(),
            self.dir.display(),
            self.node.log_text()
        )
    }
}

fn run_in(ctrd: &TestContainerd, reference: &str, command: &[String]) -> Result<()> {
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let out = ctrd.run(reference, &args)?;
    ensure!(
        out.status.success(),
        "{command:?} in {reference} exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Seconds from `rpull` of the refactored v1 to its command done, on a
/// cold node.
fn cold_breakfs(env: &Env, refs: &Refs, command: &[String]) -> Result<Timed> {
    let lab = Lab::start(env, "cold-breakfs")?;
    let t = Instant::now();
    eprintln!("bench: cold-breakfs rpull at {:.3}", wall());
    lab.rpull(&refs.refactored_v1)?;
    let pulled = Instant::now();
    eprintln!("bench: cold-breakfs run at {:.3}", wall());
    lab.run(&refs.refactored_v1, command)?;
    eprintln!("bench: cold-breakfs done at {:.3}", wall());
    lab.keep_log();
    Ok(Timed::since(t, pulled))
}

/// Seconds from `ctr image pull` of the original v1 to its command done,
/// with containerd's own overlayfs snapshotter, on a cold node.
fn cold_overlay(env: &Env, refs: &Refs, command: &[String]) -> Result<Timed> {
    let _dir = env.fresh("cold-overlay")?;
    let ctrd = TestContainerd::start_with(ContainerdOptions {
        snapshotter: Some("overlayfs".into()),
        ..Default::default()
    })?;
    ensure!(
        ctrd.plugin_ok("io.containerd.snapshotter.v1", "overlayfs")?,
        "containerd's overlayfs snapshotter does not work here"
    );
    let t = Instant::now();
    ctrd.pull_plain_http(&refs.original_v1)?;
    let pulled = Instant::now();
    run_in(&ctrd, &refs.original_v1, command)?;
    Ok(Timed::since(t, pulled))
}

/// Seconds from `rpull` of `v2` to its command done, on a node that
/// pulled and ran `v1` before (not timed).
fn update(env: &Env, flow: &str, v1: &str, v2: &str, command: &[String]) -> Result<Timed> {
    let lab = Lab::start(env, flow)?;
    lab.rpull(v1)?;
    lab.run(v1, command)?;
    let before = lab.node.cloud_bytes()?;
    let t = Instant::now();
    eprintln!("bench: {flow} rpull at {:.3}", wall());
    lab.rpull(v2)?;
    let pulled = Instant::now();
    eprintln!("bench: {flow} run at {:.3}", wall());
    lab.run(v2, command)?;
    eprintln!("bench: {flow} done at {:.3}", wall());
    let mut timed = Timed::since(t, pulled);
    timed.bytes = lab.node.cloud_bytes()? - before;
    lab.keep_log();
    Ok(timed)
}

fn report(rows: &[(String, Refs, Figures)], runs: usize) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Time from the start of the pull to the command done (`--version` \
         of the image's binary, then a read of the whole binary), through a \
         {RTT_MS} ms / {MBIT} Mbit/s link (`breakfs shape`) in front of a real \
         docker-registry; a private containerd 1.6 and, for the breakfs flows, \
         a fresh `breakfs node --snapshotter-socket` per run (no peers). \
         Medians of {runs} run(s); the ratios are of times measured in the same \
         run of this benchmark. Built with the dev profile (opt-level 1 for \
         breakfs, 2 for dependencies), not a release build.\n"
    );
    let _ = writeln!(
        md,
        "* Cold node: `ctr-remote image rpull --plain-http --snapshotter breakfs` \
         of the refactored v1 + `ctr run --snapshotter breakfs` (lazy layers), \
         against `ctr image pull --plain-http` + `ctr run` of the original v1 \
         ({OVERLAY_LABEL}). Target: ≤ 0.3×.\n\
         * Version update: v1 was pulled and run on the node, then v2 is \
         deployed (only v2 timed): the refactored v2 (refactored after v1 into \
         the same layout, sharing v1's unchanged layers), against the originals \
         converted per layer by `ctr-remote image convert --estargz --oci` and \
         rpulled the same way ({ESTARGZ_LABEL}; no refactoring, no peers). \
         Target: ≤ 0.6×.\n\
         * Point update, beside it (not instead of it): the same flows from v1 \
         to the family's point release (its app packages and three base \
         packages at their newest, the rest as in v1: the program the image \
         starts is new bytes, the libraries it loads are the same files), \
         refactored after v1 in a layout of its own.\n"
    );
    let _ = writeln!(
        md,
        "| family | case | {BREAKFS_LABEL} (s) | baseline | baseline (s) | ratio | target |\n\
         |---|---|---:|---|---:|---:|---:|"
    );
    for (fam, _, f) in rows {
        let (cb, co) = (totals(&f.cold_breakfs), totals(&f.cold_overlay));
        let (ub, ue) = (totals(&f.update_breakfs), totals(&f.update_estargz));
        let _ = writeln!(
            md,
            "| {fam} | cold node, v1 | {cb:.2} | {OVERLAY_LABEL} | {co:.2} | {:.2}× | ≤ 0.3× |",
            cb / co
        );
        let _ = writeln!(
            md,
            "| {fam} | version update v1→v2 | {ub:.2} | {ESTARGZ_LABEL} | {ue:.2} | {:.2}× | ≤ 0.6× |",
            ub / ue
        );
        let (pb, pe) = (totals(&f.point_breakfs), totals(&f.point_estargz));
        let _ = writeln!(
            md,
            "| {fam} | point update v1→point (program new, its libraries unchanged) | {pb:.2} | {ESTARGZ_LABEL} | {pe:.2} | {:.2}× | (beside v1→v2) |",
            pb / pe
        );
    }
    let _ = writeln!(
        md,
        "\nPull alone (median s): cold breakfs / overlayfs; update breakfs / eStargz; \
         point update breakfs / eStargz:\n"
    );
    for (fam, _, f) in rows {
        let _ = writeln!(
            md,
            "* {fam}: {:.2} / {:.2}; {:.2} / {:.2}; {:.2} / {:.2}",
            pulls(&f.cold_breakfs),
            pulls(&f.cold_overlay),
            pulls(&f.update_breakfs),
            pulls(&f.update_estargz),
            pulls(&f.point_breakfs),
            pulls(&f.point_estargz)
        );
    }
    let _ = writeln!(
        md,
        "\nBytes the node fetched from the registry from the update's rpull to \
         its command done (median MB; its range requests, TOCs, manifests and \
         configs; containerd's own manifest and config reads not counted): \
         update breakfs / eStargz; point update breakfs / eStargz:\n"
    );
    for (fam, _, f) in rows {
        let _ = writeln!(
            md,
            "* {fam}: {:.2} / {:.2}; {:.2} / {:.2}",
            megabytes(&f.update_breakfs),
            megabytes(&f.update_estargz),
            megabytes(&f.point_breakfs),
            megabytes(&f.point_estargz)
        );
    }
    let _ = writeln!(
        md,
        "\nEvery run (s, pull to command done, and the pull alone; for the \
         updates the MB the node fetched from the registry):\n"
    );
    for (fam, _, f) in rows {
        let list = |v: &[Timed]| {
            v.iter()
                .map(|x| {
                    if x.bytes > 0.0 {
                        format!(
                            "{:.2} (pull {:.2}, {:.2} MB)",
                            x.total,
                            x.pull,
                            x.bytes / 1e6
                        )
                    } else {
                        format!("{:.2} (pull {:.2})", x.total, x.pull)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "* {fam}: cold breakfs {}; cold overlayfs {}; update breakfs {}; update eStargz {}; \
             point update breakfs {}; point update eStargz {}",
            list(&f.cold_breakfs),
            list(&f.cold_overlay),
            list(&f.update_breakfs),
            list(&f.update_estargz),
            list(&f.point_breakfs),
            list(&f.point_estargz)
        );
    }
    let _ = writeln!(
        md,
        "\nImages (compressed layer bytes, layers; in pairs, the second's \
         layers also in the first):\n"
    );
    for (fam, refs, _) in rows {
        let mut sizes: Vec<String> = Vec::new();
        for (i, (w, b, d)) in refs.sizes.iter().enumerate() {
            let mut s = format!("{w} {:.1} MB, {} layers", harness::mb(*b), d.len());
            // The list goes in pairs: v1, then its v2 or point.
            if i % 2 == 1 {
                let v1 = &refs.sizes[i - 1].2;
                let _ = write!(
                    s,
                    " ({} shared)",
                    d.iter().filter(|x| v1.contains(x)).count()
                );
            }
            sizes.push(s);
        }
        let _ = writeln!(md, "* {fam}: {}", sizes.join("; "));
    }
    md
}
