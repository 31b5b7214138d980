//! One repository in a registry, over the OCI distribution API: manifests,
//! blobs (whole, ranges, uploads, cross-repository mounts), tags, and the
//! Basic / Bearer-token auth dance.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use breakfs_index::{Descriptor, Digest, Platform, Reference, media_types};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::auth::{self, Challenge};
use crate::blobfile::{VerifyingFile, check_bytes};
use crate::{ClientOptions, Error, Result};

/// Attempts for idempotent requests that fail on the transport or with a 5xx.
const ATTEMPTS: usize = 3;
/// The first retry's delay; doubled for each further one, plus a random
/// part up to as much again, so that nodes that failed together do not
/// come back together.
const BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Uploads up to this size go in one PUT; bigger ones in PATCH chunks of it.
const DEFAULT_CHUNK: usize = 16 << 20;
/// Manifests bigger than this are refused (the distribution spec caps at 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;
/// A token reply is a small JSON document.
const MAX_TOKEN_REPLY: usize = 1 << 20;
/// One page of a tag list.
const MAX_TAG_PAGE: usize = 16 << 20;
/// Error bodies are read this far at most: the message is at the start.
const MAX_ERROR_BODY: usize = 4 << 10;
/// How long an error body may take (it is only for the message).
const ERROR_BODY_GRACE: Duration = Duration::from_secs(5);
/// A body must average at least this many bytes a second once the client
/// timeout has passed since it began: a server that trickles bytes to hold
/// a reader (slowloris) is cut off, while any link worth using is far faster.
const MIN_RATE: u64 = 8 << 10;
/// Redirects followed at most (a registry sends blobs to its storage once).
const MAX_REDIRECTS: usize = 5;

/// A manifest as the registry served it.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The raw bytes (their digest is the manifest digest).
    pub bytes: Vec<u8>,
    /// The `Content-Type` the registry gave, if any.
    pub content_type: Option<String>,
    /// The digest of `bytes`, checked against the reference or `Docker-Content-Digest`.
    pub digest: Digest,
}

/// One repository in one registry.
#[derive(Clone, Debug)]
pub struct RegistryRepo {
    host: String,
    repo: String,
    base: Url,
    client: reqwest::Client,
    /// What the docker config says about this host.
    config: auth::ConfigLookup,
    config_path: Option<PathBuf>,
    /// The credentials once a challenge asked for them (a helper is run
    /// once, shared by clones).
    found: Arc<tokio::sync::OnceCell<Option<auth::Found>>>,
    /// The `Authorization` value that last worked (shared by clones).
    auth: Arc<Mutex<Option<String>>>,
    chunk_size: usize,
    platform: Platform,
    /// The connect timeout, the longest wait for an answer, and the grace
    /// before a body must keep [`MIN_RATE`].
    timeout: Duration,
    /// Headers sent with every request (a relay request's).
    extra: HeaderMap,
}

/// One request, rebuilt for each attempt.
struct Req<'a> {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
    what: &'a str,
    /// Token scopes beyond `repository:REPO:pull` (push, mount source).
    scopes: Vec<String>,
}

impl<'a> Req<'a> {
    fn new(method: Method, url: Url, what: &'a str) -> Self {
        Req {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            what,
            scopes: Vec::new(),
        }
    }

    fn header(mut self, name: header::HeaderName, value: &str) -> Result<Self> {
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
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF)
        .with_max_delay(MAX_BACKOFF)
        .with_max_times(ATTEMPTS - 1)
        .with_jitter()
}

enum UploadStart {
    Mounted,
    Session(Url),
}

