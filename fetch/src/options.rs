//! How to talk to registries: scheme, platform, credentials, timeouts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use breakfs_index::Platform;

/// Options shared by every store a command opens.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Talk plain HTTP to registries instead of HTTPS.
    pub plain_http: bool,
    /// The platform to pick from a multi-platform index.
    pub platform: Platform,
    /// The docker config file with credentials; `None` means
    /// `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Connect timeout, and the longest a transfer may stall without a byte.
    pub timeout: Duration,
    /// Registries reached at another address (`HOST[:PORT]` → `ADDR:PORT`):
    /// a mirror, or this site's path to the registry. Images keep their
    /// names; only the connection goes elsewhere.
    pub endpoints: BTreeMap<String, String>,
    /// Follow redirects to other hosts (a registry sending blobs to its
    /// storage); off for peers, which serve what they hold themselves.
    pub foreign_redirects: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            platform: Platform::linux_amd64(),
            docker_config: None,
            timeout: Duration::from_secs(30),
            endpoints: BTreeMap::new(),
            foreign_redirects: true,
        }
    }
}

impl ClientOptions {
    /// The defaults, with `BREAKFS_PLAIN_HTTP=1` (or `true`) turning on plain HTTP.
    pub fn from_env() -> Self {
        let plain_http = std::env::var("BREAKFS_PLAIN_HTTP")
            .map(|v| matches!(v.trim(), "1" | "true" | "yes"))
            .unwrap_or(false);
        ClientOptions {
            plain_http,
            ..ClientOptions::default()
        }
    }

    /// The docker config file to read credentials from, if any is known.
    pub fn docker_config_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.docker_config {
            return Some(p.clone());
        }
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
    }
}
