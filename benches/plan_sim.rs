//! Planner simulation over the Debian-package corpus (issue 2, acceptance
//! 2 and 3): for each family, plan v1 alone, then v2 (and the point
//! release) incrementally on top of v1's layers, and report bound, share
//! and layer counts, exact and with relaxed mtimes; then plan every image
//! of the corpus jointly and report redundant bytes against the floor.
//!
//! Reads the OCI layouts under `$BREAKFS_CORPUS` (default
//! `~/.cache/breakfs/corpus`), one directory per family with tags `v1`,
//! `v2` and `point`. Run: `cargo bench --bench plan_sim`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use breakfs_index::{
    Compression, Digest, Entry, EntryKind, ImageIndex, LayerIndex, Manifest, MergedView, decoder,
};
use breakfs_refactor::{PackageDb, Plan, PlanImage, PlanOptions, PublishedLayer, plan};

const TAGS: [&str; 3] = ["v1", "v2", "point"];

/// One image of the corpus, as read from its layout.
struct Loaded {
    image: PlanImage,
    /// Digest and file entries of each original layer, bottom first.
    layers: Vec<(Digest, Vec<Entry>)>,
    /// Which original layer each path of the view comes from.
    layer_of: HashMap<String, usize>,
}

fn blob_path(layout: &Path, d: &Digest) -> PathBuf {
    layout.join("blobs").join("sha256").join(d.hex())
}

fn open_layer(layout: &Path, media_type: &str, d: &Digest) -> Result<Box<dyn Read>> {
    let compression = Compression::from_media_type(media_type)
        .with_context(|| format!("layer {d}: unknown media type {media_type}"))?;
    let f = File::open(blob_path(layout, d)).with_context(|| format!("opening blob {d}"))?;
    Ok(decoder(compression, f)?)
}

