//! The node's HTTP service, peer side: the OCI distribution read API for
//! what the node holds (`/v2/`, manifests it resolved, blobs and verified
//! ranges with single Range requests), `GET /cache/index`, `GET
//! /measurements`, `GET /metrics` (Prometheus text), `GET /profiles/<image>`
//! (learned access profiles, `crate::profile`) and `POST /prefetch`.
//! Only content-addressed data is served: blobs by digest, manifests by
//! digest or by a tag the node itself resolved (the bytes are still the
//! digest's). Reads are open to anyone who reaches the node; `POST
//! /prefetch` changes its state and can require a bearer token; request
//! bodies are limited to [`guard::MAX_CONTROL_BODY`]. A blob range the
//! node does not hold, asked with `Breakfs-Relay: HOST`, is relayed from
//! that registry (`crate::relay`): only for the registries the node relays
//! for, bounded in size and number, behind the token when there is one.
//! The same service answers the mount control API (`crate::control`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakfs_fetch::guard::{self, Token};
use breakfs_fetch::{ClientOptions, CloudSource, ContentStore, Fetcher};
use breakfs_index::{Causes, Digest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::mounts::MountTable;
use crate::peer::{Peers, index_of_store};
use crate::prefetch::{PrefetchRequest, Prefetcher};
use crate::relay::{MAX_RELAY_RANGE, RELAY_HEADER, Refusal, Relay, RelayAsk};

/// Counters of what the node served to peers and clients.
#[derive(Default)]
pub(crate) struct Served {
    /// Blob bytes sent (whole or ranges).
    pub blob_bytes: AtomicU64,
    /// Manifest bytes sent.
    pub manifest_bytes: AtomicU64,
    /// Requests answered with content.
    pub hits: AtomicU64,
    /// Requests for something not held.
    pub misses: AtomicU64,
    /// Peer requests waiting now for a range this node is fetching.
    pub waiting: AtomicU64,
    /// Such waits that ended with the range held.
    pub waits_served: AtomicU64,
    /// Such waits that ended without it (the fetch failed or took too long).
    pub waits_missed: AtomicU64,
}

/// Everything the node's servers answer from (built in one place,
/// `crate::chain`).
pub(crate) struct NodeService {
    /// The content store.
    pub(crate) store: Arc<ContentStore>,
    /// The node's fetch scheduler.
    pub(crate) fetcher: Fetcher,
    /// The end of its chain.
    pub(crate) cloud: Arc<CloudSource>,
    /// The registry client options mounts and prefetches resolve with.
    pub(crate) client: ClientOptions,
    /// Its peers.
    pub(crate) peers: Arc<Peers>,
    /// Its prefetcher.
    pub(crate) prefetcher: Arc<Prefetcher>,
    /// The URL peers reach it at.
    pub(crate) node_url: String,
    /// The store's budget in bytes, if any.
    pub(crate) budget: Option<u64>,
    /// What was served.
    pub(crate) served: Served,
    /// What it relays for its peers, and through them.
    pub(crate) relay: Arc<Relay>,
    /// The mounts it serves.
    pub(crate) mounts: MountTable,
    /// Its containerd snapshotter's counts, if one runs.
    pub(crate) snapshot_stats: crate::snapshotter::SnapshotStats,
}

/// Where a request comes from: the network (TCP) or the node's own
/// control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Over TCP: registry references only.
    Network,
    /// The control socket, which its file permissions guard.
    Local,
}

/// The routes of the peer-facing service; with `token`, `POST /prefetch`
/// requires it.
pub(crate) fn routes(svc: Arc<NodeService>, token: Option<Token>, origin: Origin) -> Router {
    let reads = Router::new()
        .route("/v2/", get(api_base))
        .route("/v2", get(api_base))
        .route("/v2/{*rest}", get(distribution))
        .route("/cache/index", get(cache_index))
        .route("/cache/have", post(crate::rollout::have))
        .route("/cache/meta", post(crate::rollout::meta_question))
        .route(
            "/cache/meta/{kind}/{digest}",
            get(crate::rollout::meta_serve),
        )
        .route("/measurements", get(measurements))
        .route("/metrics", get(metrics))
        .route("/prefetch", get(prefetch_list))
        .route("/profiles/{image}", get(crate::profile::serve))
        .with_state(svc.clone());
    let control = Router::new()
        .route(
            "/prefetch",
            post(move |svc, body| prefetch_start(svc, body, origin)),
        )
        .with_state(svc);
    let control = guard::require_token(control, token, "node");
    guard::limit_body(reads.merge(control), guard::MAX_CONTROL_BODY, "")
}

