//! Guards at the HTTP edges of the node and scheduler services: a bearer
//! token for the endpoints that change state and a size limit on request
//! bodies, each refused with a status and the reason; a bound on the
//! requests handled at once; and a size limit on the answers these
//! services read from each other.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::{Error, Result};

/// Request bodies of control endpoints (`POST /prefetch`, `POST /mounts`)
/// larger than this are refused.
pub const MAX_CONTROL_BODY: usize = 1 << 20;

/// A shared secret that control requests carry as `Authorization: Bearer
/// TOKEN`.
#[derive(Clone)]
pub struct Token {
    secret: Arc<str>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// The token in the file at `path` (surrounding whitespace ignored).
    pub fn from_file(path: &Path) -> Result<Token> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the token file {}", path.display()), e))?;
        let what = format!("the token file {}", path.display());
        let secret = text.trim();
        if secret.is_empty() {
            return Err(Error::Protocol {
                what,
                reason: "it is empty; put a random secret in it \
                         (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
                    .into(),
            });
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Protocol {
                what,
                reason: "the token must be one word of printable ASCII (it travels in an \
                         HTTP header)"
                    .into(),
            });
        }
        Ok(Token {
            secret: secret.into(),
        })
    }

    /// The `Authorization` header value that carries it.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }

    /// Whether an `Authorization` header value carries the token as
    /// `Bearer TOKEN`.
    pub fn admits_bearer(&self, authorization: Option<&[u8]>) -> bool {
        authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .is_some_and(|t| self.admits(t))
    }

    /// Whether `given` is the secret; takes the same time wherever they differ.
    fn admits(&self, given: &[u8]) -> bool {
        let want = self.secret.as_bytes();
        let mut diff = want.len() ^ given.len();
        for (i, w) in want.iter().enumerate() {
            diff |= usize::from(w ^ given.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// `router` with each of its routes requiring `token` (none: open). A
/// request without it, or with another, gets 401 and the reason; `service`
/// names the service in it (`node`, `scheduler`).
pub fn require_token(router: Router, token: Option<Token>, service: &'static str) -> Router {
    match token {
        Some(t) => router.route_layer(middleware::from_fn_with_state((t, service), check_token)),
        None => router,
    }
}

async fn check_token(
    State((token, service)): State<(Token, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let reason = match given.map(|v| v.strip_prefix(b"Bearer ")) {
        Some(Some(t)) if token.admits(t) => return next.run(req).await,
        Some(Some(_)) => format!("the bearer token is not this {service}'s (its --token-file)"),
        Some(None) => "only `Authorization: Bearer TOKEN` is accepted here".to_string(),
        None => format!(
            "this endpoint changes the {service}'s state and needs `Authorization: Bearer \
             TOKEN`, the token of the {service}'s --token-file"
        ),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"breakfs\"")],
        format!("{reason}\n"),
    )
        .into_response()
}

/// `router` with request bodies limited to `max` bytes: a bigger one gets
/// 413 and the reason, ending with `hint` (how to raise the limit, if one can).
pub fn limit_body(router: Router, max: usize, hint: &'static str) -> Router {
    router
        .layer(middleware::from_fn_with_state(
            (max, hint),
            explain_too_large,
        ))
        .layer(DefaultBodyLimit::max(max))
}

/// Handle at most `n` requests of `router` at once; the others wait their
/// turn (in arrival order) before their body is read, so that memory stays
/// bounded however many arrive together.
pub fn limit_in_flight(router: Router, n: usize) -> Router {
    let slots = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
    router.route_layer(middleware::from_fn_with_state(slots, one_slot))
}

async fn one_slot(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    match slots.acquire().await {
        Ok(_slot) => next.run(req).await,
        // Never closed: the semaphore lives as long as the router.
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn explain_too_large(
    State((max, hint)): State<(usize, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let size = match declared {
        Some(n) if n > max as u64 => format!("{n} bytes"),
        _ => {
            // A body without a length is cut off by the extractor as it
            // passes the limit: say why instead of its terse message.
            let resp = next.run(req).await;
            if resp.status() != StatusCode::PAYLOAD_TOO_LARGE {
                return resp;
            }
            "more".to_string()
        }
    };
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body ({size}) is larger than this endpoint's limit of {max} bytes{hint}\n"
        ),
    )
        .into_response()
}

/// The body of `resp`, refused past `max` bytes; `what` names it in errors.
/// The client's own timeout bounds the time it takes.
pub async fn body_within(mut resp: reqwest::Response, max: usize, what: &str) -> Result<Vec<u8>> {
    let too_big = |n: u64| Error::Protocol {
        what: what.to_string(),
        reason: format!("larger than {max} bytes ({n} or more); refused"),
    };
    if let Some(n) = resp.content_length().filter(|n| *n > max as u64) {
        return Err(too_big(n));
    }
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| Error::Transfer {
        what: what.to_string(),
        source: e,
    })? {
        if out.len() + c.len() > max {
            return Err(too_big((out.len() + c.len()) as u64));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::routing::post;

    #[test]
    fn a_token_file_holds_one_printable_word() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "  s3cret-token\n").unwrap();
        let t = Token::from_file(&p).unwrap();
        assert_eq!(t.bearer(), "Bearer s3cret-token");
        assert!(t.admits(b"s3cret-token"));
        assert!(!t.admits(b"s3cret-toke"));
        assert!(!t.admits(b"s3cret-tokenX"));
        assert!(!t.admits(b""));
        assert_eq!(format!("{t:?}"), "Token(…)");
        for bad in ["", "\n", "two words"] {
            std::fs::write(&p, bad).unwrap();
            let e = Token::from_file(&p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
        let e = Token::from_file(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading the token file"), "{e}");
    }

    #[tokio::test]
    async fn guards_refuse_with_a_status_and_a_reason() {
        let router = Router::new().route(
            "/c",
            post(|b: axum::body::Bytes| async move { b.len().to_string() }),
        );
        let token = Token {
            secret: "tok".into(),
        };
        let app = limit_body(require_token(router, Some(token), "node"), 16, "; raise it");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/c", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let send = |auth: Option<&'static str>, body: reqwest::Body| {
            let mut rb = http.post(&url).body(body);
            if let Some(a) = auth {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            async move {
                let r = rb.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        let (s, t) = send(None, "x".into()).await;
        assert_eq!(s, 401);
        assert!(t.contains("needs `Authorization: Bearer TOKEN`"), "{t}");
        let (s, t) = send(Some("Bearer nope"), "x".into()).await;
        assert!(s == 401 && t.contains("not this node's"), "{s} {t}");
        let (s, t) = send(Some("Basic dG9r"), "x".into()).await;
        assert!(
            s == 401 && t.contains("only `Authorization: Bearer"),
            "{s} {t}"
        );
        assert_eq!(
            send(Some("Bearer tok"), "abc".into()).await,
            (200, "3".into())
        );
        // Too big, with a length and without one (a stream).
        let (s, t) = send(Some("Bearer tok"), vec![b'a'; 17].into()).await;
        assert!(
            s == 413 && t.contains("(17 bytes)") && t.ends_with("; raise it\n"),
            "{s} {t}"
        );
        let stream = futures::stream::iter(
            (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"0123456789"))),
        );
        let (s, t) = send(Some("Bearer tok"), reqwest::Body::wrap_stream(stream)).await;
        assert!(s == 413 && t.contains("limit of 16 bytes"), "{s} {t}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_n_requests_are_handled_at_once_and_other_routes_do_not_wait() {
        use std::time::Duration;
        use tokio::sync::{Semaphore, watch};
        /// The limited handlers count themselves in `inside` and hold their
        /// slot until `gate` lets them go; `arrived` counts the requests
        /// that reached the server, before the limit.
        struct Seen {
            arrived: watch::Sender<usize>,
            inside: watch::Sender<usize>,
            most: watch::Sender<usize>,
            gate: Semaphore,
        }
        let seen = Arc::new(Seen {
            arrived: watch::Sender::new(0),
            inside: watch::Sender::new(0),
            most: watch::Sender::new(0),
            gate: Semaphore::new(0),
        });
        let router = Router::new()
            .route(
                "/work",
                post(
                    |State(seen): State<Arc<Seen>>, _b: axum::body::Bytes| async move {
                        let mut now = 0;
                        seen.inside.send_modify(|n| {
                            *n += 1;
                            now = *n;
                        });
                        seen.most.send_modify(|m| *m = (*m).max(now));
                        seen.gate.acquire().await.unwrap().forget();
                        seen.inside.send_modify(|n| *n -= 1);
                        "done"
                    },
                ),
            )
            .with_state(seen.clone());
        let counted = seen.clone();
        let app = limit_in_flight(router, 3)
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                if req.uri().path() == "/work" {
                    counted.arrived.send_modify(|n| *n += 1);
                }
                next.run(req)
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let r = http.post(format!("{base}/work")).body("x").send();
                tokio::spawn(async move { r.await.unwrap().status().as_u16() })
            })
            .collect();

        // Wait (on the counts, up to a bound) until the limit is saturated:
        // all 20 arrived, 3 inside and held there, 17 queued behind them.
        let bound = Duration::from_secs(20);
        let saturated = async {
            seen.arrived
                .subscribe()
                .wait_for(|n| *n == 20)
                .await
                .unwrap();
            seen.inside.subscribe().wait_for(|n| *n == 3).await.unwrap();
        };
        tokio::time::timeout(bound, saturated).await.unwrap_or_else(|_| {
            panic!(
                "the limited route never held 3 requests with the rest queued: {} arrived, {} inside",
                *seen.arrived.borrow(),
                *seen.inside.borrow()
            )
        });
        // A route outside the limit answers while the limited one is full.
        let health = tokio::time::timeout(bound, async {
            let r = http.get(format!("{base}/healthz")).send().await.unwrap();
            r.status().as_u16()
        })
        .await
        .unwrap_or_else(|_| panic!("/healthz waited behind the 3 held /work requests"));
        assert_eq!(health, 200);
        assert!(
            calls.iter().all(|c| !c.is_finished()),
            "a /work request finished while every slot was held"
        );
        assert_eq!(*seen.inside.borrow(), 3, "a 4th request got in");

        // Let them go: every request is served, never more than 3 at once.
        seen.gate.add_permits(20);
        let statuses = futures::future::join_all(calls).await;
        let statuses: Vec<u16> = statuses.into_iter().map(|s| s.unwrap()).collect();
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
        assert_eq!(*seen.most.borrow(), 3);
    }
}
