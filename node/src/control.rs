//! The mount control API (`GET`, `POST`, `DELETE /mounts`) and the
//! snapshotter's status (`GET /snapshots`), served on the node's control
//! socket, and over TCP only behind the bearer token; and its client
//! (`breakfs mount --node`, `breakfs umount`, `breakfs status`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use breakfs_fetch::guard::{self, Token};
use breakfs_fs::StatusRecord;
use breakfs_index::Causes;
use serde::{Deserialize, Serialize};

use crate::server::NodeService;
use crate::snapshotter::SnapshotterStatus;
use crate::{Error, Result};

/// A `POST /mounts` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct MountRequest {
    /// The image.
    pub image: String,
    /// An existing directory.
    pub mountpoint: PathBuf,
    /// Fetch the rest in the background.
    #[serde(default = "yes")]
    pub hydrate: bool,
    /// Fetch programs' libraries when they are first read.
    #[serde(default = "yes")]
    pub dependency_prefetch: bool,
    /// FUSE threads.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct MountpointQuery {
    mountpoint: PathBuf,
}

/// The control routes (the socket's permissions guard them).
pub(crate) fn routes(svc: Arc<NodeService>) -> Router {
    let r = Router::new()
        .route(
            "/mounts",
            get(list_mounts).post(add_mount).delete(remove_mount),
        )
        .route("/snapshots", get(list_snapshots))
        .with_state(svc);
    guard::limit_body(r, guard::MAX_CONTROL_BODY, "")
}

/// The control routes over TCP: behind `token`, or refused without one.
pub(crate) fn tcp_routes(svc: Arc<NodeService>, token: Option<&Token>) -> Router {
    match token {
        Some(t) => guard::require_token(routes(svc), Some(t.clone()), "node"),
        None => Router::new().route("/mounts", any(mounts_over_tcp)),
    }
}

async fn mounts_over_tcp() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "mount control is served on the node's control socket only (breakfs mount --node \
         unix:PATH); start the node with --token-file to allow it over TCP with a bearer token",
    )
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn list_mounts(State(svc): State<Arc<NodeService>>) -> Response {
    axum::Json(svc.mounts.list()).into_response()
}

async fn list_snapshots(State(svc): State<Arc<NodeService>>) -> Response {
    let status = tokio::task::spawn_blocking(move || crate::snapshotter::snapshotter_status(&svc));
    match status.await {
        Ok(Some(s)) => axum::Json(s).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "this node daemon serves no containerd snapshotter (start it with --snapshotter-socket)",
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn add_mount(State(svc): State<Arc<NodeService>>, body: axum::body::Bytes) -> Response {
    let req: MountRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not a mount request ({{\"image\": REF, \"mountpoint\": DIR}}): {e}"
                ),
            );
        }
    };
    match svc.mount(req).await {
        Ok(rec) => axum::Json(rec).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, Causes(&e)),
    }
}

async fn remove_mount(
    State(svc): State<Arc<NodeService>>,
    Query(q): Query<MountpointQuery>,
) -> Response {
    match svc.unmount(&q.mountpoint).await {
        Ok(msg) => (StatusCode::OK, format!("{msg}\n")).into_response(),
        Err(e) => error(StatusCode::CONFLICT, Causes(&e)),
    }
}

