//! Registry benchmark: images refactored one after the other into one
//! destination, as a registry receives them (each family's v1, then its
//! point release, then its newest version, then the next family), with the
//! default 48-layer cap. Per image: share of its file bytes in layers
//! already published, the exact bound, the share the image reaches against
//! its own family's earlier images alone, layers, size against the
//! original, stale (shadowed) bytes, and time and CPU time against
//! single-core `gzip -6` of the same layer tars; then the joint plan of
//! every image against the floor of redundancy. Work directories go on a
//! tmpfs (`/dev/shm`) where there is one; the destination is on disk.
//!
//! `cargo bench --bench registry -- [FAMILY...] [--plan-only] [--relax] [--level N]`
//! (default: every corpus family, then the application families, whose
//! images hold an earlier family's runtime). `--plan-only` runs the planner alone
//! (no layers written; size is the uncompressed estimate, no timing);
//! `--level N` writes new layers at deflate level N instead of the
//! writer's default.
//! Writes the report to stdout, target/bench-registry.md and
//! docs/results/registry.md.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "support/harness.rs"]
mod harness;
#[path = "../tests/support/measure.rs"]
#[allow(dead_code)]
mod measure;
#[path = "../tests/support/registry.rs"]
#[allow(dead_code)]
mod registry;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use breakfs_index::{EntryKind, ImageRef, MergedView};
use breakfs_refactor::{
    LayerSource, LoadedImage, NoProgress, PlanImage, PlanOptions, PublishedLayer, load_image, plan,
    refactor,
};
use measure::{ADDED, gzip_seconds, options};
use nix::sys::resource::{UsageWho, getrusage};

/// What one image of the sequence measured.
#[derive(Default)]
struct Row {
    name: String,
    build: &'static str,
    file_bytes: u64,
    share: f64,
    bound: f64,
    /// Share and bound against the family's own earlier images only.
    alone: (f64, f64),
    layers: usize,
    size_ratio: f64,
    stale_bytes: u64,
    /// File bytes reused from layers that hold stale files (planner).
    bought_bytes: u64,
    /// Refactoring seconds and `gzip -6` seconds of the same tars.
    secs: Option<(f64, f64)>,
    /// CPU seconds (user + system, every thread) of the refactoring and
    /// of `gzip -6`.
    cpu: Option<(f64, f64)>,
}

impl Row {
    fn rel(&self) -> f64 {
        if self.bound > 0.0 {
            self.share / self.bound
        } else {
            1.0
        }
    }
}

/// What the planner gives one image planned after the ones before it.
struct Planned {
    share: f64,
    bound: f64,
    layers: usize,
    /// Uncompressed file bytes of the image's layers over its own.
    size_ratio: f64,
    stale_bytes: u64,
    bought_bytes: u64,
    secs: f64,
}

