//! Profile benchmark: a cold start with an access profile recorded on
//! another node, against the same start without one, and against the
//! physical floor of that start (docs/profiles.md).
//!
//! A real docker-registry holds refactored (eStargz) corpus images and is
//! reached only through `breakfs shape` (50 ms RTT, 50 Mbit/s, shared).
//! Per image (v1 of each family):
//!
//! 1. Node A (fresh, defaults) mounts the image and runs the family's
//!    command in a chroot of the mount (it reads real files: an
//!    interpreter and its modules, a server's libraries); A keeps the
//!    profile of those reads.
//! 2. A starts again with a fresh cache holding only its profiles (so that
//!    a peer gets the profile from A, and every byte from the cloud), and
//!    node E with an empty cache (no profile), for the baseline.
//! 3. Each run: a fresh node whose peer is E mounts the image and runs
//!    the command (no profile); a fresh node whose peer is A does the same
//!    (profile). Timed from `breakfs mount` to the command's end. Node
//!    defaults for both (hydration and dependency prefetch on).
//!
//! Floor ([`floor_of`]): compressed bytes of the gzip members the command
//! reads ÷ link bandwidth, plus 3 RTT, plus the command's warm time, all
//! measured on a node of their own that fetches nothing but what is read
//! and records until after the command exited. Targets: with profile at
//! most 0.5× without, and at most 1.2× the floor.
//!
//! `cargo bench --bench profile -- [--runs N] [--families A,B,...]`
//! (defaults: 3 runs; python,node,httpd,postgres); writes the table to
//! stdout, target/bench-profile.md and docs/results/profile.md. Needs root,
//! FUSE, skopeo and docker-registry.
//!
//! A second section (`--section refactor`, or `all`, the default) measures
//! `breakfs refactor --profile CMD` (issue 21's acceptance 2): see
//! [`refactor_section`].
#![allow(clippy::unwrap_used)]

#[path = "testbed/cache.rs"]
#[allow(dead_code)]
mod cache;
#[path = "../tests/support/containerd.rs"]
#[allow(dead_code)]
mod containerd;
#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "testbed/estargz.rs"]
#[allow(dead_code)]
mod estargz;
#[path = "support/harness.rs"]
mod harness;
#[path = "testbed/interrupt.rs"]
#[allow(dead_code)]
mod interrupt;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use harness::{Env, Node, NodeMount, Published, Shaper, mb, median, publish, run, run_chroot};
use registry::TestRegistry;

const RTT_MS: u64 = 50;
const MBIT: u64 = 50;
const NODE_LOG: &str = "warn,breakfs_node=info";

/// The node log filter: `BREAKFS_BENCH_NODE_LOG`, else [`NODE_LOG`].
fn node_log() -> String {
    std::env::var("BREAKFS_BENCH_NODE_LOG").unwrap_or_else(|_| NODE_LOG.to_string())
}

/// One image's figures.
struct Figures {
    title: String,
    chunks: usize,
    read_bytes: u64,
    warm: f64,
    without: Vec<f64>,
    with: Vec<f64>,
    cloud_without: Vec<f64>,
    cloud_with: Vec<f64>,
}

impl Figures {
    fn floor(&self) -> f64 {
        self.read_bytes as f64 * 8.0 / (MBIT as f64 * 1e6) + 3.0 * RTT_MS as f64 / 1e3 + self.warm
    }
}

