//! What a node daemon is started with: its settings (a config file and
//! flags merged by [`Settings`] into a [`Config`]) and its listeners, bound
//! by the caller (a test binds `127.0.0.1:0`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakfs_fetch::ClientOptions;
use breakfs_fetch::guard::Token;
use serde::Deserialize;
use tokio::net::{TcpListener, UnixListener};

use crate::holder::KeepMounts;

/// The queuing delay background requests keep a source under by default.
pub const BACKGROUND_TARGET: Duration = Duration::from_millis(25);
use crate::{DEFAULT_SOCKET, Error, Result};

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
    /// Background requests keep each source's queuing delay under this
    /// (`None`: not windowed, only `prefetch_rate` holds them back).
    pub background_target: Option<Duration>,
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
    /// Keep mounts served across restarts of the daemon (a mount holder
    /// keeps their FUSE connections; docs/restarts.md).
    pub keep_mounts: Option<KeepMounts>,
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
            background_target: Some(BACKGROUND_TARGET),
            deadline: Duration::from_secs(30),
            parallel: 8,
            token: None,
            verify: false,
            snapshotter_socket: None,
            keep_mounts: None,
        }
    }
}

/// A node's settings as its TOML config file holds them, or as flags give
/// them: [`Settings::over`] lets one set win over another, and
/// [`Settings::resolve`] fills in the defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to serve on [default: 0.0.0.0:7480].
    pub listen: Option<String>,
    /// The control socket [default: [`DEFAULT_SOCKET`]].
    pub socket: Option<PathBuf>,
    /// The URL peers reach this node at.
    pub advertise: Option<String>,
    /// The content store [default: /var/lib/breakfs/store].
    pub cache: Option<PathBuf>,
    /// Keep the store within this size (e.g. `20GiB`).
    pub budget: Option<String>,
    /// Configured peers; merged settings keep both sets' peers.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Whether to add the peers that peers know [default: true].
    pub learn_peers: Option<bool>,
    /// Registry hosts to relay for; merged settings keep both sets'.
    #[serde(default)]
    pub relay: Vec<String>,
    /// Talk plain HTTP to registries [default: false].
    pub plain_http: Option<bool>,
    /// Background work at most this size per second (e.g. `2MiB`).
    pub prefetch_rate: Option<String>,
    /// Milliseconds of queuing delay background requests keep each source
    /// under; 0: not windowed [default: 25].
    pub background_target_ms: Option<u64>,
    /// Seconds a read waits for a missing chunk [default: 30].
    pub deadline: Option<u64>,
    /// Parallel range requests [default: 8].
    pub parallel: Option<usize>,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Seconds of the registry client's timeout.
    pub registry_timeout: Option<u64>,
    /// Check the whole store before serving [default: false].
    pub verify: Option<bool>,
    /// Serve containerd's snapshots API on this Unix socket [default: off].
    pub snapshotter_socket: Option<PathBuf>,
    /// Keep mounts served across restarts of the daemon; mounts no daemon
    /// serves for this many seconds are unmounted [default: 0, off].
    pub keep_mounts: Option<u64>,
}

/// Merged settings: where to listen and the daemon's [`Config`].
pub struct Resolved {
    /// The TCP address to bind.
    pub listen: String,
    /// The control socket's path.
    pub socket: PathBuf,
    /// The daemon's settings.
    pub config: Config,
}

