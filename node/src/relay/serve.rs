//! The serving side of relaying: a peer's range request passed on to the
//! registry over this node's own link, within limits (the registries
//! relayed for, the token, the range's size, the requests at once).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use breakfs_fetch::{Error, RegistryRepo, TransferHook};
use breakfs_index::{Digest, ImageRef};

use super::{MAX_CLIENTS, MAX_RELAY_RANGE, RELAYS_IN_FLIGHT, Relay};

/// The serving side's state.
pub(super) struct Serving {
    /// The node's own clients, by registry and repository.
    upstream: Mutex<HashMap<(String, String), RegistryRepo>>,
    slots: Arc<tokio::sync::Semaphore>,
    relayed: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    /// Told of every range relayed (the node's registry link measured).
    measured: Mutex<Option<TransferHook>>,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            upstream: Mutex::new(HashMap::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(RELAYS_IN_FLIGHT)),
            relayed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            measured: Mutex::new(None),
        }
    }
}

impl Serving {
    /// Ranges relayed, their bytes, requests refused, requests failed.
    pub(super) fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.relayed.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A relay request as it arrived.
pub struct RelayAsk<'a> {
    /// The registry named by the `Breakfs-Relay` header.
    pub host: &'a str,
    /// The repository (`/v2/NAME/blobs/...`).
    pub name: &'a str,
    /// The blob.
    pub blob: &'a Digest,
    /// The range `[start, end)`.
    pub start: u64,
    /// Its end (exclusive).
    pub end: u64,
    /// The request's `Authorization` header.
    pub authorization: Option<&'a [u8]>,
}

/// Why a relay request was not answered with bytes; the peer service maps
/// each to an HTTP status.
#[derive(Debug)]
pub enum Refusal {
    /// The node does not relay for this registry (403).
    NotRelayed {
        /// The registry asked for.
        host: String,
        /// Those it relays for.
        relayed: Vec<String>,
    },
    /// The node has a token and the request did not carry it (401).
    NeedsToken,
    /// Not a repository name or digest the node would pass on (400).
    BadRequest(String),
    /// More than [`MAX_RELAY_RANGE`] bytes (400).
    TooLarge(u64),
    /// [`RELAYS_IN_FLIGHT`] relays are running (503).
    Busy,
    /// The registry's answer (404 if it has no such blob, else 502).
    Upstream(Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotRelayed { host, relayed } if relayed.is_empty() => write!(
                f,
                "this node does not relay for registry {host}: it relays for none; start it \
                 with --relay {host} to fetch ranges from {host} for its peers"
            ),
            Refusal::NotRelayed { host, relayed } => write!(
                f,
                "this node does not relay for registry {host} (it relays for {}); add \
                 --relay {host} to fetch ranges from {host} for its peers",
                relayed.join(", ")
            ),
            Refusal::NeedsToken => f.write_str(
                "relaying spends this node's registry link: a relay request needs \
                 `Authorization: Bearer TOKEN`, the token of the node's --token-file (the \
                 nodes of an edge share one)",
            ),
            Refusal::BadRequest(why) => f.write_str(why),
            Refusal::TooLarge(n) => write!(
                f,
                "a relayed range is at most {MAX_RELAY_RANGE} bytes and this one is {n}; \
                 ask for smaller ranges"
            ),
            Refusal::Busy => write!(
                f,
                "this node relays at most {RELAYS_IN_FLIGHT} ranges at once and is at that \
                 limit; fetch the range elsewhere"
            ),
            Refusal::Upstream(e) => write!(f, "relaying failed: {}", breakfs_index::Causes(e)),
        }
    }
}

impl Relay {
    /// Call `f` with (`"cloud"`, bytes, seconds) after each range relayed:
    /// it crossed this node's registry link, so it measures that link as
    /// the node's own fetches do (and the scheduler learns it).
    pub fn on_transfer(&self, f: TransferHook) {
        *self.serving.measured.lock() = Some(f);
    }

    /// Fetch the range `ask` names from the registry for a peer.
    pub async fn relay_range(&self, ask: &RelayAsk<'_>) -> std::result::Result<Vec<u8>, Refusal> {
        let r = self.relay_checked(ask).await;
        let s = &self.serving;
        let c = match &r {
            Ok(b) => {
                s.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                &s.relayed
            }
            Err(Refusal::Upstream(_)) => &s.failed,
            Err(_) => &s.refused,
        };
        c.fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn relay_checked(&self, ask: &RelayAsk<'_>) -> std::result::Result<Vec<u8>, Refusal> {
        if !self.hosts.contains(ask.host) {
            return Err(Refusal::NotRelayed {
                host: ask.host.to_string(),
                relayed: self.hosts(),
            });
        }
        if let Some(t) = &self.token
            && !t.admits_bearer(ask.authorization)
        {
            return Err(Refusal::NeedsToken);
        }
        // The image reference parser says what a repository name may be;
        // nothing else reaches the registry's URL.
        let named = format!("docker://{}/{}@{}", ask.host, ask.name, ask.blob);
        match ImageRef::parse(&named) {
            Ok(ImageRef::Registry { repo, .. }) if repo == ask.name => {}
            _ => {
                return Err(Refusal::BadRequest(format!(
                    "{:?} is not a repository name (lowercase letters, digits, . _ - and /)",
                    ask.name
                )));
            }
        }
        let len = ask.end.saturating_sub(ask.start);
        if len > MAX_RELAY_RANGE {
            return Err(Refusal::TooLarge(len));
        }
        let Ok(_slot) = self.serving.slots.clone().try_acquire_owned() else {
            return Err(Refusal::Busy);
        };
        let repo = self.upstream_client(ask.host, ask.name)?;
        let began = Instant::now();
        let bytes = repo
            .read_range(ask.blob, ask.start, len)
            .await
            .map_err(Refusal::Upstream)?;
        let hook = self.serving.measured.lock().clone();
        if let Some(f) = hook {
            f("cloud", bytes.len() as u64, began.elapsed().as_secs_f64());
        }
        Ok(bytes)
    }

    /// The node's own client for `name` at registry `host`, kept so that
    /// tokens and connections are reused.
    fn upstream_client(
        &self,
        host: &str,
        name: &str,
    ) -> std::result::Result<RegistryRepo, Refusal> {
        let key = (host.to_string(), name.to_string());
        if let Some(r) = self.serving.upstream.lock().get(&key) {
            return Ok(r.clone());
        }
        let r = RegistryRepo::new(host, name, &self.opts).map_err(Refusal::Upstream)?;
        let mut m = self.serving.upstream.lock();
        if m.len() >= MAX_CLIENTS {
            m.clear();
        }
        m.insert(key, r.clone());
        Ok(r)
    }
}