impl RegistryRepo {
    /// A client for `HOST[:PORT]/REPO`; reads the docker config, makes no request yet.
    pub fn new(host: &str, repo: &str, opts: &ClientOptions) -> Result<RegistryRepo> {
        let scheme = if opts.plain_http { "http" } else { "https" };
        let at = opts.endpoints.get(host).map_or(host, String::as_str);
        let base = Url::parse(&format!("{scheme}://{at}/")).map_err(|e| Error::Protocol {
            what: format!("registry {host} (at {at})"),
            reason: format!("not a valid host[:port]: {e}"),
        })?;
        let redirects = if opts.foreign_redirects {
            reqwest::redirect::Policy::limited(MAX_REDIRECTS)
        } else {
            reqwest::redirect::Policy::custom(same_host_redirects)
        };
        let client = reqwest::Client::builder()
            .connect_timeout(opts.timeout)
            .read_timeout(opts.timeout)
            .redirect(redirects)
            .user_agent(concat!("breakfs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Unreachable {
                registry: host.to_string(),
                source: e,
            })?;
        let config_path = opts.docker_config_path();
        let config = match &config_path {
            Some(p) => auth::load_config(p, host)?,
            None => auth::ConfigLookup::default(),
        };
        Ok(RegistryRepo {
            host: host.to_string(),
            repo: repo.to_string(),
            base,
            client,
            config,
            config_path,
            found: Arc::new(tokio::sync::OnceCell::new()),
            auth: Arc::new(Mutex::new(None)),
            chunk_size: DEFAULT_CHUNK,
            platform: opts.platform.clone(),
            timeout: opts.timeout,
            extra: HeaderMap::new(),
        })
    }

    /// The same client sending header `name: value` with every request.
    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Result<RegistryRepo> {
        let v = HeaderValue::from_str(value).map_err(|_| Error::Protocol {
            what: self.name(),
            reason: format!("{value:?} cannot be sent as the {name} header"),
        })?;
        self.extra.insert(name, v);
        Ok(self)
    }

    /// `HOST[:PORT]`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository path.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The platform picked from multi-platform images.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Uploads bigger than `n` bytes go in PATCH chunks of `n` (default 16 MiB).
    pub fn set_upload_chunk_size(&mut self, n: usize) {
        self.chunk_size = n.max(1);
    }

    fn name(&self) -> String {
        format!("docker://{}/{}", self.host, self.repo)
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(&format!("v2/{}/{path}", self.repo))
            .map_err(|e| Error::Protocol {
                what: self.name(),
                reason: format!("cannot build the URL for {path}: {e}"),
            })
    }

    fn current_auth(&self) -> Option<String> {
        self.auth.lock().ok().and_then(|g| g.clone())
    }

