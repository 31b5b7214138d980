//! The emulated edge: the registry filled with the original and the
//! refactored images, the clusters' links to it, the links between nodes,
//! and what every strategy shares (node choice, the outcome).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow};
use sha2::{Digest as _, Sha256};

use super::cache::{cached_dir, copy_tree};
use super::corpus::CorpusImage;
use super::estargz;
use super::harness::{self, Env, Shaper, run, skopeo_copy};
use super::interrupt::{check_interrupt, parallel};
use super::opts::Opts;
use super::reference::{Reference, sha256_file};
use super::registry::TestRegistry;

/// A refactored image in the registry.
pub struct Refactored {
    /// Its bytes (layers).
    pub size: u64,
    /// Its layers (digest, size).
    pub layers: Vec<(String, u64)>,
}

/// Fill the registry: the originals at `orig/FAMILY:TAG`, the images
/// refactored jointly (`breakfs refactor --joint`, as BREAK refactors the
/// set of images a registry serves) at `refactored/FAMILY:TAG`, and the
/// originals' eStargz conversions from the layout `estargz` (if given) at
/// `esgz/FAMILY:TAG` and `esgz-opt/FAMILY:TAG`. The refactored layout and
/// then the registry's storage are cached, keyed by the refactoring's
/// sources, the images' digests and the conversions.
pub fn fill_registry(
    env: &Env,
    reg: &mut TestRegistry,
    images: &[CorpusImage],
    estargz: Option<&Path>,
) -> Result<Vec<Refactored>> {
    let mut key = Sha256::new();
    refactor_sources(&mut key, Path::new(env!("CARGO_MANIFEST_DIR")))?;
    for im in images {
        key.update(im.manifest_digest.as_bytes());
    }
    let key = &hex::encode(key.finalize())[..16];
    let layout = cached_dir("joint", key, |fresh| {
        let work = env.tmp.join("joint-work");
        eprintln!(
            "testbed: refactoring {} images jointly (cached for the next run)",
            images.len()
        );
        let r = run(
            env.breakfs()
                .args(["refactor", "--joint", "--work-dir"])
                .arg(&work)
                .arg("--to")
                .arg(format!("oci:{}", fresh.display()))
                .args(images.iter().map(|i| i.reference.clone())),
            "breakfs refactor --joint",
        );
        let _ = std::fs::remove_dir_all(&work);
        r.map(|_| ())
    })?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let tags: Vec<String> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(String::from)
        .collect();
    let jobs: Vec<(&CorpusImage, String)> = images
        .iter()
        .map(|im| {
            // `refactor --joint` names a tag FAMILY-TAG, or TAG when every
            // image is of one family.
            let want = format!("{}-{}", im.family, im.tag);
            let tag = tags
                .iter()
                .find(|t| **t == want)
                .or_else(|| tags.iter().find(|t| **t == im.tag))
                .ok_or_else(|| anyhow!("the joint layout has no tag {want} (it has {tags:?})"))?;
            Ok((im, tag.clone()))
        })
        .collect::<Result<_>>()?;
    let storage = reg.storage_dir();
    let mut pushed = false;
    let registry_key = {
        let mut k = Sha256::new();
        k.update(key.as_bytes());
        match estargz {
            Some(e) => k.update(e.to_string_lossy().as_bytes()),
            None => k.update(b"no eStargz"),
        }
        hex::encode(k.finalize())[..16].to_string()
    };
    let cached = cached_dir("registry", &registry_key, |fresh| {
        eprintln!(
            "testbed: pushing {n} original, {n} refactored and {} eStargz images (cached for the next run)",
            if estargz.is_some() {
                2 * images.len()
            } else {
                0
            },
            n = images.len()
        );
        push_originals(reg, images)?;
        // One at a time: the images share layers, and the registry's
        // filesystem driver fails concurrent uploads of one blob.
        for (im, tag) in &jobs {
            check_interrupt()?;
            skopeo_copy(
                &format!("oci:{}:{tag}", layout.display()),
                &reg.reference(&format!("refactored/{}:{}", im.family, im.tag)),
            )?;
        }
        if let Some(e) = estargz {
            estargz::push(e, images, |repo| reg.reference(repo))?;
        }
        pushed = true;
        copy_tree(&storage, &fresh.join("storage"))
    })?;
    if !pushed {
        // The cached storage, hard-linked (the registry never rewrites a
        // blob), under a restarted registry.
        reg.kill();
        let _ = std::fs::remove_dir_all(&storage);
        copy_tree(&cached.join("storage"), &storage)?;
        reg.restart();
    }
    jobs.iter()
        .map(|(_, tag)| {
            let layers = harness::layout_layers(&layout, tag)?;
            Ok(Refactored {
                size: layers.iter().map(|l| l.1).sum(),
                layers,
            })
        })
        .collect()
}

/// Hash what the refactored images depend on: the sources of the refactor
/// and index crates (the layer and TOC formats) and Cargo.lock. A rebuild
/// for any other change (the node daemon, this benchmark) keeps the cached
/// joint refactoring and registry, which take minutes to redo.
fn refactor_sources(key: &mut Sha256, root: &Path) -> Result<()> {
    let mut files = vec![root.join("Cargo.lock")];
    let mut dirs = vec![root.join("refactor"), root.join("index")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        key.update(f.strip_prefix(root)?.to_string_lossy().as_bytes());
        key.update(sha256_file(&f)?.as_bytes());
    }
    Ok(())
}

