//! The peer-facing side of a rollout: `POST /cache/have` answers which
//! of the chunks asked this node has, is fetching, took on, or is deciding
//! on, from memory; and takes on the chunks nobody has or fetches in the
//! stripes this node owns (`super::split`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use breakfs_fetch::{ChunkLoc, Priority};

use super::{HaveAnswer, HaveQuery, Holding, MAX_QUERY_CHUNKS, split};
use crate::server::NodeService;

/// `POST /cache/have`: which of the chunks asked this node has, is
/// fetching, or is deciding on.
pub(crate) async fn have(State(svc): State<Arc<NodeService>>, body: axum::body::Bytes) -> Response {
    let q: HaveQuery = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => {
            let why = format!(
                "the body is not a have query ({{\"node\", \"layer\", \"chunks\": [{{\"digest\", \"offset\", \"end\"}}]}}): {e}\n"
            );
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    if q.chunks.len() > MAX_QUERY_CHUNKS {
        let why = format!("at most {MAX_QUERY_CHUNKS} chunks per question\n");
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    let held = {
        let (store, layer) = (svc.store.clone(), q.layer.clone());
        tokio::task::spawn_blocking(move || {
            if store.has_blob(&layer) {
                None
            } else {
                Some(breakfs_fetch::merge_ranges(&store.held_ranges(&layer)))
            }
        })
        .await
        .unwrap_or(Some(Vec::new()))
    };
    let rollout = &svc.peers.rollout;
    rollout.interest.note(&q.layer, &q.node);
    let mut chunks: Vec<Holding> = q
        .chunks
        .iter()
        .map(|c| {
            let have = match &held {
                None => true,
                Some(h) => h.iter().any(|&(s, e)| s <= c.offset && c.end <= e),
            };
            if have && c.offset < c.end {
                return Holding::Have;
            }
            let running = svc.fetcher.in_flight(&q.layer, c.offset, &c.digest);
            rollout.holding(&q.layer, c, &q.node, running)
        })
        .collect();
    take_on(&svc, &q, &mut chunks);
    let answer = HaveAnswer {
        node: svc.node_url.clone(),
        chunks,
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
        .into_response()
}

/// Take on the chunks of `q` that nobody has or fetches (`answers`
/// `Neither`) in the stripes this node owns among the nodes that want the
/// layer, when it fetches that layer itself (an image it serves has it):
/// queue them at the asker's priority and answer `Claimed`.
fn take_on(svc: &Arc<NodeService>, q: &HaveQuery, answers: &mut [Holding]) {
    if !answers.contains(&Holding::Neither) || svc.cloud.home(&q.layer).is_none() {
        return;
    }
    let rollout = &svc.peers.rollout;
    let me = svc.peers.me();
    let members = rollout.interest.members(&q.layer);
    let wanting = || members.iter().map(String::as_str).chain([q.node.as_str()]);
    let prio = if q.background {
        Priority::Background
    } else {
        Priority::OnDemand
    };
    let mut taken = Vec::new();
    for (h, c) in answers.iter_mut().zip(&q.chunks) {
        let take = *h == Holding::Neither
            && c.offset < c.end
            && c.size > 0
            && split::owns(me, wanting(), &q.layer, c.offset)
            && !svc.store.has_chunk(&c.digest)
            && rollout.claim(&q.layer, c);
        if !take {
            continue;
        }
        let loc = ChunkLoc {
            layer: q.layer.clone(),
            offset: c.offset,
            compressed_end: c.end,
            inner_offset: c.inner,
            size: c.size,
            digest: c.digest.clone(),
        };
        // Queued before the answer leaves: the asker's request for the
        // range waits on the job.
        let done = svc.fetcher.queue(&loc, prio);
        taken.push(async move {
            done.await;
            loc.digest
        });
        *h = Holding::Claimed;
    }
    if taken.is_empty() {
        return;
    }
    let svc = svc.clone();
    tokio::spawn(async move {
        for d in futures::future::join_all(taken).await {
            svc.peers.rollout.claim_done(&d);
        }
    });
}
