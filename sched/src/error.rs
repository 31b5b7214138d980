//! The one error type of the scheduler crate. Each message names the thing
//! and, where there is one, the fix; a source error is exposed through
//! `source()`, not repeated in the message (print the chain, as the binary
//! does with anyhow's `{:#}`). [`Error::status`] maps each to the HTTP
//! status the extender answers with.

use std::sync::Arc;

use axum::http::StatusCode;

/// What can go wrong in the scheduler service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML config does not parse or has a key the service does not know.
    #[error("the scheduler config is not valid (see the keys in sched/deploy/sched.yaml)")]
    Config(#[source] serde_yaml::Error),
    /// The config file cannot be read.
    #[error("cannot read the file {}", .path.display())]
    ConfigFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why it cannot be read.
        #[source]
        e: std::io::Error,
    },
    /// A `--node` flag is not `NAME=URL[@CLUSTER]`.
    #[error(
        "--node {0:?}: give NAME=URL or NAME=URL@CLUSTER, e.g. edge-1=http://10.0.0.1:7480@east"
    )]
    NodeFlag(String),
    /// `maxBodySize` is not a size.
    #[error(
        "maxBodySize {0:?} is not a size like 32Mi or 1000000: fix maxBodySize in the \
         scheduler config or --max-body-size"
    )]
    MaxBodySize(String),
    /// `cacheSumSize` is not a size.
    #[error("cacheSumSize in the scheduler config or --cache-sum-size")]
    CacheSumSize(#[source] breakfs_index::Error),
    /// The bearer token cannot travel in an HTTP header.
    #[error(
        "the bearer token cannot be sent to the node daemons in an HTTP header: \
         write one word of printable ASCII to the token file"
    )]
    TokenHeader(#[source] axum::http::header::InvalidHeaderValue),
    /// The HTTP client for the node daemons could not be built.
    #[error(
        "building the HTTP client for the node daemons (TLS backend or proxy settings \
         in the environment)"
    )]
    NodeClient(#[source] reqwest::Error),
    /// Polling a node daemon failed (logged, the node's view goes stale).
    #[error("polling the node daemon {node} at {url}")]
    Poll {
        /// The node's name.
        node: String,
        /// What was asked of it.
        url: String,
        /// What failed.
        #[source]
        source: Box<PollError>,
    },
    /// A pod's image reference does not parse.
    #[error("the image {image:?} is not a reference like HOST/REPO:TAG or docker://HOST/REPO:TAG")]
    ImageRef {
        /// The reference as the pod gives it.
        image: String,
        /// Why not.
        #[source]
        source: Box<breakfs_index::Error>,
    },
    /// A pod's image could not be resolved at its registry.
    #[error("resolving the image {image} at its registry")]
    Resolve {
        /// The reference resolved.
        image: String,
        /// What the registry client said.
        #[source]
        source: Box<breakfs_fetch::Error>,
    },
    /// A resolution shared by concurrent calls failed (the one error each
    /// of them sees).
    #[error(transparent)]
    Shared(Arc<Error>),
    /// An extender request whose body is not `ExtenderArgs`.
    #[error(
        "the body is not an ExtenderArgs document ({{\"Pod\": ..., \"Nodes\"|\"NodeNames\": ...}}): {0}"
    )]
    BadArgs(&'static str),
    /// An extender request body that is not JSON of the `ExtenderArgs` shape.
    #[error(
        "the body is not an ExtenderArgs document ({{\"Pod\": ..., \"Nodes\"|\"NodeNames\": ...}})"
    )]
    ArgsJson(#[source] serde_json::Error),
    /// `/plan` without its query.
    #[error("give ?image=REF&node=NAME")]
    PlanQuery,
    /// `/plan` could not plan.
    #[error("planning {image} on {node}")]
    Plan {
        /// The image asked for.
        image: String,
        /// The node asked for.
        node: String,
        /// Why not.
        #[source]
        source: Box<Error>,
    },
    /// The Kubernetes API URL does not parse.
    #[error("the Kubernetes API URL {url:?} (give --kube-url http://HOST:PORT)")]
    KubeUrl {
        /// The URL as given.
        url: String,
        /// Why not.
        #[source]
        source: axum::http::uri::InvalidUri,
    },
    /// No Kubernetes API found in the cluster or a kubeconfig.
    #[error("finding the Kubernetes API (in-cluster or kubeconfig): give --kube-url")]
    KubeInfer(#[source] kube::config::InferConfigError),
    /// The Kubernetes client could not be built.
    #[error("building a Kubernetes client")]
    KubeClient(#[source] Box<kube::Error>),
    /// The Node and Pod watches ended before listing once.
    #[error("the Kubernetes watches of Nodes and Pods stopped before listing once")]
    KubeWatch(#[source] kube::runtime::reflector::store::WriterDropped),
    /// The Node and Pod watches did not list in time at start.
    #[error("the Kubernetes API did not list Nodes and Pods within {} s", .0.as_secs())]
    KubeTimeout(std::time::Duration),
    /// Labelling a node failed.
    #[error("labelling node {node} with its measured registry link")]
    Label {
        /// The node's name.
        node: String,
        /// What the API said.
        #[source]
        source: Box<kube::Error>,
    },
    /// The extender's listener failed.
    #[error("serving the extender")]
    Serve(#[source] std::io::Error),
}

/// Why polling one node daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The request or the answer's status.
    #[error("the request failed")]
    Http(#[from] reqwest::Error),
    /// The answer's body (too large, cut short).
    #[error("reading the answer")]
    Body(#[from] breakfs_fetch::Error),
    /// The answer is not the JSON expected.
    #[error("the answer is not the JSON a node daemon serves")]
    Json(#[from] serde_json::Error),
}

/// The scheduler crate's result.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The HTTP status the extender answers this error with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadArgs(_) | Error::ArgsJson(_) | Error::PlanQuery => StatusCode::BAD_REQUEST,
            Error::Plan { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Shared(e) => e.status(),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