    fn set_auth(&self, value: String) {
        if let Ok(mut g) = self.auth.lock() {
            *g = Some(value);
        }
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

    /// A body of `resp` read within the client's limits.
    fn body<'a>(&self, resp: Response, what: &'a str) -> BodyReader<'a> {
        BodyReader::new(resp, what, self.timeout)
    }

    /// Send with auth (one re-try after a 401 challenge) and, for GET/HEAD,
    /// retries with jittered backoff on transport errors and 5xx.
    async fn send(&self, req: Req<'_>) -> Result<Response> {
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
                    tracing::debug!(registry = %self.host, error = %e, ?delay, "retrying {}", req.what);
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

    /// GET a manifest or index by tag or digest, with its digest checked.
    pub async fn get_manifest(&self, reference: &Reference) -> Result<FetchedManifest> {
        let what = format!("manifest {}:{reference}", self.name());
        let what = match reference {
            Reference::Digest(_) => {
                what.replacen(&format!(":{reference}"), &format!("@{reference}"), 1)
            }
            Reference::Tag(_) => what,
        };
        let url = self.url(&format!("manifests/{reference}"))?;
        let req = Req::new(Method::GET, url, &what)
            .header(header::ACCEPT, media_types::ACCEPT_MANIFESTS)?;
        let resp = expect(self.send(req).await?, &[StatusCode::OK], &what).await?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| Digest::parse(s.trim()).ok());
        let bytes = self.body(resp, &what).within(MAX_MANIFEST).await?;
        let digest = Digest::of(&bytes);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => header_digest,
        };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(Error::DigestMismatch {
                what,
                expected,
                actual: digest,
            });
        }
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest,
        })
    }

    /// All tags of the repository, following `Link` pagination.
    pub async fn tags(&self) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let what = format!("tags of {}", self.name());
        let mut url = self.url("tags/list")?;
        url.query_pairs_mut().append_pair("n", "1000");
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let resp = self.send(Req::new(Method::GET, url.clone(), &what)).await?;
            let resp = match expect(resp, &[StatusCode::OK], &what).await {
                Ok(r) => r,
                // A repository nobody pushed to yet has no tags.
                Err(Error::NotFound { .. }) if out.is_empty() => return Ok(out),
                Err(e) => return Err(e),
            };
            let next = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_link_next);
            let page_url = resp.url().clone();
            let body = self.body(resp, &what).within(MAX_TAG_PAGE).await?;
            let list: TagList = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
                what: what.clone(),
                reason: format!("not a tag list: {e}"),
            })?;
            out.extend(list.tags.unwrap_or_default());
            match next {
                Some(n) => {
                    url = page_url.join(&n).map_err(|e| Error::Protocol {
                        what: what.clone(),
                        reason: format!("bad Link header {n:?}: {e}"),
                    })?;
                }
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    fn blob_what(&self, d: &Digest) -> String {
        format!("blob {d} in {}", self.name())
    }

    /// Whether the repository has the blob (HEAD).
    pub async fn has_blob(&self, d: &Digest) -> Result<bool> {
        let what = self.blob_what(d);
        let url = self.url(&format!("blobs/{d}"))?;
        let resp = self.send(Req::new(Method::HEAD, url, &what)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect(resp, &[], &what).await.map(|_| false),
        }
    }

    async fn get_blob(&self, d: &Digest, what: &str) -> Result<Response> {
        let url = self.url(&format!("blobs/{d}"))?;
        let resp = self.send(Req::new(Method::GET, url, what)).await?;
        expect(resp, &[StatusCode::OK], what).await
    }

    /// Stream a blob into `path`, verified, atomically; a broken transfer is retried.
    pub async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        let what = self.blob_what(&desc.digest);
        (|| self.blob_to_file_once(desc, path, &what))
            .retry(retry_policy())
            .when(|e| matches!(e, Error::Transfer { .. }))
            .notify(|e, delay| {
                tracing::debug!(registry = %self.host, error = %breakfs_index::Causes(e), ?delay, "retrying {what}");
            })
            .await
    }

    async fn blob_to_file_once(&self, desc: &Descriptor, path: &Path, what: &str) -> Result<()> {
        let resp = self.get_blob(&desc.digest, what).await?;
        let mut body = self.body(resp, what);
        let mut out = VerifyingFile::create(path).await?;
        while let Some(chunk) = body.chunk().await? {
            out.write_within(&chunk, desc, what).await?;
        }
        out.finish(desc, what).await
    }

    /// Read a whole blob, verified against its descriptor.
    pub async fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let what = self.blob_what(&desc.digest);
        let resp = self.get_blob(&desc.digest, &what).await?;
        let mut body = self.body(resp, &what);
        let mut out = Vec::with_capacity(usize::try_from(desc.size.min(64 << 20)).unwrap_or(0));
        while let Some(chunk) = body.chunk().await? {
            out.extend_from_slice(&chunk);
            if out.len() as u64 > desc.size {
                return Err(Error::SizeMismatch {
                    what,
                    expected: desc.size,
                    actual: out.len() as u64,
                });
            }
        }
        check_bytes(&what, desc, &out)?;
        Ok(out)
    }

    /// Read `len` bytes at `start` of a blob, unverified (shorter at the end).
    /// Works with registries that ignore `Range` (200 with the whole body)
    /// and with redirects to storage (307, followed).
    pub async fn read_range(&self, d: &Digest, start: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let what = format!("bytes {start}+{len} of {}", self.blob_what(d));
        let end = start.saturating_add(len - 1);
        let url = self.url(&format!("blobs/{d}"))?;
        let req = Req::new(Method::GET, url, &what)
            .header(header::RANGE, &format!("bytes={start}-{end}"))?;
        let resp = expect(
            self.send(req).await?,
            &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
            &what,
        )
        .await?;
        let whole = resp.status() == StatusCode::OK;
        let mut window = RangeWindow::new(if whole { start } else { 0 }, len);
        let mut body = self.body(resp, &what);
        while let Some(chunk) = body.chunk().await? {
            if window.push(&chunk) {
                break;
            }
        }
        Ok(window.into_bytes())
    }

    /// Start an upload session, or mount the blob from `mount_from` (same registry).
    async fn start_upload(
        &self,
        d: &Digest,
        mount_from: Option<&str>,
        what: &str,
    ) -> Result<UploadStart> {
        let mut url = self.url("blobs/uploads/")?;
        let mut scopes = vec![format!("repository:{}:pull,push", self.repo)];
        if let Some(from) = mount_from {
            url.query_pairs_mut()
                .append_pair("mount", &d.to_string())
                .append_pair("from", from);
            scopes.push(format!("repository:{from}:pull"));
        }
        let mut req = Req::new(Method::POST, url, what).header(header::CONTENT_LENGTH, "0")?;
        req.scopes = scopes;
        let resp = self.send(req).await?;
        let resp = expect(resp, &[StatusCode::CREATED, StatusCode::ACCEPTED], what).await?;
        if resp.status() == StatusCode::CREATED && mount_from.is_some() {
            return Ok(UploadStart::Mounted);
        }
        Ok(UploadStart::Session(location(&resp, what)?))
    }

    fn push_req<'a>(&self, method: Method, url: Url, what: &'a str) -> Req<'a> {
        let mut r = Req::new(method, url, what);
        r.scopes = vec![format!("repository:{}:pull,push", self.repo)];
        r
    }

    async fn put_final(&self, mut session: Url, d: &Digest, body: Bytes, what: &str) -> Result<()> {
        session
            .query_pairs_mut()
            .append_pair("digest", &d.to_string());
        let len = body.len().to_string();
        let mut req = self
            .push_req(Method::PUT, session, what)
            .header(header::CONTENT_TYPE, "application/octet-stream")?
            .header(header::CONTENT_LENGTH, &len)?;
        req.body = Some(body);
        expect(self.send(req).await?, &[StatusCode::CREATED], what).await?;
        Ok(())
    }

    async fn cancel_upload(&self, session: Url, what: &str) {
        if let Err(e) = self
            .send(self.push_req(Method::DELETE, session, what))
            .await
        {
            tracing::debug!(error = %e, "cancelling the upload of {what}");
        }
    }

    /// Upload a file as a blob; `false` if the repository had it already or
    /// it was mounted from `mount_from` (another repository on this registry).
    pub async fn push_blob_file(
        &self,
        desc: &Descriptor,
        path: &Path,
        mount_from: Option<&str>,
    ) -> Result<bool> {
        if self.has_blob(&desc.digest).await? {
            return Ok(false);
        }
        let what = format!(
            "upload of {} as {}",
            path.display(),
            self.blob_what(&desc.digest)
        );
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| crate::blobfile::open_error(path, &what, e))?;
        let session = match self
            .start_upload(&desc.digest, mount_from.filter(|f| *f != self.repo), &what)
            .await?
        {
            UploadStart::Mounted => return Ok(false),
            UploadStart::Session(u) => u,
        };
        let mut hasher = Sha256::new();
        let mut sent: u64 = 0;
        let mut session = session;
        let chunk = self.chunk_size;
        let mut buf = vec![0u8; chunk];
        let mut pending: Option<Bytes> = None;
        loop {
            let n = read_full(&mut file, &mut buf)
                .await
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            // Hold one chunk back so that the last one can ride on the final PUT.
            if let Some(prev) = pending.take() {
                session = match self.patch(session.clone(), sent, prev.clone(), &what).await {
                    Ok(u) => u,
                    Err(e) => {
                        self.cancel_upload(session, &what).await;
                        return Err(e);
                    }
                };
                sent += prev.len() as u64;
            }
            pending = Some(Bytes::copy_from_slice(&buf[..n]));
        }
        let total = sent + pending.as_ref().map_or(0, |b| b.len() as u64);
        let res = crate::blobfile::check(&what, desc, total, Digest::from_hasher(hasher));
        if let Err(e) = res {
            self.cancel_upload(session, &what).await;
            return Err(e);
        }
        self.put_final(session, &desc.digest, pending.unwrap_or_default(), &what)
            .await?;
        Ok(true)
    }

    async fn patch(&self, session: Url, offset: u64, body: Bytes, what: &str) -> Result<Url> {
        let end = offset + body.len() as u64 - 1;
        let mut req = self
            .push_req(Method::PATCH, session, what)
            .header(header::CONTENT_TYPE, "application/octet-stream")?
            .header(header::CONTENT_RANGE, &format!("{offset}-{end}"))?
            .header(header::CONTENT_LENGTH, &body.len().to_string())?;
        req.body = Some(body);
        let resp = expect(self.send(req).await?, &[StatusCode::ACCEPTED], what).await?;
        location(&resp, what)
    }

    /// Upload bytes as a blob; `false` if the repository had it already.
    pub async fn push_blob_bytes(&self, desc: &Descriptor, bytes: &[u8]) -> Result<bool> {
        let what = format!("upload of {}", self.blob_what(&desc.digest));
        check_bytes(&what, desc, bytes)?;
        if self.has_blob(&desc.digest).await? {
            return Ok(false);
        }
        let UploadStart::Session(session) = self.start_upload(&desc.digest, None, &what).await?
        else {
            return Ok(false);
        };
        self.put_final(session, &desc.digest, Bytes::copy_from_slice(bytes), &what)
            .await?;
        Ok(true)
    }

    /// PUT a manifest (or index) under `tag`; returns its digest.
    pub async fn push_manifest(&self, tag: &str, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let what = format!("manifest {}:{tag}", self.name());
        self.put_manifest(tag, media_type, bytes, &what).await
    }

    /// PUT a manifest by its digest, untagged (an index will list it).
    pub async fn push_manifest_untagged(&self, media_type: &str, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes).to_string();
        let what = format!("manifest {}@{digest}", self.name());
        self.put_manifest(&digest, media_type, bytes, &what).await
    }

    async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
        what: &str,
    ) -> Result<Digest> {
        let what = what.to_string();
        let digest = Digest::of(bytes);
        let url = self.url(&format!("manifests/{reference}"))?;
        let mut req = self
            .push_req(Method::PUT, url, &what)
            .header(header::CONTENT_TYPE, media_type)?;
        req.body = Some(Bytes::copy_from_slice(bytes));
        let resp = expect(
            self.send(req).await?,
            &[StatusCode::CREATED, StatusCode::OK],
            &what,
        )
        .await?;
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| Digest::parse(s.trim()).ok())
            && d != digest
        {
            return Err(Error::DigestMismatch {
                what: format!("{what} (as stored by the registry)"),
                expected: digest,
                actual: d,
            });
        }
        Ok(digest)
    }
}

