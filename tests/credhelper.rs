//! Docker credential helpers: `breakfs` asks `docker-credential-NAME get`
//! (found on `PATH`) for the credentials of a real `docker-registry` behind
//! htpasswd Basic auth, named by `credsStore` or `credHelpers` in
//! `$DOCKER_CONFIG/config.json`; a wrong password and a missing helper
//! fail with a message naming the helper and what to do.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::images::{Layer, T, tar_of, write_image};
use crate::support::registry::TestRegistry;

const USER: &str = "edge";
const PASSWORD: &str = "s3cret-pw";

/// A temp dir with helpers in `bin/` and docker configs beside it.
struct World {
    dir: tempfile::TempDir,
    reg: TestRegistry,
}

impl World {
    fn new() -> World {
        let w = World {
            dir: tempfile::tempdir().unwrap(),
            reg: TestRegistry::start_with_auth(USER, PASSWORD),
        };
        std::fs::create_dir(w.bin()).unwrap();
        w
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// `docker-credential-NAME`: answers `get` for the registry with
    /// `password`, "not found" for any other server, and logs each server
    /// it was asked about.
    fn helper(&self, name: &str, password: &str) {
        let log = self.dir.path().join(format!("{name}.log"));
        let script = format!(
            "#!/bin/sh\n\
             [ \"$1\" = get ] || exit 2\n\
             server=$(cat)\n\
             echo \"$server\" >> '{log}'\n\
             if [ \"$server\" = '{host}' ]; then\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{password}\"}}\\n' \"$server\"\n\
             else\n\
             echo 'credentials not found in native keychain'\n\
             exit 1\n\
             fi\n",
            log = log.display(),
            host = self.reg.host(),
        );
        let path = self.bin().join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The servers helper `name` was asked about.
    fn asked(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A docker config directory holding `config`.
    fn config(&self, name: &str, config: serde_json::Value) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    }

    /// `breakfs ARGS` with `DOCKER_CONFIG=config` and the helpers on `PATH`.
    fn breakfs(&self, config: &Path, args: &[&str]) -> Output {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin()];
        paths.extend(std::env::split_paths(&path));
        Command::new(env!("CARGO_BIN_EXE_breakfs"))
            .args(args)
            .env("DOCKER_CONFIG", config)
            .env("PATH", std::env::join_paths(paths).unwrap())
            .output()
            .unwrap()
    }

    fn image(&self) -> String {
        format!("docker://{}/app:v1", self.reg.host())
    }

    fn inspect(&self, config: &Path) -> Output {
        self.breakfs(config, &["inspect", "--plain-http", &self.image()])
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Push a small image through the helper, then read it back through it.
#[test]
fn creds_store_helper_pushes_and_pulls() {
    let w = World::new();
    w.helper("test", PASSWORD);
    let config = w.config("store", serde_json::json!({"credsStore": "test"}));

    let src = w.dir.path().join("src");
    let layer = Layer::gzip(tar_of(&[T::File("hello", b"hello\n", 0o644)]));
    write_image(&src, "v1", &[layer]);
    let src = format!("oci:{}:v1", src.display());
    let work = w.dir.path().join("work").display().to_string();
    let out = w.breakfs(
        &config,
        &[
            "refactor",
            "--plain-http",
            "--work-dir",
            &work,
            "--to",
            &w.image(),
            &src,
        ],
    );
    assert!(out.status.success(), "push: {}", stderr(&out));

    let out = w.inspect(&config);
    assert!(out.status.success(), "inspect: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("manifest  sha256:"), "{stdout}");
    // The helper was asked for this registry, by its HOST:PORT.
    let asked = w.asked("test");
    assert!(!asked.is_empty());
    assert!(asked.iter().all(|s| *s == w.reg.host()), "{asked:?}");
}

/// `credHelpers` names the helper for this registry; it wins over a
/// `credsStore` (here one that is not installed, and so never run).
#[test]
fn cred_helpers_entry_is_used_for_its_registry() {
    let w = World::new();
    w.helper("test", PASSWORD);
    let config = w.config(
        "helpers",
        serde_json::json!({
            "credsStore": "not-installed",
            "credHelpers": {w.reg.host(): "test"},
        }),
    );
    // An empty repository: the registry's 404 after the auth dance shows
    // the credentials were accepted (a refusal would be a 401).
    let out = w.inspect(&config);
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(!out.status.success());
    assert!(err.contains("not found"), "{err}");
    assert!(
        !err.contains("refused") && !err.contains("credential"),
        "{err}"
    );
    assert_eq!(w.asked("test"), [w.reg.host()]);
}

#[test]
fn wrong_password_from_a_helper_names_the_user_and_the_helper() {
    let w = World::new();
    w.helper("wrong", "not-the-password");
    let config = w.config("wrong", serde_json::json!({"credsStore": "wrong"}));
    let out = w.inspect(&config);
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(!out.status.success());
    for needle in [
        &w.reg.host(),
        "refused access",
        &format!("user \"{USER}\""),
        "docker-credential-wrong",
        "credsStore",
        "docker login",
    ] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
    assert!(!err.contains("not-the-password"), "{err}");
}

#[test]
fn missing_helper_says_what_to_do() {
    let w = World::new();
    let config = w.config("missing", serde_json::json!({"credsStore": "absent"}));
    let out = w.inspect(&config);
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(!out.status.success());
    for needle in [
        "docker-credential-absent",
        "not found on PATH",
        &w.reg.host(),
    ] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
}

/// A helper that has nothing for the registry: the usual "log in" advice,
/// naming the helper that was asked.
#[test]
fn helper_without_credentials_for_the_registry_says_how_to_log_in() {
    let w = World::new();
    w.helper("elsewhere", PASSWORD);
    let config = w.config(
        "elsewhere",
        serde_json::json!({"credHelpers": {"other.example:5000": "elsewhere", w.reg.host(): "empty"}}),
    );
    // `empty` knows no server at all.
    let empty = w.bin().join("docker-credential-empty");
    std::fs::write(
        &empty,
        "#!/bin/sh\ncat >/dev/null\necho 'credentials not found in native keychain'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = w.inspect(&config);
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(!out.status.success());
    for needle in ["docker-credential-empty has none", "docker login"] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
    assert!(w.asked("elsewhere").is_empty());
}
