//! Registry authentication: `WWW-Authenticate` challenges and docker config
//! credentials, inline (`auths`) or from a credential helper (`credHelpers`,
//! `credsStore`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

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
#[derive(Clone, Debug, Default)]
pub(crate) struct ConfigLookup {
    /// The credentials, when the file holds them inline.
    pub(crate) credentials: Option<Credentials>,
    /// The credential helper `credHelpers` names for this host.
    pub(crate) host_helper: Option<String>,
    /// The credential helper `credsStore` names for every registry.
    pub(crate) store: Option<String>,
}

impl ConfigLookup {
    /// The helpers the file names for this host, in the order they are asked.
    pub(crate) fn helpers(&self) -> impl Iterator<Item = &str> {
        self.host_helper
            .iter()
            .chain(&self.store)
            .map(String::as_str)
    }
}

/// Credentials and where they came from (for messages).
#[derive(Clone, Debug)]
pub(crate) struct Found {
    pub(crate) credentials: Credentials,
    /// The config file, or the helper and the file that names it.
    pub(crate) from: String,
}

/// The credentials for `host`: from the helper `credHelpers` names for it,
/// else inline in `auths`, else from the `credsStore` helper. A helper is
/// run only here, when a registry asks for credentials.
pub(crate) async fn resolve(
    lookup: &ConfigLookup,
    host: &str,
    config: &Path,
    timeout: Duration,
) -> Result<Option<Found>> {
    let via = |helper: &str, key: &str| {
        format!(
            "credential helper docker-credential-{helper} ({key} in {})",
            config.display()
        )
    };
    if let Some(h) = &lookup.host_helper
        && let Some(credentials) = helper_get(h, host, timeout).await?
    {
        let from = via(h, "credHelpers");
        return Ok(Some(Found { credentials, from }));
    }
    if let Some(credentials) = &lookup.credentials {
        let from = config.display().to_string();
        let credentials = credentials.clone();
        return Ok(Some(Found { credentials, from }));
    }
    if let Some(h) = &lookup.store
        && let Some(credentials) = helper_get(h, host, timeout).await?
    {
        let from = via(h, "credsStore");
        return Ok(Some(Found { credentials, from }));
    }
    Ok(None)
}

/// Ask `docker-credential-NAME get` (found on `PATH`) for the credentials
/// of `host`; `None` when the helper has none for it.
pub(crate) async fn helper_get(
    name: &str,
    host: &str,
    timeout: Duration,
) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::CredentialHelper {
            helper: program,
            registry: host.to_string(),
            reason: "not a helper name (letters, digits, '-', '_', '.'): fix credsStore or credHelpers in the docker config".into(),
        });
    }
    run_helper(Path::new(&program), host, timeout).await
}

/// The server URL a helper files `host` under: Docker Hub's is the v1 URL
/// `docker login` uses.
fn helper_server_url(host: &str) -> &str {
    if HUB_ALIASES.contains(&host) {
        "https://index.docker.io/v1/"
    } else {
        host
    }
}

/// Run `program get` with the server URL on stdin and read its
/// `{"Username": .., "Secret": ..}` answer, within `timeout`.
async fn run_helper(program: &Path, host: &str, timeout: Duration) -> Result<Option<Credentials>> {
    use tokio::io::AsyncWriteExt;
    let name = program.display().to_string();
    let name = name.rsplit('/').next().unwrap_or(&name).to_string();
    let fail = |reason: String| Error::CredentialHelper {
        helper: name.clone(),
        registry: host.to_string(),
        reason,
    };
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(if e.kind() == std::io::ErrorKind::NotFound {
                "not found on PATH: install it, or remove the credsStore or credHelpers entry that names it from the docker config".to_string()
            } else {
                format!("cannot run {name}: {e}")
            })
        })?;
    let stdin = child.stdin.take();
    let run = async move {
        if let Some(mut stdin) = stdin {
            // A helper that exits without reading closes the pipe: its
            // exit status and output say what went wrong.
            let _ = stdin.write_all(helper_server_url(host).as_bytes()).await;
        }
        child.wait_with_output().await
    };
    let out = match tokio::time::timeout(timeout, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(fail(format!("reading its answer: {e}"))),
        // Dropping the future killed the helper (kill_on_drop).
        Err(_) => {
            return Err(fail(format!(
                "no answer within {timeout:?}, stopped it; is it waiting for a keyring to be unlocked?"
            )));
        }
    };
    if !out.status.success() {
        let said = String::from_utf8_lossy(if out.stderr.trim_ascii().is_empty() {
            &out.stdout
        } else {
            &out.stderr
        })
        .trim()
        .to_string();
        let all = [&out.stdout[..], &out.stderr[..]].concat();
        // The helpers' own words for "nothing stored for this server".
        if String::from_utf8_lossy(&all)
            .to_ascii_lowercase()
            .contains("credentials not found")
        {
            return Ok(None);
        }
        let said: String = said.chars().take(300).collect();
        return Err(fail(format!(
            "`{name} get` failed ({}): {said}",
            out.status
        )));
    }
    #[derive(Deserialize)]
    struct Reply {
        #[serde(default, rename = "Username")]
        username: String,
        #[serde(default, rename = "Secret")]
        secret: String,
    }
    // The answer holds a secret: it is never quoted in a message.
    let reply: Reply = serde_json::from_slice(&out.stdout).map_err(|_| {
        fail(format!(
            "its answer is not the JSON {{\"Username\": .., \"Secret\": ..}} of `{name} get`"
        ))
    })?;
    if reply.username == "<token>" {
        return Err(fail(format!(
            "it holds an identity token for {host}, which breakfs cannot use; log in with a user name and password (docker login -u USER {host})"
        )));
    }
    if reply.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: reply.username,
        password: reply.secret,
    }))
}

