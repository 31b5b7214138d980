//! What a node publishes about itself, as plain data: its cache index
//! (`GET /cache/index`: the blobs and ranges it holds) and the measured
//! quality of its links (`GET /measurements`). Node daemons write these,
//! peers and the scheduler read them.

use serde::{Deserialize, Serialize};

use crate::Digest;

/// A cache index larger than this is refused (a store of 100,000 blobs
/// lists in about 10 MiB).
pub const MAX_INDEX: usize = 32 << 20;

/// What a node holds, as it publishes it at `GET /cache/index`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheIndex {
    /// The node's own base URL, as configured.
    pub node: String,
    /// Whole blobs (layers, configs, manifests), verified.
    pub blobs: Vec<HeldBlob>,
    /// Layers held in part: verified compressed ranges.
    pub partial: Vec<PartialLayer>,
    /// Uncompressed chunks held.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Bytes the store uses on disk (blobs, ranges, chunks).
    pub used: u64,
    /// The configured budget, if any.
    pub budget: Option<u64>,
    /// Peers this node knows (so that peers learn of each other).
    pub peers: Vec<String>,
    /// Registries (`HOST[:PORT]`) the node fetches ranges from for its
    /// peers (`breakfs node --relay`).
    #[serde(default)]
    pub relay: Vec<String>,
}

/// A whole blob in an index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeldBlob {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// A layer held in part.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartialLayer {
    /// The layer blob's digest.
    pub digest: Digest,
    /// Held byte ranges `[start, end)`, sorted, merged.
    pub ranges: Vec<(u64, u64)>,
}

impl CacheIndex {
    /// How much of blob `d` the node holds: `Some(None)` whole,
    /// `Some(Some(ranges))` in part, `None` not at all.
    pub fn holding(&self, d: &Digest) -> Option<Option<&[(u64, u64)]>> {
        if self.blobs.iter().any(|b| &b.digest == d) {
            return Some(None);
        }
        self.partial
            .iter()
            .find(|p| &p.digest == d)
            .map(|p| Some(p.ranges.as_slice()))
    }
}

/// Measured quality of one link (to the registry or to a peer): EWMAs over
/// real transfers and light probes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStats {
    /// Round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Bandwidth, Mbit/s (from transfers of at least 64 KiB).
    pub bandwidth_mbps: Option<f64>,
    /// Transfers and probes seen.
    pub samples: u64,
    /// Probes or transfers that failed.
    pub failures: u64,
    /// Seconds since the last success (at the time of reading).
    pub last_ok_secs: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_holding_distinguishes_whole_and_partial() {
        let d1 = Digest::of(b"1");
        let d2 = Digest::of(b"2");
        let idx = CacheIndex {
            blobs: vec![HeldBlob {
                digest: d1.clone(),
                size: 1,
            }],
            partial: vec![PartialLayer {
                digest: d2.clone(),
                ranges: vec![(0, 10)],
            }],
            ..CacheIndex::default()
        };
        assert_eq!(idx.holding(&d1), Some(None));
        assert_eq!(idx.holding(&d2), Some(Some(&[(0u64, 10u64)][..])));
        assert_eq!(idx.holding(&Digest::of(b"3")), None);
    }
}
