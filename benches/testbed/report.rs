//! The report: the Markdown table and the strip plot of times to ready.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use super::corpus::CorpusImage;
use super::harness::{self, median};
use super::opts::{Opts, Strategy};
use super::workload::Deployment;
use super::world::{Outcome, Refactored, background_rate, distinct_bytes};

/// A finished run: the strategies' outcomes and the Markdown report.
pub struct Report {
    /// Each strategy's outcome, in the order run.
    pub results: Vec<(Strategy, Outcome)>,
    /// The report: settings, machine, table.
    pub markdown: String,
    /// The strip plot of times to ready.
    pub svg: String,
    /// Deployments replayed.
    pub deployments: usize,
}

/// An SVG strip plot of each strategy's times to ready (one dot per
/// deployment, a bar at the median), log-scaled seconds.
pub fn svg_plot(results: &[(Strategy, Outcome)]) -> String {
    let (w, row, left, top) = (760.0, 34.0, 230.0, 20.0);
    let h = top * 2.0 + row * results.len() as f64 + 30.0;
    let all = results.iter().flat_map(|(_, v)| v.secs.iter().copied());
    let lo = all.clone().fold(f64::MAX, f64::min).max(0.01);
    let hi = all.fold(0.0, f64::max).max(lo * 2.0);
    let (l0, l1) = (lo.log10().floor(), hi.log10().ceil());
    let x = |secs: f64| left + (secs.max(1e-6).log10() - l0) / (l1 - l0) * (w - left - 20.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let bottom = top + row * results.len() as f64;
    let mut d = l0;
    while d <= l1 {
        let v = 10f64.powf(d);
        let xv = x(v);
        out.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>\n\
             <text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v} s</text>\n",
            bottom + 16.0
        ));
        d += 1.0;
    }
    for (i, (s, v)) in results.iter().enumerate() {
        let y = top + row * (i as f64 + 0.5);
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 10.0,
            y + 4.0,
            s.name()
        ));
        for (k, secs) in v.secs.iter().enumerate() {
            let jitter = ((k * 7919) % 11) as f64 - 5.0;
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#3060c0\" fill-opacity=\"0.5\"/>\n",
                x(*secs),
                y + jitter
            ));
        }
        let m = median(&v.secs);
        out.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#c03030\" stroke-width=\"3\"/>\n",
            x(m),
            y - 12.0,
            y + 12.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"{:.1}\">time to ready per deployment (dots), median (red bar); log scale</text>\n</svg>\n",
        h - 4.0
    ));
    out
}

/// The node logs of a failed strategy, kept in target/testbed-logs/FLAG.
pub fn keep_logs(dir: &Path, flag: &str) {
    let keep = Path::new("target/testbed-logs").join(flag);
    let _ = std::fs::remove_dir_all(&keep);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let log = e.path().join("node.log");
        if log.exists() && std::fs::create_dir_all(&keep).is_ok() {
            let name = format!("{}.log", e.file_name().to_string_lossy());
            let _ = std::fs::copy(&log, keep.join(name));
        }
    }
    if keep.exists() {
        eprintln!(
            "testbed: the node logs of the failed strategy are in {}",
            keep.display()
        );
    }
}