/// Fill `buf` as far as the file allows; fewer bytes only at the end.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let m = file.read(&mut buf[n..]).await?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Ok(n)
}

/// The upload session URL of a response, resolved against the request URL.
fn location(resp: &Response, what: &str) -> Result<Url> {
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Protocol {
            what: what.to_string(),
            reason: format!(
                "the registry answered {} without a Location header",
                resp.status()
            ),
        })?;
    resp.url().join(loc).map_err(|e| Error::Protocol {
        what: what.to_string(),
        reason: format!("bad Location header {loc:?}: {e}"),
    })
}

/// Pass a response on if its status is one of `ok`; else a clear error.
async fn expect(resp: Response, ok: &[StatusCode], what: &str) -> Result<Response> {
    let status = resp.status();
    if ok.contains(&status) {
        return Ok(resp);
    }
    if status == StatusCode::NOT_FOUND {
        return Err(Error::NotFound {
            what: what.to_string(),
        });
    }
    let body = error_text(resp, what).await;
    let mut body: String = body.trim().chars().take(300).collect();
    if body.is_empty() {
        body = "(no body)".into();
    }
    Err(Error::Status {
        what: what.to_string(),
        status: status.as_u16(),
        body,
    })
}

/// The start of an error body, as text: at most [`MAX_ERROR_BODY`] bytes,
/// given up on (with what came) when it is slow.
async fn error_text(resp: Response, what: &str) -> String {
    let mut body = BodyReader::new(resp, what, ERROR_BODY_GRACE);
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match body.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) | Err(_) => break,
        }
    }
    out.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&out).into_owned()
}

