//! A plain TCP forwarder that counts the HTTP requests passing through it,
//! to prove which blobs a client asked a registry for (whole or by Range),
//! and the bytes the registry sent back.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Request lines with their Range headers, in order.
type Ranged = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A forwarder on a loopback port; stops accepting when dropped.
pub struct CountingProxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    ranged: Ranged,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    /// Forward `127.0.0.1:<new port>` to `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let ranged: Ranged = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicU64::new(0));
        let (reqs, halt, up) = (requests.clone(), stop.clone(), upstream.to_string());
        let with_ranges = ranged.clone();
        let counted = down.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&up) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let (reqs, counted) = (reqs.clone(), counted.clone());
                let ranged = with_ranges.clone();
                thread::spawn(move || pump_requests(client, server, reqs, ranged));
                thread::spawn(move || pump(s2, c2, &counted));
            }
        });
        CountingProxy {
            port,
            requests,
            ranged,
            down,
            stop,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Request lines seen so far (`GET /v2/.../blobs/sha256:... HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Request lines that asked for a blob.
    pub fn blob_requests(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.contains("/blobs/sha256:"))
            .collect()
    }

    /// Request lines seen so far, each with its `Range` header's value
    /// (`bytes=A-B`) if it had one.
    pub fn requests_with_ranges(&self) -> Vec<(String, Option<String>)> {
        self.ranged.lock().expect("requests lock").clone()
    }

    /// How many range requests for blobs the proxy saw.
    pub fn blob_range_requests(&self) -> usize {
        self.requests_with_ranges()
            .iter()
            .filter(|(line, range)| line.contains("/blobs/") && range.is_some())
            .count()
    }

    /// The `[start, end)` byte ranges asked of each blob so far, by digest
    /// (`sha256:...`); a request without a Range header is the whole blob.
    pub fn ranges_by_blob(&self) -> std::collections::BTreeMap<String, Vec<(u64, u64)>> {
        let mut out: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
        for (line, range) in self.requests_with_ranges() {
            let Some(at) = line.find("/blobs/sha256:") else {
                continue;
            };
            let digest: String = line[at + 7..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            let span = range
                .as_deref()
                .and_then(|r| r.trim().strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(s, e)| Some((s.parse().ok()?, e.parse::<u64>().ok()? + 1)))
                .unwrap_or((0, u64::MAX));
            out.entry(digest).or_default().push(span);
        }
        out
    }

    /// Bytes the upstream sent back so far (heads and bodies).
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Forget the requests seen so far.
    pub fn reset(&self) {
        self.requests.lock().expect("requests lock").clear();
        self.ranged.lock().expect("requests lock").clear();
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, counted: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Forward client bytes, recording every request line (the client sends
/// no bodies to a registry it only reads from).
fn pump_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    reqs: Arc<Mutex<Vec<String>>>,
    ranged: Ranged,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line = Vec::new();
    let mut at_line_start = true;
    // The index in `ranged` of the request whose headers are passing.
    let mut in_headers: Option<usize> = None;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                let l = String::from_utf8_lossy(&line).trim_end().to_string();
                if at_line_start && (l.starts_with("GET ") || l.starts_with("HEAD ")) {
                    reqs.lock().expect("requests lock").push(l.clone());
                    let mut r = ranged.lock().expect("requests lock");
                    r.push((l, None));
                    in_headers = Some(r.len() - 1);
                } else if l.is_empty() {
                    in_headers = None;
                } else if let Some(i) = in_headers
                    && let Some((name, value)) = l.split_once(':')
                    && name.eq_ignore_ascii_case("range")
                    && let Some(slot) = ranged.lock().expect("requests lock").get_mut(i)
                {
                    slot.1 = Some(value.trim().to_string());
                }
                line.clear();
                at_line_start = true;
            } else if line.len() < 4096 {
                line.push(b);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Whether the byte ranges `spans` (as [`CountingProxy::ranges_by_blob`]
/// gives them) together cover `[start, end)`.
pub fn spans_cover(spans: &[(u64, u64)], (start, end): (u64, u64)) -> bool {
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let mut pos = start;
    for (s, e) in spans {
        if s > pos {
            break;
        }
        pos = pos.max(e);
    }
    pos >= end
}