fn load(layout: &Path, tag: &str) -> Result<Loaded> {
    let index: ImageIndex = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let desc = index
        .manifests
        .iter()
        .find(|m| {
            m.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
                == Some(tag)
        })
        .with_context(|| format!("{}: no tag {tag}", layout.display()))?;
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(blob_path(layout, &desc.digest))?)?;
    let mut indexes = Vec::new();
    for l in &manifest.layers {
        let what = format!("layer {} of {}:{tag}", l.digest, layout.display());
        let idx = LayerIndex::read(open_layer(layout, &l.media_type, &l.digest)?, &what)?;
        indexes.push(idx);
    }
    let view = MergedView::build(&indexes)?;
    let packages = match PackageDb::wanted_files(&view) {
        None => PackageDb::empty(),
        Some((status, lists)) => {
            let mut want: Vec<&str> = vec![status.as_str()];
            want.extend(lists.iter().map(|(_, p)| p.as_str()));
            let content = read_files(layout, &manifest, &view, &want)?;
            let status = content.get(status.as_str()).cloned().unwrap_or_default();
            let lists: Vec<(String, Vec<u8>)> = lists
                .iter()
                .map(|(pkg, path)| {
                    (
                        pkg.clone(),
                        content.get(path.as_str()).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            PackageDb::from_dpkg(&status, &lists, &view)
        }
    };
    let layers = manifest
        .layers
        .iter()
        .zip(&indexes)
        .map(|(d, idx)| {
            let files = idx
                .entries
                .iter()
                .map(|e| e.entry.clone())
                .filter(|e| e.kind == EntryKind::File)
                .collect();
            (d.digest.clone(), files)
        })
        .collect();
    let layer_of = view
        .iter()
        .map(|me| (me.entry.path.clone(), me.layer))
        .collect();
    let family = layout
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Loaded {
        image: PlanImage {
            name: format!("{family}:{tag}"),
            view,
            packages,
        },
        layers,
        layer_of,
    })
}

/// Read the content of `paths` from the layer tars, one pass per layer.
fn read_files(
    layout: &Path,
    manifest: &Manifest,
    view: &MergedView,
    paths: &[&str],
) -> Result<HashMap<String, Vec<u8>>> {
    let mut by_layer: HashMap<usize, Vec<(u64, u64, String)>> = HashMap::new();
    for p in paths {
        if let Some(me) = view.get(p) {
            by_layer.entry(me.layer).or_default().push((
                me.data_offset,
                me.entry.size,
                p.to_string(),
            ));
        }
    }
    let mut out = HashMap::new();
    for (layer, mut want) in by_layer {
        want.sort();
        let d = &manifest.layers[layer];
        let mut r = open_layer(layout, &d.media_type, &d.digest)?;
        let mut pos = 0u64;
        for (offset, size, path) in want {
            if offset < pos {
                bail!("{path}: overlapping content offsets in layer {}", d.digest);
            }
            io::copy(&mut (&mut r).take(offset - pos), &mut io::sink())?;
            let mut buf = Vec::with_capacity(size as usize);
            (&mut r).take(size).read_to_end(&mut buf)?;
            pos = offset + size;
            out.insert(path, buf);
        }
    }
    Ok(out)
}

fn published(p: &Plan) -> Vec<PublishedLayer> {
    p.layers
        .iter()
        .enumerate()
        .map(|(n, l)| PublishedLayer {
            id: format!("plan-{n}"),
            entries: l.entries.clone(),
        })
        .collect()
}

/// Share of `new`'s file bytes in original layers that `old` has by digest.
fn original_share(old: &Loaded, new: &Loaded) -> f64 {
    let old_digests: HashSet<&Digest> = old.layers.iter().map(|(d, _)| d).collect();
    let mut total = 0u64;
    let mut shared = 0u64;
    for me in new
        .image
        .view
        .iter()
        .filter(|me| me.entry.kind == EntryKind::File)
    {
        total += me.entry.size;
        let l = new
            .layer_of
            .get(&me.entry.path)
            .copied()
            .unwrap_or(usize::MAX);
        if new
            .layers
            .get(l)
            .is_some_and(|(d, _)| old_digests.contains(d))
        {
            shared += me.entry.size;
        }
    }
    ratio(shared, total)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

struct PairResult {
    bound: f64,
    share: f64,
    layers: usize,
    dup: u64,
    orig: f64,
    mtime_changes: usize,
}

fn pair(old: &Loaded, new: &Loaded, opts: &PlanOptions) -> Result<PairResult> {
    let p1 = plan(std::slice::from_ref(&old.image), &[], opts)?;
    p1.check(std::slice::from_ref(&old.image), &[])?;
    let pubs = published(&p1);
    let p2 = plan(std::slice::from_ref(&new.image), &pubs, opts)?;
    p2.check(std::slice::from_ref(&new.image), &pubs)?;
    let ip = &p2.images[0];
    if std::env::var_os("PLAN_SIM_VERBOSE").is_some() {
        explain_losses(&p1, &p2, new, opts.relax_mtime);
    }
    Ok(PairResult {
        bound: ratio(ip.bound_bytes, ip.file_bytes),
        share: ratio(ip.reused_bytes, ip.file_bytes),
        layers: ip.layers.len().max(p1.images[0].layers.len()),
        dup: ip.duplicated_bytes,
        orig: original_share(old, new),
        mtime_changes: ip.mtime_changes.len(),
    })
}

/// Print the v1 layers that hold bytes v2 has unchanged but that v2 could
/// not reuse, biggest loss first, with a few of the entries that broke them.
fn explain_losses(p1: &Plan, p2: &Plan, new: &Loaded, relax: bool) {
    let reused: HashSet<usize> = p2
        .layers
        .iter()
        .filter_map(|l| match l.source {
            breakfs_refactor::LayerSource::Reused(j) => Some(j),
            breakfs_refactor::LayerSource::New => None,
        })
        .collect();
    let mut losses = Vec::new();
    for (j, l) in p1.layers.iter().enumerate() {
        if reused.contains(&j) {
            continue;
        }
        let mut kept = 0u64;
        let mut total = 0u64;
        let mut broken = Vec::new();
        for e in &l.entries {
            let size = if e.kind == EntryKind::File { e.size } else { 0 };
            total += size;
            let same = new.image.view.get(&e.path).is_some_and(|me| {
                if e.kind == EntryKind::Hardlink {
                    me.entry.kind == e.kind && me.entry.link == e.link
                } else if relax {
                    me.entry.eq_ignoring_mtime(e)
                } else {
                    me.entry == *e
                }
            });
            if same {
                kept += size;
            } else if broken.len() < 4 {
                broken.push(format!("{}({})", e.path, size));
            }
        }
        if kept > 0 {
            losses.push((kept, total, l.label.clone(), broken));
        }
    }
    losses.sort_by_key(|l| std::cmp::Reverse(l.0));
    for (kept, total, label, broken) in losses.iter().take(12) {
        println!(
            "    lost {:>8.2} MiB of {:>8.2} MiB in {label}: {}",
            *kept as f64 / (1 << 20) as f64,
            *total as f64 / (1 << 20) as f64,
            broken.join(" ")
        );
    }
}

/// Redundant file bytes: stored over distinct layers minus distinct contents.
fn redundant(stored: u64, distinct_contents: u64) -> u64 {
    stored.saturating_sub(distinct_contents)
}

fn main() -> Result<()> {
    let root = std::env::var_os("BREAKFS_CORPUS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/breakfs/corpus"))
        })
        .context("set BREAKFS_CORPUS or HOME")?;
    let mut families: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("index.json").exists())
            .collect(),
        Err(_) => Vec::new(),
    };
    families.sort();
    if families.is_empty() {
        println!(
            "plan_sim: no corpus under {} (build it first); nothing to measure",
            root.display()
        );
        return Ok(());
    }
    let t = Instant::now();
    let mut loaded: Vec<(String, Vec<Loaded>)> = Vec::new();
    for f in &families {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A family still being built lacks some tags: measure what is there.
        let tags = std::fs::read_to_string(f.join("index.json")).unwrap_or_default();
        if !TAGS.iter().all(|t| tags.contains(&format!("\"{t}\""))) {
            println!("{name}: not all of {TAGS:?} built yet, skipped");
            continue;
        }
        let imgs = TAGS
            .iter()
            .map(|t| load(f, t))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("family {name}"))?;
        loaded.push((name, imgs));
    }
    if loaded.is_empty() {
        return Ok(());
    }
    println!(
        "loaded {} families in {:.1}s",
        loaded.len(),
        t.elapsed().as_secs_f64()
    );

    for relax in [false, true] {
        let opts = PlanOptions {
            relax_mtime: relax,
            ..PlanOptions::default()
        };
        println!();
        println!(
            "## incremental, {}",
            if relax { "--relax-mtime" } else { "exact" }
        );
        println!(
            "{:<12} {:<8} {:>7} {:>7} {:>7} {:>10} {:>7} {:>9} {:>8}",
            "family", "pair", "orig", "bound", "share", "share/bnd", "layers", "dup MiB", "mtimes"
        );
        let (mut sb, mut ss, mut worst, mut n) = (0.0, 0.0, f64::INFINITY, 0.0);
        let t = Instant::now();
        for (name, imgs) in &loaded {
            for (label, new) in [("v1→v2", &imgs[1]), ("v1→point", &imgs[2])] {
                let r = pair(&imgs[0], new, &opts)?;
                let rel = if r.bound > 0.0 {
                    r.share / r.bound
                } else {
                    1.0
                };
                worst = f64::min(worst, rel);
                sb += r.bound;
                ss += r.share;
                n += 1.0;
                println!(
                    "{:<12} {:<8} {:>6.1}% {:>6.1}% {:>6.1}% {:>10.3} {:>7} {:>9.1} {:>8}",
                    name,
                    label,
                    100.0 * r.orig,
                    100.0 * r.bound,
                    100.0 * r.share,
                    rel,
                    r.layers,
                    r.dup as f64 / (1 << 20) as f64,
                    r.mtime_changes
                );
            }
        }
        println!(
            "mean bound {:.1}%, mean share {:.1}%, mean share / mean bound {:.3} (need >= 0.975), worst pair share/bound {:.3} (need >= 0.9); {:.1}s",
            100.0 * sb / n,
            100.0 * ss / n,
            ss / sb,
            worst,
            t.elapsed().as_secs_f64()
        );
    }

    let all: Vec<&Loaded> = loaded.iter().flat_map(|(_, v)| v.iter()).collect();
    let images: Vec<PlanImage> = all.iter().map(|l| l.image.clone()).collect();
    let mut contents: HashMap<&Digest, u64> = HashMap::new();
    for img in &images {
        for me in img
            .view
            .iter()
            .filter(|me| me.entry.kind == EntryKind::File)
        {
            if let Some(d) = &me.entry.digest {
                contents.insert(d, me.entry.size);
            }
        }
    }
    let distinct_contents: u64 = contents.values().sum();
    let mut orig_layers: HashMap<&Digest, u64> = HashMap::new();
    for l in &all {
        for (d, files) in &l.layers {
            orig_layers.insert(d, files.iter().map(|e| e.size).sum());
        }
    }
    let orig_redundant = redundant(orig_layers.values().sum(), distinct_contents);
    println!();
    println!("## joint, {} images", images.len());
    for relax in [false, true] {
        let opts = PlanOptions {
            relax_mtime: relax,
            joint: true,
            ..PlanOptions::default()
        };
        let t = Instant::now();
        let p = plan(&images, &[], &opts)?;
        let secs = t.elapsed().as_secs_f64();
        p.check(&images, &[])?;
        let stored: u64 = p
            .layers
            .iter()
            .map(|l| {
                l.entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::File)
                    .map(|e| e.size)
                    .sum::<u64>()
            })
            .sum();
        let mut entries: HashSet<Entry> = HashSet::new();
        let mut entry_bytes = 0u64;
        for img in &images {
            for me in img
                .view
                .iter()
                .filter(|me| me.entry.kind == EntryKind::File)
            {
                let mut e = me.entry.clone();
                if relax {
                    e.mtime = 0;
                }
                let size = e.size;
                if entries.insert(e) {
                    entry_bytes += size;
                }
            }
        }
        let floor = redundant(entry_bytes, distinct_contents);
        let red = redundant(stored, distinct_contents);
        let max_layers = p.images.iter().map(|i| i.layers.len()).max().unwrap_or(0);
        let dup: u64 = p.images.iter().map(|i| i.duplicated_bytes).sum();
        println!(
            "{}: redundant {:.1} MiB, floor {:.1} MiB, ratio {:.3} (need <= 1.25); original redundant {:.1} MiB, reduction {:.2}x (BREAK: 3.11x); layers <= {max_layers}, duplicated {:.1} MiB; plan {:.1}s",
            if relax { "relax" } else { "exact" },
            red as f64 / (1 << 20) as f64,
            floor as f64 / (1 << 20) as f64,
            if floor == 0 {
                f64::NAN
            } else {
                red as f64 / floor as f64
            },
            orig_redundant as f64 / (1 << 20) as f64,
            if red == 0 {
                f64::INFINITY
            } else {
                orig_redundant as f64 / red as f64
            },
            dup as f64 / (1 << 20) as f64,
            secs
        );
    }
    Ok(())
}
