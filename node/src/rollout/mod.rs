//! Rollouts: one cloud fetch per cluster. When the nodes of a cluster
//! start the same new image at once, each chunk should cross the cloud
//! link once. Before a node fetches a range, it asks each peer directly
//! (`POST /cache/have`, one small request per peer for the range's chunks,
//! answered from memory) whether it has each chunk, is fetching it, or is
//! deciding right now too; a peer that has a chunk serves it, a peer that
//! is fetching it is waited on (its server holds the request until its own
//! fetch ends, bounded), and the rest is fetched from the next sources.
//!
//! When no node has or fetches a chunk, the nodes that want its layer
//! split the layer among themselves (`split`): a node asked about a chunk
//! of a stripe it owns takes it on, fetches it over the cloud link, and
//! answers "claimed"; the asker waits on it. Two nodes deciding on one
//! chunk at once both learn it (each registers before it asks, and a
//! question that reaches a deciding node counts as an answer "deciding"),
//! and the one ranked higher for the chunk's stripe fetches while the
//! other waits on it. A wait that fails (the peer died, stalled, or its
//! fetch failed) costs a retry from the next source, never a failed read;
//! every chunk is still checked against its digest.
//!
//! The image's config and its layers' TOCs, which every node reads before
//! any chunk, go the same way (`meta`): asked about, waited on, and split
//! among the nodes deciding at once. The peer-facing `POST /cache/have`
//! is `serve`; a read from a peer that holds the request until its own
//! fetch ends is `wait`.

mod ask;
mod meta;
mod serve;
mod split;
mod wait;

pub(crate) use ask::plan;
pub(crate) use meta::{
    metrics as meta_metrics, question as meta_question, serve as meta_serve, turn as meta_turn,
};
pub(crate) use serve::have;
use wait::{PeerWait, host_of};

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use breakfs_fetch::{ChunkLoc, PEER_REST};
use breakfs_index::Digest;
use serde::{Deserialize, Serialize};

/// The header in which a peer says how long it waits for a range this
/// node is fetching (milliseconds).
pub(crate) const WAIT_HEADER: &str = "breakfs-wait";

/// Longest a node holds a peer's request for a range it is fetching.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long a peer's request may wait on this node's fetch: as its
/// [`WAIT_HEADER`] says, at most [`MAX_WAIT`], 2 s without one.
pub(crate) fn asked_wait(headers: &axum::http::HeaderMap) -> Duration {
    headers
        .get(WAIT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(2), Duration::from_millis)
        .min(MAX_WAIT)
}

/// How long a question to a peer may take before the peer is passed over.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Chunks in one question at most (a batch is a few MiB: far fewer).
const MAX_QUERY_CHUNKS: usize = 4096;

/// Flights kept at most before old finished ones are dropped.
const MAX_FLIGHTS: usize = 8192;

/// Chunks a node takes on for its peers at once, at most.
const MAX_CLAIMS: usize = 4096;

/// A question to a peer: which of these chunks of `layer` it has.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaveQuery {
    /// The asking node's id (its URL).
    pub node: String,
    /// The layer blob.
    pub layer: Digest,
    /// The chunks, by digest and member span in the layer.
    pub chunks: Vec<AskedChunk>,
    /// Whether the asker fetches them in the background (a chunk taken on
    /// is fetched at that priority).
    #[serde(default)]
    pub background: bool,
}

/// One chunk asked about.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AskedChunk {
    /// sha256 of the uncompressed chunk.
    pub digest: Digest,
    /// Offset of its gzip member in the layer.
    pub offset: u64,
    /// End of its member.
    pub end: u64,
    /// Offset of the chunk in its decompressed member.
    #[serde(default)]
    pub inner: u64,
    /// Its uncompressed size.
    #[serde(default)]
    pub size: u64,
    /// Whether the asker took it on for a peer (and fetches it whatever
    /// the answer).
    #[serde(default)]
    pub claimed: bool,
}

