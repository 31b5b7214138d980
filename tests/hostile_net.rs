//! Hostile peers and registries (issue 7, item 3): small HTTP servers
//! written here play a peer or the registry and answer with wrong bytes,
//! truncated bodies, endless slow bodies (slowloris), huge headers,
//! redirects elsewhere and wrong lengths, against a real `breakfs node`
//! with a real FUSE mount and a real `breakfs pull`. Each run must end in
//! bounded time (a watchdog, not a timing assert) with an error that names
//! what was wrong, nothing unverified may reach a reader, the store or
//! another peer, and the node must keep serving meanwhile.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::mount::{breakfs, files_of, hex_sha256, ok};
use crate::node::Node;
use crate::support::images::{Layer, T, noise, tar_of, write_image};
use crate::support::registry::TestRegistry;

/// A request as the hostile servers see it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
    /// The registry a relay request names (`Breakfs-Relay`).
    relay: Option<String>,
    /// A `bytes=A-B` range as `[A, B+1)`.
    range: Option<(usize, usize)>,
}

type Answer = dyn Fn(&Seen, &mut TcpStream) + Send + Sync;

/// An HTTP server on a loopback port answering each request (one per
/// connection) with `answer` on a thread of its own; stops accepting when
/// dropped.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Answers to blob requests in progress.
    busy: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(answer: impl Fn(&Seen, &mut TcpStream) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer: Arc<Answer> = Arc::new(answer);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, b2, halt) = (seen.clone(), busy.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut sock) = conn else { continue };
                let (answer, seen, busy) = (answer.clone(), s2.clone(), b2.clone());
                thread::spawn(move || {
                    let Some(req) = read_head(&mut sock) else {
                        return;
                    };
                    seen.lock().unwrap().push(req.clone());
                    let blob = usize::from(req.path.contains("/blobs/"));
                    busy.fetch_add(blob, Ordering::SeqCst);
                    answer(&req, &mut sock);
                    busy.fetch_sub(blob, Ordering::SeqCst);
                    let _ = sock.shutdown(Shutdown::Both);
                });
            }
        });
        Server {
            port,
            seen,
            busy,
            stop,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn blob_requests(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path.contains("/blobs/"))
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Read a request head (the hostile servers take no bodies).
fn read_head(sock: &mut TcpStream) -> Option<Seen> {
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut b).ok()?;
        if n == 0 || head.len() > 64 << 10 {
            return None;
        }
        head.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split_whitespace().nth(1)?.to_string();
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let range = header("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse::<usize>().ok()? + 1))
    });
    Some(Seen {
        path,
        authorization: header("authorization"),
        relay: header("breakfs-relay"),
        range,
    })
}

/// Write a response head; `length` is what Content-Length claims.
fn head(sock: &mut TcpStream, status: &str, length: usize, extra: &str) -> bool {
    let h = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {length}\r\n\
         Content-Type: application/octet-stream\r\n{extra}\r\n"
    );
    sock.write_all(h.as_bytes()).is_ok()
}

fn respond(sock: &mut TcpStream, status: &str, extra: &str, body: &[u8]) {
    if head(sock, status, body.len(), extra) {
        let _ = sock.write_all(body);
    }
}

/// `bytes`, or the asked range of them, as 200 or 206.
fn serve_range(sock: &mut TcpStream, req: &Seen, bytes: &[u8]) {
    match req.range {
        Some((a, b)) if a < bytes.len() => {
            let b = b.min(bytes.len());
            let cr = format!("Content-Range: bytes {a}-{}/{}\r\n", b - 1, bytes.len());
            respond(sock, "206 Partial Content", &cr, &bytes[a..b]);
        }
        _ => respond(sock, "200 OK", "", bytes),
    }
}

/// The digest a `/v2/NAME/blobs/DIGEST` path asks for.
fn blob_of(path: &str) -> Option<&str> {
    path.rsplit_once("/blobs/").map(|(_, d)| d)
}

/// Send one byte every 200 ms until the reader goes (at most a minute).
fn drip(sock: &mut TcpStream) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if sock.write_all(b"x").is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// What a hostile peer does with a blob request.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// The right length, every byte flipped.
    WrongBytes,
    /// Half the body, then the connection closes.
    Truncated,
    /// The head at once, then a byte every 200 ms.
    Slowloris,
    /// A 1 MiB header before the body.
    HugeHeaders,
    /// 307 to another server.
    Redirect,
    /// Content-Length half of what is sent.
    ShortLength,
}