/// An HTTP client for node `node` (`unix:PATH`, an absolute socket path, or
/// `http://HOST:PORT`) and the base URL to use with it; it carries the
/// bearer `token`, if given.
pub fn node_client(node: &str, token: Option<&Token>) -> Result<(reqwest::Client, String)> {
    let sock = node
        .strip_prefix("unix:")
        .or_else(|| node.starts_with('/').then_some(node));
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(600));
    if let Some(token) = token {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut value = reqwest::header::HeaderValue::from_str(&token.bearer())
            .map_err(|_| Error::Control("the token cannot travel in an HTTP header".into()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
        b = b.default_headers(headers);
    }
    let built = |b: reqwest::ClientBuilder| {
        b.build().map_err(|source| Error::Client {
            what: "building the node client".into(),
            source,
        })
    };
    Ok(match sock {
        Some(path) => (
            built(b.unix_socket(path))?,
            "http://breakfs-node".to_string(),
        ),
        None => (built(b)?, node.trim_end_matches('/').to_string()),
    })
}

/// Ask node daemon `node` to mount `req`; its status record once it answers.
pub async fn mount_through(
    node: &str,
    token: Option<&Token>,
    req: &MountRequest,
) -> Result<StatusRecord> {
    let (client, base) = node_client(node, token)?;
    let resp = client
        .post(format!("{base}/mounts"))
        .json(req)
        .send()
        .await
        .map_err(|source| Error::Client {
            what: format!("asking the node daemon at {node} to mount (is it running?)"),
            source,
        })?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(Error::Control(format!(
            "the node daemon at {node} could not mount {}: {}",
            req.image,
            body.trim()
        )));
    }
    serde_json::from_str(&body)
        .map_err(|e| Error::Control(format!("the node daemon's answer: {e}")))
}

/// What node daemon `node` serves: its mounts and, if it runs one, its
/// containerd snapshotter's snapshots (`breakfs status`).
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node daemon asked.
    pub node: String,
    /// Its mounts.
    pub mounts: Vec<StatusRecord>,
    /// Its snapshotter's snapshots; `None` when it runs none.
    pub snapshotter: Option<SnapshotterStatus>,
}

/// `breakfs status`'s text for a node daemon: its mounts, one line each,
/// then its snapshotter's snapshots.
pub fn node_report(s: &NodeStatus) -> String {
    use std::fmt::Write as _;
    let mut out = format!("node daemon {}: {} mounts\n", s.node, s.mounts.len());
    for m in &s.mounts {
        let pct = crate::snapshotter::percent(m.hydrated_bytes, m.chunk_bytes);
        let _ = writeln!(
            out,
            "  {}  {} ({pct:.1}% hydrated)",
            m.mountpoint.display(),
            m.image
        );
    }
    match &s.snapshotter {
        Some(snaps) => out.push_str(&crate::snapshotter::snapshots_report(snaps)),
        None => out
            .push_str("no containerd snapshotter (the daemon runs without --snapshotter-socket)\n"),
    }
    out
}

/// Ask node daemon `node` for its [`NodeStatus`].
pub async fn node_status(node: &str, token: Option<&Token>) -> Result<NodeStatus> {
    let (client, base) = node_client(node, token)?;
    let get = |path: &'static str| {
        let (client, base) = (&client, &base);
        async move {
            let resp = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .map_err(|source| Error::Client {
                    what: format!("asking the node daemon at {node} for {path} (is it running?)"),
                    source,
                })?;
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            Ok::<_, Error>((status, body))
        }
    };
    let answer = |path: &str, body: &str| {
        Error::Control(format!(
            "the node daemon at {node} answered GET {path} with {}",
            body.trim()
        ))
    };
    let parse_err = |path: &str, e: serde_json::Error| {
        Error::Control(format!("the node daemon's answer to GET {path}: {e}"))
    };
    let (status, body) = get("/mounts").await?;
    if !status.is_success() {
        return Err(answer("/mounts", &body));
    }
    let mounts = serde_json::from_str(&body).map_err(|e| parse_err("/mounts", e))?;
    let (status, body) = get("/snapshots").await?;
    let snapshotter = match status {
        StatusCode::NOT_FOUND => None,
        s if s.is_success() => {
            Some(serde_json::from_str(&body).map_err(|e| parse_err("/snapshots", e))?)
        }
        _ => return Err(answer("/snapshots", &body)),
    };
    Ok(NodeStatus {
        node: node.to_string(),
        mounts,
        snapshotter,
    })
}