/// A peer's answer: per chunk asked, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HaveAnswer {
    /// The answering node's id (its URL).
    pub node: String,
    /// Per chunk asked.
    pub chunks: Vec<Holding>,
}

/// What a node says of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Holding {
    /// It holds the chunk's member as verified bytes.
    Have,
    /// It is fetching it from a source that is not a peer.
    Fetching,
    /// It took it on (it owns the chunk's stripe) and will fetch it.
    Claimed,
    /// It is asking its peers about it right now.
    Deciding,
    /// Neither (or it waits on another peer for it).
    Neither,
}

/// Where one chunk this node fetches stands.
enum Stage {
    /// Asking the peers; who asked this node about it meanwhile (and
    /// whether they had taken it on), and whether this node took it on.
    Deciding {
        asked: BTreeMap<String, bool>,
        claimed: bool,
    },
    /// Taken on for a peer, queued.
    Claimed,
    /// Fetched from the chain (store, relays, cloud), not from a peer.
    Fetching,
    /// Waiting on a peer.
    Waiting,
}

struct Flight {
    layer: Digest,
    offset: u64,
    stage: Stage,
    at: Instant,
}

/// What a node decided for the chunks it fetched, by kind (for metrics).
#[derive(Default)]
pub(crate) struct Decisions {
    /// Taken from a peer that had them.
    pub(crate) from_holder: AtomicU64,
    /// Waited on a peer that was fetching them.
    pub(crate) from_fetching: AtomicU64,
    /// Waited on a peer that took them on (it owns their stripe).
    pub(crate) from_claimed: AtomicU64,
    /// Waited on a peer deciding at the same time, ranked higher.
    pub(crate) from_deciding: AtomicU64,
    /// Fetched here (no peer had them or was getting them).
    pub(crate) here: AtomicU64,
    /// Questions to peers that failed.
    pub(crate) failed_questions: AtomicU64,
    /// Chunks this node took on for the peers that asked.
    pub(crate) claims: AtomicU64,
}

/// The rollout state of a node: its flights and the peers it passes over.
#[derive(Default)]
pub(crate) struct Rollout {
    flights: Mutex<HashMap<Digest, Flight>>,
    resting: Mutex<HashMap<String, Instant>>,
    /// What was decided.
    pub(crate) decisions: Decisions,
    /// How long this node waits on a peer's fetch.
    wait: Mutex<Option<Duration>>,
    /// Who wants which layer.
    interest: split::Interest,
    /// Chunks taken on and not done yet.
    claiming: AtomicUsize,
    /// Its reads of image metadata (configs, TOCs), for peers asking.
    pub(crate) metas: meta::Metas,
    /// The ids peers gave in their answers, by URL.
    ids: Mutex<HashMap<String, String>>,
}

impl Rollout {
    /// Wait at most `wait` on a peer's fetch (by default 5 s).
    pub(crate) fn set_wait(&self, wait: Duration) {
        *self.wait.lock() = Some(wait.min(MAX_WAIT));
    }

    fn wait(&self) -> Duration {
        self.wait.lock().unwrap_or(Duration::from_secs(5))
    }

    /// Pass peer `url` over for [`PEER_REST`]: it did not answer.
    fn rest(&self, url: &str) {
        self.resting
            .lock()
            .insert(url.to_string(), Instant::now() + PEER_REST);
    }

    fn resting(&self, url: &str) -> bool {
        let mut r = self.resting.lock();
        match r.get(url) {
            Some(t) if *t > Instant::now() => true,
            Some(_) => {
                r.remove(url);
                false
            }
            None => false,
        }
    }

