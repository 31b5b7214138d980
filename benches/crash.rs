//! Crash benchmark: SIGKILL at random moments, many times over.
//!
//! The crash loop of the integration suite (`tests/support/crashloop.rs`)
//! for longer: a real docker-registry holds the corpus image refactored
//! (eStargz: lazy chunks, kept ranges, layers assembled whole), and its
//! OCI layout holds it as built (plain gzip: whole blobs, indexed into
//! chunks); a `breakfs node` with a budget of 1.05 images (it evicts when
//! it holds parts of both) and `--prefetch-rate 8MiB` (hydration and
//! prefetch last seconds) mounts one and prefetches the other, a
//! standalone `breakfs mount` sometimes runs beside it on its own store,
//! and readers read both. Each iteration SIGKILLs the daemon, the mount
//! process or both within 2 s, checks the stores with `breakfs verify`,
//! restarts, and reads the whole image back through new mounts, comparing
//! every file with `umoci unpack`. A run stops at the first corrupt entry
//! or wrong byte, naming the seed.
//!
//! `cargo bench --bench crash -- [--iterations N] [--seed S] [--family F]`
//! (defaults: 100, from the clock, redis); writes the figures to stdout
//! and target/bench-crash.md. Needs root, FUSE, skopeo, umoci and
//! docker-registry.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "../tests/support/crashloop.rs"]
mod crashloop;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;
#[path = "../tests/support/tree.rs"]
#[allow(dead_code)]
mod tree;

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use harness::publish;
use registry::TestRegistry;

fn main() -> Result<()> {
    let mut iterations = 100usize;
    let mut seed = crashloop::seed_from_env();
    let mut family = "redis".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow!("--iterations wants a positive number"))?;
            }
            "--seed" => {
                seed = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("--seed wants a number"))?;
            }
            "--family" => {
                family = args
                    .next()
                    .ok_or_else(|| anyhow!("--family wants a corpus family"))?;
            }
            other => bail!("unknown argument {other:?}: use --iterations N, --seed S, --family F"),
        }
    }
    let image = corpus::build_family(&family)?
        .into_iter()
        .find(|i| i.tag == "v1")
        .ok_or_else(|| anyhow!("corpus family {family} has no v1"))?;
    let reg = TestRegistry::start();
    let (_tmpdir, env) = harness::direct_env("breakfs-bench-crash", &reg)?;
    let published = publish(&env, &reg, &image)?;
    let expected = tree::snapshot(&harness::umoci_rootfs(&env, &image)?)?;
    let opts = crashloop::Options::one_image_two_forms(
        harness::BREAKFS.into(),
        env.run_dir.clone(),
        env.fresh("crash")?,
        &published.remote,
        &image.reference,
        expected,
        image.compressed_size() + image.uncompressed_size(),
        iterations,
        seed,
    );
    let budget = opts.budget;
    eprintln!(
        "crash bench: {family} v1 refactored and as built, {iterations} iterations, seed {seed} \
         (--seed {seed} repeats it), budget {} MB",
        budget / 1_000_000
    );
    let began = Instant::now();
    let outcome = crashloop::run(&opts, &mut |line| eprintln!("crash bench: {line}"));
    let secs = began.elapsed().as_secs_f64();
    let (report, failure) = match outcome {
        Ok(r) => (r, None),
        Err(e) => (crashloop::Report::default(), Some(format!("{e:#}"))),
    };
    let md = render(&family, &opts, &report, failure.as_deref(), secs);
    harness::write_report("crash", &md)?;
    if let Some(f) = failure {
        bail!("seed {seed}: {f}");
    }
    Ok(())
}

fn stats(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    format!("{:.2} / {:.2} / {:.2}", at(0.5), at(0.9), at(1.0))
}

fn render(
    family: &str,
    o: &crashloop::Options,
    r: &crashloop::Report,
    failure: Option<&str>,
    secs: f64,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Crash benchmark\n");
    let _ = writeln!(
        md,
        "{family} v1, refactored (registry) and as built (OCI layout); node budget {} MB, \
         --prefetch-rate {}; kills within {} ms of the mounts starting; seed {} \
         (`cargo bench --bench crash -- --seed {}` repeats it); {:.0} s in all.\n",
        o.budget / 1_000_000,
        o.prefetch_rate,
        o.max_delay.as_millis(),
        o.seed,
        o.seed,
        secs
    );
    if let Some(f) = failure {
        let _ = writeln!(md, "**FAILED**: {f}\n");
        return md;
    }
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    let row = |md: &mut String, k: &str, v: String| {
        let _ = writeln!(md, "| {k} | {v} |");
    };
    row(&mut md, "iterations (kills)", r.iterations.to_string());
    let victims: Vec<String> = r.victims.iter().map(|(k, v)| format!("{k} {v}")).collect();
    row(&mut md, "killed", victims.join(", "));
    let phases: Vec<String> = r.phases.iter().map(|(k, v)| format!("{k} {v}")).collect();
    row(&mut md, "under way at the kill", phases.join(", "));
    row(
        &mut md,
        "layers evicted (all daemon lives)",
        r.evictions.to_string(),
    );
    row(
        &mut md,
        "corrupt entries found by `breakfs verify`",
        r.corrupt.len().to_string(),
    );
    row(
        &mut md,
        "leftovers of killed processes (removed on open)",
        format!(
            "{} temp files, {} other",
            r.leftover_temps, r.leftover_other
        ),
    );
    row(
        &mut md,
        "files compared with umoci unpack",
        r.files_compared.to_string(),
    );
    row(
        &mut md,
        "`breakfs verify` of the stores, s (p50 / p90 / max)",
        stats(&r.verify_secs),
    );
    row(
        &mut md,
        "kill → restarted daemon serves a mount, s (p50 / p90 / max)",
        stats(&r.recover_secs),
    );
    row(
        &mut md,
        "reading the whole image back, s (p50 / p90 / max)",
        stats(&r.read_secs),
    );
    row(
        &mut md,
        "largest store right after a restart, MB",
        format!("{:.1}", r.max_store_after_restart as f64 / 1e6),
    );
    md
}