/// The redirect policy for peers: a redirect to the same host and port is
/// followed (a few times), one anywhere else is refused: a peer serves what
/// it holds itself, and must not send the node to other addresses.
fn same_host_redirects(attempt: reqwest::redirect::Attempt<'_>) -> reqwest::redirect::Action {
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

/// A response body read within limits: at most a given size where the
/// caller says, and on average at least [`MIN_RATE`] bytes a second once
/// `grace` has passed since the body began.
struct BodyReader<'a> {
    resp: Response,
    what: &'a str,
    grace: Duration,
    began: tokio::time::Instant,
    got: u64,
}

impl<'a> BodyReader<'a> {
    fn new(resp: Response, what: &'a str, grace: Duration) -> Self {
        BodyReader {
            resp,
            what,
            grace,
            began: tokio::time::Instant::now(),
            got: 0,
        }
    }

    /// The next piece of the body; `None` at its end.
    async fn chunk(&mut self) -> Result<Option<Bytes>> {
        let allowed = Duration::from_secs_f64(self.got as f64 / MIN_RATE as f64);
        let due = self.began + self.grace + allowed;
        match tokio::time::timeout_at(due, self.resp.chunk()).await {
            Ok(Ok(Some(c))) => {
                self.got += c.len() as u64;
                Ok(Some(c))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => Err(Error::Transfer {
                what: self.what.to_string(),
                source: e,
            }),
            Err(_) => Err(Error::TooSlow {
                what: self.what.to_string(),
                reason: format!(
                    "the body trickles in: {} bytes in {:.1} s, less than {MIN_RATE} bytes/s \
                     after the first {:?}",
                    self.got,
                    self.began.elapsed().as_secs_f64(),
                    self.grace
                ),
            }),
        }
    }

    /// The whole body, refused as soon as it passes `max` bytes.
    async fn within(mut self, max: usize) -> Result<Vec<u8>> {
        let too_big = |n: u64| Error::Protocol {
            what: self.what.to_string(),
            reason: format!("the body is larger than {max} bytes ({n} or more); refused"),
        };
        if let Some(n) = self.resp.content_length().filter(|n| *n > max as u64) {
            return Err(too_big(n));
        }
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            if out.len() + c.len() > max {
                return Err(too_big((out.len() + c.len()) as u64));
            }
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

/// The `rel="next"` target of a `Link` header.
pub(crate) fn parse_link_next(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let part = part.trim();
        let (target, params) = part.strip_prefix('<')?.split_once('>')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().replace(' ', "");
            p == "rel=\"next\"" || p == "rel=next"
        });
        is_next.then(|| target.to_string())
    })
}

