//! The service's configuration: the YAML file (`breakfs sched --config`),
//! with the defaults the flags fall back on.

use serde::{Deserialize, Serialize};

use crate::directory::NodeEntry;
use crate::error::{Error, Result};
use crate::score::Weights;

/// The service's configuration (YAML, in the spirit of the paper's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// URL prefix of the extender verbs (`urlPrefix` in the scheduler's
    /// extender config ends here).
    #[serde(default)]
    pub prefix: String,
    /// Score weights.
    #[serde(flatten)]
    pub weights: Weights,
    /// Bytes of cache per cluster the prefetch planner may fill
    /// (e.g. `26Gi`).
    #[serde(default)]
    pub cache_sum_size: Option<String>,
    /// The node daemons to watch.
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    /// Talk plain HTTP to registries.
    #[serde(default)]
    pub plain_http: bool,
    /// Seconds between polls of each node daemon.
    #[serde(default = "default_poll")]
    pub poll_secs: f64,
    /// A node's data older than this many seconds is not trusted.
    #[serde(default = "default_stale")]
    pub stale_secs: f64,
    /// Seconds between runs of the prefetch planner (when `cacheSumSize`
    /// is set).
    #[serde(default = "default_plan")]
    pub plan_secs: f64,
    /// The Kubernetes API, when the service runs in a cluster.
    #[serde(default)]
    pub kubernetes: KubeSettings,
    /// A file holding the bearer token `/plan` requires and the node
    /// daemons are sent (their `--token-file`).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Request bodies larger than this are refused with 413 (a quantity
    /// like `32Mi`): `ExtenderArgs` in the `Nodes` form carry whole Node
    /// objects, about 6.5 KB each.
    #[serde(default = "default_max_body")]
    pub max_body_size: String,
}

fn default_max_body() -> String {
    "32Mi".into()
}

/// How the service uses the Kubernetes API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSettings {
    /// Watch Nodes and Pods (resources for `NodeNames` requests, node
    /// daemons announced by the `breakfs.io/daemon-url` annotation).
    #[serde(default)]
    pub enabled: bool,
    /// The API's URL without credentials (e.g. `kubectl proxy`'s); unset:
    /// in-cluster service account or kubeconfig.
    #[serde(default)]
    pub url: Option<String>,
    /// Publish each node's measured registry link as node labels
    /// (`breakfs.io/rtt-registry-ms`, `breakfs.io/bw-registry-mbps`).
    #[serde(default = "yes")]
    pub publish_labels: bool,
    /// Seconds between syncs with the API's view.
    #[serde(default = "default_sync")]
    pub sync_secs: f64,
}

fn yes() -> bool {
    true
}
fn default_sync() -> f64 {
    10.0
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            enabled: false,
            url: None,
            publish_labels: true,
            sync_secs: default_sync(),
        }
    }
}

fn default_plan() -> f64 {
    30.0
}

fn default_listen() -> String {
    "0.0.0.0:7490".into()
}
fn default_poll() -> f64 {
    2.0
}
fn default_stale() -> f64 {
    30.0
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            listen: default_listen(),
            prefix: String::new(),
            weights: Weights::default(),
            cache_sum_size: None,
            nodes: Vec::new(),
            plain_http: false,
            poll_secs: default_poll(),
            stale_secs: default_stale(),
            plan_secs: default_plan(),
            kubernetes: KubeSettings::default(),
            token_file: None,
            max_body_size: default_max_body(),
        }
    }
}

impl SchedConfig {
    /// Parse a YAML config.
    pub fn from_yaml(text: &str) -> Result<SchedConfig> {
        let c: SchedConfig = serde_yaml::from_str(text).map_err(Error::Config)?;
        c.max_body()?;
        c.cache_sum_bytes()?;
        Ok(c)
    }

    /// Read and parse a YAML config file.
    pub fn from_file(path: &std::path::Path) -> Result<SchedConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            e,
        })?;
        SchedConfig::from_yaml(&text)
    }

    /// `cacheSumSize` in bytes (a size like `26Gi` or `20GiB`), when set.
    pub fn cache_sum_bytes(&self) -> Result<Option<u64>> {
        self.cache_sum_size
            .as_deref()
            .map(|s| breakfs_index::parse_size(s).map_err(Error::CacheSumSize))
            .transpose()
    }

    /// `maxBodySize` in bytes.
    pub fn max_body(&self) -> Result<usize> {
        breakfs_index::parse_size(&self.max_body_size)
            .ok()
            .filter(|n| *n >= 1)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::MaxBodySize(self.max_body_size.clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_unknown_keys_are_refused() {
        let c = SchedConfig::from_yaml(include_str!("../deploy/sched.yaml")).unwrap();
        assert_eq!(c.weights.net_weight, 1.5);
        assert_eq!(c.weights.layer_weight, 2.0);
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.nodes[2].cluster, "west");
        assert_eq!(c.cache_sum_size.as_deref(), Some("26Gi"));
        assert_eq!(c.cache_sum_bytes().unwrap(), Some(26 << 30));
        let sized = SchedConfig::from_yaml("cacheSumSize: 20GiB\nmaxBodySize: 64KiB\n").unwrap();
        assert_eq!(sized.cache_sum_bytes().unwrap(), Some(20 << 30));
        assert_eq!(sized.max_body().unwrap(), 64 << 10);
        let e = breakfs_index::Causes(&SchedConfig::from_yaml("cacheSumSize: lots\n").unwrap_err())
            .to_string();
        assert!(e.contains("\"lots\" is not a size"), "{e}");
        let e = breakfs_index::Causes(
            &SchedConfig::from_yaml("netWeight: 1\nnetWeiht: 2\n").unwrap_err(),
        )
        .to_string();
        assert!(e.contains("netWeiht"), "{e}");
        assert_eq!(c.max_body().unwrap(), 32 << 20);
        assert_eq!(c.token_file, None);
        let e = SchedConfig::from_yaml("maxBodySize: lots\n").unwrap_err();
        assert!(e.to_string().contains("maxBodySize \"lots\""), "{e}");
    }
}
