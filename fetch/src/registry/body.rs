//! Reading a registry's answer within limits: a body that must keep a
//! minimum rate and may be capped in size, and the error an unexpected
//! status makes (with the start of its body).

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Response, StatusCode};

use super::RegistryRepo;
use crate::{Error, Result};

/// Error bodies are read this far at most: the message is at the start.
const MAX_ERROR_BODY: usize = 4 << 10;
/// How long an error body may take (it is only for the message).
const ERROR_BODY_GRACE: Duration = Duration::from_secs(5);
/// A body must average at least this many bytes a second once the client
/// timeout has passed since it began: a server that trickles bytes to hold
/// a reader (slowloris) is cut off, while any link worth using is far faster.
const MIN_RATE: u64 = 8 << 10;

impl RegistryRepo {
    /// A body of `resp` read within the client's limits.
    pub(super) fn body<'a>(&self, resp: Response, what: &'a str) -> BodyReader<'a> {
        BodyReader::new(resp, what, self.timeout)
    }
}

/// Pass a response on if its status is one of `ok`; else a clear error.
pub(super) async fn expect(resp: Response, ok: &[StatusCode], what: &str) -> Result<Response> {
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
/// A response body read within limits: at most a given size where the
/// caller says, and on average at least [`MIN_RATE`] bytes a second once
/// `grace` has passed since the body began.
pub(super) struct BodyReader<'a> {
    resp: Response,
    what: &'a str,
    grace: Duration,
    began: tokio::time::Instant,
    got: u64,
}

impl<'a> BodyReader<'a> {
    pub(super) fn new(resp: Response, what: &'a str, grace: Duration) -> Self {
        BodyReader {
            resp,
            what,
            grace,
            began: tokio::time::Instant::now(),
            got: 0,
        }
    }

    /// The next piece of the body; `None` at its end.
    pub(super) async fn chunk(&mut self) -> Result<Option<Bytes>> {
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
    pub(super) async fn within(mut self, max: usize) -> Result<Vec<u8>> {
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
