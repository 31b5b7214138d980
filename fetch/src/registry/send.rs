//! Sending a request to a registry: the current `Authorization`, the
//! Basic / Bearer-token auth dance on a 401 (with credentials from the
//! docker config or a credential helper), and retries with jittered
//! backoff.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};

use super::body::expect;
use super::{MAX_REDIRECTS, RegistryRepo};
use crate::auth::{self, Challenge};
use crate::{Error, Result};

/// Attempts for idempotent requests that fail on the transport or with a 5xx.
const ATTEMPTS: usize = 3;
/// The first retry's delay; doubled for each further one, plus a random
/// part up to as much again, so that nodes that failed together do not
/// come back together.
const BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A token reply is a small JSON document.
const MAX_TOKEN_REPLY: usize = 1 << 20;

/// One request, rebuilt for each attempt.
pub(super) struct Req<'a> {
    pub(super) method: Method,
    pub(super) url: Url,
    pub(super) headers: HeaderMap,
    pub(super) body: Option<Bytes>,
    pub(super) what: &'a str,
    /// Token scopes beyond `repository:REPO:pull` (push, mount source).
    pub(super) scopes: Vec<String>,
}

impl<'a> Req<'a> {
    pub(super) fn new(method: Method, url: Url, what: &'a str) -> Self {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            what,
            scopes: Vec::new(),
        }
    }

    pub(super) fn header(mut self, name: header::HeaderName, value: &str) -> Result<Self> {
        let v = HeaderValue::from_str(value).map_err(|_| Error::Protocol {
            what: self.what.to_string(),
            reason: format!("{value:?} cannot be sent as the {name} header"),
        })?;
        self.headers.insert(name, v);
        Ok(self)
    }
}

/// Why one attempt of a request did not get a usable answer.
enum Failed {
    /// The transport failed: no answer.
    Transport(reqwest::Error),
    /// A 5xx answer, kept: it is the answer once the retries run out.
    Server(Response),
    /// No answer head within the timeout.
    Slow,
}

/// The delays between attempts: exponential, jittered, bounded.
pub(super) fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_max_times(ATTEMPTS - 1)
        .with_jitter()
}
impl RegistryRepo {
    fn current_auth(&self) -> Option<String> {
        self.auth.lock().clone()
    }

    fn set_auth(&self, value: String) {
        *self.auth.lock() = Some(value);
    }

