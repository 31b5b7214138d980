//! What a node daemon is started with: its settings and its listeners,
//! bound by the caller (a test binds `127.0.0.1:0`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakfs_fetch::ClientOptions;
use breakfs_fetch::guard::Token;
use tokio::net::{TcpListener, UnixListener};

use crate::{Error, Result};

/// A node daemon's settings (`breakfs node` merges its flags and config
/// file into one).
#[derive(Clone)]
pub struct Config {
    /// The URL peers reach this node at [default: `http://` and the TCP
    /// listener's address, 127.0.0.1 for an unspecified one].
    pub advertise: Option<String>,
    /// The content store's directory.
    pub cache: PathBuf,
    /// Keep the store within this many bytes.
    pub budget: Option<u64>,
    /// Configured peers (`http://HOST:PORT`).
    pub peers: Vec<String>,
    /// Whether to add the peers that peers know.
    pub learn_peers: bool,
    /// Registries (`HOST[:PORT]`) to relay for and stripe cold pulls over.
    pub relay: Vec<String>,
    /// The registry client's options.
    pub client: ClientOptions,
    /// Background work at most this many bytes per second.
    pub prefetch_rate: Option<u64>,
    /// How long a read waits for a missing chunk.
    pub deadline: Duration,
    /// Parallel range requests.
    pub parallel: usize,
    /// The bearer token that state-changing requests over TCP and relay
    /// requests must carry.
    pub token: Option<Token>,
    /// Check the whole store before serving (`breakfs verify --repair`).
    pub verify: bool,
    /// Serve containerd's snapshots API on this Unix socket (snapshots
    /// kept in `CACHE/snapshotter`).
    pub snapshotter_socket: Option<PathBuf>,
}

impl Config {
    /// The defaults for a store at `cache`: no budget, no peers (learning
    /// on), no relay, 30 s deadline, 8 parallel requests.
    pub fn new(cache: PathBuf) -> Config {
        Config {
            advertise: None,
            cache,
            budget: None,
            peers: Vec::new(),
            learn_peers: true,
            relay: Vec::new(),
            client: ClientOptions::default(),
            prefetch_rate: None,
            deadline: Duration::from_secs(30),
            parallel: 8,
            token: None,
            verify: false,
            snapshotter_socket: None,
        }
    }
}

/// The sockets a node serves on.
pub struct Listeners {
    /// Peers, the scheduler and OCI clients (and mount control with a token).
    pub tcp: TcpListener,
    /// The local control socket (`breakfs mount --node unix:PATH`).
    pub control: ControlSocket,
}

/// The bound control socket; its file is removed when the daemon stops.
pub struct ControlSocket {
    pub(crate) listener: UnixListener,
    pub(crate) path: PathBuf,
}

impl ControlSocket {
    /// Bind the control socket at `path`, replacing a stale one (no one
    /// answering); an error if another daemon answers there.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::io(
                    format!("creating the socket directory {}", dir.display()),
                    e,
                )
            })?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("binding the control socket {}", path.display()), e))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
