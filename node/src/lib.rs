//! The breakfs node daemon, one per edge node: it owns the content store
//! and fetches for all the node's mounts and prefetches through one chain
//! (store → peers → with `--relay`, the least loaded of its own and its
//! peers' registry links → cloud); serves what it holds to peers over the
//! OCI distribution API and relays registry ranges for them; publishes its
//! cache index, link measurements and Prometheus metrics; prefetches on
//! request; mounts images on request over its control socket, learning
//! each image's start-up reads as an access profile that it serves and
//! that later mounts, here or on a peer, fetch at once; and, with a
//! snapshotter socket, serves containerd's snapshots API.
//!
//! The doors: [`run`] (or [`Node::start`] then [`Node::serve`]) with a
//! [`Config`], [`Listeners`] the caller bound and a shutdown token; the
//! mount lifecycle shared with standalone mounts ([`mount_and_probe`],
//! [`serve_mount`], [`unmount`]; a standalone mount process:
//! [`run_standalone`], [`spawn_mount_process`]); the daemon's settings
//! ([`Settings`], a config file and flags merged; [`KeepMounts`] and the
//! mount holder's process, [`run_holder`]); the control API's client
//! ([`mount_through`], [`MountRequest`], [`node_status`]); a client of
//! its snapshots API ([`snapshots_client`]).

mod chain;
mod config;
mod control;
mod daemon;
mod error;
mod holder;
mod lifecycle;
mod metrics;
mod mounts;
pub mod notify;
mod peer;
mod prefetch;
mod profile;
mod relay;
mod rollout;
mod server;
mod snapshotter;

pub use config::{Config, ControlSocket, Listeners, Resolved, Settings};
pub use control::{MountRequest, NodeStatus, mount_through, node_client, node_report, node_status};
pub use daemon::{Node, run};
pub use error::{Error, Result};
pub use holder::{KeepMounts, run_holder};
pub use lifecycle::{
    Ending, MOUNT_READY, MountProcess, end_session, mount_and_probe, process_alive, run_standalone,
    serve_mount, shutdown_on_stop_signals, spawn_mount_process, status_report, stop_signals,
    unmount, unmount_path,
};
pub use prefetch::{PrefetchRequest, PrefetchTask};
#[doc(hidden)]
pub use server::{V2Object, manifest_media_type, range_of, v2_object};
pub use snapshotter::{
    Fault, LazyLayer, SnapshotStatus, SnapshotterStatus, api as snapshots_api, snapshots_client,
    snapshots_report,
};

/// The control socket a node listens on unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/breakfs/node.sock";
