//! Image metadata in a rollout: an image's config and its layers' TOCs are
//! what every node reads before any chunk, so nodes starting one image at
//! once share them as they share chunks. Before a node reads one from the
//! cloud it asks each peer once (`POST /cache/meta`, answered from memory;
//! reads that start together, as a mount's TOCs do, share one question
//! per peer) whether it has it, is reading it, or is deciding on it right now; it
//! takes it from a peer that has it, waits on one reading it
//! (`GET /cache/meta/{kind}/{digest}`, held by that peer's server until its
//! read ends, bounded), or, among the nodes deciding at once, waits on the
//! one ranked highest for it (`super::split`'s rendezvous order), which
//! reads it. So the nodes split the image's TOCs among themselves and each
//! crosses the cloud link once.
//!
//! Only what can be checked is shared: a TOC by its layer's TOC digest
//! annotation, a config by its digest (the fetcher checks both). A peer
//! that does not answer, stalls past the wait, dies, or sends bytes that
//! do not check out costs a read from the cloud, never a failed mount.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use breakfs_fetch::{Meta, MetaTurn, PEER_REST, toc_tail_name};
use breakfs_index::{Causes, Digest};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Holding, WAIT_HEADER, host_of, split};
use crate::peer::Peers;
use crate::server::NodeService;

/// Largest metadata answer: a TOC's gzip member of a layer with a hundred
/// thousand files is a few MiB.
const MAX_META: u64 = 32 << 20;

/// Largest blob served as metadata: configs are a few KiB.
const MAX_META_BLOB: u64 = 4 << 20;

/// Metadata reads under way at most (each ends within a read).
const MAX_META_FLIGHTS: usize = 4096;

/// Where the rendezvous order of one piece of metadata is taken: past any
/// stripe of a real layer.
const META_RANK_OFFSET: u64 = u64::MAX;

/// A question to a peer: whether it has, reads or decides on each item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaQuery {
    /// The asking node's id (its URL).
    pub node: String,
    /// The metadata asked about.
    pub items: Vec<MetaItem>,
}

/// One piece of metadata asked about.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaItem {
    /// `toc` (a layer's TOC, by the layer's digest) or `blob` (a config).
    pub kind: String,
    /// The layer or blob.
    pub digest: Digest,
}

/// A peer's answer to a [`MetaQuery`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaAnswer {
    /// The answering node's id (its URL).
    pub node: String,
    /// What it says of each item, in order.
    pub items: Vec<Holding>,
}

/// Items in one question at most.
const MAX_META_ITEMS: usize = 1024;

/// How long a question waits for others to go with it: the reads of an
/// image's TOCs all start within one turn of the mount's task.
const BATCH_WINDOW: Duration = Duration::from_millis(1);

/// One piece of metadata: its kind and digest.
type Key = (&'static str, Digest);

fn kind_of(s: &str) -> Option<&'static str> {
    ["toc", "blob"].into_iter().find(|k| *k == s)
}

/// Where a read of metadata on this node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Asking the peers.
    Deciding,
    /// Read from the chain (the cloud), not from a peer.
    Reading,
    /// Waiting on a peer.
    Waiting,
}

struct Flight {
    stage: Stage,
    /// Who asked this node about it while it was deciding.
    asked: BTreeSet<String>,
    /// Dropped when the read ends: a peer's request held on it goes on.
    done: watch::Sender<()>,
    id: u64,
}

/// What a node decided for the metadata it read, and the waits it held,
/// by kind (for metrics).
#[derive(Default)]
pub(crate) struct MetaDecisions {
    /// Taken from a peer that had it.
    pub(crate) from_holder: AtomicU64,
    /// Waited on a peer reading it.
    pub(crate) from_fetching: AtomicU64,
    /// Waited on a peer deciding at the same time, ranked higher.
    pub(crate) from_deciding: AtomicU64,
    /// Read here (no peer had it or was getting it).
    pub(crate) here: AtomicU64,
    /// Waits on a peer that failed (read here after all).
    pub(crate) failed: AtomicU64,
    /// Peer requests held now for metadata this node reads.
    pub(crate) waiting: AtomicU64,
    /// Peer requests held for it that were answered, or not.
    pub(crate) waits_served: AtomicU64,
    pub(crate) waits_missed: AtomicU64,
}

