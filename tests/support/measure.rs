#![allow(clippy::unwrap_used)]
//! Measurements shared by tests and benchmarks: redundancy of a set of
//! images as stored in layers, and the distinct layers of a set of images.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};

use breakfs_fetch::ClientOptions;
use breakfs_index::{EntryKind, ImageRef, MergedView};
use breakfs_refactor::{LoadedImage, PlanOptions, RefactorOptions, WriterOptions};

/// Refactor options for tests and benchmarks: default planner and writer,
/// plain HTTP to the loopback registries.
pub fn options(work: &Path, joint: bool, relax: bool) -> RefactorOptions {
    RefactorOptions {
        plan: PlanOptions {
            joint,
            relax_mtime: relax,
            ..PlanOptions::default()
        },
        writer: WriterOptions::default(),
        client: ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        },
        work_dir: work.to_path_buf(),
        deltas: false,
    }
}

/// Paths an eStargz layer adds to an image's tree.
pub const ADDED: &[&str] = &[
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// Redundant bytes of a set of merged views stored as `layers`.
pub struct Redundancy {
    /// File bytes stored over all distinct layers.
    pub stored: u64,
    /// Bytes of distinct file contents.
    pub distinct_content: u64,
    /// Bytes of distinct exact entries (ignoring mtime when relaxed).
    pub distinct_entries: u64,
}

pub fn redundancy(views: &[MergedView], layers: &[Vec<(String, u64)>], relax: bool) -> Redundancy {
    let mut contents = HashSet::new();
    let mut entries = HashSet::new();
    let (mut distinct_content, mut distinct_entries) = (0, 0);
    for v in views {
        for me in v.iter() {
            let e = &me.entry;
            if e.kind != EntryKind::File {
                continue;
            }
            let d = e.digest.clone().unwrap();
            if contents.insert(d.clone()) {
                distinct_content += e.size;
            }
            let mut key = e.clone();
            if relax {
                key.mtime = 0;
            }
            if entries.insert(key) {
                distinct_entries += e.size;
            }
        }
    }
    let stored = layers
        .iter()
        .map(|l| l.iter().map(|(_, s)| s).sum::<u64>())
        .sum();
    Redundancy {
        stored,
        distinct_content,
        distinct_entries,
    }
}

/// Regular-file bytes of every distinct layer of `images` in a layout.
pub fn distinct_layers(refs: &[String], work: &Path) -> Vec<Vec<(String, u64)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    for r in refs {
        let r = ImageRef::parse(r).unwrap();
        let store = rt
            .block_on(breakfs_fetch::Store::open(&r, &ClientOptions::default()))
            .unwrap();
        let image = rt.block_on(store.resolve(&r)).unwrap();
        for l in image.layers() {
            if !seen.insert(l.digest.clone()) {
                continue;
            }
            let files: Vec<(String, u64)> = match rt.block_on(store.read_toc(l)).unwrap() {
                Some(toc) => toc
                    .layer
                    .entries
                    .into_iter()
                    .filter(|(e, _)| e.kind == EntryKind::File)
                    .map(|(e, _)| (e.path, e.size))
                    .collect(),
                None => {
                    let path = work.join("layer.tmp");
                    rt.block_on(store.blob_to_file(l, &path)).unwrap();
                    let f = std::fs::File::open(&path).unwrap();
                    let comp = breakfs_index::Compression::from_media_type(&l.media_type).unwrap();
                    let idx = breakfs_index::LayerIndex::read(
                        breakfs_index::decoder(comp, f).unwrap(),
                        "layer",
                    )
                    .unwrap();
                    idx.entries
                        .into_iter()
                        .filter(|e| e.entry.kind == EntryKind::File)
                        .map(|e| (e.entry.path, e.entry.size))
                        .collect()
                }
            };
            out.push(files);
        }
    }
    out
}

impl Redundancy {
    /// Redundant bytes: stored − distinct content.
    pub fn redundant(&self) -> u64 {
        self.stored - self.distinct_content
    }

    /// The floor: what storing each distinct entry once leaves redundant.
    pub fn floor(&self) -> u64 {
        self.distinct_entries - self.distinct_content
    }
}

/// Seconds single-core `gzip -6` takes over the image's uncompressed layer tars.
pub fn gzip_seconds(image: &LoadedImage) -> Result<f64> {
    let mut total = 0.0;
    for tar in &image.tars {
        let t = Instant::now();
        let st = Command::new("gzip")
            .args(["-6", "-c"])
            .stdin(std::fs::File::open(tar)?)
            .stdout(Stdio::null())
            .status()
            .context("running gzip")?;
        ensure!(st.success(), "gzip failed on {}", tar.display());
        total += t.elapsed().as_secs_f64();
    }
    Ok(total)
}
