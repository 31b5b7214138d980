//! Registry authentication: `WWW-Authenticate` challenges and docker config
//! credentials.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::{Error, Result};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `Bearer realm=..,service=..,scope=..`: fetch a token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// `Basic realm=..`: send the credentials themselves.
    Basic,
}

/// Parse one `WWW-Authenticate` header value; `None` for schemes we do not speak.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else {
        None
    }
}

/// `key="value",key=value` pairs; quoted values may hold commas.
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        let key = key.trim().to_ascii_lowercase();
        if !key.is_empty() {
            out.insert(key, value.trim().to_string());
        }
        if chars.peek().is_none() {
            break;
        }
    }
    out
}

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` header value.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(raw))
    }
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// What a docker config file says about one registry.
#[derive(Debug, Default)]
pub(crate) struct ConfigLookup {
    /// The credentials, when the file holds them inline.
    pub(crate) credentials: Option<Credentials>,
    /// A credential helper the file names for this host (not supported).
    pub(crate) helper: Option<String>,
}

/// `https://HOST/v1/` and `HOST` name the same registry in `auths`.
fn normalize_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Look `host` up in the docker config JSON `bytes`; `path` is for messages.
pub(crate) fn lookup_config(bytes: &[u8], host: &str, path: &Path) -> Result<ConfigLookup> {
    let what = || format!("docker config {}", path.display());
    let file: DockerConfigFile = serde_json::from_slice(bytes).map_err(|e| Error::Protocol {
        what: what(),
        reason: format!("not a docker config.json: {e}"),
    })?;
    let hub_aliases = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    let same = |k: &str| {
        let k = normalize_host(k);
        k == host || (hub_aliases.contains(&k) && hub_aliases.contains(&host))
    };
    let mut out = ConfigLookup {
        helper: file
            .cred_helpers
            .iter()
            .find(|(k, _)| same(k))
            .map(|(_, v)| v.clone())
            .or(file.creds_store.clone()),
        credentials: None,
    };
    if let Some((_, entry)) = file.auths.iter().find(|(k, _)| same(k)) {
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = STANDARD.decode(auth.trim()).map_err(|e| Error::Protocol {
                what: what(),
                reason: format!("auths[{host:?}].auth is not base64: {e}"),
            })?;
            let text = String::from_utf8(decoded).map_err(|_| Error::Protocol {
                what: what(),
                reason: format!("auths[{host:?}].auth is not UTF-8 user:password"),
            })?;
            let (user, pass) = text.split_once(':').ok_or_else(|| Error::Protocol {
                what: what(),
                reason: format!("auths[{host:?}].auth is not base64 of user:password"),
            })?;
            out.credentials = Some(Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            });
        } else if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            out.credentials = Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            });
        }
    }
    Ok(out)
}

/// Read the docker config at `path` (a missing file means no credentials).
pub(crate) fn load_config(path: &Path, host: &str) -> Result<ConfigLookup> {
    match std::fs::read(path) {
        Ok(bytes) => lookup_config(&bytes, host, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigLookup::default()),
        Err(e) => Err(Error::io(
            format!("reading docker config {}", path.display()),
            e,
        )),
    }
}

/// The token in a token server's JSON reply (`token` or `access_token`).
pub(crate) fn parse_token_reply(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Reply {
        token: Option<String>,
        access_token: Option<String>,
    }
    let r: Reply = serde_json::from_slice(bytes).ok()?;
    r.token
        .filter(|t| !t.is_empty())
        .or(r.access_token.filter(|t| !t.is_empty()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_comma_in_scope() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:library/ubuntu:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:library/ubuntu:pull,push".into()),
            }
        );
    }

    #[test]
    fn parses_unquoted_and_spaced_params() {
        let c = parse_challenge(r#"bearer realm=http://127.0.0.1:9/t , service = "svc""#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://127.0.0.1:9/t".into(),
                service: Some("svc".into()),
                scope: None,
            }
        );
    }

    #[test]
    fn parses_basic_and_rejects_unknown() {
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        // A bearer challenge without a realm cannot be followed.
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn reads_auth_field_and_normalizes_keys() {
        let cfg = serde_json::json!({
            "auths": {
                "https://127.0.0.1:5000/v1/": {"auth": STANDARD.encode("alice:s3:cret")},
                "other:1": {"username": "bob", "password": "pw"}
            }
        });
        let bytes = cfg.to_string().into_bytes();
        let p = Path::new("/x/config.json");
        let l = lookup_config(&bytes, "127.0.0.1:5000", p).unwrap();
        let c = l.credentials.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3:cret")
        );
        let l = lookup_config(&bytes, "other:1", p).unwrap();
        assert_eq!(l.credentials.unwrap().username, "bob");
        assert!(
            lookup_config(&bytes, "nowhere", p)
                .unwrap()
                .credentials
                .is_none()
        );
    }

    #[test]
    fn docker_hub_aliases_and_helpers() {
        let cfg = serde_json::json!({
            "auths": {"https://index.docker.io/v1/": {"auth": STANDARD.encode("u:p")}},
            "credHelpers": {"gcr.io": "gcloud"}
        });
        let bytes = cfg.to_string().into_bytes();
        let p = Path::new("c.json");
        assert!(
            lookup_config(&bytes, "registry-1.docker.io", p)
                .unwrap()
                .credentials
                .is_some()
        );
        assert_eq!(
            lookup_config(&bytes, "gcr.io", p)
                .unwrap()
                .helper
                .as_deref(),
            Some("gcloud")
        );
    }

    #[test]
    fn bad_config_is_named() {
        let p = Path::new("/etc/bad.json");
        let err = lookup_config(b"{not json", "h", p).unwrap_err();
        assert!(err.to_string().contains("/etc/bad.json"), "{err}");
        let cfg = br#"{"auths":{"h":{"auth":"!!!"}}}"#;
        let err = lookup_config(cfg, "h", p).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn token_reply_forms() {
        assert_eq!(
            parse_token_reply(br#"{"token":"abc"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(
            parse_token_reply(br#"{"access_token":"xyz","expires_in":60}"#).as_deref(),
            Some("xyz")
        );
        assert_eq!(parse_token_reply(br#"{"token":""}"#), None);
        assert_eq!(parse_token_reply(b"nope"), None);
    }

    #[test]
    fn basic_header_encodes() {
        let c = Credentials {
            username: "a".into(),
            password: "b".into(),
        };
        assert_eq!(c.basic_header(), "Basic YTpi");
    }
}