const API_VERSION: &str = "registry/2.0";

async fn api_base() -> Response {
    (
        [("Docker-Distribution-API-Version", API_VERSION)],
        axum::Json(serde_json::json!({})),
    )
        .into_response()
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("Docker-Distribution-API-Version", API_VERSION)],
        axum::Json(serde_json::json!({"errors": [{"code": code, "message": message}]})),
    )
        .into_response()
}

async fn distribution(
    State(svc): State<Arc<NodeService>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    match v2_object(&rest) {
        Some(V2Object::Blob { name, digest }) => blob(&svc, name, digest, &headers).await,
        Some(V2Object::Manifest { name, reference }) => manifest(&svc, name, reference).await,
        None => oci_error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "this node serves /v2/<name>/blobs/<digest> and /v2/<name>/manifests/<reference> only",
        ),
    }
}

/// What a `/v2/{rest}` request path names. Public (hidden) for the fuzz
/// targets in `fuzz/` only, like [`v2_object`] and [`range_of`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V2Object<'a> {
    /// `NAME/blobs/DIGEST`.
    Blob {
        /// The repository name.
        name: &'a str,
        /// The digest as given (not yet checked).
        digest: &'a str,
    },
    /// `NAME/manifests/REFERENCE`.
    Manifest {
        /// The repository name.
        name: &'a str,
        /// A tag or a digest.
        reference: &'a str,
    },
}

/// Split the part of a request path after `/v2/`; `None` for anything
/// but a blob or a manifest.
#[doc(hidden)]
pub fn v2_object(rest: &str) -> Option<V2Object<'_>> {
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Some(V2Object::Blob { name, digest });
    }
    rest.rsplit_once("/manifests/")
        .map(|(name, reference)| V2Object::Manifest { name, reference })
}

/// The range a `Range` header value asks of a `size`-byte blob, as the
/// blob handlers read it (see `parse_range`).
#[doc(hidden)]
pub fn range_of(value: &HeaderValue, size: u64) -> Result<Option<(u64, u64)>, String> {
    let mut headers = HeaderMap::new();
    headers.insert(header::RANGE, value.clone());
    parse_range(&headers, size)
}

/// A single `bytes=` range of a `size`-byte blob: `Ok(None)` without a
/// Range header, `Err` when it is malformed or unsatisfiable.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, String> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| "the Range header is not text")?;
    let spec = v
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("only bytes ranges are served, not {v:?}"))?;
    if spec.contains(',') {
        return Err("only a single range is served".into());
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("malformed range {spec:?}"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("malformed range {spec:?}"))
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (false, false) => (num(a)?, num(b)?.saturating_add(1).min(size)),
        (false, true) => (num(a)?, size),
        (true, false) => (size.saturating_sub(num(b)?), size),
        (true, true) => return Err(format!("malformed range {spec:?}")),
    };
    if start >= end || start >= size {
        return Err(format!("range {spec:?} is outside the {size}-byte blob"));
    }
    Ok(Some((start, end)))
}

