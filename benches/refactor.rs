//! Refactoring benchmark over the Debian corpus: sharing between versions
//! (incremental, exact and --relax-mtime) against the bound, joint
//! redundancy against the floor, compressed sizes, and speed against
//! single-core `gzip -6` measured in the same run.
//!
//! `cargo bench --bench refactor -- [FAMILY...|all] [--no-joint]`; writes
//! the tables to stdout and to target/bench-refactor.md.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/corpus.rs"]
mod corpus;
#[path = "../tests/support/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, ensure};
use breakfs_fetch::ClientOptions;
use breakfs_index::{ImageRef, MergedView};
use breakfs_refactor::{ImageReport, LoadedImage, NoProgress, load_image, refactor};
use corpus::CorpusImage;
use measure::{ADDED, gzip_seconds, options};

struct Bench {
    rt: tokio::runtime::Runtime,
    tmp: PathBuf,
}

impl Bench {
    fn refactor(
        &self,
        sources: &[&str],
        dest: &Path,
        work: &Path,
        joint: bool,
        relax: bool,
    ) -> Result<(Vec<ImageReport>, f64)> {
        let srcs: Vec<ImageRef> = sources
            .iter()
            .map(|s| ImageRef::parse(s))
            .collect::<Result<_, _>>()?;
        let dest = ImageRef::parse(&format!("oci:{}", dest.display()))?;
        let t = Instant::now();
        let r = self.rt.block_on(refactor(
            &srcs,
            &dest,
            &options(work, joint, relax),
            &NoProgress,
        ))?;
        Ok((r, t.elapsed().as_secs_f64()))
    }

    fn load(&self, reference: &str, work: &Path) -> Result<LoadedImage> {
        let r = ImageRef::parse(reference)?;
        Ok(self
            .rt
            .block_on(load_image(&r, &options(work, false, false), &NoProgress))?)
    }
}

/// Check that a refactored image's merged view equals its original's,
/// entry by entry (mtimes aside with --relax-mtime); fail the run if not.
fn verify(b: &Bench, original: &str, refactored: &str, work: &Path, relax: bool) -> Result<()> {
    let a = b.load(original, work)?.view;
    let mut v = b.load(refactored, work)?.view;
    for p in ADDED {
        v.remove(p);
    }
    let diff = a.diff(&v, relax);
    ensure!(
        diff.is_empty(),
        "{refactored} differs from {original}: {} differences, first {:?}",
        diff.len(),
        &diff[..diff.len().min(5)]
    );
    Ok(())
}