    /// Register `chunks` as being decided; the guard forgets those still
    /// undecided when dropped. Also says, per chunk, whether this node
    /// took it on for a peer.
    fn deciding<'a>(&'a self, layer: &Digest, chunks: &'a [ChunkLoc]) -> (Deciding<'a>, Vec<bool>) {
        let mut f = self.flights.lock();
        if f.len() > MAX_FLIGHTS {
            let old = Duration::from_secs(120);
            f.retain(|_, x| {
                matches!(x.stage, Stage::Deciding { .. } | Stage::Claimed) || x.at.elapsed() < old
            });
        }
        let mut claimed = Vec::with_capacity(chunks.len());
        for c in chunks {
            let took = f.get(&c.digest).is_some_and(|x| {
                x.layer == *layer
                    && x.offset == c.offset
                    && matches!(
                        x.stage,
                        Stage::Claimed | Stage::Deciding { claimed: true, .. }
                    )
            });
            claimed.push(took);
            f.insert(
                c.digest.clone(),
                Flight {
                    layer: layer.clone(),
                    offset: c.offset,
                    stage: Stage::Deciding {
                        asked: BTreeMap::new(),
                        claimed: took,
                    },
                    at: Instant::now(),
                },
            );
        }
        let guard = Deciding {
            rollout: self,
            chunks,
        };
        (guard, claimed)
    }

    /// `chunks`, being decided, are fetched here without asking.
    fn fetch_here(&self, chunks: &[ChunkLoc]) {
        let mut f = self.flights.lock();
        for c in chunks {
            if let Some(x) = f.get_mut(&c.digest) {
                x.stage = Stage::Fetching;
                x.at = Instant::now();
            }
        }
        self.decisions
            .here
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
    }

    /// The peer at `url` calls itself `id` (in an answer).
    fn learn_id(&self, url: &str, id: &str) {
        let id = id.trim().trim_end_matches('/').to_string();
        self.ids.lock().insert(url.to_string(), id);
    }

    /// Chunks decided (each with whether a peer is waited on for it, else
    /// it is fetched here).
    fn decided<'c>(&self, chunks: impl IntoIterator<Item = (&'c ChunkLoc, bool)>) {
        let mut f = self.flights.lock();
        for (c, waiting) in chunks {
            if let Some(x) = f.get_mut(&c.digest) {
                x.stage = if waiting {
                    Stage::Waiting
                } else {
                    Stage::Fetching
                };
                x.at = Instant::now();
            }
        }
    }

    /// Take chunk `c` of `layer` on for a peer, unless this node has a
    /// flight for it already or takes on too much; whether it did.
    fn claim(&self, layer: &Digest, c: &AskedChunk) -> bool {
        if self.claiming.load(Ordering::Relaxed) >= MAX_CLAIMS {
            return false;
        }
        let mut f = self.flights.lock();
        if f.contains_key(&c.digest) {
            return false;
        }
        f.insert(
            c.digest.clone(),
            Flight {
                layer: layer.clone(),
                offset: c.offset,
                stage: Stage::Claimed,
                at: Instant::now(),
            },
        );
        self.claiming.fetch_add(1, Ordering::Relaxed);
        self.decisions.claims.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A chunk taken on is done (stored, or failed everywhere): forget it
    /// if it never came to be decided.
    fn claim_done(&self, chunk: &Digest) {
        self.claiming.fetch_sub(1, Ordering::Relaxed);
        let mut f = self.flights.lock();
        if f.get(chunk)
            .is_some_and(|x| matches!(x.stage, Stage::Claimed))
        {
            f.remove(chunk);
        }
    }

    /// What this node says of chunk `c` of `layer` to `asker`, from its
    /// flights (`running`: whether its fetcher runs the chunk's job); a
    /// question reaching a chunk being decided is remembered.
    fn holding(&self, layer: &Digest, c: &AskedChunk, asker: &str, running: bool) -> Holding {
        let mut f = self.flights.lock();
        let Some(x) = f
            .get_mut(&c.digest)
            .filter(|x| x.layer == *layer && x.offset == c.offset)
        else {
            return Holding::Neither;
        };
        match &mut x.stage {
            Stage::Deciding { asked, claimed } => {
                if asked.len() < 256 {
                    asked.insert(asker.to_string(), c.claimed);
                }
                if *claimed {
                    Holding::Claimed
                } else {
                    Holding::Deciding
                }
            }
            Stage::Claimed => Holding::Claimed,
            Stage::Fetching if running => Holding::Fetching,
            _ => Holding::Neither,
        }
    }
}