async fn blob(svc: &Arc<NodeService>, name: &str, digest: &str, headers: &HeaderMap) -> Response {
    let Ok(d) = Digest::parse(digest) else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "not a sha256 digest",
        );
    };
    let path = svc.store.blob_path(&d);
    let size = tokio::fs::metadata(&path)
        .await
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let Some(size) = size else {
        return partial_blob(svc, name, &d, headers).await;
    };
    let range = match parse_range(headers, size) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                e,
            )
                .into_response();
        }
    };
    let (start, end) = range.unwrap_or((0, size));
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return partial_blob(svc, name, &d, headers).await,
    };
    let mut file = file;
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "seek failed");
    }
    svc.served.hits.fetch_add(1, Ordering::Relaxed);
    svc.served
        .blob_bytes
        .fetch_add(end - start, Ordering::Relaxed);
    if let Some(b) = svc.store.budget() {
        b.touch([&d]);
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(end - start)));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&d.to_string()) {
        h.insert("Docker-Content-Digest", v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    resp
}

/// A Range request for a layer held only in part: served from verified
/// ranges when they cover it, else relayed when the request asks for it.
async fn partial_blob(
    svc: &Arc<NodeService>,
    name: &str,
    d: &Digest,
    headers: &HeaderMap,
) -> Response {
    wait_in_flight(svc, d, headers).await;
    let held = match held_range(svc, d, headers).await {
        Ok(r) => r,
        Err(_) if headers.contains_key(RELAY_HEADER) => {
            return relayed(svc, name, d, headers).await;
        }
        Err(why) => {
            svc.served.misses.fetch_add(1, Ordering::Relaxed);
            return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", why);
        }
    };
    let (range, bytes) = held;
    svc.served.hits.fetch_add(1, Ordering::Relaxed);
    svc.served
        .blob_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    range_answer(d, range.0, bytes)
}

/// When the closed range asked of `d` is not held but this node's running
/// fetches cover it, wait for them: as long as the `Breakfs-Wait` header
/// says (milliseconds), at most 10 s, or 2 s without the header
/// (`crate::rollout::asked_wait`).
async fn wait_in_flight(svc: &Arc<NodeService>, d: &Digest, headers: &HeaderMap) {
    let Ok(Some((start, end))) = parse_range(headers, u64::MAX) else {
        return;
    };
    if end == u64::MAX {
        return;
    }
    let Some(flight) = svc.fetcher.range_flight(d, start, end).await else {
        return;
    };
    let wait = crate::rollout::asked_wait(headers);
    svc.served.waiting.fetch_add(1, Ordering::Relaxed);
    let held = flight.wait(wait).await;
    svc.served.waiting.fetch_sub(1, Ordering::Relaxed);
    let outcome = if held {
        &svc.served.waits_served
    } else {
        &svc.served.waits_missed
    };
    outcome.fetch_add(1, Ordering::Relaxed);
}

/// The asked range of `d` from the verified ranges the store keeps, or
/// why it is not there.
async fn held_range(
    svc: &Arc<NodeService>,
    d: &Digest,
    headers: &HeaderMap,
) -> Result<((u64, u64), Vec<u8>), &'static str> {
    let held = {
        let (store, d) = (svc.store.clone(), d.clone());
        tokio::task::spawn_blocking(move || store.held_ranges(&d))
            .await
            .unwrap_or_default()
    };
    if held.is_empty() {
        return Err("this node does not hold the blob");
    }
    let end_known = held.iter().map(|r| r.1).max().unwrap_or(0);
    let Ok(Some(range)) = parse_range(headers, end_known) else {
        return Err(
            "this node holds only parts of the blob: ask for a range it holds (see /cache/index)",
        );
    };
    // A closed range reaching past what is held is not held: a shorter
    // answer would pass for all of it.
    if let Ok(Some((_, asked_end))) = parse_range(headers, u64::MAX)
        && asked_end < u64::MAX
        && asked_end > range.1
    {
        return Err("this node does not hold that range");
    }
    let bytes = {
        let (store, d) = (svc.store.clone(), d.clone());
        tokio::task::spawn_blocking(move || store.read_held(&d, range.0, range.1 - range.0))
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten()
    };
    bytes
        .map(|b| (range, b))
        .ok_or("this node does not hold that range")
}