const LIES: [Lie; 6] = [
    Lie::WrongBytes,
    Lie::Truncated,
    Lie::Slowloris,
    Lie::HugeHeaders,
    Lie::Redirect,
    Lie::ShortLength,
];

/// A peer that claims to hold `blobs` whole (its cache index) and lies
/// about their bytes as `lie` says; redirects go to `decoy`.
fn hostile_peer(lie: Lie, blobs: Arc<HashMap<String, Vec<u8>>>, decoy: String) -> Server {
    let listed: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(d, b)| serde_json::json!({"digest": d, "size": b.len()}))
        .collect();
    let index = serde_json::json!({
        "node": "http://hostile.invalid", "blobs": listed, "partial": [],
        "chunks": 0, "chunk_bytes": 0, "used": 0, "budget": null, "peers": [],
    });
    lying_node(lie, index, blobs, decoy)
}

/// A peer that holds nothing but says it relays for registry `host` (its
/// cache index), and lies about the bytes of `blobs` as `lie` says.
fn hostile_relay(
    lie: Lie,
    host: &str,
    blobs: Arc<HashMap<String, Vec<u8>>>,
    decoy: String,
) -> Server {
    let index = serde_json::json!({
        "node": "http://hostile.invalid", "blobs": [], "partial": [],
        "chunks": 0, "chunk_bytes": 0, "used": 0, "budget": null, "peers": [],
        "relay": [host],
    });
    lying_node(lie, index, blobs, decoy)
}

/// A node publishing `index` and answering blob requests with lies about
/// `blobs`.
fn lying_node(
    lie: Lie,
    index: serde_json::Value,
    blobs: Arc<HashMap<String, Vec<u8>>>,
    decoy: String,
) -> Server {
    Server::start(move |req, sock| {
        if req.path == "/cache/index" {
            return respond(sock, "200 OK", "", index.to_string().as_bytes());
        }
        let Some(bytes) = blob_of(&req.path).and_then(|d| blobs.get(d)) else {
            return respond(sock, "404 Not Found", "", b"");
        };
        let (a, b) = req.range.unwrap_or((0, bytes.len()));
        let body = &bytes[a.min(bytes.len())..b.min(bytes.len())];
        let status = if req.range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        match lie {
            Lie::WrongBytes => {
                let wrong: Vec<u8> = body.iter().map(|x| x ^ 0x5a).collect();
                respond(sock, status, "", &wrong);
            }
            Lie::Truncated => {
                if head(sock, status, body.len(), "") {
                    let _ = sock.write_all(&body[..body.len() / 2]);
                }
            }
            Lie::Slowloris => {
                if head(sock, status, body.len(), "") {
                    drip(sock);
                }
            }
            Lie::HugeHeaders => {
                let pad = format!("X-Padding: {}\r\n", "a".repeat(1 << 20));
                respond(sock, status, &pad, body);
            }
            Lie::Redirect => {
                let to = format!("Location: {decoy}{}\r\n", req.path);
                respond(sock, "307 Temporary Redirect", &to, b"");
            }
            Lie::ShortLength => {
                if head(sock, status, body.len() / 2, "") {
                    let _ = sock.write_all(body);
                }
            }
        }
    })
}

/// A small image of incompressible files, as an OCI layout at `dir:v1`;
/// returns the files by path.
fn small_image(dir: &Path) -> Vec<(String, Vec<u8>)> {
    image_of_files(dir, 8)
}

/// An image of `n` incompressible files of 40 KB and up, as an OCI layout
/// at `dir:v1`; returns the files by path.
fn image_of_files(dir: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            (
                format!("data/f{i}"),
                noise(i as u64 + 1, 40_000 + 30_000 * (i % 8)),
            )
        })
        .collect();
    let mut entries = vec![T::Dir("data/")];
    entries.extend(files.iter().map(|(p, b)| T::File(p, b, 0o644)));
    write_image(dir, "v1", &[Layer::gzip(tar_of(&entries))]);
    files
}

/// Refactor the layout `src:v1` to `dest` (a registry or a layout).
fn refactor(src: &Path, dest: &str, work: &Path) {
    ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(work)
        .args(["--to", dest])
        .arg(format!("oci:{}:v1", src.display())));
}