/// Chunks being decided; undecided ones are forgotten on drop.
struct Deciding<'a> {
    rollout: &'a Rollout,
    chunks: &'a [ChunkLoc],
}

impl Drop for Deciding<'_> {
    fn drop(&mut self) {
        let mut f = self.rollout.flights.lock();
        for c in self.chunks {
            if f.get(&c.digest)
                .is_some_and(|x| matches!(x.stage, Stage::Deciding { .. }))
            {
                f.remove(&c.digest);
            }
        }
    }
}

/// A peer as the decision sees it.
struct PeerView {
    /// Its id (what it calls itself; its URL when it did not answer).
    id: String,
    /// Its answer, per chunk, if it answered.
    answer: Option<Vec<Holding>>,
    /// Per chunk, whether it asked this node about it while this node was
    /// deciding, and if so whether it had taken it on.
    asked_me: Vec<Option<bool>>,
    /// The expected cost of a read from it.
    cost: f64,
}

/// Per chunk (`claimed`: whether this node took each on for a peer), the
/// peer to take it from (an index into `peers`), or `None`: fetch it here.
/// `over(a, b, i)`: node `a` ranks above node `b` for chunk `i`. A peer
/// that has it comes first, then one fetching it, then the highest-ranked
/// one that took it on (for a chunk this node took on too, only one ranked
/// above it), then the highest-ranked one deciding on it too above `me`
/// (not for a chunk this node took on: it fetches those). The previous
/// chunk's peer is kept when it is as good, so that neighbours make one
/// request.
fn choose(
    me: &str,
    peers: &[PeerView],
    claimed: &[bool],
    over: impl Fn(&str, &str, usize) -> bool,
) -> Vec<Option<(usize, Holding)>> {
    let mut out: Vec<Option<(usize, Holding)>> = Vec::with_capacity(claimed.len());
    for (i, &mine) in claimed.iter().enumerate() {
        let rank = |p: &PeerView| -> Option<(u8, Holding)> {
            let said = p.answer.as_ref().and_then(|a| a.get(i)).copied();
            let asked = p.asked_me.get(i).copied().flatten();
            let up = || over(&p.id, me, i);
            match said {
                Some(Holding::Have) => return Some((0, Holding::Have)),
                Some(Holding::Fetching) => return Some((1, Holding::Fetching)),
                _ => {}
            }
            let took = said == Some(Holding::Claimed) || asked == Some(true);
            if took && (!mine || up()) {
                return Some((2, Holding::Claimed));
            }
            let deciding = said == Some(Holding::Deciding) || asked == Some(false);
            (deciding && !mine && up()).then_some((3, Holding::Deciding))
        };
        let best = peers.iter().filter_map(rank).map(|(r, _)| r).min();
        let Some(best) = best else {
            out.push(None);
            continue;
        };
        let prev = out
            .last()
            .copied()
            .flatten()
            .filter(|(k, _)| rank(&peers[*k]).is_some_and(|(r, _)| r == best));
        let pick = prev.map(|(k, _)| k).or_else(|| {
            (0..peers.len())
                .filter(|&k| rank(&peers[k]).is_some_and(|(r, _)| r == best))
                .min_by(|&a, &b| {
                    if best >= 2 {
                        // The top of those that took it on or decide on
                        // it: it waits on nobody among them.
                        if over(&peers[a].id, &peers[b].id, i) {
                            std::cmp::Ordering::Less
                        } else {
                            std::cmp::Ordering::Greater
                        }
                    } else {
                        peers[a].cost.total_cmp(&peers[b].cost)
                    }
                })
        });
        out.push(pick.and_then(|k| rank(&peers[k]).map(|(_, h)| (k, h))));
    }
    out
}