/// The metadata reads of a node, for peers asking.
#[derive(Default)]
pub(crate) struct Metas {
    flights: Mutex<HashMap<Key, Flight>>,
    seq: AtomicU64,
    /// The question being gathered, not sent yet.
    open: Mutex<Option<Arc<Batch>>>,
    /// What was decided.
    pub(crate) decisions: MetaDecisions,
}

impl Metas {
    /// What this node says of `key` to `asker` from its reads; a question
    /// reaching a read being decided is remembered.
    fn holding(&self, key: &Key, asker: &str) -> Holding {
        let mut f = self.flights.lock();
        let Some(x) = f.get_mut(key) else {
            return Holding::Neither;
        };
        match x.stage {
            Stage::Deciding => {
                if x.asked.len() < 256 {
                    x.asked.insert(asker.to_string());
                }
                Holding::Deciding
            }
            Stage::Reading => Holding::Fetching,
            // It waits on a peer: waiting on it would not go up the order.
            Stage::Waiting => Holding::Neither,
        }
    }

    /// A watch that ends when this node's read of `key` ends, if one is
    /// under way.
    fn watch(&self, key: &Key) -> Option<watch::Receiver<()>> {
        self.flights.lock().get(key).map(|x| x.done.subscribe())
    }

    fn set_stage(&self, key: &Key, id: u64, stage: Stage) {
        if let Some(x) = self.flights.lock().get_mut(key).filter(|x| x.id == id) {
            x.stage = stage;
        }
    }
}

/// The peers' answers to one question, per peer asked (`None`: no
/// answer), each per item.
type Answers = Arc<Vec<Option<MetaAnswer>>>;

/// A question going out: the peers asked and their answers, once in.
type Asked = futures::future::Shared<BoxFuture<'static, (Arc<Vec<String>>, Answers)>>;

/// Reads of metadata asked about in one question per peer.
struct Batch {
    /// The items; closed (taken) when the question goes out.
    keys: Mutex<Option<Vec<Key>>>,
    /// The question.
    answers: Asked,
}

impl Metas {
    /// Add `key` to the question being gathered, or start one (asked of
    /// `urls` after [`BATCH_WINDOW`]); where its answers come and the
    /// key's place in them.
    fn ask_with_others(&self, peers: &Arc<Peers>, urls: Vec<String>, key: &Key) -> (Asked, usize) {
        use futures::FutureExt as _;
        let mut open = self.open.lock();
        if let Some(b) = open.as_ref()
            && let Some(keys) = b.keys.lock().as_mut()
            && keys.len() < MAX_META_ITEMS
        {
            keys.push(key.clone());
            return (b.answers.clone(), keys.len() - 1);
        }
        let batch = Arc::new_cyclic(|me: &std::sync::Weak<Batch>| {
            let (me, peers) = (me.clone(), peers.clone());
            let answers = async move {
                tokio::time::sleep(BATCH_WINDOW).await;
                let keys = me
                    .upgrade()
                    .and_then(|b| {
                        let mut open = peers.rollout.metas.open.lock();
                        if open.as_ref().is_some_and(|o| Arc::ptr_eq(o, &b)) {
                            *open = None;
                        }
                        b.keys.lock().take()
                    })
                    .unwrap_or_default();
                let query = MetaQuery {
                    node: peers.me().to_string(),
                    items: keys
                        .iter()
                        .map(|(kind, digest)| MetaItem {
                            kind: kind.to_string(),
                            digest: digest.clone(),
                        })
                        .collect(),
                };
                let answers = if keys.is_empty() {
                    vec![None; urls.len()]
                } else {
                    let asked = urls.iter().map(|u| ask(&peers, u, &query));
                    futures::future::join_all(asked).await
                };
                (Arc::new(urls), Arc::new(answers))
            }
            .boxed()
            .shared();
            Batch {
                keys: Mutex::new(Some(vec![key.clone()])),
                answers,
            }
        });
        let answers = batch.answers.clone();
        *open = Some(batch);
        (answers, 0)
    }
}

/// A read of metadata registered on this node; forgotten when dropped
/// (after the fetcher recorded what it read), which lets go of the peers
/// waiting on it.
struct Turn {
    peers: Arc<Peers>,
    key: Key,
    id: u64,
}

