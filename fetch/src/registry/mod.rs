//! One repository in a registry, over the OCI distribution API: manifests,
//! blobs (whole, ranges, uploads, cross-repository mounts) and tags. How a
//! request is sent (auth, retries) is in `send`; how a body is read within
//! limits, in `body`.

mod body;
mod send;

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable as _;
use breakfs_index::{Descriptor, Digest, Platform, Reference, media_types};
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::auth;
use crate::blobfile::{VerifyingFile, check_bytes};
use crate::{ClientOptions, Error, Result};
use body::expect;
use send::{Req, retry_policy, same_host_redirects};

/// Uploads up to this size go in one PUT; bigger ones in PATCH chunks of it.
const DEFAULT_CHUNK: usize = 16 << 20;
/// Manifests bigger than this are refused (the distribution spec caps at 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;
/// One page of a tag list.
const MAX_TAG_PAGE: usize = 16 << 20;
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
    /// before a body must keep its minimum rate.
    timeout: Duration,
    /// Headers sent with every request (a relay request's).
    extra: HeaderMap,
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
        if !whole {
            check_partial(&resp, start, len, &what)?;
        }
        let mut window = RangeWindow::new(if whole { start } else { 0 }, len);
        let mut body = self.body(resp, &what);
        let mut got = 0u64;
        while let Some(chunk) = body.chunk().await? {
            got += chunk.len() as u64;
            if window.push(&chunk) {
                if !whole && got > len {
                    return Err(longer_than_asked(&what, len));
                }
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
            tracing::debug!(error = %breakfs_index::Causes(&e), "cancelling the upload of {what}");
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
/// A 206 answer must be the range asked for: starting at `start` (per its
/// Content-Range, when it gives one) and no longer than `len` bytes (per
/// its Content-Length). Other bytes would pass for the blob's.
fn check_partial(resp: &reqwest::Response, start: u64, len: u64, what: &str) -> Result<()> {
    if resp.content_length().is_some_and(|n| n > len) {
        return Err(longer_than_asked(what, len));
    }
    let Some(cr) = resp.headers().get(header::CONTENT_RANGE) else {
        return Ok(());
    };
    let text = cr.to_str().unwrap_or("");
    let first = text
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, _)| a.trim().parse::<u64>().ok());
    if first != Some(start) {
        return Err(Error::Protocol {
            what: what.to_string(),
            reason: format!(
                "the registry answered a Range request from byte {start} with \
                 Content-Range {text:?}: other bytes than asked"
            ),
        });
    }
    Ok(())
}

fn longer_than_asked(what: &str, len: u64) -> Error {
    Error::Protocol {
        what: what.to_string(),
        reason: format!(
            "the registry answered a Range request for {len} bytes with a longer body: \
             it does not serve byte ranges faithfully"
        ),
    }
}

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
}
