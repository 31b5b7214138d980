//! The systemd integration in `systemd/`: the unit files and containerd's
//! unit with the breakfs drop-in pass `systemd-analyze verify`, and the node daemon speaks the readiness
//! protocol (`READY=1` once it serves, `STOPPING=1` on SIGTERM, exit 0), with
//! its flags alone and with the example `node.toml`.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the units start breakfs once installed.
const INSTALLED: &str = "/usr/local/bin/breakfs";

/// containerd's unit, which `containerd.service.d/breakfs.conf` extends.
const CONTAINERD_UNIT: &str = "/lib/systemd/system/containerd.service";

/// How long the daemon has to say READY=1, and then STOPPING=1.
const NOTIFY_LIMIT: Duration = Duration::from_secs(30);

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

#[test]
fn units_pass_systemd_analyze_verify() {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "systemd-analyze is needed to check the unit files ({other:?}): \
             install Debian's `systemd` package (scripts/install-deps.sh)"
        ),
    }
    // verify wants every ExecStart= binary to exist: point the units at the
    // binary under test, in a directory of their own.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["breakfs-node.service", "breakfs-mount@.service"] {
        let text = std::fs::read_to_string(systemd_dir().join(name)).unwrap();
        assert!(
            text.contains(&format!("ExecStart={INSTALLED} ")),
            "{name} should start {INSTALLED}"
        );
        let text = text.replace(INSTALLED, env!("CARGO_BIN_EXE_breakfs"));
        std::fs::write(tmp.path().join(name), text).unwrap();
    }
    // containerd's unit as Debian ships it, with the drop-in beside it:
    // verify reads drop-ins from `NAME.d/` in the given units' directories.
    let containerd_unit = Path::new(CONTAINERD_UNIT);
    assert!(
        containerd_unit.exists(),
        "{CONTAINERD_UNIT} is needed to check the containerd drop-in: \
         install Debian's `containerd` package (scripts/install-deps.sh)"
    );
    std::fs::copy(containerd_unit, tmp.path().join("containerd.service")).unwrap();
    let dropins = tmp.path().join("containerd.service.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(
        systemd_dir().join("containerd.service.d/breakfs.conf"),
        dropins.join("breakfs.conf"),
    )
    .unwrap();
    // An instance of the template resolves to breakfs-mount@.service beside
    // it, and its BindsTo= to breakfs-node.service there too.
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join("breakfs-node.service"))
        .arg(tmp.path().join("breakfs-mount@example.service"))
        .arg(tmp.path().join("containerd.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}): {stderr}",
        out.status
    );
    // Unknown keys and bad values are only warnings: none about our units
    // (warnings about the host's own units are not ours to fix).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("breakfs")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the units:\n{}",
        ours.join("\n")
    );
}

#[test]
fn node_daemon_notifies_ready_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = Notify::at_path(&tmp.path().join("notify.sock"));
    let cache = tmp.path().join("cache");
    let socket = tmp.path().join("node.sock");
    let mut node = Node::start(tmp.path(), &notify.env, |c| {
        c.args(["node", "--listen", "127.0.0.1:0", "--cache"])
            .arg(&cache)
            .arg("--socket")
            .arg(&socket);
    });
    ready_then_stopping(&mut node, &notify, &[&socket]);
}

#[test]
fn node_daemon_starts_from_the_example_config() {
    // The shipped node.toml parses and the daemon comes up with it; flags
    // move what would need root or a fixed port into the test's directory.
    // An abstract NOTIFY_SOCKET, as systemd gives to some containers.
    let tmp = tempfile::tempdir().unwrap();
    let notify = Notify::abstract_name();
    let cache = tmp.path().join("cache");
    let socket = tmp.path().join("node.sock");
    let snapshots = tmp.path().join("snapshotter.sock");
    let mut node = Node::start(tmp.path(), &notify.env, |c| {
        c.args(["node", "--config"])
            .arg(systemd_dir().join("node.toml"))
            .args(["--listen", "127.0.0.1:0", "--cache"])
            .arg(&cache)
            .arg("--socket")
            .arg(&socket)
            .arg("--snapshotter-socket")
            .arg(&snapshots);
    });
    // The snapshotter socket too: containerd is ordered after READY=1.
    ready_then_stopping(&mut node, &notify, &[&socket, &snapshots]);
}

/// Waits for READY=1, checks the `sockets` are there, sends SIGTERM,
/// waits for STOPPING=1 and a clean exit.
fn ready_then_stopping(node: &mut Node, notify: &Notify, sockets: &[&Path]) {
    notify.wait_for(node, "READY=1");
    for socket in sockets {
        let is_socket = std::fs::symlink_metadata(socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        assert!(
            is_socket,
            "READY=1 sent but no socket at {}\n{}",
            socket.display(),
            node.log()
        );
    }
    let pid = node.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success(), "kill -TERM {pid} failed");
    notify.wait_for(node, "STOPPING=1");
    let deadline = Instant::now() + NOTIFY_LIMIT;
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "breakfs node still running {NOTIFY_LIMIT:?} after STOPPING=1\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "breakfs node exited with {status} on SIGTERM\n{}",
        node.log()
    );
}

/// A `breakfs node` process, killed on drop if still running.
struct Node {
    child: Child,
    log: PathBuf,
}

impl Node {
    fn start(dir: &Path, notify_socket: &str, args: impl FnOnce(&mut Command)) -> Node {
        let log = dir.join("node.log");
        // One file for both streams, so that they interleave as written.
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakfs"));
        args(&mut cmd);
        cmd.env("NOTIFY_SOCKET", notify_socket)
            // Status records of its mounts, apart from real ones.
            .env("BREAKFS_RUN_DIR", dir.join("run"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().unwrap();
        Node { child, log }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("breakfs node's output:\n{text}")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The socket systemd would listen on, and `NOTIFY_SOCKET` naming it.
struct Notify {
    socket: UnixDatagram,
    env: String,
}

impl Notify {
    fn at_path(path: &Path) -> Notify {
        let socket = UnixDatagram::bind(path).unwrap();
        Notify {
            socket,
            env: path.to_str().unwrap().to_owned(),
        }
    }

    fn abstract_name() -> Notify {
        // Abstract names are machine-wide: make this one unique.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("breakfs-test-notify-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Notify {
            socket,
            env: format!("@{name}"),
        }
    }

    /// Receives datagrams until one has the line `want` (a datagram may
    /// carry several `KEY=VALUE` lines), failing fast if the daemon exits.
    fn wait_for(&self, node: &mut Node, want: &str) {
        let deadline = Instant::now() + NOTIFY_LIMIT;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let exited = node.child.try_wait().unwrap();
            // What it sent just before exiting is still in the socket.
            self.socket.set_nonblocking(true).unwrap();
            while let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = msg.lines().any(|l| l == want);
                seen.push(msg);
                if found {
                    return;
                }
            }
            self.socket.set_nonblocking(false).unwrap();
            if let Some(status) = exited {
                panic!(
                    "breakfs node exited with {status} before {want} (received meanwhile: {seen:?})\n{}",
                    node.log()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {want} from breakfs node in {NOTIFY_LIMIT:?} (received meanwhile: {seen:?})\n{}",
                node.log()
            );
            // Short reads, so that a daemon that dies is noticed at once.
            self.socket
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let found = msg.lines().any(|l| l == want);
                    seen.push(msg);
                    if found {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("receiving on NOTIFY_SOCKET {}: {e}", self.env),
            }
        }
    }
}
