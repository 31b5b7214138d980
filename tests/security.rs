//! Security of the services (issue 7, item 6): `breakfs node` and `breakfs
//! sched` listen on the configured address only, refuse oversized bodies
//! with 413 and the reason, and with --token-file require a bearer token on
//! the endpoints that change state, while peers' reads of content-addressed
//! data and kube-scheduler's extender calls stay open.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::mount::running;
use crate::node::Node;
use crate::sched::SchedProc;

/// `curl` a request: (status, body). `target` is a URL, or
/// `unix:SOCKET URL` for the control socket.
pub(crate) fn call(
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ]);
    let url = match target.strip_prefix("unix:").and_then(|t| t.split_once(' ')) {
        Some((sock, url)) => {
            c.args(["--unix-socket", sock]);
            url
        }
        None => target,
    };
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if body.is_some() {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    let mut child = c
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body.unwrap_or_default()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn token_file(dir: &Path, secret: &str) -> String {
    let p = dir.join("token");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p.display().to_string()
}

/// The inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The TCP addresses that process `pid` listens on (from its socket fds
/// and /proc/net/tcp{,6}).
fn listening(pid: u32) -> Vec<String> {
    let inodes = socket_inodes(pid);
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // f[1] local address (hex), f[3] state (0A: LISTEN), f[9] inode.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i.to_string() == f[9]) {
                out.push(decode_addr(f[1]));
            }
        }
    }
    out
}

/// `0100007F:1F90` → `127.0.0.1:8080` (IPv6 addresses as hex).
fn decode_addr(hex: &str) -> String {
    let (ip, port) = hex.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    if ip.len() == 8 {
        let n = u32::from_str_radix(ip, 16).unwrap();
        format!("{}:{port}", std::net::Ipv4Addr::from(n.swap_bytes()))
    } else {
        format!("[{ip}]:{port}")
    }
}

/// The pid of the process listening on TCP `port`.
fn pid_listening_on(port: u16) -> u32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_dir(format!("/proc/{pid}/fd")).is_err() {
            continue;
        }
        if listening(pid)
            .iter()
            .any(|a| a.ends_with(&format!(":{port}")))
        {
            return pid;
        }
    }
    panic!("no process listens on port {port}");
}