fn main() -> Result<()> {
    let mut runs = 3usize;
    let mut families = "python,node,httpd,postgres".to_string();
    let mut section = "all".to_string();
    let mut refactor_families = REFACTOR_FAMILIES.to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow!("--runs wants a positive number"))?;
            }
            "--families" => {
                families = args
                    .next()
                    .ok_or_else(|| anyhow!("--families wants FAMILY,..."))?;
            }
            "--section" => {
                section = args
                    .next()
                    .filter(|s| ["all", "node", "refactor"].contains(&s.as_str()))
                    .ok_or_else(|| anyhow!("--section wants all, node or refactor"))?;
            }
            "--refactor-families" => {
                refactor_families = args
                    .next()
                    .ok_or_else(|| anyhow!("--refactor-families wants FAMILY,..."))?;
            }
            other => bail!(
                "unknown argument {other:?}: use --runs N, --families A,B,..., \
                 --section all|node|refactor, --refactor-families A,B,..."
            ),
        }
    }
    ensure!(
        std::fs::metadata("/proc/self")?.uid() == 0,
        "the profile benchmark needs root (FUSE mounts through node daemons)"
    );
    let names: Vec<&str> = if section == "refactor" {
        Vec::new()
    } else {
        families.split(',').filter(|f| !f.is_empty()).collect()
    };
    for n in &names {
        corpus::family(n)?;
    }
    let built = corpus::build_families(&names)?;

    // Declared first so that it is removed last, after every guard below.
    let tmpdir = tempfile::Builder::new()
        .prefix("breakfs-bench-profile")
        .tempdir()?;
    let reg = TestRegistry::start();
    let shaper = Shaper::start(&reg.host(), RTT_MS, MBIT)?;
    let env = Env {
        tmp: tmpdir.path().to_path_buf(),
        run_dir: tmpdir.path().join("run"),
        link: shaper.addr.clone(),
    };
    std::fs::create_dir_all(&env.run_dir)?;
    eprintln!(
        "profile bench: registry {} behind breakfs shape {} ({RTT_MS} ms RTT, {MBIT} Mbit/s); {runs} runs",
        reg.host(),
        env.link
    );
    let load_before = load_average();
    let mut all = Vec::new();
    for fam in &names {
        let img = built
            .iter()
            .find(|i| i.family == *fam && i.tag == "v1")
            .ok_or_else(|| anyhow!("the corpus has no {fam}:v1"))?;
        let published = publish(&env, &reg, img)?;
        let f = bench_image(&env, &published, &img.command, runs)
            .with_context(|| format!("benchmarking {}", published.title))?;
        eprintln!(
            "profile bench: {}: without {:.2} s, with {:.2} s, floor {:.2} s",
            f.title,
            median(&f.without),
            median(&f.with),
            f.floor()
        );
        all.push(f);
    }
    if section != "refactor" {
        harness::write_report("profile", &report(&all, runs))?;
    }
    if section != "node" {
        let fams: Vec<&str> = refactor_families
            .split(',')
            .filter(|f| !f.is_empty())
            .collect();
        refactor_section(&env, &reg, &fams, runs, &load_before)?;
    }
    Ok(())
}

fn bench_image(env: &Env, p: &Published, command: &[String], runs: usize) -> Result<Figures> {
    let slug = p.title.replace(' ', "-");
    // 1. Node A (defaults) records the profile the later runs use.
    let a_dir = env.fresh(&format!("{slug}-a"))?;
    let image = {
        let a = Node::start(env, &a_dir, &[], &node_log())?;
        let point = env.tmp.join(format!("{slug}-mnt-a"));
        let m = NodeMount::with_args(env, &node_args(&a), &p.remote, &point)?;
        run_chroot(&m.point, command)?;
        let image = manifest_of(env, &m)?;
        wait_profile(&a, &image)?;
        image
    };
    // The floor: what the command reads, and its warm time.
    let floor = floor_of(env, &slug, &p.remote, command)?;
    // 2. A again, holding only its profiles; E, empty.
    let a_dir2 = env.fresh(&format!("{slug}-a2"))?;
    std::fs::create_dir_all(a_dir2.join("cache"))?;
    run(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(a_dir.join("cache/profiles"))
            .arg(a_dir2.join("cache/profiles")),
        "copying A's profiles",
    )?;
    let a = Node::start(env, &a_dir2, &[], &node_log())?;
    wait_profile(&a, &image)?;
    let e = Node::start(env, &env.fresh(&format!("{slug}-e"))?, &[], &node_log())?;
    let mut f = Figures {
        title: p.title.clone(),
        chunks: floor.members,
        read_bytes: floor.bytes,
        warm: floor.warm,
        without: Vec::new(),
        with: Vec::new(),
        cloud_without: Vec::new(),
        cloud_with: Vec::new(),
    };
    // 3. Cold starts, alternating.
    for r in 0..runs {
        for (with, peer) in [(false, &e), (true, &a)] {
            let name = format!("{slug}-{}-{r}", if with { "with" } else { "without" });
            let dir = env.fresh(&name)?;
            let b = Node::start(env, &dir, &["--peer", &peer.url], &node_log())?;
            let point = env.tmp.join(format!("{name}-mnt"));
            let began = Instant::now();
            let m = NodeMount::with_args(env, &node_args(&b), &p.remote, &point)?;
            let mounted = began.elapsed().as_secs_f64();
            run_chroot(&m.point, command)?;
            let took = began.elapsed().as_secs_f64();
            let cloud = b.cloud_bytes()?;
            keep_log(&b, &name, took)?;
            eprintln!(
                "profile bench: {} run {r} {}: {took:.2} s (mounted at {mounted:.2} s), {:.1} MB from the cloud",
                p.title,
                if with { "with profile" } else { "without" },
                cloud / 1e6
            );
            if with {
                f.with.push(took);
                f.cloud_with.push(cloud);
            } else {
                f.without.push(took);
                f.cloud_without.push(cloud);
            }
        }
    }
    Ok(f)
}