/// A 206 answer of `bytes` at `start` of blob `d` (its size unsaid).
fn range_answer(d: &Digest, start: u64, bytes: Vec<u8>) -> Response {
    let last = (start + bytes.len() as u64).saturating_sub(1);
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_RANGE, format!("bytes {start}-{last}/*")),
            (
                header::HeaderName::from_static("docker-content-digest"),
                d.to_string(),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// A range of blob `d` in repository `name` fetched from the registry the
/// `Breakfs-Relay` header names, for a peer.
async fn relayed(svc: &Arc<NodeService>, name: &str, d: &Digest, headers: &HeaderMap) -> Response {
    let Some(host) = headers.get(RELAY_HEADER).and_then(|v| v.to_str().ok()) else {
        return (
            StatusCode::BAD_REQUEST,
            "the Breakfs-Relay header is not text: name a registry as HOST[:PORT]\n",
        )
            .into_response();
    };
    // Any size: the registry knows the blob's; a range past it is the
    // registry's to refuse.
    let (start, end) = match parse_range(headers, u64::MAX) {
        Ok(Some((s, e))) if e < u64::MAX => (s, e),
        Ok(_) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "a relay request asks for one closed range, `Range: bytes=A-B`, of at most \
                     {MAX_RELAY_RANGE} bytes\n"
                ),
            )
                .into_response();
        }
        Err(e) => return (StatusCode::RANGE_NOT_SATISFIABLE, format!("{e}\n")).into_response(),
    };
    let ask = RelayAsk {
        host: host.trim(),
        name,
        blob: d,
        start,
        end,
        authorization: headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
    };
    match svc.relay.relay_range(&ask).await {
        Ok(bytes) => range_answer(d, start, bytes),
        Err(r) => {
            let status = match &r {
                Refusal::NotRelayed { .. } => StatusCode::FORBIDDEN,
                Refusal::NeedsToken => StatusCode::UNAUTHORIZED,
                Refusal::BadRequest(_) | Refusal::TooLarge(_) => StatusCode::BAD_REQUEST,
                Refusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
                Refusal::Upstream(breakfs_fetch::Error::NotFound { .. }) => StatusCode::NOT_FOUND,
                Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
            };
            let mut resp = (status, format!("{r}\n")).into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

async fn manifest(svc: &Arc<NodeService>, name: &str, reference: &str) -> Response {
    let digest = match Digest::parse(reference) {
        Ok(d) => Some(d),
        Err(_) => svc.store.lookup_ref(name, reference),
    };
    let bytes = digest
        .as_ref()
        .and_then(|d| svc.store.read_blob(d).ok().flatten());
    let (Some(d), Some(bytes)) = (digest, bytes) else {
        svc.served.misses.fetch_add(1, Ordering::Relaxed);
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            &format!("this node has not resolved {name}:{reference}"),
        );
    };
    let Some(media_type) = manifest_media_type(&bytes) else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "that digest is not a manifest",
        );
    };
    svc.served.hits.fetch_add(1, Ordering::Relaxed);
    svc.served
        .manifest_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    (
        [
            (header::CONTENT_TYPE, media_type),
            (
                header::HeaderName::from_static("docker-content-digest"),
                d.to_string(),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// The media type of a manifest or index document, `None` if `bytes` is
/// not one. Public (hidden) for the fuzz targets.
#[doc(hidden)]
pub fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("schemaVersion")?;
    if let Some(m) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Some(m.to_string());
    }
    Some(if v.get("manifests").is_some() {
        breakfs_index::media_types::OCI_INDEX.to_string()
    } else {
        breakfs_index::media_types::OCI_MANIFEST.to_string()
    })
}

async fn cache_index(State(svc): State<Arc<NodeService>>) -> Response {
    let s = svc.clone();
    let index = tokio::task::spawn_blocking(move || {
        let mut i = index_of_store(&s.store, &s.node_url, s.budget, s.peers.urls());
        i.relay = s.relay.hosts();
        i
    })
    .await;
    match index {
        Ok(i) => axum::Json(i).into_response(),
        Err(e) => oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &e.to_string()),
    }
}

async fn measurements(State(svc): State<Arc<NodeService>>) -> Response {
    axum::Json(serde_json::json!({
        "node": svc.node_url,
        "links": svc.peers.links().snapshot(),
        "relay": svc.relay.status(),
    }))
    .into_response()
}