/// [`small_image`] under `tmp`, refactored into a layout, as served: its
/// files and its blobs.
fn refactored_small_image(tmp: &Path) -> (Vec<(String, Vec<u8>)>, Arc<Served>) {
    let files = small_image(&tmp.join("src"));
    let layout = tmp.join("refactored");
    refactor(
        &tmp.join("src"),
        &format!("oci:{}:v1", layout.display()),
        &tmp.join("work"),
    );
    (files, Arc::new(Served::from_layout(&layout)))
}

/// Run `cmd`; it must end within `limit` (else it is killed: it hung).
fn within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish within {limit:?}: it hung");
        }
    }
}

/// Wait for `cond` (a condition, not a time), failing after `limit`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < until,
            "{what} did not happen within {limit:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every blob and chunk file in store `cache` hashes to its name, and every
/// kept range is the registry's bytes: nothing unverified is held (so none
/// can be served to a reader or a peer). Files going away meanwhile (a
/// layer being assembled) are skipped.
fn assert_store_verified(cache: &Path, blob: impl Fn(&str) -> Option<Vec<u8>>) {
    for kind in ["blobs", "chunks"] {
        for e in std::fs::read_dir(cache.join(kind).join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(bytes) = std::fs::read(e.path()) {
                assert_eq!(hex_sha256(&bytes), name, "{kind}/{name} is not verified");
            }
        }
    }
    for l in std::fs::read_dir(cache.join("ranges/sha256"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let layer = l.file_name().to_string_lossy().into_owned();
        let original = blob(&format!("sha256:{layer}")).unwrap();
        for r in std::fs::read_dir(l.path()).into_iter().flatten().flatten() {
            let name = r.file_name().to_string_lossy().into_owned();
            let Some((s, e)) = name.split_once('-') else {
                continue;
            };
            let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
            if let Ok(bytes) = std::fs::read(r.path()) {
                assert!(
                    bytes == original[s..e],
                    "kept range {layer}/{name} is not the layer's bytes"
                );
            }
        }
    }
}

/// An image as a registry serves it: the manifest of tag `v1` and every blob.
struct Served {
    manifest: Vec<u8>,
    config: String,
    layers: Vec<String>,
    blobs: HashMap<String, Vec<u8>>,
}

impl Served {
    fn from_layout(dir: &Path) -> Served {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let read = |d: &str| std::fs::read(dir.join("blobs/sha256").join(&d[7..])).unwrap();
        let m = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest = read(m);
        let v: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        let config = v["config"]["digest"].as_str().unwrap().to_string();
        let layers: Vec<String> = v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect();
        let blobs = std::iter::once(&config)
            .chain(&layers)
            .map(|d| (d.clone(), read(d)))
            .collect();
        Served {
            manifest,
            config,
            layers,
            blobs,
        }
    }
}

/// An image of incompressible files refactored into a registry of its own.
struct Pushed {
    reg: TestRegistry,
    /// `docker://REGISTRY/REPO:v1`.
    reference: String,
    /// The files by path.
    files: Vec<(String, Vec<u8>)>,
    /// The manifest as the registry serves it.
    manifest: serde_json::Value,
    /// Each layer's bytes as the registry holds them, by digest.
    layers: Arc<HashMap<String, Vec<u8>>>,
}

impl Pushed {
    /// An image of `n` files (see [`image_of_files`]) as `repo:v1`, built
    /// under `tmp`.
    fn new(tmp: &Path, n: usize, repo: &str) -> Pushed {
        let files = image_of_files(&tmp.join("src"), n);
        let reg = TestRegistry::start();
        let reference = reg.reference(&format!("{repo}:v1"));
        refactor(&tmp.join("src"), &reference, &tmp.join("work"));
        let manifest =
            ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &reference]));
        let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let mut p = Pushed {
            reg,
            reference,
            files,
            manifest,
            layers: Arc::default(),
        };
        let layers = p.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let d = l["digest"].as_str().unwrap().to_string();
                let b = p.blob(&d).unwrap();
                (d, b)
            })
            .collect();
        p.layers = Arc::new(layers);
        p
    }

    /// Blob `d` (`sha256:...`) as the registry holds it.
    fn blob(&self, d: &str) -> Option<Vec<u8>> {
        std::fs::read(self.reg.blob_data_path(&d[7..])).ok()
    }
}

