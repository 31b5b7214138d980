//! Striped cold pulls: a layer no peer holds yet comes from the registry
//! over this node's own link and, at once, over the registry links of peers
//! that relay for it (`breakfs node --relay HOST`), so that it arrives at
//! about the sum of the links' bandwidths where each node has an uplink of
//! its own.
//!
//! Serving side (`serve`, [`Relay::relay_range`]): a peer's `GET
//! /v2/NAME/blobs/D` with a `Range` and `Breakfs-Relay: HOST` that the
//! store cannot answer is fetched from repository NAME at HOST with the
//! node's own registry client and passed on; the relaying node keeps
//! nothing (it cannot verify a range without the layer's TOC). Source side
//! (`source`, [`RelaySource`]): per range request, one link among the
//! node's own and its relaying peers', the least loaded for its measured
//! throughput; the plain cloud source after it in the chain is the
//! fallback, and every chunk is checked as from any source, so a relay
//! that fails or lies never fails a read (it rests, as the fetcher rests a
//! failing peer).

mod serve;
mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use breakfs_fetch::ClientOptions;
use breakfs_fetch::guard::Token;
use serde::Serialize;

pub use serve::{Refusal, RelayAsk};
pub use source::{LinkLoad, RelaySource};

/// The request header that asks a peer to relay, naming the registry.
pub const RELAY_HEADER: &str = "breakfs-relay";

/// The largest range a node relays in one request.
pub const MAX_RELAY_RANGE: u64 = 16 << 20;

/// Relayed requests a node serves at once; more are turned away (503).
pub const RELAYS_IN_FLIGHT: usize = 8;

/// Registry clients kept per side at most (one per registry and
/// repository, or per peer and repository); past it they are made anew.
const MAX_CLIENTS: usize = 256;

/// What a node relays and through whom it relays; one per node, shared by
/// its peer service (serving) and its fetch chain ([`RelaySource`]).
pub struct Relay {
    hosts: BTreeSet<String>,
    token: Option<Token>,
    opts: ClientOptions,
    serving: serve::Serving,
    striping: source::Striping,
}

/// What `GET /measurements` says about relaying.
#[derive(Clone, Debug, Serialize)]
pub struct RelayStatus {
    /// Registries relayed for and through.
    pub hosts: Vec<String>,
    /// Ranges relayed for peers.
    pub relayed_requests: u64,
    /// Their bytes.
    pub relayed_bytes: u64,
    /// Relay requests refused (not relayed host, token, size, busy).
    pub refused: u64,
    /// Relay requests the registry failed.
    pub failed: u64,
    /// This node's links to the registries (`own`, or a peer's URL).
    pub links: BTreeMap<String, LinkLoad>,
}

impl Relay {
    /// Relaying for and through registries `hosts` (none: off), with the
    /// node's registry client options and its token, if any (required of
    /// relay requests, and sent with the node's own).
    pub fn new(hosts: &[String], opts: &ClientOptions, token: Option<Token>) -> Arc<Relay> {
        Arc::new(Relay {
            hosts: hosts.iter().map(|h| h.trim().to_string()).collect(),
            token,
            opts: opts.clone(),
            serving: serve::Serving::default(),
            striping: source::Striping::default(),
        })
    }

    /// The registries relayed for and through, sorted.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.iter().cloned().collect()
    }

    /// Counters and link loads now.
    pub fn status(&self) -> RelayStatus {
        let (relayed_requests, relayed_bytes, refused, failed) = self.serving.counts();
        RelayStatus {
            hosts: self.hosts(),
            relayed_requests,
            relayed_bytes,
            refused,
            failed,
            links: self.striping.loads(),
        }
    }
}