impl Turn {
    /// Register a read of `key` as being decided; `None` when this node
    /// reads it already (a second reader goes its own way) or reads too
    /// much at once.
    fn register(peers: &Arc<Peers>, key: &Key) -> Option<Turn> {
        let metas = &peers.rollout.metas;
        let mut f = metas.flights.lock();
        if f.contains_key(key) || f.len() >= MAX_META_FLIGHTS {
            return None;
        }
        let id = metas.seq.fetch_add(1, Ordering::Relaxed);
        f.insert(
            key.clone(),
            Flight {
                stage: Stage::Deciding,
                asked: BTreeSet::new(),
                done: watch::channel(()).0,
                id,
            },
        );
        Some(Turn {
            peers: peers.clone(),
            key: key.clone(),
            id,
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut f = self.peers.rollout.metas.flights.lock();
        if f.get(&self.key).is_some_and(|x| x.id == self.id) {
            f.remove(&self.key);
        }
    }
}

/// A peer as the decision on one piece of metadata sees it.
struct View {
    /// Its id (what it calls itself; its URL when it did not answer).
    id: String,
    /// What it said, if it answered.
    said: Option<Holding>,
    /// Whether it asked this node while this node was deciding.
    asked_me: bool,
    /// The expected cost of a read from it.
    cost: f64,
}

/// The peer to take metadata from (an index into `peers`), or `None`:
/// read it here. A peer that has it comes first, then one reading it
/// (cheapest first), then the highest-ranked one deciding on it too if it
/// ranks above `me` (`over(a, b)`: `a` ranks above `b`).
fn choose(me: &str, peers: &[View], over: impl Fn(&str, &str) -> bool) -> Option<(usize, Holding)> {
    let cheapest = |h: Holding| {
        (0..peers.len())
            .filter(|&k| peers[k].said == Some(h))
            .min_by(|&a, &b| peers[a].cost.total_cmp(&peers[b].cost))
            .map(|k| (k, h))
    };
    cheapest(Holding::Have)
        .or_else(|| cheapest(Holding::Fetching))
        .or_else(|| {
            let deciding = (0..peers.len())
                .filter(|&k| peers[k].said == Some(Holding::Deciding) || peers[k].asked_me);
            let top = deciding.reduce(|a, b| {
                if over(&peers[b].id, &peers[a].id) {
                    b
                } else {
                    a
                }
            });
            top.filter(|&k| over(&peers[k].id, me))
                .map(|k| (k, Holding::Deciding))
        })
}

/// The peers' turn on `meta` ([`breakfs_fetch::Source::metadata`]):
/// `None` when there is no peer to ask.
pub(crate) fn turn<'a>(peers: &'a Arc<Peers>, meta: Meta<'a>) -> Option<BoxFuture<'a, MetaTurn>> {
    let r = &peers.rollout;
    let urls: Vec<String> = peers.urls().into_iter().filter(|u| !r.resting(u)).collect();
    if urls.is_empty() {
        return None;
    }
    Some(Box::pin(async move {
        let key: Key = (meta.kind(), meta.desc().digest.clone());
        let Some(turn) = Turn::register(peers, &key) else {
            return MetaTurn::here();
        };
        let metas = &r.metas;
        let (answers, at) = metas.ask_with_others(peers, urls, &key);
        let (urls, answers) = answers.await;
        let pick = {
            let asked = metas
                .flights
                .lock()
                .get(&key)
                .map(|x| x.asked.clone())
                .unwrap_or_default();
            let views: Vec<View> = urls
                .iter()
                .zip(answers.iter())
                .map(|(u, a)| {
                    let id = a.as_ref().map_or_else(|| u.clone(), |a| a.node.clone());
                    View {
                        asked_me: asked.contains(&id),
                        id,
                        said: a.as_ref().and_then(|a| a.items.get(at).copied()),
                        cost: peers.links().cost(u, 64 << 10),
                    }
                })
                .collect();
            let over = |a: &str, b: &str| split::above(a, b, &key.1, META_RANK_OFFSET);
            choose(peers.me(), &views, over)
        };
        let d = &metas.decisions;
        let Some((k, said)) = pick else {
            metas.set_stage(&key, turn.id, Stage::Reading);
            d.here.fetch_add(1, Ordering::Relaxed);
            return MetaTurn {
                got: None,
                turn: Box::new(turn),
            };
        };
        metas.set_stage(&key, turn.id, Stage::Waiting);
        let url = &urls[k];
        match get(peers, url, meta, r.wait()).await {
            Ok(bytes) => {
                let counter = match said {
                    Holding::Have => &d.from_holder,
                    Holding::Fetching => &d.from_fetching,
                    _ => &d.from_deciding,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                MetaTurn {
                    got: Some((format!("peer {}", host_of(url)), bytes)),
                    turn: Box::new(turn),
                }
            }
            Err(e) => {
                d.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    peer = %url,
                    "waiting on it for the {} of {} failed: {e}; reading it here",
                    meta.kind(),
                    key.1
                );
                // Peers waiting on this node now wait on its own read.
                metas.set_stage(&key, turn.id, Stage::Reading);
                MetaTurn {
                    got: None,
                    turn: Box::new(turn),
                }
            }
        }
    }))
}

/// Ask the peer at `url` about `query`; `None` (and the peer passed over
/// for a while) when it does not answer in time or answers nonsense.
async fn ask(peers: &Peers, url: &str, query: &MetaQuery) -> Option<MetaAnswer> {
    let began = Instant::now();
    let r = async {
        let a: MetaAnswer = super::post_question(
            peers,
            url,
            "meta",
            query,
            1024 + 16 * query.items.len(),
            "a metadata answer",
        )
        .await?;
        if a.items.len() != query.items.len() {
            return Err(format!(
                "it answered for {} items, not the {} asked",
                a.items.len(),
                query.items.len()
            ));
        }
        Ok(a)
    }
    .await;
    match r {
        Ok(a) => {
            peers.links().rtt(url, began.elapsed().as_secs_f64());
            peers.rollout.learn_id(url, &a.node);
            Some(a)
        }
        Err(e) => {
            peers.links().failure(url);
            tracing::warn!(peer = %url, "asking whether it has metadata failed: {e}; not asked again for {PEER_REST:?}");
            peers.rollout.rest(url);
            None
        }
    }
}

/// `meta`'s bytes from the peer at `url`, waiting at most `wait` on its
/// read of them (unverified: the fetcher checks them).
async fn get(peers: &Peers, url: &str, meta: Meta<'_>, wait: Duration) -> Result<Vec<u8>, String> {
    let desc = meta.desc();
    let resp = peers
        .client()
        .get(format!("{url}/cache/meta/{}/{}", meta.kind(), desc.digest))
        .header(WAIT_HEADER, wait.as_millis().to_string())
        .timeout(wait + Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| {
            // Dead or stalled: pass it over for a while.
            peers.links().failure(url);
            peers.rollout.rest(url);
            Causes(&e).to_string()
        })?;
    if resp.status() != StatusCode::OK {
        return Err(format!("the peer answered {}", resp.status()));
    }
    let max = match meta {
        Meta::Toc(_) => desc.size.min(MAX_META),
        Meta::Blob(_) => desc.size,
    };
    let began = Instant::now();
    let body = breakfs_fetch::guard::body_within(resp, max as usize, "metadata from a peer")
        .await
        .map_err(|e| Causes(&e).to_string())?;
    peers
        .links()
        .transfer(url, body.len() as u64, began.elapsed().as_secs_f64());
    Ok(body)
}

/// Metadata `key` as this node holds it, checked when it was read: a
/// TOC's tail record, or a small blob.
fn held(svc: &NodeService, key: &Key) -> Option<Vec<u8>> {
    let store = &svc.store;
    match key.0 {
        "toc" => store.read_meta(&toc_tail_name(&key.1)).ok().flatten(),
        _ => {
            let small = std::fs::metadata(store.blob_path(&key.1))
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_META_BLOB);
            small
                .then(|| store.read_blob(&key.1).ok().flatten())
                .flatten()
        }
    }
}

/// Whether this node holds metadata `key` (without reading it).
fn holds(svc: &NodeService, key: &Key) -> bool {
    match key.0 {
        "toc" => svc.store.meta_path(&toc_tail_name(&key.1)).is_file(),
        _ => std::fs::metadata(svc.store.blob_path(&key.1))
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_META_BLOB),
    }
}