impl Settings {
    /// Read the TOML config file at `path`.
    pub fn from_file(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the node config {}", path.display()), e))?;
        toml::from_str(&text).map_err(|source| Error::ConfigFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// These settings where set, else `base`'s (peers and relay hosts:
    /// `base`'s then these).
    pub fn over(self, base: Settings) -> Settings {
        let mut peers = base.peers;
        peers.extend(self.peers);
        let mut relay = base.relay;
        relay.extend(self.relay);
        Settings {
            listen: self.listen.or(base.listen),
            socket: self.socket.or(base.socket),
            advertise: self.advertise.or(base.advertise),
            cache: self.cache.or(base.cache),
            budget: self.budget.or(base.budget),
            peers,
            learn_peers: self.learn_peers.or(base.learn_peers),
            relay,
            plain_http: self.plain_http.or(base.plain_http),
            prefetch_rate: self.prefetch_rate.or(base.prefetch_rate),
            background_target_ms: self.background_target_ms.or(base.background_target_ms),
            deadline: self.deadline.or(base.deadline),
            parallel: self.parallel.or(base.parallel),
            token_file: self.token_file.or(base.token_file),
            registry_timeout: self.registry_timeout.or(base.registry_timeout),
            verify: self.verify.or(base.verify),
            snapshotter_socket: self.snapshotter_socket.or(base.snapshotter_socket),
            keep_mounts: self.keep_mounts.or(base.keep_mounts),
        }
    }

    /// Check the settings and fill in the defaults: sizes parsed, the token
    /// read; `client` (platform, endpoints) takes the settings' plain HTTP
    /// and timeout. With `keep_mounts`, the holder's command is left empty
    /// for the caller, which knows its program, to fill in.
    pub fn resolve(self, mut client: ClientOptions) -> Result<Resolved> {
        if let Some(bad) = self
            .relay
            .iter()
            .find(|h| h.trim().is_empty() || h.contains('/'))
        {
            return Err(Error::RelayHost(bad.clone()));
        }
        let size = |what: &str, s: Option<String>| {
            s.as_deref()
                .map(breakfs_index::parse_size)
                .transpose()
                .map_err(|e| Error::Setting {
                    what: what.to_string(),
                    source: Box::new(e.into()),
                })
        };
        let budget = size("--budget", self.budget)?;
        let prefetch_rate = size("--prefetch-rate", self.prefetch_rate)?;
        let token = self
            .token_file
            .map(|p| Token::from_file(&p))
            .transpose()
            .map_err(|e| Error::Setting {
                what: "--token-file".to_string(),
                source: Box::new(e.into()),
            })?;
        client.plain_http = self.plain_http.unwrap_or(false);
        if let Some(t) = self.registry_timeout {
            client.timeout = Duration::from_secs(t.max(1));
        }
        Ok(Resolved {
            listen: self.listen.unwrap_or_else(|| "0.0.0.0:7480".into()),
            socket: self.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            config: Config {
                advertise: self.advertise,
                cache: self
                    .cache
                    .unwrap_or_else(|| PathBuf::from("/var/lib/breakfs/store")),
                budget,
                peers: self.peers,
                learn_peers: self.learn_peers.unwrap_or(true),
                relay: self.relay,
                client,
                prefetch_rate,
                background_target: match self.background_target_ms {
                    None => Some(BACKGROUND_TARGET),
                    Some(0) => None,
                    Some(ms) => Some(Duration::from_millis(ms)),
                },
                deadline: Duration::from_secs(self.deadline.unwrap_or(30).max(1)),
                parallel: self.parallel.unwrap_or(8).max(1),
                token,
                verify: self.verify.unwrap_or(false),
                snapshotter_socket: self.snapshotter_socket,
                keep_mounts: self.keep_mounts.filter(|s| *s > 0).map(|s| KeepMounts {
                    orphan_after: Duration::from_secs(s),
                    holder: Vec::new(),
                }),
            },
        })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_peers_add_up() {
        let file: Settings = toml::from_str(
            "listen = \"0.0.0.0:9000\"\nbudget = \"1GiB\"\npeers = [\"http://a:1\"]\n\
             learn_peers = false\nplain_http = true\nregistry_timeout = 7\n",
        )
        .unwrap();
        let flags = Settings {
            budget: Some("2GiB".into()),
            peers: vec!["http://b:1".into()],
            deadline: Some(0),
            ..Settings::default()
        };
        let r = flags.over(file).resolve(ClientOptions::default()).unwrap();
        assert_eq!(r.listen, "0.0.0.0:9000");
        assert_eq!(r.socket, PathBuf::from(DEFAULT_SOCKET));
        let c = r.config;
        assert_eq!(c.budget, Some(2 << 30));
        assert_eq!(c.peers, ["http://a:1", "http://b:1"]);
        assert!(!c.learn_peers);
        assert!(c.client.plain_http);
        assert_eq!(c.client.timeout, Duration::from_secs(7));
        assert_eq!(c.deadline, Duration::from_secs(1));
        assert_eq!(c.parallel, 8);
        assert_eq!(c.cache, PathBuf::from("/var/lib/breakfs/store"));
    }

    #[test]
    fn bad_settings_are_refused_with_what_to_fix() {
        assert!(toml::from_str::<Settings>("budjet = \"1GiB\"\n").is_err());
        let relay = Settings {
            relay: vec!["http://reg:5000".into()],
            ..Settings::default()
        };
        let e = relay.resolve(ClientOptions::default()).err().unwrap();
        assert!(e.to_string().contains("without a scheme"), "{e}");
        let budget = Settings {
            budget: Some("lots".into()),
            ..Settings::default()
        };
        let e = budget.resolve(ClientOptions::default()).err().unwrap();
        assert_eq!(e.to_string(), "--budget");
        assert!(std::error::Error::source(&e).is_some());
    }
}