/// File bytes of `next` in original layers that `prev` has too (by digest):
/// the share before refactoring.
fn original_share(prev: &LoadedImage, next: &LoadedImage) -> f64 {
    let prev_layers: HashSet<_> = prev
        .image
        .layers()
        .iter()
        .map(|l| l.digest.clone())
        .collect();
    let shared: HashSet<usize> = next
        .image
        .layers()
        .iter()
        .enumerate()
        .filter(|(_, l)| prev_layers.contains(&l.digest))
        .map(|(i, _)| i)
        .collect();
    let bytes: u64 = next
        .view
        .iter()
        .filter(|me| me.entry.kind == breakfs_index::EntryKind::File && shared.contains(&me.layer))
        .map(|me| me.entry.size)
        .sum();
    bytes as f64 / next.view.file_bytes().max(1) as f64
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn main() -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    let mut joint = true;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--bench" => {}
            "--no-joint" => joint = false,
            "all" => names.extend(corpus::FAMILIES.iter().map(|f| f.name)),
            other => {
                let f = corpus::family(other)?;
                names.push(f.name);
            }
        }
    }
    if names.is_empty() {
        names.extend(corpus::FAMILIES.iter().map(|f| f.name));
    }
    let images = corpus::build_families(&names)?;
    let tmpdir = tempfile::tempdir()?;
    let b = Bench {
        rt: tokio::runtime::Runtime::new()?,
        tmp: tmpdir.path().to_path_buf(),
    };
    let find = |f: &str, t: &str| -> &CorpusImage {
        images.iter().find(|i| i.family == f && i.tag == t).unwrap()
    };
    let mut md = String::new();
    writeln!(
        md,
        "Machine: {} cores, {}; corpus from Debian bookworm packages (apt-cache madison versions).\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    )?;

    // Sharing between versions.
    writeln!(
        md,
        "### Incremental refactoring: share of v2's file bytes in layers reused from v1\n"
    )?;
    writeln!(
        md,
        "| family | pair | original layers reused | share exact | bound exact | share/bound | share relax | bound relax | share/bound | layers | size × (new/orig) |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut ratios = [Vec::new(), Vec::new()];
    let mut means = [(0.0, 0.0), (0.0, 0.0)];
    let mut speed = Vec::new();
    let mut verified = 0usize;
    for f in &names {
        let v1 = find(f, "v1");
        for next in ["point", "v2"] {
            let n = find(f, next);
            let work = b.tmp.join(format!("work-{f}-{next}"));
            let mut row = Vec::new();
            let mut layers = 0;
            let mut size_ratio = 0.0;
            for (k, relax) in [false, true].into_iter().enumerate() {
                let dest = b.tmp.join(format!("{f}-{next}-{relax}"));
                let (r1, t1) = b.refactor(&[&v1.reference], &dest, &work, false, relax)?;
                let (r2, t2) = b.refactor(&[&n.reference], &dest, &work, false, relax)?;
                verify(&b, &v1.reference, &r1[0].dest, &work, relax)?;
                verify(&b, &n.reference, &r2[0].dest, &work, relax)?;
                verified += 2;
                let r = &r2[0];
                ratios[k].push(r.share() / r.bound().max(1e-9));
                means[k].0 += r.share();
                means[k].1 += r.bound();
                row.push((r.share(), r.bound()));
                if !relax {
                    layers = r.layers;
                    size_ratio = r.compressed_bytes as f64 / r.original_compressed_bytes as f64;
                    if next == "point" {
                        // Speed: v1 from scratch (fresh work dir), then point incrementally.
                        let w2 = b.tmp.join(format!("speed-{f}"));
                        let d2 = b.tmp.join(format!("speed-{f}-dest"));
                        let (_, scratch) = b.refactor(&[&v1.reference], &d2, &w2, false, false)?;
                        let (_, incr) = b.refactor(&[&n.reference], &d2, &w2, false, false)?;
                        let loaded = b.load(&v1.reference, &w2)?;
                        let gz = gzip_seconds(&loaded)?;
                        let bytes: u64 = loaded
                            .tars
                            .iter()
                            .map(|t| std::fs::metadata(t).map(|m| m.len()).unwrap_or(0))
                            .sum();
                        speed.push((
                            f.to_string(),
                            bytes,
                            gz,
                            scratch,
                            incr,
                            r1[0].compressed_bytes as f64 / r1[0].original_compressed_bytes as f64,
                        ));
                        std::fs::remove_dir_all(&w2).ok();
                        std::fs::remove_dir_all(&d2).ok();
                    }
                }
                let _ = (t1, t2);
                std::fs::remove_dir_all(&dest).ok();
            }
            let prev = b.load(&v1.reference, &work)?;
            let nxt = b.load(&n.reference, &work)?;
            let orig = original_share(&prev, &nxt);
            std::fs::remove_dir_all(&work).ok();
            writeln!(
                md,
                "| {f} | v1→{next} | {} | {} | {} | {:.3} | {} | {} | {:.3} | {layers} | {size_ratio:.3} |",
                pct(orig),
                pct(row[0].0),
                pct(row[0].1),
                row[0].0 / row[0].1.max(1e-9),
                pct(row[1].0),
                pct(row[1].1),
                row[1].0 / row[1].1.max(1e-9),
            )?;
            eprintln!("{f} v1→{next} done");
        }
    }
    let n = ratios[0].len() as f64;
    for (k, name) in ["exact", "relax-mtime"].iter().enumerate() {
        let min = ratios[k].iter().cloned().fold(f64::INFINITY, f64::min);
        writeln!(
            md,
            "\n{name}: mean share {} vs mean bound {} → {:.3} of the bound (target ≥ 0.975); worst pair {:.3} of its bound (target ≥ 0.9).",
            pct(means[k].0 / n),
            pct(means[k].1 / n),
            means[k].0 / means[k].1.max(1e-9),
            min
        )?;
    }

    writeln!(
        md,
        "\n### Speed: refactoring against single-core `gzip -6` of the same layer tars\n"
    )?;
    writeln!(
        md,
        "| family | uncompressed MB | gzip -6 s | v1 from scratch s | ratio | point incremental s | ratio | v1 size × |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (f, bytes, gz, scratch, incr, sr) in &speed {
        writeln!(
            md,
            "| {f} | {:.0} | {gz:.1} | {scratch:.1} | {:.2} | {incr:.1} | {:.2} | {sr:.3} |",
            *bytes as f64 / 1e6,
            scratch / gz,
            incr / gz
        )?;
    }

    if joint {
        writeln!(
            md,
            "\n### Joint refactoring of all {} images\n",
            images.len()
        )?;
        writeln!(
            md,
            "| mode | redundant MB before | redundant MB after | floor MB | after/floor | reduction | compressed MB before | stored MB after | seconds |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        let sources: Vec<&str> = images.iter().map(|i| i.reference.as_str()).collect();
        for relax in [false, true] {
            let work = b.tmp.join("work-joint");
            let dest = b.tmp.join(format!("joint-{relax}"));
            let (reports, secs) = b.refactor(&sources, &dest, &work, true, relax)?;
            let views: Vec<MergedView> = images
                .iter()
                .map(|i| b.load(&i.reference, &work).map(|l| l.view))
                .collect::<Result<_>>()?;
            let originals: Vec<String> = images.iter().map(|i| i.reference.clone()).collect();
            let outputs: Vec<String> = reports.iter().map(|r| r.dest.clone()).collect();
            for (i, o) in originals.iter().zip(&outputs) {
                verify(&b, i, o, &work, relax)?;
                verified += 1;
            }
            let before =
                measure::redundancy(&views, &measure::distinct_layers(&originals, &work), relax);
            let after =
                measure::redundancy(&views, &measure::distinct_layers(&outputs, &work), relax);
            let compressed_before: u64 = reports.iter().map(|r| r.original_compressed_bytes).sum();
            let mut seen = HashSet::new();
            let mut stored = 0;
            for o in &outputs {
                let r = ImageRef::parse(o)?;
                let s =
                    b.rt.block_on(breakfs_fetch::Store::open(&r, &ClientOptions::default()))?;
                for l in b.rt.block_on(s.resolve(&r))?.layers() {
                    if seen.insert(l.digest.clone()) {
                        stored += l.size;
                    }
                }
            }
            writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {:.3} | {:.2}× (BREAK: 3.11×) | {:.1} | {:.1} | {secs:.0} |",
                if relax { "relax-mtime" } else { "exact" },
                before.redundant() as f64 / 1e6,
                after.redundant() as f64 / 1e6,
                after.floor() as f64 / 1e6,
                after.redundant() as f64 / after.floor().max(1) as f64,
                before.redundant() as f64 / after.redundant().max(1) as f64,
                compressed_before as f64 / 1e6,
                stored as f64 / 1e6,
            )?;
            std::fs::remove_dir_all(&dest).ok();
        }
    }
    writeln!(
        md,
        "\nEvery refactored image of this run ({verified}) was read back and its merged view compared with its original's, entry by entry: all equal (mtimes aside with --relax-mtime)."
    )?;
    println!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-refactor.md");
    std::fs::write(&out, &md)?;
    eprintln!("written to {}", out.display());
    Ok(())
}