/// A thread mounting an image through a node daemon and reading every file.
struct Reader {
    got: std::sync::mpsc::Receiver<Vec<(String, Vec<u8>)>>,
    thread: thread::JoinHandle<crate::mount::Mount>,
}

impl Reader {
    /// Mount `reference` through `node` (whose directory is `node_dir`) at
    /// `point` and read every file, on a thread of its own.
    fn start(node: &Node, node_dir: &Path, reference: &str, point: &Path) -> Reader {
        let (tx, got) = std::sync::mpsc::channel();
        let (node_dir, reference, point) = (
            node_dir.to_path_buf(),
            reference.to_string(),
            point.to_path_buf(),
        );
        let control = node.control();
        let thread = thread::spawn(move || {
            let m = crate::mount::Mount::new(
                &reference,
                &point,
                &node_dir.join("unused-cache"),
                &["--node", &control],
            );
            let got: Vec<(String, Vec<u8>)> = files_of(&m.point)
                .into_iter()
                .map(|(p, _)| {
                    let b = std::fs::read(m.point.join(&p)).unwrap_or_else(|e| panic!("{p}: {e}"));
                    (p, b)
                })
                .collect();
            let _ = tx.send(got);
            m
        });
        Reader { got, thread }
    }

    /// Wait for the files (at most `limit`: a watchdog, the read hung past
    /// it) and check them against `files`; returns the mount.
    fn finish(
        self,
        node: &Node,
        limit: Duration,
        files: &[(String, Vec<u8>)],
    ) -> crate::mount::Mount {
        let got = self
            .got
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("reading the mount hung: {}", node.log_text()));
        let mount = self.thread.join().unwrap();
        let mut want = files.to_vec();
        want.sort();
        assert_eq!(got.len(), want.len());
        for ((p, b), (wp, wb)) in got.iter().zip(&want) {
            assert_eq!(p, wp);
            assert!(b == wb, "{p} read wrong bytes through the mount");
        }
        mount
    }
}

#[test]
fn hostile_peers_are_skipped_nothing_they_send_is_used_and_the_node_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let img = Pushed::new(tmp.path(), 8, "hostile/app");
    let (files, reference, manifest, layers) =
        (&img.files, &img.reference, &img.manifest, &img.layers);

    // Peers lying each their own way, all claiming every layer; and where
    // the redirecting one points.
    let decoy = Server::start(|_, sock| respond(sock, "200 OK", "", b"not the blob"));
    let peers: Vec<(Lie, Server)> = LIES
        .iter()
        .map(|&lie| (lie, hostile_peer(lie, layers.clone(), decoy.url())))
        .collect();
    let peer_urls: Vec<String> = peers.iter().map(|(_, p)| p.url()).collect();
    let peer_refs: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    // A registry that trickles its manifest, for a prefetch meanwhile.
    let slow_registry = Server::start(|req, sock| {
        if req.path.contains("/manifests/") && head(sock, "200 OK", 1000, "") {
            drip(sock);
        } else {
            respond(sock, "200 OK", "", b"{}");
        }
    });

    let node = Node::start(
        &tmp.path().join("b"),
        &peer_refs,
        &["--deadline", "6", "--registry-timeout", "3"],
    );
    node.wait_for_peers(&peer_refs);
    let slow_ref = format!("docker://{}/stuck/app:v1", slow_registry.host());
    node.post(
        "/prefetch",
        &serde_json::json!({ "images": [slow_ref] }).to_string(),
    );

    // Mount and read everything; a watchdog fails the test if it hangs.
    let reader = Reader::start(
        &node,
        &tmp.path().join("b"),
        reference,
        &tmp.path().join("mnt"),
    );
    // While a request hangs on the slowloris peer, the node serves others.
    let slowloris = &peers
        .iter()
        .find(|(l, _)| matches!(l, Lie::Slowloris))
        .unwrap()
        .1;
    wait_for(
        "a request held by the slowloris peer",
        Duration::from_secs(30),
        || slowloris.busy.load(Ordering::SeqCst) > 0,
    );
    let config = manifest["config"]["digest"].as_str().unwrap();
    for (path, want) in [
        ("/cache/index".to_string(), None),
        (format!("/v2/any/blobs/{config}"), Some(&config[7..])),
    ] {
        let probe = within(
            Command::new("curl")
                .args(["-sSf", "--max-time", "10"])
                .arg(format!("{}{path}", node.url)),
            Duration::from_secs(20),
        );
        assert!(
            probe.status.success(),
            "the node stopped serving: {probe:?}"
        );
        if let Some(hex) = want {
            assert_eq!(hex_sha256(&probe.stdout), hex, "{path}");
        }
    }
    let mount = reader.finish(&node, Duration::from_secs(60), files);

    // Every liar was asked and found out; the redirect was not followed.
    let log = node.log_text();
    for (lie, p) in &peers {
        assert!(p.blob_requests() > 0, "{lie:?} peer was never asked");
        if !matches!(lie, Lie::WrongBytes) {
            assert!(
                log.contains(&format!("peer {} is not asked again", p.host())),
                "{lie:?} peer was not set aside: {log}"
            );
        }
    }
    assert!(decoy.seen().is_empty(), "a peer's redirect was followed");
    for needle in [
        "the bytes were not used",
        "redirected to",
        "no answer within",
        "answered what breakfs cannot read: ",
    ] {
        assert!(
            log.contains(needle),
            "the log does not say {needle:?}: {log}"
        );
    }
    let samples = crate::node::parse_metrics(&node.get("/metrics"));
    let metric = |k: &str| samples.iter().find(|(n, _)| n == k).map(|s| s.1).unwrap();
    assert!(metric("breakfs_digest_failures_total") > 0.0);
    assert!(metric("breakfs_fetch_bytes_total{source=\"cloud\"}") > 0.0);

    // The prefetch from the trickling registry failed on its own, clearly.
    wait_for("the stuck prefetch to end", Duration::from_secs(30), || {
        node.json("/prefetch")["1"]["finished"] == true
    });
    let task = node.json("/prefetch")["1"].clone();
    let err = task["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("trickles in") && err.contains(&slow_registry.host()),
        "{task}"
    );

    drop(mount);
    assert_store_verified(&node.cache, |d| img.blob(d));
}