/// Plan `images` one after the other, each against every layer published
/// before it; check every plan.
fn plan_sequence(images: &[&PlanImage], opts: &PlanOptions) -> Result<Vec<Planned>> {
    let mut published: Vec<PublishedLayer> = Vec::new();
    let mut out = Vec::new();
    for img in images {
        let t = Instant::now();
        let p = plan(std::slice::from_ref(*img), &published, opts)?;
        let secs = t.elapsed().as_secs_f64();
        p.check(std::slice::from_ref(*img), &published)?;
        let ip = &p.images[0];
        let stored: u64 = ip
            .layers
            .iter()
            .flat_map(|&l| p.layers[l].entries.iter())
            .filter(|e| e.kind == EntryKind::File && !ADDED.contains(&e.path.as_str()))
            .map(|e| e.size)
            .sum();
        let f = ip.file_bytes.max(1) as f64;
        out.push(Planned {
            share: ip.reused_bytes as f64 / f,
            bound: ip.bound_bytes as f64 / f,
            layers: ip.layers.len(),
            size_ratio: stored as f64 / f,
            stale_bytes: ip.shadowed_bytes,
            bought_bytes: ip.stale_bought_bytes,
            secs,
        });
        for (n, l) in p.layers.iter().enumerate() {
            if l.source == LayerSource::New {
                published.push(PublishedLayer {
                    id: format!("{}#{n}", img.name),
                    entries: l.entries.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Redundant bytes of the joint plan of every image against the floor.
fn joint(images: &[PlanImage], relax: bool) -> Result<(u64, u64, f64)> {
    let opts = PlanOptions {
        joint: true,
        relax_mtime: relax,
        ..PlanOptions::default()
    };
    let t = Instant::now();
    let p = plan(images, &[], &opts)?;
    let secs = t.elapsed().as_secs_f64();
    p.check(images, &[])?;
    let layers: Vec<Vec<(String, u64)>> = p
        .layers
        .iter()
        .map(|l| {
            l.entries
                .iter()
                .filter(|e| e.kind == EntryKind::File)
                .map(|e| (e.path.clone(), e.size))
                .collect()
        })
        .collect();
    let views: Vec<MergedView> = images.iter().map(|i| i.view.clone()).collect();
    let r = measure::redundancy(&views, &layers, relax);
    Ok((r.redundant(), r.floor(), secs))
}

struct Pipeline {
    rt: tokio::runtime::Runtime,
    dest: PathBuf,
    relax: bool,
    /// Deflate level of new layers (`--level N`; the writer's default).
    level: u32,
}

impl Pipeline {
    fn load(&self, reference: &str, work: &Path) -> Result<LoadedImage> {
        let r = ImageRef::parse(reference)?;
        let o = options(work, false, self.relax);
        Ok(self.rt.block_on(load_image(&r, &o, &NoProgress))?)
    }

    /// Refactor `image` into the destination as `tag`, read it back and
    /// compare merged views; fill the row's measured figures.
    fn run(
        &self,
        image: &corpus::CorpusImage,
        tag: &str,
        work: &Path,
        row: &mut Row,
    ) -> Result<()> {
        let src = ImageRef::parse(&image.reference)?;
        let dest = ImageRef::parse(&format!("oci:{}:{tag}", self.dest.display()))?;
        let mut o = options(work, false, self.relax);
        o.writer.level = self.level;
        let t = Instant::now();
        let cpu0 = cpu_seconds(UsageWho::RUSAGE_SELF)?;
        let reports = self.rt.block_on(refactor(&[src], &dest, &o, &NoProgress))?;
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(UsageWho::RUSAGE_SELF)? - cpu0;
        let r = &reports[0];
        let original = self.load(&image.reference, work)?;
        let gz_cpu0 = cpu_seconds(UsageWho::RUSAGE_CHILDREN)?;
        let gz = gzip_seconds(&original)?;
        let gz_cpu = cpu_seconds(UsageWho::RUSAGE_CHILDREN)? - gz_cpu0;
        let mut back = self.load(&r.dest, work)?.view;
        for p in ADDED {
            back.remove(p);
        }
        let diff = original.view.diff(&back, self.relax);
        ensure!(
            diff.is_empty(),
            "{} differs from {}: {} differences, first {:?}",
            r.dest,
            image.reference,
            diff.len(),
            &diff[..diff.len().min(5)]
        );
        row.share = r.share();
        row.bound = r.bound();
        row.layers = r.layers;
        row.size_ratio = r.compressed_bytes as f64 / r.original_compressed_bytes.max(1) as f64;
        row.stale_bytes = r.shadowed_bytes;
        row.secs = Some((secs, gz));
        row.cpu = Some((cpu, gz_cpu));
        Ok(())
    }
}

/// User + system CPU seconds of this process or of its waited-for children.
fn cpu_seconds(who: UsageWho) -> Result<f64> {
    let u = getrusage(who)?;
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(s(u.user_time()) + s(u.system_time()))
}

/// The load averages (1, 5, 15 minutes) and this process's autogroup (the
/// scheduler shares CPU between autogroups first, so a process's nice
/// value weighs only against its own group's).
fn load_and_group() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let group = std::fs::read_to_string("/proc/self/autogroup").unwrap_or_default();
    format!(
        "load average {} ({})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        group.trim()
    )
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn main() -> Result<()> {
    // `BREAKFS_LOG=breakfs_refactor=debug`: the pipeline's stage times.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BREAKFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut names: Vec<&str> = Vec::new();
    let (mut plan_only, mut relax) = (false, false);
    let mut level = breakfs_refactor::WriterOptions::default().level;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--plan-only" => plan_only = true,
            "--relax" => relax = true,
            "--level" => {
                level = args
                    .next()
                    .and_then(|l| l.parse().ok())
                    .context("--level takes a deflate level, 0-9")?;
            }
            other => names.push(corpus::family(other)?.name),
        }
    }
    if names.is_empty() {
        names.extend(
            corpus::FAMILIES
                .iter()
                .chain(corpus::APP_FAMILIES)
                .map(|f| f.name),
        );
    }
    let images = corpus::build_families(&names)?;
    let tmpdir = tempfile::Builder::new()
        .prefix("bench-registry")
        .tempdir()?;
    // Work directories (source tars, new layers before they are pushed)
    // in memory where there is a tmpfs, as `gzip -6`'s output goes to
    // /dev/null: on a shared machine other people's builds stall writes to
    // disk for seconds. The destination stays on disk.
    let shm = Path::new("/dev/shm");
    let on_tmpfs = shm.is_dir();
    let scratch = if on_tmpfs {
        tempfile::Builder::new()
            .prefix("bench-registry")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new()
            .prefix("bench-registry-work")
            .tempdir()?
    };
    let pipe = Pipeline {
        rt: tokio::runtime::Runtime::new()?,
        dest: tmpdir.path().join("registry"),
        relax,
        level,
    };
    let opts = PlanOptions {
        relax_mtime: relax,
        ..PlanOptions::default()
    };

    // Every view, for the planner's figures.
    let t = Instant::now();
    let mut plan_images = Vec::new();
    for image in &images {
        let work = scratch.path().join("load");
        let l = pipe.load(&image.reference, &work)?;
        plan_images.push(PlanImage {
            name: format!("{}:{}", image.family, image.tag),
            view: l.view,
            packages: l.packages,
        });
        std::fs::remove_dir_all(&work).ok();
    }
    eprintln!(
        "registry: loaded {} images in {:.0}s",
        plan_images.len(),
        t.elapsed().as_secs_f64()
    );
    let all: Vec<&PlanImage> = plan_images.iter().collect();
    let seq = plan_sequence(&all, &opts)?;
    let mut rows: Vec<Row> = Vec::new();
    for (k, (image, s)) in images.iter().zip(&seq).enumerate() {
        rows.push(Row {
            name: image.family.to_string(),
            build: image.build.tag(),
            file_bytes: plan_images[k].view.file_bytes(),
            share: s.share,
            bound: s.bound,
            layers: s.layers,
            size_ratio: s.size_ratio,
            stale_bytes: s.stale_bytes,
            bought_bytes: s.bought_bytes,
            ..Row::default()
        });
    }
    // Each family alone: against its own earlier images only.
    for f in &names {
        let ks: Vec<usize> = (0..images.len())
            .filter(|&k| images[k].family == *f)
            .collect();
        let imgs: Vec<&PlanImage> = ks.iter().map(|&k| &plan_images[k]).collect();
        for (&k, s) in ks.iter().zip(plan_sequence(&imgs, &opts)?) {
            rows[k].alone = (s.share, s.bound);
        }
    }
    let plan_secs: f64 = seq.iter().map(|s| s.secs).sum();
    for r in &rows {
        eprintln!(
            "registry: planned {}:{}: share {}, bound {}, alone {}",
            r.name,
            r.build,
            pct(r.share),
            pct(r.bound),
            pct(r.alone.0)
        );
    }

    let load_before = load_and_group();
    if !plan_only {
        for (k, image) in images.iter().enumerate() {
            let work = scratch.path().join("work");
            let tag = format!("{}-{}", image.family, image.tag);
            pipe.run(image, &tag, &work, &mut rows[k])
                .with_context(|| format!("refactoring {tag} into the registry"))?;
            std::fs::remove_dir_all(&work).ok();
            eprintln!("registry: {tag} done");
        }
    }
    let load_after = load_and_group();

    let mut md = String::new();
    writeln!(
        md,
        "Built with the {}.\n",
        if cfg!(debug_assertions) {
            "dev profile (`cargo bench --profile dev`: opt-level 1 for breakfs' crates, 2 for dependencies, 3 for sha2; libdeflate's C at -O2)"
        } else {
            "bench profile (release)"
        }
    )?;
    writeln!(
        md,
        "{} families × (v1, point, v2) refactored in that order into one destination, {}, default layer cap ({}); {}.\n",
        names.len(),
        if relax { "--relax-mtime" } else { "exact" },
        opts.max_layers,
        if plan_only {
            "planner only: size is uncompressed file bytes of the image's layers over its own, no layers written".to_string()
        } else {
            format!(
                "every image written, read back and its merged view compared with its original's (all equal); size is compressed bytes of the image's layers over the original's; the work directory {}, the destination on disk",
                if on_tmpfs {
                    "on a tmpfs"
                } else {
                    "on disk too"
                }
            )
        },
    )?;
    writeln!(
        md,
        "| image | file MB | share | bound | share/bound | alone share | alone bound | layers | size × | stale MB | reuse they buy MB | secs | gzip -6 s | ratio | cpu s | gzip cpu s | cpu ratio |"
    )?;
    writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in &rows {
        let (secs, gz, ratio) = match r.secs {
            Some((s, g)) => (
                format!("{s:.1}"),
                format!("{g:.1}"),
                format!("{:.2}", s / g),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let (cpu, gz_cpu, cpu_ratio) = match r.cpu {
            Some((c, g)) => (
                format!("{c:.1}"),
                format!("{g:.1}"),
                format!("{:.2}", c / g),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        writeln!(
            md,
            "| {}:{} | {:.0} | {} | {} | {:.3} | {} | {} | {} | {:.3} | {:.1} | {:.1} | {secs} | {gz} | {ratio} | {cpu} | {gz_cpu} | {cpu_ratio} |",
            r.name,
            r.build,
            harness::mb(r.file_bytes),
            pct(r.share),
            pct(r.bound),
            r.rel(),
            pct(r.alone.0),
            pct(r.alone.1),
            r.layers,
            r.size_ratio,
            harness::mb(r.stale_bytes),
            harness::mb(r.bought_bytes),
        )?;
    }
    writeln!(md)?;
    for (build, need) in [("point", 0.975), ("v2", 0.95)] {
        let sel: Vec<&Row> = rows.iter().filter(|r| r.build == build).collect();
        let n = sel.len().max(1) as f64;
        let share: f64 = sel.iter().map(|r| r.share).sum::<f64>() / n;
        let bound: f64 = sel.iter().map(|r| r.bound).sum::<f64>() / n;
        let mean_rel: f64 = sel.iter().map(|r| r.rel()).sum::<f64>() / n;
        writeln!(
            md,
            "* {build}: mean share {} against mean bound {}: {:.3} of the bound (mean of per-image ratios {mean_rel:.3}; need ≥ {need}).",
            pct(share),
            pct(bound),
            share / bound.max(1e-9),
        )?;
    }
    let worst = rows
        .iter()
        .filter(|r| r.build != "v1")
        .min_by(|a, b| a.rel().total_cmp(&b.rel()));
    if let Some(w) = worst {
        writeln!(
            md,
            "* worst image: {}:{} at {:.3} of its bound (need ≥ 0.85).",
            w.name,
            w.build,
            w.rel()
        )?;
    }
    let max_size = rows.iter().map(|r| r.size_ratio).fold(0.0, f64::max);
    let stale: u64 = rows.iter().map(|r| r.stale_bytes).sum();
    let bought: u64 = rows.iter().map(|r| r.bought_bytes).sum();
    writeln!(
        md,
        "* largest size ratio {max_size:.3} (need ≤ 1.10); stale (shadowed) bytes in reused layers {:.1} MB over the run, which let {:.1} MB of current files be reused.",
        harness::mb(stale),
        harness::mb(bought)
    )?;
    let below = rows
        .iter()
        .filter(|r| r.share + 1e-9 < r.alone.0)
        .map(|r| format!("{}:{}", r.name, r.build))
        .collect::<Vec<_>>();
    writeln!(
        md,
        "* images whose share against the registry is below their share against their own family alone: {}.",
        if below.is_empty() {
            "none".to_string()
        } else {
            below.join(", ")
        }
    )?;
    if let Some(worst) = rows
        .iter()
        .filter_map(|r| r.secs.map(|(s, g)| (s / g, r)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
    {
        let over: Vec<String> = rows
            .iter()
            .filter_map(|r| r.secs.map(|(s, g)| (s / g, r)))
            .filter(|(x, _)| *x > 0.3)
            .map(|(x, r)| format!("{}:{} {x:.2}", r.name, r.build))
            .collect();
        let worst_inc = rows
            .iter()
            .filter(|r| r.build != "v1")
            .filter_map(|r| r.secs.map(|(s, g)| (s / g, r)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        writeln!(
            md,
            "* time: worst {:.2}× `gzip -6` of the same tars over every image ({}:{}; need ≤ 0.3); over the point and v2 images worst {}; above 0.3: {}. Measured in this run.",
            worst.0,
            worst.1.name,
            worst.1.build,
            worst_inc.map_or("–".to_string(), |(x, r)| format!(
                "{x:.2}× ({}:{})",
                r.name, r.build
            )),
            if over.is_empty() {
                "none".to_string()
            } else {
                over.join(", ")
            }
        )?;
        let (cpu, gz_cpu) = rows
            .iter()
            .filter_map(|r| r.cpu)
            .fold((0.0, 0.0), |(a, b), (c, g)| (a + c, b + g));
        let worst_cpu = rows
            .iter()
            .filter_map(|r| r.cpu.map(|(c, g)| (c / g, r)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((x, r)) = worst_cpu {
            writeln!(
                md,
                "* CPU time (user + system, all threads): {cpu:.0}s refactoring against {gz_cpu:.0}s of `gzip -6`, {:.2} of it; worst image {}:{} at {x:.2}. Where the refactoring gets more than one core's worth of CPU, its time ratio is below its CPU ratio.",
                cpu / gz_cpu.max(1e-9),
                r.name,
                r.build
            )?;
        }
        writeln!(
            md,
            "* load while images were refactored: at the start {load_before}; at the end {load_after}."
        )?;
    }
    writeln!(
        md,
        "* planning the whole sequence took {plan_secs:.1}s (planner only)."
    )?;
    let (red, floor, secs) = joint(&plan_images, relax)?;
    writeln!(
        md,
        "* joint plan of all {} images: redundant {:.1} MB against a floor of {:.1} MB, {:.3} of it (need ≤ 1.1); planned in {secs:.1}s.",
        plan_images.len(),
        harness::mb(red),
        harness::mb(floor),
        red as f64 / floor.max(1) as f64
    )?;
    harness::write_report("registry", &md)?;
    Ok(())
}
