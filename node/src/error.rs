//! The one error type of the node crate.

use std::io;
use std::path::PathBuf;

/// What can go wrong running a node daemon or serving a mount.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching, the store or the registry client failed.
    #[error(transparent)]
    Fetch(#[from] breakfs_fetch::Error),
    /// Opening or mounting an image failed.
    #[error(transparent)]
    Fs(#[from] breakfs_fs::Error),
    /// A reference or image document is malformed.
    #[error(transparent)]
    Index(#[from] breakfs_index::Error),
    /// The content store could not be opened or checked.
    #[error("{what}")]
    Store {
        /// What was being done, with the store's path.
        what: String,
        /// The store's error.
        #[source]
        source: breakfs_fetch::Error,
    },
    /// A local file, socket or task operation failed (the cause follows
    /// in the error chain).
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A mount in use cannot be unmounted now.
    #[error(
        "{} is busy: a process has a file open or its working directory there; \
         stop it first (or `umount -l {}` to detach it anyway)",
        .mountpoint.display(),
        .mountpoint.display()
    )]
    Busy {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// Unmounting failed for another reason.
    #[error("unmounting {}", .mountpoint.display())]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What the kernel said.
        #[source]
        source: nix::errno::Errno,
    },
    /// The node serves no mount there.
    #[error("this node does not serve a mount at {}", .0.display())]
    NotServed(PathBuf),
    /// What is mounted there is not a breakfs mount.
    #[error(
        "{} is a {fstype} mount of {device}, not a breakfs mount: left mounted \
         (umount(8) unmounts it, if that is what you meant)",
        .mountpoint.display()
    )]
    NotBreakfs {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Its file-system type, as /proc/self/mountinfo gives it.
        fstype: String,
        /// Its mount source.
        device: String,
    },
    /// Nothing is mounted there.
    #[error("nothing is mounted on {}", .0.display())]
    NotMounted(PathBuf),
    /// Another daemon answers on the control socket.
    #[error(
        "another node daemon answers on {}; stop it, or give this one --socket",
        .0.display()
    )]
    SocketInUse(PathBuf),
    /// A node daemon (for `breakfs mount --node`, `umount`) refused or
    /// failed a request.
    #[error("{0}")]
    Control(String),
    /// A request to a node daemon could not be made.
    #[error("{what}")]
    Client {
        /// What was asked, of which node.
        what: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The node's config file is not TOML of the known keys.
    #[error("parsing the node config {}", .path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A setting is not valid (a size that does not parse, a token file
    /// that cannot be read).
    #[error("{what}")]
    Setting {
        /// The setting, as its flag names it.
        what: String,
        /// Why not.
        #[source]
        source: Box<Error>,
    },
    /// A relay host that is not a registry host.
    #[error(
        "--relay {0:?}: name a registry host as image references do \
         (registry.example.com, 10.0.0.9:5000), without a scheme or path"
    )]
    RelayHost(String),
    /// A backgrounded mount process ended before its mount answered.
    #[error("mounting {image} failed ({status}):\n{log_tail}")]
    MountProcess {
        /// The image.
        image: String,
        /// How the process ended.
        status: std::process::ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A snapshots API request that cannot be done as asked; containerd
    /// maps the fault to its own errors (`crate::snapshotter`).
    #[error("{what}")]
    Snapshot {
        /// The kind of refusal, answered as its gRPC code.
        fault: crate::snapshotter::Fault,
        /// What is wrong, naming the snapshot.
        what: String,
    },
}

impl Error {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the node crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