#[test]
fn hostile_relays_are_set_aside_and_nothing_they_send_reaches_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let img = Pushed::new(tmp.path(), 40, "hostile/relayed");
    let (reference, layers) = (&img.reference, &img.layers);

    // Peers that say they relay for the registry, each lying its own way.
    let host = img.reg.host();
    let decoy = Server::start(|_, sock| respond(sock, "200 OK", "", b"not the blob"));
    let relays: Vec<(Lie, Server)> = LIES
        .iter()
        .map(|&lie| (lie, hostile_relay(lie, &host, layers.clone(), decoy.url())))
        .collect();
    let relay_urls: Vec<String> = relays.iter().map(|(_, p)| p.url()).collect();
    let relay_refs: Vec<&str> = relay_urls.iter().map(String::as_str).collect();
    let node = Node::start(
        &tmp.path().join("n"),
        &relay_refs,
        &[
            "--relay",
            &host,
            "--deadline",
            "6",
            "--registry-timeout",
            "3",
        ],
    );
    node.wait_for_peers(&relay_refs);

    // Read every file through a mount; a watchdog fails the test if it hangs.
    let reader = Reader::start(
        &node,
        &tmp.path().join("n"),
        reference,
        &tmp.path().join("mnt"),
    );
    let mount = reader.finish(&node, Duration::from_secs(120), &img.files);

    // Every liar was asked to relay from the registry and set aside; the
    // redirect was not followed; the registry served instead.
    for (lie, r) in &relays {
        let asked = r
            .seen()
            .iter()
            .filter(|s| s.path.contains("/blobs/") && s.relay.as_deref() == Some(host.as_str()))
            .count();
        assert!(asked > 0, "{lie:?} relay was never asked: {:?}", r.seen());
    }
    assert!(decoy.seen().is_empty(), "a relay's redirect was followed");
    let log = node.log_text();
    assert!(
        log.contains("the bytes were not used") && log.contains("a relay delivered wrong bytes"),
        "{log}"
    );
    let samples = crate::node::parse_metrics(&node.get("/metrics"));
    let metric = |k: &str| samples.iter().find(|(n, _)| n == k).map(|s| s.1).unwrap();
    assert!(metric("breakfs_digest_failures_total") > 0.0);
    assert!(metric("breakfs_fetch_failures_total{source=\"relay\"}") > 0.0);
    assert!(metric("breakfs_fetch_bytes_total{source=\"cloud\"}") > 0.0);
    drop(mount);
    assert_store_verified(&node.cache, |d| img.blob(d));
}