/// The names of Docker Hub.
const HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

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
    let same = |k: &str| {
        let k = normalize_host(k);
        k == host || (HUB_ALIASES.contains(&k) && HUB_ALIASES.contains(&host))
    };
    let mut out = ConfigLookup {
        host_helper: file
            .cred_helpers
            .iter()
            .find(|(k, _)| same(k))
            .map(|(_, v)| v.clone()),
        store: file.creds_store.clone().filter(|s| !s.is_empty()),
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
                .host_helper
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

    /// A helper script `docker-credential-NAME` in `dir` running `body`.
    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn helper_answers_are_read_or_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(10);
        // The server URL comes on stdin; the answer is the protocol's JSON.
        let ok = script(
            dir.path(),
            "ok",
            r#"[ "$1" = get ] || exit 2; s=$(cat); printf '{"ServerURL":"%s","Username":"u","Secret":"p:%s"}' "$s" "$s""#,
        );
        let c = run_helper(&ok, "reg:5000", t).await.unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("u", "p:reg:5000")
        );
        // Docker Hub is asked by the URL `docker login` files it under.
        let c = run_helper(&ok, "registry-1.docker.io", t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.password, "p:https://index.docker.io/v1/");

        let none = script(
            dir.path(),
            "none",
            "cat >/dev/null; echo 'credentials not found in native keychain'; exit 1",
        );
        assert!(run_helper(&none, "reg", t).await.unwrap().is_none());

        let broken = script(dir.path(), "broken", "echo 'keyring is locked' >&2; exit 3");
        let err = run_helper(&broken, "reg", t).await.unwrap_err().to_string();
        for needle in [
            "docker-credential-broken",
            "reg",
            "keyring is locked",
            "exit status: 3",
        ] {
            assert!(err.contains(needle), "no {needle:?} in {err}");
        }

        // A garbled answer is not quoted: it may hold the secret.
        let garbled = script(dir.path(), "garbled", "echo 'Secret=hunter2'");
        let err = run_helper(&garbled, "reg", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not the JSON") && !err.contains("hunter2"),
            "{err}"
        );

        let token = script(
            dir.path(),
            "token",
            r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
        );
        let err = run_helper(&token, "reg", t).await.unwrap_err().to_string();
        assert!(
            err.contains("identity token") && err.contains("docker login -u"),
            "{err}"
        );

        let slow = script(dir.path(), "slow", "exec sleep 30");
        let started = std::time::Instant::now();
        let err = run_helper(&slow, "reg", Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.contains("no answer within"), "{err}");

        let err = helper_get("../x", "reg", t).await.unwrap_err().to_string();
        assert!(err.contains("not a helper name"), "{err}");
        let err = helper_get("surely-not-installed", "reg", t)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("docker-credential-surely-not-installed")
                && err.contains("not found on PATH"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn inline_credentials_come_before_the_store() {
        let t = Duration::from_secs(10);
        let inline = Credentials {
            username: "inline".into(),
            password: "pw".into(),
        };
        let cfg = Path::new("/x/config.json");
        let lookup = ConfigLookup {
            credentials: Some(inline.clone()),
            host_helper: None,
            store: Some("never-run".into()),
        };
        let f = resolve(&lookup, "reg", cfg, t).await.unwrap().unwrap();
        assert_eq!((f.credentials, f.from.as_str()), (inline, "/x/config.json"));
        let none = ConfigLookup::default();
        assert!(resolve(&none, "reg", cfg, t).await.unwrap().is_none());
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
