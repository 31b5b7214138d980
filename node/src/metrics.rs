//! The node's `GET /metrics` page: Prometheus text exposition of its
//! fetches by source class, its store and budget, what it served and
//! relayed, its links and its mounts.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use breakfs_fetch::{Histogram, LATENCY_BOUNDS, YieldStats};

use crate::server::NodeService;

/// Builds a Prometheus text page.
#[derive(Default)]
pub struct PromText {
    out: String,
}

impl PromText {
    /// An empty page.
    pub fn new() -> PromText {
        PromText::default()
    }

    /// Start metric family `name` of `kind` (`counter`, `gauge`, `histogram`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample with labels.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family `name` of `kind` with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family `name` of `kind` with one sample per value of `label`.
    pub fn by_label(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: &[(&str, f64)],
    ) {
        self.family(name, kind, help);
        for (value, v) in samples {
            self.sample(name, &[(label, value)], *v);
        }
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BOUNDS
            .iter()
            .map(|b| b.to_string())
            .chain(std::iter::once("+Inf".to_string()))
            .enumerate()
        {
            cumulative += h.counts.get(i).copied().unwrap_or(0);
            let mut l = labels.to_vec();
            l.push(("le", &bound));
            self.sample(&format!("{name}_bucket"), &l, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The source classes the fetch metrics are labelled by.
const CLASSES: [&str; 4] = ["local", "peer", "relay", "cloud"];

/// The node's Prometheus page; `used` is the bytes its store uses.
pub(crate) fn page(svc: &NodeService, used: u64) -> String {
    let stats = svc.fetcher.stats();
    let mut p = PromText::new();
    // Bytes, requests, failures by source class.
    let mut by_class: std::collections::BTreeMap<&str, [u64; 3]> = Default::default();
    for c in CLASSES {
        by_class.insert(c, [0; 3]);
    }
    for (name, st) in &stats.sources {
        let class = match name.split_whitespace().next() {
            Some("local") => "local",
            Some("peer") | Some("peers") => "peer",
            Some("relay") | Some("relays") => "relay",
            _ => "cloud",
        };
        let e = by_class.entry(class).or_default();
        e[0] += st.bytes;
        e[1] += st.requests;
        e[2] += st.failures;
    }
    let per_source = [
        (
            "breakfs_fetch_bytes_total",
            "Compressed bytes fetched, by source.",
            0,
        ),
        (
            "breakfs_fetch_requests_total",
            "Range and blob requests answered, by source.",
            1,
        ),
        (
            "breakfs_fetch_failures_total",
            "Requests that failed, by source.",
            2,
        ),
    ];
    for (name, help, field) in per_source {
        p.family(name, "counter", help);
        for (c, v) in &by_class {
            p.sample(name, &[("source", c)], v[field] as f64);
        }
    }
    p.family(
        "breakfs_fetch_duration_seconds",
        "histogram",
        "Duration of range and blob requests, by source.",
    );
    for c in CLASSES {
        let h = stats.latency.get(c).cloned().unwrap_or_default();
        p.histogram("breakfs_fetch_duration_seconds", &[("source", c)], &h);
    }
    p.single(
        "breakfs_cache_hits_total",
        "counter",
        "Chunk requests the store answered at once.",
        stats.hits as f64,
    );
    p.single(
        "breakfs_cache_misses_total",
        "counter",
        "Chunk requests that needed a fetch.",
        stats.misses as f64,
    );
    p.single(
        "breakfs_chunks_stored_total",
        "counter",
        "Chunks verified and stored.",
        stats.chunks_stored as f64,
    );
    p.single(
        "breakfs_digest_failures_total",
        "counter",
        "Chunks that arrived with wrong bytes (not used).",
        stats.digest_failures as f64,
    );
    p.single(
        "breakfs_layers_completed_total",
        "counter",
        "Layers assembled into whole, verified blobs.",
        stats.layers_completed as f64,
    );
    background(&mut p, &stats.background);
    p.single(
        "breakfs_fetch_queued",
        "gauge",
        "Chunk fetches queued now.",
        stats.queued as f64,
    );
    p.single(
        "breakfs_cache_bytes",
        "gauge",
        "Bytes the content store uses.",
        used as f64,
    );
    p.single(
        "breakfs_cache_budget_bytes",
        "gauge",
        "The store's budget (0: none).",
        svc.budget.unwrap_or(0) as f64,
    );
    let (evictions, evicted) = svc.store.budget().map_or((0, 0), |b| {
        (
            b.evictions.load(Ordering::Relaxed),
            b.evicted_bytes.load(Ordering::Relaxed),
        )
    });
    p.single(
        "breakfs_cache_evictions_total",
        "counter",
        "Layers evicted to stay within the budget.",
        evictions as f64,
    );
    p.single(
        "breakfs_cache_evicted_bytes_total",
        "counter",
        "Bytes evicted to stay within the budget.",
        evicted as f64,
    );
    let served = &svc.served;
    p.by_label(
        "breakfs_served_bytes_total",
        "counter",
        "Bytes served to peers and clients.",
        "kind",
        &[
            ("blob", served.blob_bytes.load(Ordering::Relaxed) as f64),
            (
                "manifest",
                served.manifest_bytes.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    p.by_label(
        "breakfs_served_requests_total",
        "counter",
        "Peer and client requests, by outcome.",
        "outcome",
        &[
            ("hit", served.hits.load(Ordering::Relaxed) as f64),
            ("miss", served.misses.load(Ordering::Relaxed) as f64),
        ],
    );
    p.single(
        "breakfs_peer_waits",
        "gauge",
        "Peer requests waiting now for a range this node is fetching.",
        served.waiting.load(Ordering::Relaxed) as f64,
    );
    p.by_label(
        "breakfs_peer_waits_total",
        "counter",
        "Peer requests that waited for a range this node was fetching, by outcome.",
        "outcome",
        &[
            ("served", served.waits_served.load(Ordering::Relaxed) as f64),
            ("missed", served.waits_missed.load(Ordering::Relaxed) as f64),
        ],
    );
    let d = &svc.peers.rollout.decisions;
    p.by_label(
        "breakfs_rollout_chunks_total",
        "counter",
        "Chunks this node fetched, by where its peers' answers sent them: a peer holding them, \
         one fetching them, one that took them on (its stripe of the layer), one deciding at \
         the same time, or here (the next sources).",
        "from",
        &[
            ("holder", d.from_holder.load(Ordering::Relaxed) as f64),
            ("fetching", d.from_fetching.load(Ordering::Relaxed) as f64),
            ("claimed", d.from_claimed.load(Ordering::Relaxed) as f64),
            ("deciding", d.from_deciding.load(Ordering::Relaxed) as f64),
            ("here", d.here.load(Ordering::Relaxed) as f64),
        ],
    );
    p.single(
        "breakfs_rollout_claims_total",
        "counter",
        "Chunks this node took on for peers that asked about them (stripes it owns of layers \
         several nodes want).",
        d.claims.load(Ordering::Relaxed) as f64,
    );
    p.single(
        "breakfs_rollout_failed_questions_total",
        "counter",
        "Questions to peers (which chunks they have) that failed or timed out.",
        d.failed_questions.load(Ordering::Relaxed) as f64,
    );
    crate::rollout::meta_metrics(&mut p, &svc.peers.rollout.metas.decisions);
    let relay = svc.relay.status();
    p.by_label(
        "breakfs_relay_served_requests_total",
        "counter",
        "Range requests of peers relayed from a registry (--relay), by outcome.",
        "outcome",
        &[
            ("relayed", relay.relayed_requests as f64),
            ("refused", relay.refused as f64),
            ("failed", relay.failed as f64),
        ],
    );
    p.single(
        "breakfs_relay_served_bytes_total",
        "counter",
        "Bytes relayed from a registry to peers (over this node's registry link).",
        relay.relayed_bytes as f64,
    );
    let links = svc.peers.links().snapshot();
    p.family(
        "breakfs_link_rtt_seconds",
        "gauge",
        "Measured round-trip time, by link.",
    );
    for (l, s) in &links {
        if let Some(r) = s.rtt_ms {
            p.sample("breakfs_link_rtt_seconds", &[("link", l)], r / 1000.0);
        }
    }
    p.family(
        "breakfs_link_bandwidth_bits_per_second",
        "gauge",
        "Measured bandwidth, by link.",
    );
    for (l, s) in &links {
        if let Some(b) = s.bandwidth_mbps {
            p.sample(
                "breakfs_link_bandwidth_bits_per_second",
                &[("link", l)],
                b * 1e6,
            );
        }
    }
    svc.mounts.metrics(&mut p);
    svc.snapshot_stats.metrics(&mut p);
    p.finish()
}

/// The background window of each source (`yielding` in the fetcher).
fn background(p: &mut PromText, windows: &std::collections::BTreeMap<String, YieldStats>) {
    type Field = fn(&YieldStats) -> f64;
    let families: [(&str, &str, &str, Field); 7] = [
        (
            "breakfs_background_window_bytes",
            "gauge",
            "Background bytes a source may have in flight now.",
            |w| w.window as f64,
        ),
        (
            "breakfs_background_window_low_bytes",
            "gauge",
            "The smallest background window since it last peaked.",
            |w| w.window_low as f64,
        ),
        (
            "breakfs_background_queuing_seconds",
            "gauge",
            "A source's queuing delay now: its round trip beyond its best.",
            |w| w.queuing,
        ),
        (
            "breakfs_background_base_rtt_seconds",
            "gauge",
            "A source's best round trip lately.",
            |w| w.base_rtt,
        ),
        (
            "breakfs_background_over_target_total",
            "counter",
            "Requests that measured a queuing delay over the target.",
            |w| w.over_target as f64,
        ),
        (
            "breakfs_background_held_total",
            "counter",
            "Background requests that waited for their source's window.",
            |w| w.held as f64,
        ),
        (
            "breakfs_background_promoted_total",
            "counter",
            "Held background requests let go at once for a reader.",
            |w| w.promoted as f64,
        ),
    ];
    for (name, kind, help, field) in families {
        p.family(name, kind, help);
        for (source, w) in windows {
            p.sample(name, &[("source", source)], field(w));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let mut h = Histogram::default();
        for s in [0.0005, 0.003, 0.003, 20.0] {
            h.observe(s);
        }
        let mut p = PromText::new();
        p.family("lat", "histogram", "test");
        p.histogram("lat", &[("source", "pe\"er")], &h);
        let page = p.finish();
        assert!(page.contains("lat_bucket{source=\"pe\\\"er\",le=\"0.001\"} 1\n"));
        assert!(page.contains("lat_bucket{source=\"pe\\\"er\",le=\"0.005\"} 3\n"));
        assert!(page.contains("lat_bucket{source=\"pe\\\"er\",le=\"+Inf\"} 4\n"));
        assert!(page.contains("lat_count{source=\"pe\\\"er\"} 4\n"));
    }
}