/// Collects bytes `[skip, skip+len)` of a stream of chunks.
pub(crate) struct RangeWindow {
    skip: u64,
    len: u64,
    out: Vec<u8>,
}

impl RangeWindow {
    /// A window `len` bytes long after the first `skip` bytes.
    pub(crate) fn new(skip: u64, len: u64) -> Self {
        RangeWindow {
            skip,
            len,
            out: Vec::new(),
        }
    }

    /// Feed a chunk; `true` once the window is full.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) -> bool {
        if self.skip > 0 {
            let s = usize::try_from(self.skip.min(chunk.len() as u64)).unwrap_or(chunk.len());
            chunk = &chunk[s..];
            self.skip -= s as u64;
        }
        let room = self.len - self.out.len() as u64;
        let take = usize::try_from(room.min(chunk.len() as u64)).unwrap_or(chunk.len());
        self.out.extend_from_slice(&chunk[..take]);
        self.out.len() as u64 == self.len
    }

    /// The bytes collected.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::auth::Credentials;
    use proptest::prelude::*;

    #[test]
    fn link_next() {
        assert_eq!(
            parse_link_next(r#"</v2/x/tags/list?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/x/tags/list?last=b&n=2")
        );
        assert_eq!(
            parse_link_next(r#"<https://a/p?q=1>; rel="prev", <https://a/n>; rel=next"#).as_deref(),
            Some("https://a/n")
        );
        assert_eq!(parse_link_next(r#"</x>; rel="prev""#), None);
        assert_eq!(parse_link_next("garbage"), None);
    }

    /// A tiny stand-in for a registry with a token server, for what Debian's
    /// registry cannot show: the Bearer flow, pagination, a 307 to storage
    /// and a storage that ignores `Range`.
    async fn fake_registry() -> (u16, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = sock.read(&mut b).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&b[..n]);
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let authz = head
                        .lines()
                        .find_map(|l| l.strip_prefix("authorization: "))
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    let basic = Credentials {
                        username: "alice".into(),
                        password: "pw".into(),
                    }
                    .basic_header();
                    let (status, extra, body): (&str, String, String) = if path
                        .starts_with("/token")
                    {
                        if authz == basic && path.contains("scope=repository%3Ax%3Apull") {
                            ("200 OK", String::new(), r#"{"token":"tok"}"#.into())
                        } else {
                            ("401 Unauthorized", String::new(), String::new())
                        }
                    } else if path == "/storage/blob" {
                        // Ignores Range: the whole body with 200.
                        ("200 OK", String::new(), "0123456789abcdef".into())
                    } else if authz != "Bearer tok" {
                        (
                            "401 Unauthorized",
                            format!(
                                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:x:pull\"\r\n"
                            ),
                            String::new(),
                        )
                    } else if path.starts_with("/v2/x/tags/list") && path.contains("last=a") {
                        (
                            "200 OK",
                            String::new(),
                            r#"{"name":"x","tags":["b"]}"#.into(),
                        )
                    } else if path.starts_with("/v2/x/tags/list") {
                        (
                            "200 OK",
                            "Link: </v2/x/tags/list?last=a&n=1>; rel=\"next\"\r\n".into(),
                            r#"{"name":"x","tags":["a"]}"#.into(),
                        )
                    } else if path.starts_with("/v2/x/blobs/") {
                        (
                            "307 Temporary Redirect",
                            "Location: /storage/blob\r\n".into(),
                            String::new(),
                        )
                    } else {
                        ("404 Not Found", String::new(), String::new())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn bearer_flow_pagination_redirect_and_full_body_range() {
        let (port, task) = fake_registry().await;
        let dir = tempfile::tempdir().unwrap();
        let host = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.json");
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:pw");
        std::fs::write(
            &cfg,
            serde_json::json!({"auths": {&host: {"auth": auth}}}).to_string(),
        )
        .unwrap();
        let opts = ClientOptions {
            plain_http: true,
            docker_config: Some(cfg),
            ..ClientOptions::default()
        };
        let repo = RegistryRepo::new(&host, "x", &opts).unwrap();
        assert_eq!(repo.tags().await.unwrap(), vec!["a", "b"]);
        let d = Digest::of(b"0123456789abcdef");
        assert_eq!(repo.read_range(&d, 3, 4).await.unwrap(), b"3456");
        assert_eq!(repo.read_range(&d, 14, 10).await.unwrap(), b"ef");
        let desc = Descriptor::new("application/octet-stream", d, 16);
        assert_eq!(repo.read_blob(&desc).await.unwrap(), b"0123456789abcdef");

        // Without credentials the token server refuses: say how to log in.
        let anon = ClientOptions {
            docker_config: Some(dir.path().join("none.json")),
            ..opts
        };
        let err = RegistryRepo::new(&host, "x", &anon)
            .unwrap()
            .tags()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("docker login {host}")), "{err}");
        task.abort();
    }

    #[tokio::test]
    async fn an_endpoint_reaches_a_named_registry_at_another_address() {
        let (port, task) = fake_registry().await;
        let dir = tempfile::tempdir().unwrap();
        // The image's registry name; its credentials are filed under it.
        let name = "registry.edge.invalid:5000";
        let cfg = dir.path().join("config.json");
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:pw");
        std::fs::write(
            &cfg,
            serde_json::json!({"auths": {name: {"auth": auth}}}).to_string(),
        )
        .unwrap();
        let mut opts = ClientOptions {
            plain_http: true,
            docker_config: Some(cfg),
            ..ClientOptions::default()
        };
        opts.endpoints
            .insert(name.to_string(), format!("127.0.0.1:{port}"));
        let repo = RegistryRepo::new(name, "x", &opts).unwrap();
        assert_eq!(repo.host(), name);
        assert_eq!(repo.tags().await.unwrap(), vec!["a", "b"]);
        task.abort();
    }

    proptest! {
        #[test]
        fn range_window_slices_any_chunking(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            start in 0u64..320,
            len in 0u64..320,
            cut in 1usize..50,
        ) {
            let mut w = RangeWindow::new(start, len);
            for c in data.chunks(cut) {
                if w.push(c) { break; }
            }
            let s = (start as usize).min(data.len());
            let e = (start.saturating_add(len) as usize).min(data.len());
            prop_assert_eq!(w.into_bytes(), data[s..e].to_vec());
        }
    }

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
                        let mut c = seen.lock().unwrap();
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
        let counts = counts.lock().unwrap().clone();
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
