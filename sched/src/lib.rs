//! The scheduler score service: a kube-scheduler extender that places a
//! pod where its image is cheapest to get (layer locality, measured links,
//! the pod's delay and bandwidth limits) and balanced on CPU and memory.
//!
//! The doors: [`Sched`] (the service, its verbs callable in process), built
//! from a [`SchedConfig`]; [`serve`] runs it over HTTP until cancelled;
//! [`Directory`] is what it knows of the nodes, fed by polling the node
//! daemons and by the Kubernetes glue ([`k8s`]); [`Server`] (or [`run`])
//! is the service's life as a process, start-up to shutdown. [`types`] holds the
//! extender wire types, [`score`] the pure filtering and scoring over what
//! is known of each node, [`planner`] the pure prefetch planner.
//!
//! Inside: `config` (the YAML), `directory` (nodes, labels, polling),
//! `resolve` (image manifests resolved and cached), `service` (the verbs),
//! `prefetch` (the planner loop), `http` (routes, errors to statuses),
//! `server` (start-up, Kubernetes glue included, and graceful shutdown),
//! `error`.

mod config;
mod directory;
mod error;
mod http;
pub mod k8s;
pub mod planner;
mod prefetch;
mod resolve;
pub mod score;
mod server;
mod service;
pub mod types;

pub use config::{KubeSettings, SchedConfig};
pub use directory::{ANNOTATION_DAEMON, LABEL_BW, LABEL_CLUSTER, LABEL_RTT};
pub use directory::{ClusterNode, Directory, NodeEntry, labels_for, link_from_labels};
pub use error::{Error, PollError, Result};
pub use http::{routes, serve};
pub use server::{SHUTDOWN_GRACE, Server, run};
pub use service::Sched;
