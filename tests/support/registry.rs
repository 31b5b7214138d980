//! A real Docker Registry 2.x (Debian's `docker-registry`) on a free
//! loopback port, with its own storage directory and config; optionally
//! behind htpasswd (Basic) auth. Killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry binary the tests run.
pub const REGISTRY_BIN: &str = "docker-registry";

/// A running registry; the process is killed and its storage removed on drop.
pub struct TestRegistry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl TestRegistry {
    /// Start an open registry (no auth).
    pub fn start() -> TestRegistry {
        Self::start_inner(None)
    }

    /// Start a registry that wants `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> TestRegistry {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> TestRegistry {
        // A port can be taken between probing and binding: try a few times.
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("creating a temp dir for the registry");
            let mut auth_yaml = String::new();
            if let Some((user, password)) = auth {
                let hash = bcrypt::hash_with_result(password, 4)
                    .expect("hashing the test password")
                    .format_for_version(bcrypt::Version::TwoY);
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("writing htpasswd");
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: breakfs-test\n    path: {}\n",
                    htpasswd.display()
                );
            }
            let port = free_port();
            let config = dir.path().join("config.yml");
            let yaml = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: breakfs-test-secret\n{auth_yaml}",
                dir.path().join("storage").display()
            );
            std::fs::write(&config, yaml).expect("writing the registry config");
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path).expect("creating the registry log");
            let log2 = log.try_clone().expect("cloning the log handle");
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {REGISTRY_BIN} (apt-get install docker-registry): {e}")
                });
            let mut reg = TestRegistry { child, dir, port };
            if reg.wait_ready(Duration::from_secs(20)) {
                return reg;
            }
            last_log = reg.log();
        }
        panic!("{REGISTRY_BIN} did not come up; its log:\n{last_log}");
    }

    /// Poll `GET /v2/` until the registry answers (any HTTP status) or it exits.
    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Some(200 | 401) = http_status(self.port, "/v2/") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `docker://127.0.0.1:PORT/REPO_AND_TAG`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("docker://{}/{repo_and_tag}", self.host())
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of the blob with hex digest `hex`.
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The registry's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The temp dir that holds config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kill the registry process, keeping its storage and port for [`TestRegistry::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("opening the registry log");
        let log2 = log.try_clone().expect("cloning the log handle");
        self.child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("restarting the registry");
        assert!(
            self.wait_ready(Duration::from_secs(20)),
            "the registry did not come back: {}",
            self.log()
        );
    }

    /// Freeze (`true`) or thaw (`false`) the registry process: connections
    /// are accepted by the kernel but never answered while frozen.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let st = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(st.success(), "kill {sig} of the registry failed");
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    l.local_addr().expect("reading the bound address").port()
}

/// The status of a plain `GET path` on 127.0.0.1:port, if anything answered.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}