async fn prefetch_start(
    State(svc): State<Arc<NodeService>>,
    body: axum::body::Bytes,
    origin: Origin,
) -> Response {
    let req: PrefetchRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("the body is not a prefetch request ({{\"images\": [REF...]}}): {e}\n"),
            )
                .into_response();
        }
    };
    if origin == Origin::Network
        && let Some(r) = req.local_reference()
    {
        let why = format!(
            "{r} names a directory on this node: over TCP a prefetch takes registry \
             references (docker://HOST/REPO:TAG) only; a local layout goes through the \
             node's control socket\n"
        );
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    match svc.prefetcher.start(req) {
        Ok(ids) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"tasks": ids})),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{}\n", Causes(&e))).into_response(),
    }
}

async fn prefetch_list(State(svc): State<Arc<NodeService>>) -> Response {
    axum::Json(svc.prefetcher.tasks()).into_response()
}

async fn metrics(State(svc): State<Arc<NodeService>>) -> Response {
    let s = svc.clone();
    let used = tokio::task::spawn_blocking(move || s.store.usage())
        .await
        .unwrap_or(0);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::page(&svc, used),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, String> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).expect("header"));
        parse_range(&h, size)
    }

    #[test]
    fn ranges_parse_like_http_says() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(range("bytes=90-200", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=50-", 100), Ok(Some((50, 100))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 100))));
        assert!(range("bytes=100-", 100).is_err());
        assert!(range("bytes=0-1,5-6", 100).is_err());
        assert!(range("items=0-1", 100).is_err());
        assert!(range("bytes=9-3", 100).is_err());
        assert_eq!(parse_range(&HeaderMap::new(), 100), Ok(None));
    }

    /// A relayed range and a prefetch from a registry nobody answers at:
    /// the 502's body and the task's error carry the cause (the refused
    /// connection), not only "cannot reach registry".
    #[tokio::test]
    async fn errors_answered_over_http_carry_their_causes() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let registry = closed.local_addr().expect("its address").to_string();
        drop(closed);
        let dir = tempfile::tempdir().expect("a temp dir");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let base = format!("http://{}", tcp.local_addr().expect("its address"));
        let control =
            crate::ControlSocket::bind(&dir.path().join("node.sock")).expect("the socket");
        let config = crate::Config {
            relay: vec![registry.clone()],
            client: ClientOptions {
                plain_http: true,
                ..ClientOptions::default()
            },
            ..crate::Config::new(dir.path().join("store"))
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let listeners = crate::Listeners { tcp, control };
        let node = tokio::spawn(crate::run(config, listeners, shutdown.clone()));
        let http = reqwest::Client::new();
        let refused = "Connection refused";

        let blob = Digest::of(b"a layer");
        let r = http
            .get(format!("{base}/v2/app/blobs/{blob}"))
            .header(RELAY_HEADER, &registry)
            .header(header::RANGE, "bytes=0-9")
            .send()
            .await
            .expect("a relay request");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let body = r.text().await.expect("its body");
        assert!(
            body.contains(&format!("cannot reach registry {registry}")),
            "{body}"
        );
        assert!(body.contains(refused), "the cause is missing: {body}");

        let r = http
            .post(format!("{base}/prefetch"))
            .json(&serde_json::json!({"images": [format!("docker://{registry}/app:v1")]}))
            .send()
            .await
            .expect("a prefetch request");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let task = loop {
            let tasks: std::collections::BTreeMap<u64, crate::PrefetchTask> = http
                .get(format!("{base}/prefetch"))
                .send()
                .await
                .expect("GET /prefetch")
                .json()
                .await
                .expect("the tasks");
            if let Some(t) = tasks.into_values().find(|t| t.finished) {
                break t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the prefetch never finished"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let error = task.error.expect("the prefetch failed");
        assert!(error.contains(&registry), "{error}");
        assert!(error.contains(refused), "the cause is missing: {error}");

        shutdown.cancel();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), node)
            .await
            .expect("the node stops")
            .expect("its task");
        assert!(stopped.is_ok(), "{stopped:?}");
    }
}