/// How the hostile registry misbehaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The manifest never ends (chunked, fast).
    EndlessManifest,
    /// The manifest trickles in.
    SlowManifest,
    /// A 1 MiB header with the manifest.
    HugeHeaders,
    /// The config's bytes flipped.
    WrongConfig,
    /// The config's Content-Length half of its size.
    ShortConfig,
    /// Layer bodies cut in half.
    TruncatedLayer,
    /// Blobs redirected to a storage server elsewhere; Basic auth asked.
    RedirectToStorage,
    /// Range requests of layers answered 206 with the blob's first bytes.
    WrongRange,
}

/// A registry serving `img` as repository `app`, misbehaving as `fault`
/// says; blobs redirect to `storage` when asked to.
fn hostile_registry(img: Arc<Served>, fault: Fault, storage: String) -> Server {
    Server::start(move |req, sock| {
        if fault == Fault::RedirectToStorage && req.authorization.is_none() {
            let challenge = "WWW-Authenticate: Basic realm=\"hostile\"\r\n";
            return respond(sock, "401 Unauthorized", challenge, b"");
        }
        if req.path.ends_with("/manifests/v1") {
            let ct = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";
            match fault {
                Fault::EndlessManifest => {
                    let h = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if sock.write_all(h.as_bytes()).is_ok() {
                        let piece = format!("10000\r\n{}\r\n", "{".repeat(0x10000));
                        while sock.write_all(piece.as_bytes()).is_ok() {}
                    }
                }
                Fault::SlowManifest => {
                    if head(sock, "200 OK", img.manifest.len(), ct) {
                        drip(sock);
                    }
                }
                Fault::HugeHeaders => {
                    let pad = format!("{ct}X-Padding: {}\r\n", "a".repeat(1 << 20));
                    respond(sock, "200 OK", &pad, &img.manifest);
                }
                _ => respond(sock, "200 OK", ct, &img.manifest),
            }
            return;
        }
        let Some(d) = blob_of(&req.path) else {
            return respond(sock, "200 OK", "", b"{}");
        };
        let Some(bytes) = img.blobs.get(d) else {
            return respond(sock, "404 Not Found", "", b"");
        };
        match fault {
            Fault::WrongConfig if *d == img.config => {
                let wrong: Vec<u8> = bytes.iter().map(|x| x ^ 0x5a).collect();
                respond(sock, "200 OK", "", &wrong);
            }
            Fault::ShortConfig if *d == img.config => {
                if head(sock, "200 OK", bytes.len() / 2, "") {
                    let _ = sock.write_all(bytes);
                }
            }
            Fault::TruncatedLayer if img.layers.iter().any(|l| l == d) => {
                let (a, b) = req.range.unwrap_or((0, bytes.len()));
                let body = &bytes[a..b.min(bytes.len())];
                if head(sock, "206 Partial Content", body.len(), "") {
                    let _ = sock.write_all(&body[..body.len() / 2]);
                }
            }
            Fault::WrongRange if img.layers.iter().any(|l| l == d) && req.range.is_some() => {
                let (a, b) = req.range.unwrap_or_default();
                let b = b.min(bytes.len());
                let cr = format!("Content-Range: bytes {a}-{}/{}\r\n", b - 1, bytes.len());
                respond(sock, "206 Partial Content", &cr, &bytes[..b - a]);
            }
            Fault::RedirectToStorage => {
                let to = format!("Location: {storage}/storage/{d}\r\n");
                respond(sock, "307 Temporary Redirect", &to, b"");
            }
            _ => serve_range(sock, req, bytes),
        }
    })
}

