//! Prometheus text exposition: a latency histogram and a small writer for
//! the `# HELP` / `# TYPE` / sample lines.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// Upper bounds of the latency buckets, in seconds.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A cumulative-on-output histogram of durations.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// Observations per bucket of [`LATENCY_BOUNDS`], plus one for `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Count one observation of `secs`.
    pub fn observe(&mut self, secs: f64) {
        if self.counts.len() != LATENCY_BOUNDS.len() + 1 {
            self.counts = vec![0; LATENCY_BOUNDS.len() + 1];
        }
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    /// Add another histogram's observations.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.len() != other.counts.len() {
            self.counts = vec![0; other.counts.len()];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

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
