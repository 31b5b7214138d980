//! Asking the peers about the chunks of a range before it is fetched:
//! each chunk's owner first (one question per owner; the chunks this node
//! owns are fetched here at once), then, for the chunks their owner had
//! nothing to say of or that did not answer, every peer (`choose` decides
//! among their answers).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use breakfs_fetch::{ChunkLoc, PEER_REST, Plan, Priority, Source};
use breakfs_index::Digest;
use futures::future::BoxFuture;

use super::{
    AskedChunk, Flight, HaveAnswer, HaveQuery, Holding, MAX_QUERY_CHUNKS, PeerView, PeerWait,
    Stage, choose, host_of, split,
};
use crate::peer::Peers;

/// The peers' plan for `chunks` of `layer` ([`Source::plan`]), fetched at
/// `prio`: `None` when there is no peer to ask.
///
/// Each chunk's owner (the node owning its stripe among this node and all
/// its peers that answer, `split::owner`) is asked first, one question
/// per owner; the chunks this node owns are fetched here without asking
/// (their askers wait on this node). Only the chunks whose owner has,
/// fetches, took on or decides on nothing of them (it does not serve the
/// layer: the nodes that want it split it among themselves) or did not
/// answer are asked of every peer.
pub(crate) fn plan<'a>(
    peers: &'a Peers,
    layer: &'a Digest,
    chunks: &'a [ChunkLoc],
    prio: Priority,
) -> Option<BoxFuture<'a, Plan>> {
    let r = &peers.rollout;
    let urls: Vec<String> = peers.urls().into_iter().filter(|u| !r.resting(u)).collect();
    if urls.is_empty() || chunks.is_empty() || chunks.len() > MAX_QUERY_CHUNKS {
        return None;
    }
    Some(Box::pin(async move {
        let (deciding, claimed) = r.deciding(layer, chunks);
        if claimed.iter().all(|&c| c) && r.interest.members(layer).len() >= urls.len() {
            // Every chunk was taken on for a peer, and as many nodes as
            // this node has peers want the layer: it owns their stripes
            // among all of them, so no peer is asked about them before
            // the fetch (a node knowing fewer that took one on too ranks
            // below it and waits on it).
            r.fetch_here(chunks);
            drop(deciding);
            return vec![None; chunks.len()];
        }
        let mut picks: Vec<Option<(usize, Holding)>> = vec![None; chunks.len()];
        // Owners first only for a layer no peer is known to hold: where one
        // holds it (a hydrated peer, a seed), every peer is asked, so the
        // chunks this node owns are taken from the holder, not the cloud
        // (which may be down).
        let ids = (!peers.someone_holds_some(layer))
            .then(|| ids_of(peers, &urls))
            .flatten();
        let open: Vec<usize> = match ids {
            Some(ids) => {
                ask_owners(
                    peers, &urls, &ids, layer, chunks, &claimed, prio, &mut picks,
                )
                .await
            }
            None => (0..chunks.len()).collect(),
        };
        if !open.is_empty() {
            let sub: Vec<ChunkLoc> = open.iter().map(|&i| chunks[i].clone()).collect();
            let sub_claimed: Vec<bool> = open.iter().map(|&i| claimed[i]).collect();
            let got = ask_all(peers, &urls, layer, &sub, &sub_claimed, prio).await;
            for (&i, p) in open.iter().zip(got) {
                picks[i] = p;
            }
        }
        drop(deciding);
        let d = &r.decisions;
        let wait = r.wait();
        let mut sources: HashMap<usize, Arc<dyn Source>> = HashMap::new();
        picks
            .into_iter()
            .map(|p| {
                let counter = match p.map(|(_, h)| h) {
                    Some(Holding::Have) => &d.from_holder,
                    Some(Holding::Fetching) => &d.from_fetching,
                    Some(Holding::Claimed) => &d.from_claimed,
                    Some(_) => &d.from_deciding,
                    None => &d.here,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let (k, _) = p?;
                let src = sources.entry(k).or_insert_with(|| {
                    Arc::new(PeerWait {
                        url: urls[k].clone(),
                        host: host_of(&urls[k]),
                        client: peers.client().clone(),
                        wait,
                        links: peers.links().clone(),
                    })
                });
                Some(src.clone())
            })
            .collect()
    }))
}

/// The ids of the peers at `urls` (from their cache indexes, else from
/// their answers), or `None` while one is unknown.
fn ids_of(peers: &Peers, urls: &[String]) -> Option<Vec<String>> {
    let known = peers.rollout.ids.lock();
    urls.iter()
        .map(|u| peers.id_of(u).or_else(|| known.get(u).cloned()))
        .collect()
}

/// The question about `chunks` (each with whether this node took it on)
/// of `layer`.
fn query<'c>(
    me: &str,
    layer: &Digest,
    chunks: impl Iterator<Item = (&'c ChunkLoc, bool)>,
    prio: Priority,
) -> HaveQuery {
    HaveQuery {
        node: me.to_string(),
        layer: layer.clone(),
        chunks: chunks
            .map(|(c, claimed)| AskedChunk {
                digest: c.digest.clone(),
                offset: c.offset,
                end: c.compressed_end,
                inner: c.inner_offset,
                size: c.size,
                claimed,
            })
            .collect(),
        background: prio == Priority::Background,
    }
}

