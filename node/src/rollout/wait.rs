//! Reading from a peer that has, or is fetching, what this node wants:
//! the peer's server holds the request (bounded) until its own fetch ends.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{StatusCode, header};
use breakfs_fetch::{Error, Result, Source, SourceClass};
use breakfs_index::{Causes, Digest};
use futures::future::BoxFuture;

use super::WAIT_HEADER;
use crate::peer::PEER_REPO;

/// `HOST:PORT` of a peer URL (as the peers' names in the fetch chain say
/// it), or the URL itself.
pub(super) fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| url.to_string())
}

/// A peer that has, or is fetching, chunks: read with a request its server
/// holds (at most `wait`) until its own fetch of them ends.
pub(super) struct PeerWait {
    pub(super) url: String,
    pub(super) host: String,
    pub(super) client: reqwest::Client,
    pub(super) wait: Duration,
    pub(super) links: Arc<crate::peer::Links>,
}

impl Source for PeerWait {
    fn name(&self) -> String {
        format!("peer {}", self.host)
    }

    fn class(&self) -> SourceClass {
        SourceClass::Peer
    }

    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let what = format!("bytes {start}+{len} of {blob} at peer {}", self.url);
            let r = self.get(blob, start, len, &what).await;
            if matches!(r, Err(Error::Unavailable { .. })) {
                self.links.failure(&self.url);
            }
            r
        })
    }

    fn observe(&self, bytes: u64, secs: f64) {
        self.links.transfer(&self.url, bytes, secs);
    }
}

impl PeerWait {
    async fn get(&self, blob: &Digest, start: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let failed = |reason: String| Error::Unavailable {
            what: what.to_string(),
            reason,
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        let resp = self
            .client
            .get(format!("{}/v2/{PEER_REPO}/blobs/{blob}", self.url))
            .header(header::RANGE, format!("bytes={start}-{}", start + len - 1))
            .header(WAIT_HEADER, self.wait.as_millis().to_string())
            // The wait, then the transfer: a range of a few MiB on a
            // cluster link.
            .timeout(self.wait + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| failed(Causes(&e).to_string()))?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::NOT_FOUND => {
                return Err(Error::NotFound {
                    what: what.to_string(),
                });
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                return Err(Error::Busy {
                    what: what.to_string(),
                    reason: format!("the peer answered {}", resp.status()),
                });
            }
            s => return Err(failed(format!("the peer answered {s}"))),
        }
        let body = breakfs_fetch::guard::body_within(resp, len as usize, "a range from a peer")
            .await
            .map_err(|e| failed(Causes(&e).to_string()))?;
        if body.len() as u64 != len {
            return Err(failed(format!("got {} of {len} bytes", body.len())));
        }
        Ok(body)
    }
}
