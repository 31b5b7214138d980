//! The extender over HTTP: `POST {prefix}/filter`, `POST
//! {prefix}/prioritize`, `GET {prefix}/plan`, `GET /healthz`, and
//! [`serve`], which runs them on a listener until a cancellation token
//! fires.
//!
//! kube-scheduler calls the extender verbs without credentials (its
//! extender config has `tlsConfig` but no bearer token), so they stay
//! open; `/plan`, which counts a placement, needs the bearer token when one
//! is configured, and the same token goes to the node daemons. Request
//! bodies are limited to `maxBodySize`. Errors become answers in one place
//! (the `IntoResponse` of [`Error`], with [`Error::status`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakfs_fetch::guard;
use breakfs_index::Causes;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::service::Sched;
use crate::types::ExtenderArgs;

/// Extender calls handled at once; more wait their turn before their body
/// is read, so that what calls hold (each its `ExtenderArgs` and scores,
/// about 100 KB for 1,000 nodes) is bounded however many arrive together.
/// kube-scheduler makes one call per pod it schedules.
const VERBS_IN_FLIGHT: usize = 64;

/// The routes, under the configured prefix: the extender verbs open (at
/// most [`VERBS_IN_FLIGHT`] handled at once), `/plan` behind the token if
/// there is one, bodies within `maxBodySize`.
pub fn routes(s: Arc<Sched>) -> Router {
    let p = s.config().prefix.trim_end_matches('/').to_string();
    let verbs = Router::new()
        .route(&format!("{p}/filter"), post(filter))
        .route(&format!("{p}/prioritize"), post(prioritize))
        .with_state(s.clone());
    let open =
        guard::limit_in_flight(verbs, VERBS_IN_FLIGHT).route("/healthz", get(|| async { "ok\n" }));
    let control = Router::new()
        .route(&format!("{p}/plan"), get(plan))
        .with_state(s.clone());
    let control = guard::require_token(control, s.token().cloned(), "scheduler");
    let max = s.config().max_body().unwrap_or(32 << 20);
    guard::limit_body(
        open.merge(control),
        max,
        "; raise maxBodySize in the scheduler config (--max-body-size)",
    )
}

/// Serve the extender of `s` on `listener` until `shutdown` is cancelled,
/// then finish the calls under way and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    s: Arc<Sched>,
    shutdown: CancellationToken,
) -> Result<()> {
    axum::serve(listener, routes(s))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(Error::Serve)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.status(), format!("{}\n", Causes(&self))).into_response()
    }
}

/// The request body as `ExtenderArgs`, or why not.
fn check_args(body: &[u8]) -> Result<Box<ExtenderArgs>> {
    // Straight into the types (no JSON tree first: this is the hot path);
    // serde would take a JSON array for a struct, so look first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::BadArgs("it is not a JSON object"));
    }
    let args: ExtenderArgs = serde_json::from_slice(body).map_err(Error::ArgsJson)?;
    if args.pod.is_none() {
        return Err(Error::BadArgs("it has no Pod"));
    }
    if args.nodes.is_none() && args.node_names.is_none() {
        return Err(Error::BadArgs("it has neither Nodes nor NodeNames"));
    }
    Ok(Box::new(args))
}

async fn filter(State(s): State<Arc<Sched>>, body: axum::body::Bytes) -> Response {
    match check_args(&body) {
        Ok(a) => axum::Json(s.filter(*a).await).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn prioritize(State(s): State<Arc<Sched>>, body: axum::body::Bytes) -> Response {
    match check_args(&body) {
        Ok(a) => axum::Json(s.prioritize(*a).await).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct PlanQuery {
    image: String,
    node: String,
}

async fn plan(
    State(s): State<Arc<Sched>>,
    q: std::result::Result<Query<PlanQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return Error::PlanQuery.into_response();
    };
    match s.plan(&q.image, &q.node).await {
        Ok(e) => axum::Json(e).into_response(),
        Err(e) => Error::Plan {
            image: q.image,
            node: q.node,
            source: Box::new(e),
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::http::StatusCode;

    use super::*;
    use crate::config::SchedConfig;

    #[test]
    fn bodies_that_are_not_extender_args_are_refused_with_a_reason() {
        for (body, why) in [
            (&b"[]"[..], "not a JSON object"),
            (b"{}", "no Pod"),
            (b"{\"Pod\": {}}", "neither Nodes nor NodeNames"),
            (b"{\"Pod\": {}, \"NodeNames\": 3}", "invalid type"),
        ] {
            let e = check_args(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            let text = Causes(&e).to_string();
            assert!(text.contains(why), "{text}");
        }
        let a = check_args(b"{\"Pod\": {}, \"NodeNames\": [\"n\"], \"X\": 1}").unwrap();
        assert_eq!(a.node_names.unwrap(), vec!["n"]);
    }

    #[tokio::test]
    async fn the_extender_serves_in_process_until_cancelled() {
        let s = Sched::new(SchedConfig::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, s, shutdown.clone()));
        let client = reqwest::Client::new();
        let r = client.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = client
            .post(format!("{url}/prioritize"))
            .body("[]")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.text().await.unwrap().contains("not a JSON object"));
        // A plan of an image that cannot be resolved: 422, naming it.
        let r = client
            .get(format!("{url}/plan?image=no%20such&node=n1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let text = r.text().await.unwrap();
        assert!(text.starts_with("planning no such on n1: "), "{text}");
        shutdown.cancel();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
        stopped.unwrap().unwrap().unwrap();
    }
}