/// Ask each chunk's owner among this node and the peers at `urls` (ids
/// `ids`) about it, one question per owner; the chunks this node owns are
/// fetched here. Fills `picks` for the chunks their owner has, fetches,
/// took on or decides on; the indices of the rest (the owner had nothing
/// to say of them, or did not answer), to be asked of every peer.
///
/// Waits go only to an owner, ranked above this node for the chunk's
/// stripe, which itself asks nobody about its own stripes: no cycle.
#[allow(clippy::too_many_arguments)]
async fn ask_owners(
    peers: &Peers,
    urls: &[String],
    ids: &[String],
    layer: &Digest,
    chunks: &[ChunkLoc],
    claimed: &[bool],
    prio: Priority,
    picks: &mut [Option<(usize, Holding)>],
) -> Vec<usize> {
    let r = &peers.rollout;
    let me = peers.me();
    let mut by_owner: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut mine = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        match split::owner(me, ids, layer, c.offset) {
            None => mine.push(i),
            Some(k) => by_owner.entry(k).or_default().push(i),
        }
    }
    r.decided(mine.iter().map(|&i| (&chunks[i], false)));
    let asked = by_owner.into_iter().map(|(k, idx)| async move {
        let q = query(
            me,
            layer,
            idx.iter().map(|&i| (&chunks[i], claimed[i])),
            prio,
        );
        let a = ask(peers, &urls[k], &q).await;
        (k, idx, a)
    });
    let mut open = Vec::new();
    let mut waiting = Vec::new();
    for (k, idx, answer) in futures::future::join_all(asked).await {
        let Some(a) = answer else {
            open.extend(idx);
            continue;
        };
        for (i, h) in idx.into_iter().zip(a.chunks) {
            if h == Holding::Neither {
                open.push(i);
            } else {
                picks[i] = Some((k, h));
                waiting.push(i);
            }
        }
    }
    r.decided(waiting.iter().map(|&i| (&chunks[i], true)));
    open.sort_unstable();
    open
}

/// Ask every peer at `urls` about `chunks` of `layer` (`claimed`: whether
/// this node took each on), and decide per chunk whom to take it from
/// (`choose`), or `None`: fetch it here.
async fn ask_all(
    peers: &Peers,
    urls: &[String],
    layer: &Digest,
    chunks: &[ChunkLoc],
    claimed: &[bool],
    prio: Priority,
) -> Vec<Option<(usize, Holding)>> {
    let r = &peers.rollout;
    let query = query(
        peers.me(),
        layer,
        chunks.iter().zip(claimed.iter().copied()),
        prio,
    );
    let answers = futures::future::join_all(urls.iter().map(|u| ask(peers, u, &query))).await;
    let mut views: Vec<PeerView> = urls
        .iter()
        .zip(answers)
        .map(|(u, a)| PeerView {
            id: a.as_ref().map_or_else(|| u.clone(), |a| a.node.clone()),
            answer: a.map(|a| a.chunks),
            asked_me: vec![None; chunks.len()],
            cost: peers.links().cost(u, 1 << 20),
        })
        .collect();
    let mut f = r.flights.lock();
    for (i, c) in chunks.iter().enumerate() {
        if let Some(Flight {
            stage: Stage::Deciding { asked, .. },
            ..
        }) = f.get(&c.digest)
        {
            for v in views.iter_mut() {
                if let Some(&took) = asked.get(&v.id) {
                    v.asked_me[i] = Some(took);
                }
            }
        }
    }
    let over = |a: &str, b: &str, i: usize| split::above(a, b, layer, chunks[i].offset);
    let picks = choose(peers.me(), &views, claimed, over);
    for (c, p) in chunks.iter().zip(&picks) {
        if let Some(x) = f.get_mut(&c.digest) {
            x.stage = match p {
                Some(_) => Stage::Waiting,
                None => Stage::Fetching,
            };
            x.at = Instant::now();
        }
    }
    picks
}

/// Ask the peer at `url` about `query`; `None` (and the peer passed over
/// for a while) when it does not answer in time or answers nonsense.
async fn ask(peers: &Peers, url: &str, query: &HaveQuery) -> Option<HaveAnswer> {
    let began = Instant::now();
    let r = async {
        let a: HaveAnswer = super::post_question(
            peers,
            url,
            "have",
            query,
            64 + 16 * query.chunks.len() + 1024,
            "a have answer",
        )
        .await?;
        if a.chunks.len() != query.chunks.len() {
            return Err(format!(
                "it answered for {} chunks, not the {} asked",
                a.chunks.len(),
                query.chunks.len()
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
            let rollout = &peers.rollout;
            rollout
                .decisions
                .failed_questions
                .fetch_add(1, Ordering::Relaxed);
            peers.links().failure(url);
            tracing::warn!(peer = %url, "asking which chunks it has failed: {e}; not asked again for {PEER_REST:?}");
            rollout.rest(url);
            None
        }
    }
}