    /// A transport error: the server could not be reached, or it answered
    /// with something that is not HTTP breakfs can read (a redirect
    /// refused, a head too large).
    fn transport(&self, e: reqwest::Error, what: &str) -> Error {
        if e.is_connect() || e.is_timeout() {
            return Error::Unreachable {
                registry: self.host.clone(),
                source: e,
            };
        }
        Error::Protocol {
            what: what.to_string(),
            reason: format!(
                "{} answered what breakfs cannot read: {}",
                self.host,
                breakfs_index::Causes(&e)
            ),
        }
    }
    /// Send with auth (one re-try after a 401 challenge) and, for GET/HEAD,
    /// retries with jittered backoff on transport errors and 5xx.
    pub(super) async fn send(&self, req: Req<'_>) -> Result<Response> {
        let mut challenged = false;
        loop {
            let resp = self.send_retrying(&req).await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                if challenged {
                    return Err(self.rejected());
                }
                challenged = true;
                self.authenticate(&resp, &req.scopes).await?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// One request with the current auth; a GET or HEAD is tried again
    /// while the transport fails (a refused redirect aside) or the
    /// registry answers 5xx.
    async fn send_retrying(&self, req: &Req<'_>) -> Result<Response> {
        let idempotent = req.method == Method::GET || req.method == Method::HEAD;
        let outcome = (|| self.send_once(req))
            .retry(retry_policy())
            .when(|f| {
                idempotent
                    && match f {
                        Failed::Transport(e) => !e.is_redirect(),
                        Failed::Server(_) => true,
                        Failed::Slow => false,
                    }
            })
            .notify(|f, delay| match f {
                Failed::Transport(e) => {
                    tracing::debug!(registry = %self.host, error = %breakfs_index::Causes(e), ?delay, "retrying {}", req.what);
                }
                Failed::Server(r) => {
                    tracing::debug!(registry = %self.host, status = %r.status(), ?delay, "retrying {}", req.what);
                }
                Failed::Slow => {}
            })
            .await;
        match outcome {
            Ok(resp) | Err(Failed::Server(resp)) => Ok(resp),
            Err(Failed::Transport(e)) => Err(self.transport(e, req.what)),
            Err(Failed::Slow) => Err(Error::TooSlow {
                what: req.what.to_string(),
                reason: format!("{} did not answer within {:?}", self.host, self.timeout),
            }),
        }
    }

    async fn send_once(&self, req: &Req<'_>) -> std::result::Result<Response, Failed> {
        let mut rb = self
            .client
            .request(req.method.clone(), req.url.clone())
            .headers(self.extra.clone())
            .headers(req.headers.clone());
        if let Some(a) = self.current_auth() {
            rb = rb.header(header::AUTHORIZATION, a);
        }
        if let Some(b) = &req.body {
            rb = rb.body(b.clone());
        }
        // The answer's head within the timeout: a server that accepts
        // and then says nothing (or trickles its headers) holds no one.
        match tokio::time::timeout(self.timeout, rb.send()).await {
            Ok(Ok(r)) if r.status().is_server_error() => Err(Failed::Server(r)),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(Failed::Transport(e)),
            Err(_) => Err(Failed::Slow),
        }
    }

    /// The credentials for this host, looked up (and a helper run) the
    /// first time a registry asks for them.
    async fn credentials(&self) -> Result<Option<&auth::Found>> {
        let Some(path) = &self.config_path else {
            return Ok(None);
        };
        let found = self
            .found
            .get_or_try_init(|| auth::resolve(&self.config, &self.host, path, self.timeout))
            .await?;
        Ok(found.as_ref())
    }

    fn no_credentials(&self) -> Error {
        let place = match &self.config_path {
            Some(p) => format!("no credentials for {} in {}", self.host, p.display()),
            None => "no docker config found ($DOCKER_CONFIG and $HOME are unset)".to_string(),
        };
        let helpers: Vec<String> = self
            .config
            .helpers()
            .map(|h| format!("docker-credential-{h}"))
            .collect();
        let helper = match helpers.as_slice() {
            [] => String::new(),
            hs => format!(" (credential helper {} has none)", hs.join(" nor ")),
        };
        Error::Unauthorized {
            registry: self.host.clone(),
            hint: format!(
                "{place}{helper}; run `docker login {}` or set DOCKER_CONFIG to a directory whose config.json has them",
                self.host
            ),
        }
    }

    fn rejected(&self) -> Error {
        match self.found.get().and_then(Option::as_ref) {
            Some(f) => Error::Unauthorized {
                registry: self.host.clone(),
                hint: format!(
                    "the credentials of user {:?} from {} were rejected; run `docker login {}` again",
                    f.credentials.username, f.from, self.host
                ),
            },
            None => self.no_credentials(),
        }
    }

    /// Answer a 401: fetch a Bearer token, or use Basic credentials.
    async fn authenticate(&self, resp: &Response, extra_scopes: &[String]) -> Result<()> {
        let challenge = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(auth::parse_challenge);
        match challenge {
            Some(Challenge::Basic) => match self.credentials().await? {
                Some(f) => {
                    self.set_auth(f.credentials.basic_header());
                    Ok(())
                }
                None => Err(self.no_credentials()),
            },
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let token = self
                    .fetch_token(&realm, service.as_deref(), scope.as_deref(), extra_scopes)
                    .await?;
                self.set_auth(format!("Bearer {token}"));
                Ok(())
            }
            None => Err(Error::Unauthorized {
                registry: self.host.clone(),
                hint: "it answered 401 without a Basic or Bearer challenge breakfs can follow"
                    .into(),
            }),
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        extra_scopes: &[String],
    ) -> Result<String> {
        let mut url = Url::parse(realm).map_err(|e| Error::Protocol {
            what: format!("auth challenge of registry {}", self.host),
            reason: format!("realm {realm:?} is not a URL: {e}"),
        })?;
        let mut scopes: Vec<String> = Vec::new();
        for s in scope
            .into_iter()
            .map(str::to_string)
            .chain(std::iter::once(format!("repository:{}:pull", self.repo)))
            .chain(extra_scopes.iter().cloned())
        {
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in &scopes {
                q.append_pair("scope", s);
            }
        }
        let found = self.credentials().await?;
        let mut rb = self.client.get(url);
        if let Some(f) = found {
            rb = rb.header(header::AUTHORIZATION, f.credentials.basic_header());
        }
        let resp = rb.send().await.map_err(|e| Error::Unreachable {
            registry: format!("{} (token server {realm})", self.host),
            source: e,
        })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(if found.is_some() {
                self.rejected()
            } else {
                self.no_credentials()
            });
        }
        let what = format!("token from {realm} for registry {}", self.host);
        let resp = expect(resp, &[StatusCode::OK], &what).await?;
        let body = self.body(resp, &what).within(MAX_TOKEN_REPLY).await?;
        auth::parse_token_reply(&body).ok_or_else(|| Error::Protocol {
            what,
            reason: "the reply has no \"token\" or \"access_token\"".into(),
        })
    }
}

/// The redirect policy for peers: a redirect to the same host and port is
/// followed (a few times), one anywhere else is refused: a peer serves what
/// it holds itself, and must not send the node to other addresses.
pub(super) fn same_host_redirects(
    attempt: reqwest::redirect::Attempt<'_>,
) -> reqwest::redirect::Action {
    let same = attempt.previous().first().is_some_and(|first| {
        first.host_str() == attempt.url().host_str()
            && first.port_or_known_default() == attempt.url().port_or_known_default()
    });
    if !same {
        let to = attempt.url().to_string();
        return attempt.error(format!(
            "it redirected to {to}: a peer must serve what it holds itself; not followed"
        ));
    }
    if attempt.previous().len() > MAX_REDIRECTS {
        return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
    }
    attempt.follow()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use parking_lot::Mutex;
    use std::path::PathBuf;
    use std::sync::Arc;

    use breakfs_index::Reference;

    use super::*;
    use crate::ClientOptions;

    /// A registry whose manifests answer by tag: `flaky` 503 twice and then
    /// 200, `down` always 503, `busy` 429, `gone` 404; each request counted.
    async fn scripted_registry() -> (
        u16,
        Arc<Mutex<std::collections::BTreeMap<String, usize>>>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let seen = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let tag = head.split_whitespace().nth(1).unwrap_or("");
                    let tag = tag.rsplit('/').next().unwrap_or("").to_string();
                    let n = {
                        let mut c = seen.lock();
                        let n = c.entry(tag.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let status = match tag.as_str() {
                        "flaky" if n > 2 => "200 OK",
                        "flaky" | "down" => "503 Service Unavailable",
                        "busy" => "429 Too Many Requests",
                        _ => "404 Not Found",
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        (port, counts, task)
    }

    #[tokio::test]
    async fn only_transport_errors_and_5xx_are_retried() {
        let (port, counts, task) = scripted_registry().await;
        let opts = ClientOptions {
            plain_http: true,
            docker_config: Some(PathBuf::from("/nonexistent/config.json")),
            ..ClientOptions::default()
        };
        let repo = RegistryRepo::new(&format!("127.0.0.1:{port}"), "x", &opts).unwrap();
        let tag = |t: &str| Reference::Tag(t.into());
        assert_eq!(repo.get_manifest(&tag("flaky")).await.unwrap().bytes, b"{}");
        let err = repo.get_manifest(&tag("down")).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: 503, .. }), "{err}");
        let err = repo.get_manifest(&tag("busy")).await.unwrap_err();
        assert!(matches!(err, Error::Status { status: 429, .. }), "{err}");
        let err = repo.get_manifest(&tag("gone")).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let counts = counts.lock().clone();
        let expected = [("busy", 1), ("down", ATTEMPTS), ("flaky", 3), ("gone", 1)];
        let expected = expected
            .map(|(t, n)| (t.to_string(), n))
            .into_iter()
            .collect();
        assert_eq!(counts, expected);
        task.abort();
    }

    #[test]
    fn retry_delays_grow_bounded_and_jittered() {
        let delays = || backon::BackoffBuilder::build(retry_policy()).collect::<Vec<_>>();
        let a = delays();
        assert_eq!(a.len(), ATTEMPTS - 1);
        for (i, d) in a.iter().enumerate() {
            let base = BACKOFF * 2u32.pow(i as u32);
            assert!(*d >= base && *d <= (base * 2).min(MAX_BACKOFF * 2), "{a:?}");
        }
        // Two clients that failed together wait different times.
        let spread: std::collections::BTreeSet<Vec<Duration>> = (0..8).map(|_| delays()).collect();
        assert!(spread.len() > 1, "{spread:?}");
    }
}