/// POST `query` as JSON to the peer at `url` (`/cache/PATH`) and parse its
/// answer of at most `max` bytes (`what` names it in errors); the error as
/// text, for the asker's log.
async fn post_question<Q: Serialize, A: serde::de::DeserializeOwned>(
    peers: &crate::peer::Peers,
    url: &str,
    path: &str,
    query: &Q,
    max: usize,
    what: &str,
) -> Result<A, String> {
    let resp = peers
        .client()
        .post(format!("{url}/cache/{path}"))
        .json(query)
        .timeout(QUERY_TIMEOUT)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| breakfs_index::Causes(&e).to_string())?;
    let body = breakfs_fetch::guard::body_within(resp, max, what)
        .await
        .map_err(|e| breakfs_index::Causes(&e).to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, answer: Option<Vec<Holding>>, asked_me: Vec<bool>, cost: f64) -> PeerView {
        PeerView {
            id: id.into(),
            answer,
            asked_me: asked_me.into_iter().map(|a| a.then_some(false)).collect(),
            cost,
        }
    }

    /// The smaller id ranks higher, for every chunk.
    fn by_id(a: &str, b: &str, _: usize) -> bool {
        a < b
    }

    #[test]
    fn holders_come_first_then_fetchers_then_higher_ranks_deciding() {
        use Holding::*;
        let peers = [
            view(
                "http://a",
                Some(vec![Deciding, Deciding, Neither]),
                vec![false; 3],
                1.0,
            ),
            view(
                "http://c",
                Some(vec![Fetching, Have, Neither]),
                vec![false; 3],
                2.0,
            ),
            view(
                "http://d",
                Some(vec![Have, Deciding, Neither]),
                vec![false; 3],
                3.0,
            ),
        ];
        let picks = choose("http://b", &peers, &[false; 3], by_id);
        assert_eq!(picks, vec![Some((2, Have)), Some((1, Have)), None]);
        // Nobody has or fetches the first chunk: the smaller id deciding.
        let peers = [
            view("http://c", Some(vec![Deciding]), vec![false], 1.0),
            view("http://a", Some(vec![Deciding]), vec![false], 2.0),
        ];
        assert_eq!(
            choose("http://b", &peers, &[false; 1], by_id),
            vec![Some((1, Deciding))]
        );
    }

    #[test]
    fn two_nodes_deciding_at_once_agree_on_who_fetches() {
        use Holding::*;
        // b answered "none" to a (a asked before b registered), but b's
        // question reached a while a decided: a counts b as deciding.
        let at_a = [view("http://b", Some(vec![Neither]), vec![true], 1.0)];
        let at_b = [view("http://a", Some(vec![Deciding]), vec![false], 1.0)];
        // a is the smaller id: a fetches, b waits on a.
        assert_eq!(choose("http://a", &at_a, &[false; 1], by_id), vec![None]);
        assert_eq!(
            choose("http://b", &at_b, &[false; 1], by_id),
            vec![Some((0, Deciding))]
        );
        // A peer that did not answer and never asked is not waited on.
        let at_b = [view("http://a", Option::None, vec![false], 1.0)];
        assert_eq!(choose("http://b", &at_b, &[false; 1], by_id), vec![None]);
    }

    #[test]
    fn neighbours_stay_with_one_peer_when_it_is_as_good() {
        use Holding::*;
        let peers = [
            view(
                "http://a",
                Some(vec![Have, Have, Have]),
                vec![false; 3],
                2.0,
            ),
            view(
                "http://c",
                Some(vec![Neither, Have, Have]),
                vec![false; 3],
                1.0,
            ),
        ];
        let picks: Vec<usize> = choose("http://b", &peers, &[false; 3], by_id)
            .into_iter()
            .map(|p| p.unwrap().0)
            .collect();
        assert_eq!(picks, vec![0, 0, 0]);
    }

    #[test]
    fn questions_reaching_a_deciding_chunk_are_remembered() {
        let r = Rollout::default();
        let layer = Digest::of(b"layer");
        let loc = ChunkLoc {
            layer: layer.clone(),
            offset: 10,
            compressed_end: 20,
            inner_offset: 0,
            size: 5,
            digest: Digest::of(b"chunk"),
        };
        let asked = AskedChunk {
            digest: loc.digest.clone(),
            offset: 10,
            end: 20,
            inner: 0,
            size: 5,
            claimed: false,
        };
        assert_eq!(
            r.holding(&layer, &asked, "http://x", true),
            Holding::Neither
        );
        let chunks = [loc];
        {
            let (_d, claimed) = r.deciding(&layer, &chunks);
            assert_eq!(claimed, [false]);
            assert_eq!(
                r.holding(&layer, &asked, "http://x", true),
                Holding::Deciding
            );
            let f = r.flights.lock();
            let Some(Flight {
                stage: Stage::Deciding { asked: by, .. },
                ..
            }) = f.get(&chunks[0].digest)
            else {
                panic!("not deciding");
            };
            assert_eq!(by.get("http://x"), Some(&false));
        }
        // Dropped undecided: forgotten.
        assert_eq!(
            r.holding(&layer, &asked, "http://x", true),
            Holding::Neither
        );
    }

    #[test]
    fn a_chunk_taken_on_is_answered_claimed_until_decided_and_then_fetched_here() {
        let r = Rollout::default();
        let layer = Digest::of(b"layer");
        let loc = ChunkLoc {
            layer: layer.clone(),
            offset: 0,
            compressed_end: 100,
            inner_offset: 0,
            size: 50,
            digest: Digest::of(b"chunk"),
        };
        let asked = AskedChunk {
            digest: loc.digest.clone(),
            offset: 0,
            end: 100,
            inner: 0,
            size: 50,
            claimed: false,
        };
        assert!(r.claim(&layer, &asked));
        // Once: a second asker finds the flight.
        assert!(!r.claim(&layer, &asked));
        assert_eq!(
            r.holding(&layer, &asked, "http://x", false),
            Holding::Claimed
        );
        let chunks = [loc];
        {
            let (_d, claimed) = r.deciding(&layer, &chunks);
            assert_eq!(claimed, [true]);
            assert_eq!(
                r.holding(&layer, &asked, "http://y", true),
                Holding::Claimed
            );
        }
        r.claim_done(&chunks[0].digest);
        assert_eq!(r.decisions.claims.load(Ordering::Relaxed), 1);
        assert_eq!(r.claiming.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_peer_that_took_a_chunk_on_is_waited_on_and_a_taker_waits_only_upwards() {
        use Holding::*;
        let peers = [
            view(
                "http://a",
                Some(vec![Deciding, Claimed, Neither]),
                vec![false; 3],
                1.0,
            ),
            view(
                "http://c",
                Some(vec![Claimed, Deciding, Fetching]),
                vec![false; 3],
                2.0,
            ),
        ];
        // Not taken on here: a taker comes before one deciding.
        assert_eq!(
            choose("http://b", &peers, &[false; 3], by_id),
            vec![Some((1, Claimed)), Some((0, Claimed)), Some((1, Fetching))]
        );
        // Taken on here: never wait on one deciding, only on a taker
        // ranked above (a < b < c), or on a fetch under way.
        assert_eq!(
            choose("http://b", &peers, &[true; 3], by_id),
            vec![None, Some((0, Claimed)), Some((1, Fetching))]
        );
        // A taker that asked while this node decided counts as a taker.
        let asked = [PeerView {
            id: "http://c".into(),
            answer: Some(vec![Neither]),
            asked_me: vec![Some(true)],
            cost: 1.0,
        }];
        assert_eq!(
            choose("http://b", &asked, &[false], by_id),
            vec![Some((0, Claimed))]
        );
    }
}