fn node_args(node: &Node) -> Vec<String> {
    vec!["--node".into(), format!("unix:{}", node.socket.display())]
}

/// Keep run `name`'s node log under `$BREAKFS_BENCH_LOGS`, if set (the
/// fetch timeline of a run, with `BREAKFS_BENCH_NODE_LOG`).
fn keep_log(node: &Node, name: &str, took: f64) -> Result<()> {
    if let Some(dir) = std::env::var_os("BREAKFS_BENCH_LOGS") {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            std::path::Path::new(&dir).join(format!("{name}.log")),
            format!("took {took:.3} s\n{}", node.log_text()),
        )?;
    }
    Ok(())
}

/// The manifest digest of the image mounted at `m`.
fn manifest_of(env: &Env, m: &NodeMount) -> Result<String> {
    let status: serde_json::Value = serde_json::from_str(&run(
        env.breakfs().args(["status", "--json"]).arg(&m.point),
        "breakfs status",
    )?)?;
    Ok(status["manifest"]
        .as_str()
        .ok_or_else(|| anyhow!("the mount's status has no manifest digest"))?
        .to_string())
}

/// What the floor of a start is made of.
struct Floor {
    /// Distinct gzip members the command reads.
    members: usize,
    /// Their compressed bytes.
    bytes: u64,
    /// The command's own time on a warm mount (the faster of two runs).
    warm: f64,
}

/// The floor of running `command` on image `reference`: a fresh node with
/// FUSE passthrough off (every read of the command reaches the daemon; a
/// passthrough open would count as a read of the whole file) mounts it
/// with no hydration and no dependency prefetch (nothing is fetched but
/// what is read, the landmarked region aside), runs the command once, then
/// twice more warm. Its recording ends only once no read has waited on a
/// fetch and no chunk was first read for the node's quiet spell, after the
/// command exited: it holds every chunk the command read. Each gzip member
/// of those chunks counts once (small files share members).
fn floor_of(env: &Env, slug: &str, reference: &str, command: &[String]) -> Result<Floor> {
    let n = Node::start_env(
        env,
        &env.fresh(&format!("{slug}-floor"))?,
        &[],
        &node_log(),
        &[("BREAKFS_PASSTHROUGH", "0")],
    )?;
    let point = env.tmp.join(format!("{slug}-floor-mnt"));
    let mut args = node_args(&n);
    args.extend(["--no-hydrate".into(), "--no-dependency-prefetch".into()]);
    let m = NodeMount::with_args(env, &args, reference, &point)?;
    run_chroot(&m.point, command)?;
    let mut warm = f64::INFINITY;
    for _ in 0..2 {
        let t = Instant::now();
        run_chroot(&m.point, command)?;
        warm = warm.min(t.elapsed().as_secs_f64());
    }
    let image = manifest_of(env, &m)?;
    let profile: serde_json::Value = serde_json::from_str(&wait_profile(&n, &image)?)?;
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    for e in profile["entries"].as_array().into_iter().flatten() {
        let (off, end) = (
            e["offset"].as_u64().unwrap_or(0),
            e["end"].as_u64().unwrap_or(0),
        );
        if seen.insert((e["layer"].to_string(), off)) {
            bytes += end.saturating_sub(off);
        }
    }
    Ok(Floor {
        members: seen.len(),
        bytes,
        warm,
    })
}