#[test]
fn hostile_registries_fail_pulls_clearly_in_bounded_time_and_store_nothing_unverified() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, img) = refactored_small_image(tmp.path());
    let storage = {
        let img = img.clone();
        Server::start(move |req, sock| {
            match req
                .path
                .strip_prefix("/storage/")
                .and_then(|d| img.blobs.get(d))
            {
                Some(b) => serve_range(sock, req, b),
                None => respond(sock, "404 Not Found", "", b""),
            }
        })
    };
    let docker = tmp.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();

    let cases: [(Fault, &[&str]); 8] = [
        (
            Fault::EndlessManifest,
            &["manifest", "larger than 8388608 bytes"],
        ),
        (Fault::SlowManifest, &["manifest", "trickles in", "cut off"]),
        (
            Fault::HugeHeaders,
            &["manifest", "message head is too large"],
        ),
        (Fault::WrongConfig, &["digest mismatch", &img.config]),
        (Fault::ShortConfig, &["size mismatch", &img.config]),
        (Fault::TruncatedLayer, &["transfer failed"]),
        (Fault::RedirectToStorage, &[]),
        (Fault::WrongRange, &["TOC", "Range requests"]),
    ];
    for (i, (fault, needles)) in cases.iter().enumerate() {
        let reg = hostile_registry(img.clone(), *fault, storage.url());
        std::fs::write(
            docker.join("config.json"),
            serde_json::json!({"auths": {reg.host(): {"auth": "YWxpY2U6cHc="}}}).to_string(),
        )
        .unwrap();
        let (cache, dest) = (
            tmp.path().join(format!("cache{i}")),
            tmp.path().join(format!("x{i}")),
        );
        let out = within(
            breakfs()
                .env("DOCKER_CONFIG", &docker)
                .args([
                    "pull",
                    "--plain-http",
                    "--registry-timeout",
                    "2",
                    "--deadline",
                    "4",
                ])
                .arg("--cache")
                .arg(&cache)
                .arg("--extract")
                .arg(&dest)
                .arg(format!("docker://{}/app:v1", reg.host())),
            Duration::from_secs(60),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{fault:?}: {err}");
        assert_store_verified(&cache, |d| img.blobs.get(d).cloned());
        if *fault == Fault::RedirectToStorage {
            assert!(out.status.success(), "{err}");
            for (p, b) in &files {
                assert!(std::fs::read(dest.join(p)).unwrap() == *b, "{p}");
            }
            // The registry had the credentials; its storage elsewhere never did.
            assert!(reg.seen().iter().any(|s| s.authorization.is_some()));
            assert!(storage.seen().iter().all(|s| s.authorization.is_none()));
            assert!(!storage.seen().is_empty());
            continue;
        }
        assert!(!out.status.success(), "{fault:?}: the pull succeeded");
        assert!(
            err.contains(&reg.host()),
            "{fault:?}: the error does not name the registry: {err}"
        );
        for n in *needles {
            assert!(
                err.contains(n),
                "{fault:?}: the error does not say {n:?}: {err}"
            );
        }
        if *fault == Fault::WrongRange {
            assert!(
                !err.contains("not eStargz"),
                "a registry's wrong ranges are blamed on the layer: {err}"
            );
        }
        if matches!(fault, Fault::TruncatedLayer | Fault::WrongRange) {
            let named = img.layers.iter().any(|l| err.contains(&l[..19]));
            assert!(named, "the error does not name the layer: {err}");
        }
    }
}

/// How a registry's layer bodies misbehave (issue 22, point 3); every
/// other answer is right.
#[derive(Clone, Copy, Debug)]
enum BadBody {
    /// Half the body, then silence with the connection open.
    Stalled,
    /// The head, then a byte every 200 ms.
    Trickling,
    /// Chunked, and it never ends.
    Endless,
    /// Content-Length half of the body sent.
    ShortLength,
}

/// Keep `sock` open, silent, until the client goes (at most a minute).
fn hold(sock: &mut TcpStream) {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = sock.read(&mut [0u8; 1]);
}