/// `POST /cache/meta`: whether this node has, reads, or decides on the
/// metadata asked.
pub(crate) async fn question(
    State(svc): State<Arc<NodeService>>,
    body: axum::body::Bytes,
) -> Response {
    let q: MetaQuery = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => {
            let why = format!(
                "the body is not a metadata question ({{\"node\", \"items\": [{{\"kind\": \"toc\"|\"blob\", \"digest\"}}]}}): {e}\n"
            );
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    if q.items.len() > MAX_META_ITEMS {
        let why = format!("at most {MAX_META_ITEMS} items per question\n");
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    let mut keys = Vec::with_capacity(q.items.len());
    for i in &q.items {
        let Some(kind) = kind_of(&i.kind) else {
            let why = format!("kind {:?} is neither \"toc\" nor \"blob\"\n", i.kind);
            return (StatusCode::BAD_REQUEST, why).into_response();
        };
        keys.push((kind, i.digest.clone()));
    }
    let have = {
        let (svc, keys) = (svc.clone(), keys.clone());
        tokio::task::spawn_blocking(move || keys.iter().map(|k| holds(&svc, k)).collect())
            .await
            .unwrap_or_else(|_| Vec::new())
    };
    let metas = &svc.peers.rollout.metas;
    let items = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            if have.get(i).copied().unwrap_or(false) {
                Holding::Have
            } else {
                metas.holding(k, &q.node)
            }
        })
        .collect();
    let answer = MetaAnswer {
        node: svc.peers.me().to_string(),
        items,
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
        .into_response()
}

/// `GET /cache/meta/{kind}/{digest}`: the metadata, checked when this
/// node read it; when this node is reading it, the request waits for that
/// read to end, as long as the `Breakfs-Wait` header says (milliseconds,
/// at most `MAX_WAIT`, 2 s without it).
pub(crate) async fn serve(
    State(svc): State<Arc<NodeService>>,
    Path((kind, digest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (Some(kind), Ok(digest)) = (kind_of(&kind), Digest::parse(&digest)) else {
        let why = "ask for /cache/meta/toc/LAYER or /cache/meta/blob/DIGEST\n";
        return (StatusCode::BAD_REQUEST, why).into_response();
    };
    let key: Key = (kind, digest);
    let read = |svc: Arc<NodeService>, key: Key| async move {
        tokio::task::spawn_blocking(move || held(&svc, &key))
            .await
            .ok()
            .flatten()
    };
    if let Some(b) = read(svc.clone(), key.clone()).await {
        return answer(&svc, b);
    }
    let metas = &svc.peers.rollout.metas;
    let Some(mut done) = metas.watch(&key) else {
        return (
            StatusCode::NOT_FOUND,
            "this node neither has nor reads it\n",
        )
            .into_response();
    };
    let wait = super::asked_wait(&headers);
    let d = &metas.decisions;
    d.waiting.fetch_add(1, Ordering::Relaxed);
    // The sender is only ever dropped: `changed` ends with the read.
    let _ = tokio::time::timeout(wait, done.changed()).await;
    d.waiting.fetch_sub(1, Ordering::Relaxed);
    match read(svc.clone(), key).await {
        Some(b) => {
            d.waits_served.fetch_add(1, Ordering::Relaxed);
            answer(&svc, b)
        }
        None => {
            d.waits_missed.fetch_add(1, Ordering::Relaxed);
            let why = "this node's read of it failed or did not end in time\n";
            (StatusCode::NOT_FOUND, why).into_response()
        }
    }
}

/// The metadata families of the node's Prometheus page.
pub(crate) fn metrics(p: &mut crate::metrics::PromText, d: &MetaDecisions) {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    p.by_label(
        "breakfs_rollout_meta_total",
        "counter",
        "Configs and TOCs this node read, by where its peers' answers sent it: a peer holding \
         it, one reading it, one deciding at the same time ranked higher, here (the next \
         sources), or here after a wait on a peer failed.",
        "from",
        &[
            ("holder", n(&d.from_holder)),
            ("fetching", n(&d.from_fetching)),
            ("deciding", n(&d.from_deciding)),
            ("here", n(&d.here)),
            ("failed", n(&d.failed)),
        ],
    );
    p.single(
        "breakfs_rollout_meta_waits",
        "gauge",
        "Peer requests waiting now for a config or TOC this node is reading.",
        n(&d.waiting),
    );
    p.by_label(
        "breakfs_rollout_meta_waits_total",
        "counter",
        "Peer requests that waited for a config or TOC this node was reading, by outcome.",
        "outcome",
        &[
            ("served", n(&d.waits_served)),
            ("missed", n(&d.waits_missed)),
        ],
    );
}

fn answer(svc: &NodeService, bytes: Vec<u8>) -> Response {
    svc.served.hits.fetch_add(1, Ordering::Relaxed);
    svc.served
        .blob_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, said: Option<Holding>, asked_me: bool, cost: f64) -> View {
        View {
            id: id.into(),
            said,
            asked_me,
            cost,
        }
    }

    /// The smaller id ranks higher.
    fn by_id(a: &str, b: &str) -> bool {
        a < b
    }

    #[test]
    fn a_holder_comes_first_then_a_reader_then_the_top_one_deciding_above_me() {
        use Holding::*;
        let peers = [
            view("http://a", Some(Deciding), false, 1.0),
            view("http://c", Some(Fetching), false, 3.0),
            view("http://d", Some(Have), false, 2.0),
            view("http://e", Some(Have), false, 1.5),
        ];
        assert_eq!(choose("http://b", &peers, by_id), Some((3, Have)));
        assert_eq!(choose("http://b", &peers[..2], by_id), Some((1, Fetching)));
        assert_eq!(choose("http://b", &peers[..1], by_id), Some((0, Deciding)));
        // Deciding but ranked below: this node reads it.
        assert_eq!(choose("http://0", &peers[..1], by_id), None);
        // Nobody answered anything useful.
        let none = [view("http://a", None, false, 1.0)];
        assert_eq!(choose("http://b", &none, by_id), None);
    }

    #[test]
    fn nodes_deciding_at_once_all_wait_on_the_top_one() {
        use Holding::*;
        let ids = ["http://a", "http://b", "http://c", "http://d"];
        // Each saw the others deciding (by answer or by their question).
        let mut readers = Vec::new();
        for me in ids {
            let peers: Vec<View> = ids
                .iter()
                .filter(|i| **i != me)
                .enumerate()
                .map(|(k, i)| {
                    view(
                        i,
                        Some(if k % 2 == 0 { Deciding } else { Neither }),
                        k % 2 == 1,
                        1.0,
                    )
                })
                .collect();
            match choose(me, &peers, by_id) {
                None => readers.push(me),
                Some((k, h)) => {
                    assert_eq!(h, Deciding);
                    assert_eq!(peers[k].id, "http://a", "{me} waits on the top one");
                }
            }
        }
        assert_eq!(readers, ["http://a"]);
    }

    #[test]
    fn questions_reaching_a_read_being_decided_are_remembered_and_a_turn_forgets_it() {
        let peers =
            Peers::new("http://me:1", &[], Arc::new(crate::peer::Links::default())).unwrap();
        let key: Key = ("toc", Digest::of(b"layer"));
        let metas = &peers.rollout.metas;
        assert_eq!(metas.holding(&key, "http://x"), Holding::Neither);
        let turn = Turn::register(&peers, &key).unwrap();
        // One read of it at a time.
        assert!(Turn::register(&peers, &key).is_none());
        assert_eq!(metas.holding(&key, "http://x"), Holding::Deciding);
        assert!(metas.flights.lock()[&key].asked.contains("http://x"));
        metas.set_stage(&key, turn.id, Stage::Reading);
        assert_eq!(metas.holding(&key, "http://y"), Holding::Fetching);
        metas.set_stage(&key, turn.id, Stage::Waiting);
        assert_eq!(metas.holding(&key, "http://y"), Holding::Neither);
        let done = metas.watch(&key).unwrap();
        drop(turn);
        // The watch ends with the turn, and the read is forgotten.
        assert!(done.has_changed().is_err());
        assert_eq!(metas.holding(&key, "http://x"), Holding::Neither);
    }
}