/// Wait (at most 60 s) until `node` serves a profile of `image`; its text.
fn wait_profile(node: &Node, image: &str) -> Result<String> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(p) = node.get(&format!("/profiles/{image}")) {
            return Ok(p);
        }
        ensure!(
            Instant::now() < until,
            "no profile of {image} on {} after 60 s: {}",
            node.url,
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn report(all: &[Figures], runs: usize) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Cold start (`breakfs mount` through a fresh node to the family's command done in a \
         chroot of the mount) through one {RTT_MS} ms / {MBIT} Mbit/s link to a real \
         docker-registry, refactored v1 images, median of {runs} runs each. *With profile*: \
         the node's peer holds the profile another node recorded (and no data); *without*: \
         its peer holds nothing. Floor: compressed bytes of the distinct gzip members of \
         the chunks the command reads ÷ {MBIT} Mbit/s + 3 RTT + the command's own time on a \
         warm mount; what it reads is recorded on a node of its own with FUSE passthrough, \
         hydration and dependency prefetch off, until after the command exited (see \
         `floor_of` in benches/profile.rs). Targets: with ≤ 0.5× without, with ≤ 1.2× floor.\n"
    );
    let _ = writeln!(
        md,
        "| image | members read | compressed MB read | warm command s | floor s | without s | with s | with / without | with / floor | cloud MB without / with |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for f in all {
        let (wo, w) = (median(&f.without), median(&f.with));
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}× {} | {:.2}× {} | {:.1} / {:.1} |",
            f.title,
            f.chunks,
            mb(f.read_bytes),
            f.warm,
            f.floor(),
            wo,
            w,
            w / wo,
            if w / wo <= 0.5 { "(met)" } else { "(missed)" },
            w / f.floor(),
            if w / f.floor() <= 1.2 {
                "(met)"
            } else {
                "(missed)"
            },
            median(&f.cloud_without) / 1e6,
            median(&f.cloud_with) / 1e6,
        );
    }
    let _ = writeln!(md, "\nEvery run (s), without / with:\n");
    for f in all {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(md, "* {}: {} / {}", f.title, fmt(&f.without), fmt(&f.with));
    }
    md
}

// ---------------------------------------------------------------------------
// `breakfs refactor --profile CMD` (issue 21, acceptance 2).

/// Families of the refactor section unless `--refactor-families` says.
const REFACTOR_FAMILIES: &str = "python,node";
/// Heading of the section in docs/results/profile.md.
const REFACTOR_HEADING: &str = "## `breakfs refactor --profile` on a fresh node";

/// One image's figures in the refactor section.
struct RefactorFigures {
    title: String,
    /// Distinct gzip members the command reads in the profiled image.
    members: usize,
    read_bytes: u64,
    warm: f64,
    profiled: Vec<f64>,
    optimized: Vec<f64>,
    cloud_profiled: Vec<f64>,
    cloud_optimized: Vec<f64>,
}

impl RefactorFigures {
    fn floor(&self) -> f64 {
        self.read_bytes as f64 * 8.0 / (MBIT as f64 * 1e6) + 3.0 * RTT_MS as f64 / 1e3 + self.warm
    }
}