/// A registry serving `img` as `app:v1` whose layer bodies, whole or
/// ranges, misbehave as `bad` says.
fn bad_body_registry(img: Arc<Served>, bad: BadBody) -> Server {
    Server::start(move |req, sock| {
        if req.path.ends_with("/manifests/v1") {
            let ct = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";
            return respond(sock, "200 OK", ct, &img.manifest);
        }
        let Some(d) = blob_of(&req.path) else {
            return respond(sock, "200 OK", "", b"{}");
        };
        let Some(bytes) = img.blobs.get(d) else {
            return respond(sock, "404 Not Found", "", b"");
        };
        if !img.layers.iter().any(|l| l == d) {
            return serve_range(sock, req, bytes);
        }
        let (a, b) = req.range.unwrap_or((0, bytes.len()));
        let (a, b) = (a.min(bytes.len()), b.min(bytes.len()));
        let body = &bytes[a..b];
        let (status, cr) = match req.range {
            Some(_) => (
                "206 Partial Content",
                format!("Content-Range: bytes {a}-{}/{}\r\n", b - 1, bytes.len()),
            ),
            None => ("200 OK", String::new()),
        };
        match bad {
            BadBody::Stalled => {
                if head(sock, status, body.len(), &cr) {
                    let _ = sock.write_all(&body[..body.len() / 2]);
                    hold(sock);
                }
            }
            BadBody::Trickling => {
                if head(sock, status, body.len(), &cr) {
                    drip(sock);
                }
            }
            BadBody::Endless => {
                let h = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n{cr}\r\n");
                if sock.write_all(h.as_bytes()).is_ok() {
                    let piece = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    while sock.write_all(piece.as_bytes()).is_ok() {}
                }
            }
            BadBody::ShortLength => {
                if head(sock, status, body.len() / 2, &cr) {
                    let _ = sock.write_all(body);
                }
            }
        }
    })
}

#[test]
fn stalled_trickling_endless_and_short_layer_bodies_fail_refactor_and_mount_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, img) = refactored_small_image(tmp.path());
    // What the mount's error says besides the layer and the registry (one
    // of them: which timeout ends a stalled read first depends on load).
    let slow: &[&str] = &["no answer within", "timed out", "trickles in"];
    let cases = [
        (BadBody::Stalled, slow),
        (BadBody::Trickling, slow),
        (BadBody::Endless, &["with a longer body"]),
        // "got N bytes", N half of what was asked: which read fails first
        // (the TOC's tail or a chunk) depends on timing; checked below.
        (BadBody::ShortLength, &["got "]),
    ];
    for (i, (bad, says)) in cases.into_iter().enumerate() {
        let reg = bad_body_registry(img.clone(), bad);
        let reference = format!("docker://{}/app:v1", reg.host());
        let dir = tmp.path().join(format!("case{i}"));
        let dest = dir.join("dest");
        let out = within(
            breakfs()
                .args(["refactor", "--plain-http", "--registry-timeout", "2"])
                .arg("--work-dir")
                .arg(dir.join("work"))
                .arg("--to")
                .arg(format!("oci:{}", dest.display()))
                .arg(&reference),
            Duration::from_secs(90),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{bad:?}, refactor: {err}");
        assert!(!out.status.success(), "{bad:?}: refactor succeeded");
        assert!(
            !dest.join("index.json").exists(),
            "{bad:?}: refactor wrote an image"
        );
        let named = img.layers.iter().any(|l| err.contains(&l[..19]));
        assert!(
            named && err.contains(&reg.host()),
            "{bad:?}: refactor does not name the layer: {err}"
        );

        let (point, cache) = (dir.join("mnt"), dir.join("cache"));
        std::fs::create_dir_all(&point).unwrap();
        let out = within(
            breakfs()
                .args(["mount", "--standalone", "--plain-http"])
                .args(["--registry-timeout", "2", "--deadline", "4", "--cache"])
                .arg(&cache)
                .arg(&reference)
                .arg(&point),
            Duration::from_secs(90),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{bad:?}, mount: {err}");
        let mounted = breakfs_fs::is_mountpoint(&point.canonicalize().unwrap());
        if mounted {
            let _ = breakfs().arg("umount").arg(&point).output();
        }
        assert!(
            !out.status.success() && !mounted,
            "{bad:?}: the mount came up"
        );
        let named = img.layers.iter().any(|l| err.contains(&l[..19]));
        assert!(
            named && err.contains(&reg.host()) && says.iter().any(|n| err.contains(n)),
            "{bad:?}: mount does not name the layer, or does not say one of {says:?}: {err}"
        );
        if matches!(bad, BadBody::ShortLength) {
            let short = err.split("got ").skip(1).any(|rest| {
                let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
                !n.is_empty() && rest[n.len()..].starts_with(" bytes")
            });
            assert!(short, "{bad:?}: mount does not say \"got N bytes\": {err}");
        }
        assert_store_verified(&cache, |d| img.blobs.get(d).cloned());
    }
}