pub fn report(
    o: &Opts,
    deps: &[Deployment],
    images: &[CorpusImage],
    refactored: &[Refactored],
    results: &[(Strategy, Outcome)],
    setup_secs: f64,
    started: Instant,
) -> String {
    let med = |s: Strategy| {
        results
            .iter()
            .find(|(x, _)| *x == s)
            .map(|(_, v)| median(&v.secs))
    };
    let base_bytes = results
        .iter()
        .find(|(s, _)| *s == Strategy::DockerLike)
        .map(|(_, v)| v.cloud);
    let ratio = |x: f64, b: Option<f64>| b.map_or("–".into(), |b| format!("{:.2}", x / b));
    let mut table = String::from(
        "| strategy | median time to ready | p90 | mean | ÷ docker-like | ÷ containerd | ÷ eStargz | ÷ eStargz optimized | from the cloud | ÷ docker-like | from peers | cache at the end |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (s, v) in results {
        let mut t = v.secs.clone();
        t.sort_by(f64::total_cmp);
        let m = median(&t);
        let p90 = t[(t.len() * 9 / 10).min(t.len() - 1)];
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        table.push_str(&format!(
            "| {} | {m:.2} s | {p90:.2} s | {mean:.2} s | {} | {} | {} | {} | {:.0} MB | {} | {:.0} MB | {:.0} MB |\n",
            s.name(),
            ratio(m, med(Strategy::DockerLike)),
            ratio(m, med(Strategy::Containerd)),
            ratio(m, med(Strategy::Estargz)),
            ratio(m, med(Strategy::EstargzOptimized)),
            v.cloud as f64 / 1e6,
            ratio(v.cloud as f64, base_bytes.map(|b| b.max(1) as f64)),
            v.peer as f64 / 1e6,
            v.cache as f64 / 1e6,
        ));
    }
    let orig: u64 = images
        .iter()
        .flat_map(|im| im.layers.iter().map(|l| (l.digest.as_str(), l.size)))
        .collect::<HashMap<&str, u64>>()
        .values()
        .sum();
    let strategies = if o.strategies == Strategy::ALL {
        String::new()
    } else {
        let flags: Vec<&str> = o.strategies.iter().map(|s| s.flag()).collect();
        format!(" --strategies {}", flags.join(","))
    };
    let subset = if o.strategies == Strategy::ALL {
        String::new()
    } else {
        let left: Vec<&str> = Strategy::ALL
            .iter()
            .filter(|s| !o.strategies.contains(s))
            .map(|s| s.name())
            .collect();
        format!(
            " A subset of the strategies ran; not run: {}.",
            if left.is_empty() {
                "none".to_string()
            } else {
                left.join(", ")
            }
        )
    };
    let per_cluster: Vec<usize> = (0..o.clusters)
        .map(|c| deps.iter().filter(|d| d.cluster == c).count())
        .collect();
    format!(
        "### Edge testbed\n\n`cargo bench --bench testbed -- --clusters {} --nodes {} --deployments {} --replay-secs {} --seed {} \
         --cloud-rtt {} --cloud-mbit {} --peer-rtt {} --peer-mbit {} --cross-rtt {} --cross-mbit {} --families {}{strategies}`\n\n\
         {} deployments of {} images (the IBM trace sample's order and arrival times scaled into {} s, versions advancing \
         v1 → point → v2; deployments per cluster {:?}) on {} clusters × {} nodes. Links: each cluster reaches the \
         registry through its own {} ms / {} Mbit/s link shared by its nodes; node ↔ node {} ms / {} Mbit/s inside a \
         cluster, {} ms / {} Mbit/s across (one shared link per pair of clusters); a breakfs node's background work \
         (prefetch) at most {:.2} MB/s (half the cluster's cloud link over its nodes) and within each source's delay-based \
         window (25 ms queuing target). The images' distinct layers are {:.0} MB \
         compressed as built, {:.0} MB refactored jointly. Seed {}. Every deployment's rootfs matched the \
         original image on sampled file hashes.{subset} Machine: {}. Set-up {:.0} s (cached parts reused), total {:.0} s.\n\n{table}{}{}",
        o.clusters,
        o.nodes,
        o.deployments,
        o.replay_secs,
        o.seed,
        o.cloud_rtt,
        o.cloud_mbit,
        o.peer_rtt,
        o.peer_mbit,
        o.cross_rtt,
        o.cross_mbit,
        o.families.join(","),
        deps.len(),
        images.len(),
        o.replay_secs,
        per_cluster,
        o.clusters,
        o.nodes,
        o.cloud_rtt,
        o.cloud_mbit,
        o.peer_rtt,
        o.peer_mbit,
        o.cross_rtt,
        o.cross_mbit,
        background_rate(o) as f64 / 1e6,
        orig as f64 / 1e6,
        distinct_bytes(refactored) as f64 / 1e6,
        o.seed,
        harness::machine(),
        setup_secs,
        started.elapsed().as_secs_f64(),
        estimator_note(results),
        ablation_note(results),
    )
}

/// Full breakfs' median against each ablation's, measured in the same run.
fn ablation_note(results: &[(Strategy, Outcome)]) -> String {
    let med = |s: Strategy| {
        results
            .iter()
            .find(|(x, _)| *x == s)
            .map(|(_, v)| median(&v.secs))
    };
    let Some(full) = med(Strategy::Breakfs) else {
        return String::new();
    };
    let ablations = [
        Strategy::NoRefactor,
        Strategy::NoPeers,
        Strategy::NoPrefetch,
        Strategy::NoSched,
    ];
    let rows: Vec<String> = ablations
        .iter()
        .filter_map(|&a| {
            let m = med(a)?;
            let verdict = if full <= m { "≤" } else { "**>**" };
            Some(format!(
                "| {} | {m:.2} s | {:.2} | {verdict} |\n",
                a.name(),
                full / m
            ))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "\nFull breakfs' median ({full:.2} s) against each ablation's, same run:\n\n\
         | ablation | its median | breakfs ÷ it | breakfs |\n|---|---:|---:|---|\n{}",
        rows.concat()
    )
}

/// The scheduler's estimator against what was measured: for each strategy
/// placed by `breakfs sched`, its expected fetch time for the chosen node
/// beside the deployment's measured time to ready (the estimator grades
/// whole-image fetches; a lazy mount's time to ready is a fetch of what the
/// command reads plus the command itself).
fn estimator_note(results: &[(Strategy, Outcome)]) -> String {
    let mut out = String::new();
    for (s, v) in results {
        let pairs: Vec<(f64, f64)> = v
            .estimates
            .iter()
            .zip(&v.secs)
            .filter_map(|(e, m)| Some(((*e)?, *m)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let mut ratios: Vec<f64> = pairs.iter().map(|(e, m)| m / e.max(1e-3)).collect();
        ratios.sort_by(f64::total_cmp);
        let mut errors: Vec<f64> = pairs
            .iter()
            .map(|(e, m)| (m - e).abs() / m.max(1e-3))
            .collect();
        errors.sort_by(f64::total_cmp);
        let est: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let meas: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        out.push_str(&format!(
            "\n{}: sched's estimator (expected fetch time of the chosen node, `/plan`) against the measured time to ready \
             of the same {} placements: median estimate {:.2} s, median measured {:.2} s; measured ÷ estimate median {:.2} \
             (min {:.2}, max {:.2}); median |measured − estimate| ÷ measured {:.2}.\n",
            s.name(),
            pairs.len(),
            median(&est),
            median(&meas),
            median(&ratios),
            ratios[0],
            ratios[ratios.len() - 1],
            median(&errors),
        ));
    }
    out
}