/// The originals, one family (repository) per thread.
fn push_originals(reg: &TestRegistry, images: &[CorpusImage]) -> Result<()> {
    let families: Vec<Vec<&CorpusImage>> = {
        let mut by: BTreeMap<&str, Vec<&CorpusImage>> = BTreeMap::new();
        for im in images {
            by.entry(im.family).or_default().push(im);
        }
        by.into_values().collect()
    };
    parallel(&families, 3, |fam| {
        for im in fam {
            skopeo_copy(
                &format!("oci:{}:{}", im.layout.display(), im.tag),
                &reg.reference(&format!("orig/{}:{}", im.family, im.tag)),
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------
// What every strategy shares.

/// What a strategy did over the whole workload.
pub struct Outcome {
    /// Seconds to ready, per deployment.
    pub secs: Vec<f64>,
    /// Bytes from the registry, all nodes.
    pub cloud: u64,
    /// Bytes from peer nodes.
    pub peer: u64,
    /// Bytes the nodes' caches (layer stores) use at the end.
    pub cache: u64,
    /// Per deployment placed by `breakfs sched`: the estimator's expected
    /// fetch time for the chosen node (`/plan`'s `fetch_secs`), to set
    /// beside the measured time to ready.
    pub estimates: Vec<Option<f64>>,
}

/// The emulated edge a strategy runs in: the settings, the registry, each
/// cluster's link to it, the images and what their rootfs must hold.
pub struct World<'a> {
    pub o: &'a Opts,
    pub env: &'a Env,
    pub reg: &'a TestRegistry,
    pub links: &'a [Shaper],
    pub images: &'a [CorpusImage],
    pub refs: &'a [Reference],
    pub refactored: &'a [Refactored],
}

impl Outcome {
    /// The outcome of a strategy whose nodes keep their layers in
    /// `dir/nodeN/SUB` and fetch only from the cloud.
    pub fn with_node_dirs(w: &World, dir: &Path, sub: &str, secs: Vec<f64>, cloud: u64) -> Outcome {
        let cache = (0..w.o.clusters * w.o.nodes)
            .map(|n| disk_bytes(&dir.join(format!("node{n}/{sub}"))))
            .sum();
        Outcome {
            secs,
            cloud,
            peer: 0,
            cache,
            estimates: Vec::new(),
        }
    }
}

/// Node choice by the default scheduler's least-requested with equal
/// pods: the node of `cluster` with the fewest deployments so far.
pub struct LeastLoaded(Mutex<Vec<usize>>);

impl LeastLoaded {
    pub fn new(o: &Opts) -> LeastLoaded {
        LeastLoaded(Mutex::new(vec![0; o.clusters * o.nodes]))
    }

    pub fn pick(&self, o: &Opts, cluster: usize) -> usize {
        let mut load = self.0.lock().unwrap();
        let range = cluster * o.nodes..(cluster + 1) * o.nodes;
        let n = range
            .clone()
            .min_by_key(|&n| (load[n], n))
            .unwrap_or(range.start);
        load[n] += 1;
        n
    }
}

/// Bytes under `p` on disk (`du -sb`).
pub fn disk_bytes(p: &Path) -> u64 {
    Command::new("du")
        .arg("-sb")
        .arg(p)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The shaped node-to-node links: for each pair of clusters (client
/// cluster, serving cluster) one link, with a route to each serving node.
/// `url(x, m)` is node `m` as nodes of cluster `x` reach it.
pub struct PeerLinks {
    pub shapers: Vec<Shaper>,
    pub urls: Vec<Vec<String>>,
}

impl PeerLinks {
    pub fn start(o: &Opts, ports: &[u16]) -> Result<PeerLinks> {
        let mut shapers = Vec::new();
        let mut urls = vec![vec![String::new(); ports.len()]; o.clusters];
        for (x, row) in urls.iter_mut().enumerate() {
            for y in 0..o.clusters {
                let serving: Vec<usize> = (y * o.nodes..(y + 1) * o.nodes).collect();
                let upstreams: Vec<String> = serving
                    .iter()
                    .map(|&m| format!("127.0.0.1:{}", ports[m]))
                    .collect();
                let (rtt, mbit) = if x == y {
                    (o.peer_rtt, o.peer_mbit)
                } else {
                    (o.cross_rtt, o.cross_mbit)
                };
                let s = Shaper::routes(&upstreams, rtt, mbit)?;
                for (&m, a) in serving.iter().zip(&s.addrs) {
                    row[m] = format!("http://{a}");
                }
                shapers.push(s);
            }
        }
        Ok(PeerLinks { shapers, urls })
    }
}

/// Each node's background budget (bytes/s, any source): half the
/// cluster's cloud link, shared by its nodes.
pub fn background_rate(o: &Opts) -> u64 {
    o.cloud_mbit * 1_000_000 / 8 / 2 / o.nodes.max(1) as u64
}

/// Bytes of the distinct layers of `images`.
pub fn distinct_bytes(images: &[Refactored]) -> u64 {
    let distinct: HashMap<&str, u64> = images
        .iter()
        .flat_map(|r| r.layers.iter().map(|(d, size)| (d.as_str(), *size)))
        .collect();
    distinct.values().sum()
}
