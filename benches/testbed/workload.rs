//! The workload: the IBM trace sample's deployments mapped onto the
//! corpus images and the clusters.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};

use super::corpus::CorpusImage;
use super::opts::Opts;

/// One deployment: which image, from which cluster, when (seconds after
/// the replay starts).
#[derive(Clone, Debug)]
pub struct Deployment {
    /// The cluster it is deployed in.
    pub cluster: usize,
    /// Index into the images.
    pub image: usize,
    /// Seconds after the replay starts.
    pub at: f64,
}

/// `2017-06-20 00:00:03.589` as seconds (day of month included: the
/// sample spans days of one month).
fn trace_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim().split_once(' ')?;
    let day: f64 = date.rsplit('-').next()?.parse().ok()?;
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let m: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    Some(day * 86400.0 + h * 3600.0 + m * 60.0 + s)
}

/// The trace's deployments mapped onto the images (`images` sorted by
/// family then tag v1, point, v2).
pub fn workload(o: &Opts, images: &[CorpusImage]) -> Result<Vec<Deployment>> {
    // The project's shared copy, else the one in the repository (a clean
    // clone has only that).
    let path = [
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/ibm-dal09-blobs-sample.csv"
        ),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ibm-dal09-blobs-sample.csv"
        ),
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .ok_or_else(|| anyhow!("the IBM trace sample is missing from tests/data"))?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| *h == n)
            .ok_or_else(|| anyhow!("{path} has no column {n}"))
    };
    let (uri, client, ts) = (
        col("http.request.uri")?,
        col("http.request.remoteaddr")?,
        col("timestamp")?,
    );
    let mut rows: Vec<(String, String, String)> = lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let parts: Vec<&str> = f.get(uri)?.split('/').collect();
            (parts.len() >= 5).then(|| {
                (
                    f[ts].to_string(),
                    f[client].to_string(),
                    parts[1..parts.len() - 2].join("/"),
                )
            })
        })
        .collect();
    rows.sort();
    // Runs of a client's requests for one repository, at their first request.
    let mut runs: Vec<(f64, String, String)> = Vec::new();
    let mut last: HashMap<String, String> = HashMap::new();
    for (t, c, repo) in &rows {
        if last.get(c) != Some(repo) {
            let secs = trace_secs(t).ok_or_else(|| anyhow!("{path}: bad timestamp {t:?}"))?;
            runs.push((secs, c.clone(), repo.clone()));
            last.insert(c.clone(), repo.clone());
        }
    }
    // Repositories by popularity onto families; clients onto clusters.
    let mut pop: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, r) in &runs {
        *pop.entry(r).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = pop.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let families: Vec<&str> = o.families.iter().map(String::as_str).collect();
    let fam_of: HashMap<&str, usize> = ranked
        .iter()
        .enumerate()
        .map(|(i, (r, _))| (*r, i % families.len()))
        .collect();
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let mut clients: Vec<&str> = runs.iter().map(|(_, c, _)| c.as_str()).collect();
    clients.sort();
    clients.dedup();
    let cluster_of: HashMap<&str, usize> = clients
        .into_iter()
        .map(|c| (c, rng.random_range(..o.clusters)))
        .collect();
    let n = o.deployments.min(runs.len());
    let (t0, t1) = (runs[0].0, runs[n - 1].0);
    let scale = if t1 > t0 {
        o.replay_secs / (t1 - t0)
    } else {
        0.0
    };
    runs.iter()
        .take(n)
        .enumerate()
        .map(|(i, (t, c, r))| {
            let family = families[fam_of[r.as_str()]];
            // The version advances with trace time: v1, point, v2.
            let tag = ["v1", "point", "v2"][(i * 3 / n).min(2)];
            let image = images
                .iter()
                .position(|im| im.family == family && im.tag == tag)
                .ok_or_else(|| anyhow!("the corpus has no {family}:{tag}"))?;
            Ok(Deployment {
                cluster: cluster_of[c.as_str()],
                image,
                at: (t - t0) * scale,
            })
        })
        .collect()
}