#[test]
fn node_control_needs_the_token_while_reads_stay_open_and_bodies_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "node-secret-1");
    let node = Node::start(&tmp.path().join("n"), &[], &["--token-file", &token]);
    let u = |p: &str| format!("{}{p}", node.url);
    let valid_prefetch = br#"{"images": []}"#;

    // It listens where it was told and nowhere else (and on its socket).
    let pid = pid_listening_on(node.port());
    assert_eq!(listening(pid), vec![format!("127.0.0.1:{}", node.port())]);

    // Control without the token, or with another: 401 and why.
    let (s, b) = call("POST", &u("/prefetch"), None, Some(valid_prefetch));
    assert_eq!(s, 401, "{b}");
    assert!(
        b.contains("needs `Authorization: Bearer TOKEN`") && b.contains("--token-file"),
        "{b}"
    );
    let (s, b) = call("POST", &u("/prefetch"), Some("guess"), Some(valid_prefetch));
    assert!(s == 401 && b.contains("not this node's"), "{s} {b}");
    let (s, b) = call("POST", &u("/mounts"), None, Some(b"{}"));
    assert_eq!(s, 401, "{b}");
    let (s, b) = call("DELETE", &u("/mounts?mountpoint=/tmp"), None, None);
    assert_eq!(s, 401, "{b}");
    // With it, the request reaches the handler (which refuses these bodies).
    let (s, b) = call(
        "POST",
        &u("/prefetch"),
        Some("node-secret-1"),
        Some(valid_prefetch),
    );
    assert!(s == 400 && b.contains("give \"images\""), "{s} {b}");
    let (s, b) = call("POST", &u("/mounts"), Some("node-secret-1"), Some(b"{}"));
    assert!(s == 400 && b.contains("not a mount request"), "{s} {b}");

    // Bodies over 1 MiB: 413 and why, token or not.
    let big = vec![b' '; (1 << 20) + 1];
    for t in [None, Some("node-secret-1")] {
        let (s, b) = call("POST", &u("/prefetch"), t, Some(&big));
        assert!(s == 413 && b.contains("limit of 1048576 bytes"), "{s} {b}");
    }

    // Reads stay open: the distribution API, the index, metrics, tasks.
    for p in [
        "/v2/",
        "/cache/index",
        "/measurements",
        "/metrics",
        "/prefetch",
    ] {
        let (s, b) = call("GET", &u(p), None, None);
        assert_eq!(s, 200, "{p}: {b}");
    }
    let missing = format!("/v2/any/blobs/sha256:{}", "0".repeat(64));
    assert_eq!(call("GET", &u(&missing), None, None).0, 404);
    // Only content-addressed names: a blob by anything but a digest is refused.
    assert_eq!(call("GET", &u("/v2/any/blobs/latest"), None, None).0, 400);

    // The control socket needs no token: its file permissions guard it.
    let sock = format!("unix:{} http://node/mounts", node.socket.display());
    assert_eq!(call("GET", &sock, None, None).0, 200);
    drop(node);

    // Without a token, mount control is not served over TCP at all.
    let open = Node::start(&tmp.path().join("open"), &[], &[]);
    let (s, b) = call("POST", &format!("{}/mounts", open.url), None, Some(b"{}"));
    assert!(
        s == 403 && b.contains("control socket only") && b.contains("--token-file"),
        "{s} {b}"
    );
    let (s, b) = call(
        "POST",
        &format!("{}/prefetch", open.url),
        None,
        Some(valid_prefetch),
    );
    assert_eq!(s, 400, "{b}");
}

#[test]
fn sched_extender_stays_open_plan_needs_the_token_and_nodes_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "sched-secret-2");
    // A node daemon stand-in that records the Authorization of each poll.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let node_url = format!("http://{}", listener.local_addr().unwrap());
    let auths = Arc::new(Mutex::new(Vec::new()));
    {
        let auths = auths.clone();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_lowercase();
                let auth = text.lines().find_map(|l| {
                    l.strip_prefix("authorization:")
                        .map(|v| v.trim().to_string())
                });
                auths.lock().unwrap().push(auth);
                let body = serde_json::json!({"node": "n", "blobs": [], "partial": [], "chunks": 0,
                    "chunk_bytes": 0, "used": 0, "budget": null, "peers": [], "links": {}})
                .to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
    let sched = SchedProc::start(&[
        "--token-file".into(),
        token,
        "--max-body-size".into(),
        "64Ki".into(),
        "--node".into(),
        format!("n1={node_url}"),
    ]);
    let u = |p: &str| format!("{}{p}", sched.1);
    let port: u16 = sched.1.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(listening(sched.0.id()), vec![format!("127.0.0.1:{port}")]);

    // kube-scheduler sends no token: the extender verbs answer without one.
    let args = serde_json::json!({
        "Pod": {"metadata": {"name": "p"}, "spec": {"containers": []}},
        "NodeNames": ["n1"],
    })
    .to_string();
    for verb in ["/filter", "/prioritize"] {
        let (s, b) = call("POST", &u(verb), None, Some(args.as_bytes()));
        assert_eq!(s, 200, "{verb}: {b}");
    }
    assert_eq!(call("GET", &u("/healthz"), None, None).0, 200);
    // Bodies past maxBodySize: 413 and how to raise it.
    let big = vec![b' '; 65 << 10];
    let (s, b) = call("POST", &u("/prioritize"), None, Some(&big));
    assert!(
        s == 413 && b.contains("limit of 65536 bytes") && b.contains("maxBodySize"),
        "{s} {b}"
    );

    // /plan counts a placement: it needs the token.
    let plan = u("/plan?image=docker://127.0.0.1:9/x:v1&node=n1");
    let (s, b) = call("GET", &plan, None, None);
    assert!(
        s == 401 && b.contains("scheduler's --token-file"),
        "{s} {b}"
    );
    let (s, b) = call("GET", &plan, Some("sched-secret-2"), None);
    assert!(s == 422 && b.contains("planning"), "{s} {b}");

    // Its requests to node daemons carry the token.
    let seen = auths.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the scheduler never polled the node");
    assert!(
        seen.iter()
            .all(|a| a.as_deref() == Some("bearer sched-secret-2")),
        "{seen:?}"
    );
}