/// The refactor section: per family (v1), the original refactored by
/// `breakfs refactor --profile CMD` (CMD: the family's command) and the
/// same original converted by `ctr-remote image optimize --oci` (which
/// runs the image's own command, the same one, and lays what it reads
/// before each layer's landmark; cached by benches/testbed/estargz.rs),
/// both in the registry behind the shaped link. Each run: a fresh node (no
/// peers, no profile, an empty store) mounts one of them and runs CMD in a
/// chroot of the mount, timed from `breakfs mount` to CMD's end; breakfs
/// fetches each layer's landmarked region at mount for both. Floor: as the
/// node section's ([`floor_of`]), of the profiled image.
fn refactor_section(
    env: &Env,
    reg: &TestRegistry,
    families: &[&str],
    runs: usize,
    load_before: &str,
) -> Result<()> {
    for n in families {
        corpus::family(n)?;
    }
    let built = corpus::build_families(families)?;
    let mut all = Vec::new();
    for fam in families {
        let img = built
            .iter()
            .find(|i| i.family == *fam && i.tag == "v1")
            .ok_or_else(|| anyhow!("the corpus has no {fam}:v1"))?;
        let f = bench_refactor_profile(env, reg, img, runs)
            .with_context(|| format!("benchmarking refactor --profile of {fam} v1"))?;
        eprintln!(
            "profile bench: {}: refactor --profile {:.2} s, ctr-remote optimize {:.2} s, floor {:.2} s",
            f.title,
            median(&f.profiled),
            median(&f.optimized),
            f.floor()
        );
        all.push(f);
    }
    let md = refactor_report(&all, runs, load_before, &load_average());
    println!("{md}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(root.join("target/bench-profile-refactor.md"), &md)?;
    // Its own section of docs/results/profile.md, after the node section
    // (kept as the last run of that section wrote it).
    let results = root.join("docs/results/profile.md");
    let old = std::fs::read_to_string(&results).unwrap_or_default();
    let kept = old
        .find(REFACTOR_HEADING)
        .map_or(old.as_str(), |at| &old[..at]);
    std::fs::write(&results, format!("{}\n\n{md}", kept.trim_end()))
        .with_context(|| format!("writing {}", results.display()))?;
    eprintln!("profile bench: wrote {}", results.display());
    Ok(())
}

/// Shell words of `args`, quoted for `/bin/sh -c`.
fn shell_line(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn bench_refactor_profile(
    env: &Env,
    reg: &TestRegistry,
    img: &corpus::CorpusImage,
    runs: usize,
) -> Result<RefactorFigures> {
    let slug = format!("{}-{}", img.family, img.tag);
    // The profiled refactoring, pushed.
    let layout = env.fresh(&format!("{slug}-profiled"))?;
    let work = env.tmp.join(format!("{slug}-profiled-work"));
    eprintln!(
        "profile bench: breakfs refactor --profile {:?}",
        img.command
    );
    run(
        env.breakfs()
            .args(["refactor", "--work-dir"])
            .arg(&work)
            .args(["--profile", &shell_line(&img.command)])
            .arg("--to")
            .arg(format!("oci:{}:{}", layout.display(), img.tag))
            .arg(&img.reference),
        "breakfs refactor --profile",
    )?;
    let _ = std::fs::remove_dir_all(&work);
    let repo = format!("profiled/{}:{}", img.family, img.tag);
    harness::skopeo_copy(
        &format!("oci:{}:{}", layout.display(), img.tag),
        &reg.reference(&repo),
    )?;
    let profiled = format!("docker://{}/{repo}", env.link);
    // The optimized eStargz (cached per image).
    let converted = estargz::converted(&env.tmp, std::slice::from_ref(img), None)?;
    estargz::push(&converted, std::slice::from_ref(img), |r| reg.reference(r))?;
    let optimized = format!(
        "docker://{}/{}/{}:{}",
        env.link,
        estargz::Conversion::Optimize.prefix(),
        img.family,
        img.tag
    );

    // The floor: what the command reads of the profiled image, and its
    // time on a warm mount.
    let floor = floor_of(env, &slug, &profiled, &img.command)?;
    let mut f = RefactorFigures {
        title: format!("{} {}", img.family, img.tag),
        members: floor.members,
        read_bytes: floor.bytes,
        warm: floor.warm,
        profiled: Vec::new(),
        optimized: Vec::new(),
        cloud_profiled: Vec::new(),
        cloud_optimized: Vec::new(),
    };
    // Cold starts on fresh nodes, alternating.
    for r in 0..runs {
        for (is_profiled, reference) in [(true, &profiled), (false, &optimized)] {
            let what = if is_profiled { "profiled" } else { "optimized" };
            let name = format!("{slug}-{what}-{r}");
            let b = Node::start(env, &env.fresh(&name)?, &[], &node_log())?;
            let point = env.tmp.join(format!("{name}-mnt"));
            let began = Instant::now();
            let m = NodeMount::with_args(env, &node_args(&b), reference, &point)?;
            let mounted = began.elapsed().as_secs_f64();
            run_chroot(&m.point, &img.command)?;
            let took = began.elapsed().as_secs_f64();
            drop(m);
            let cloud = b.cloud_bytes()?;
            keep_log(&b, &name, took)?;
            eprintln!(
                "profile bench: {} run {r} {what}: {took:.2} s (mounted at {mounted:.2} s), {:.1} MB from the cloud",
                f.title,
                cloud / 1e6
            );
            if is_profiled {
                f.profiled.push(took);
                f.cloud_profiled.push(cloud);
            } else {
                f.optimized.push(took);
                f.cloud_optimized.push(cloud);
            }
        }
    }
    Ok(f)
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn refactor_report(all: &[RefactorFigures], runs: usize, before: &str, after: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{REFACTOR_HEADING}\n");
    let _ = writeln!(
        md,
        "* Command: `cargo bench --bench profile -- {}`\n* Machine: {}\n* Load average \
         (1, 5, 15 min) before / after: {before} / {after}\n",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" "),
        harness::machine()
    );
    let _ = writeln!(
        md,
        "A fresh node (no peers, no profile, an empty store) mounts the image through one \
         {RTT_MS} ms / {MBIT} Mbit/s link to a real docker-registry and runs the family's \
         command in a chroot of the mount; timed from `breakfs mount` to the command's end, \
         median of {runs} runs, node defaults. *refactor --profile*: the original refactored \
         by `breakfs refactor --profile CMD` (CMD: the family's command). *ctr-remote \
         optimize*: the same original converted by `ctr-remote image optimize --oci` (it runs \
         the image's command, the same one, and lays the files it reads before each layer's \
         `.prefetch.landmark`). breakfs fetches each layer's landmarked region at mount for \
         both. Floor: compressed bytes of the distinct gzip members the command reads in the \
         profiled image (recorded as in the node section) ÷ {MBIT} Mbit/s + 3 RTT + the \
         command's own time on a warm mount. Targets: refactor --profile ≤ 1.3× floor, and \
         faster than ctr-remote optimize.\n"
    );
    let _ = writeln!(
        md,
        "| image | members read | compressed MB read | warm command s | floor s | refactor --profile s | ctr-remote optimize s | profile / floor | profile / optimize | cloud MB profile / optimize |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for f in all {
        let (p, o) = (median(&f.profiled), median(&f.optimized));
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}× {} | {:.2}× {} | {:.1} / {:.1} |",
            f.title,
            f.members,
            mb(f.read_bytes),
            f.warm,
            f.floor(),
            p,
            o,
            p / f.floor(),
            if p / f.floor() <= 1.3 {
                "(met)"
            } else {
                "(missed)"
            },
            p / o,
            if p < o { "(met)" } else { "(missed)" },
            median(&f.cloud_profiled) / 1e6,
            median(&f.cloud_optimized) / 1e6,
        );
    }
    let _ = writeln!(
        md,
        "\nEvery run (s), refactor --profile / ctr-remote optimize:\n"
    );
    for f in all {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "* {}: {} / {}",
            f.title,
            fmt(&f.profiled),
            fmt(&f.optimized)
        );
    }
    md
}