/// Whether process `pid` ignores SIGPIPE (`SigIgn` in its status).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (13 - 1)) != 0
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The connections to TCP `port` that process `pid` has yet to deal with:
/// those waiting in its listener's accept queue, and those it accepted and
/// still holds although the client reset them (a reset socket leaves the
/// kernel's tables; its descriptor stays until the process closes it).
fn unhandled_connections(pid: u32, port: u16) -> usize {
    let mut listed = std::collections::HashSet::new();
    let mut queued = 0;
    // The inode column of each table (`/proc/net/unix` has fewer columns).
    for (table, col) in [
        ("tcp", 9),
        ("tcp6", 9),
        ("udp", 9),
        ("udp6", 9),
        ("unix", 6),
        ("netlink", 9),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let Some(inode) = f.get(col).and_then(|i| i.parse::<u64>().ok()) {
                listed.insert(inode);
            }
            // A listener (state 0A) on `port`: its rx_queue is the accept queue.
            let on_port = f.get(1).and_then(|a| a.rsplit_once(':')).map(|(_, p)| p)
                == Some(&format!("{port:04X}")[..]);
            if table.starts_with("tcp") && on_port && f.get(3) == Some(&"0A") {
                let rx = f[4].split_once(':').map_or("0", |(_, rx)| rx);
                queued += usize::from_str_radix(rx, 16).unwrap();
            }
        }
    }
    let held = socket_inodes(pid)
        .into_iter()
        .filter(|inode| !listed.contains(inode))
        .count();
    queued + held
}

/// SO_LINGER 0: closing `s` resets the connection.
fn reset_on_close(s: &std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &linger).expect("setsockopt SO_LINGER");
}

/// A write to a socket whose client hung up must fail with EPIPE, not kill
/// the service: with SIGPIPE at its default action, node daemons died when
/// a peer gave up on a slow read, and their mounts answered ENOTCONN.
#[test]
fn services_outlive_clients_that_hang_up_mid_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("n"), &[], &[]);
    let sched = SchedProc::start(&[format!("--node=n1={}", node.url)]);
    let extender = serde_json::json!({
        "Pod": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x/y:z"}]}},
        "NodeNames": ["n1"],
    })
    .to_string();
    for (what, pid, addr, request) in [
        (
            "breakfs node",
            node.pid(),
            node.url.trim_start_matches("http://").to_string(),
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        ),
        (
            "breakfs sched",
            sched.0.id(),
            sched.1.trim_start_matches("http://").to_string(),
            format!(
                "POST /prioritize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{extender}",
                extender.len()
            ),
        ),
    ] {
        assert!(ignores_sigpipe(pid), "{what} does not ignore SIGPIPE");
        // What it holds unlisted anyway (none so far): not a hang-up.
        let before = unhandled_connections(pid, port_of(&addr));
        // Ask and hang up at once (a reset, not a clean close), many times.
        for _ in 0..50 {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            reset_on_close(&s);
            drop(s);
        }
        // Wait until it has dealt with every hung-up client (a write to
        // each is what would kill it), or died.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            assert!(running(pid), "{what} died when clients hung up");
            let left = unhandled_connections(pid, port_of(&addr)).saturating_sub(before);
            if left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "{what} still holds {left} hung-up connections after 20 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(running(pid), "{what} died when clients hung up");
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{what} answers {:?} after the hang-ups",
            String::from_utf8_lossy(&answer)
        );
    }
}
