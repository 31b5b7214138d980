//! The image corpus: realistic OCI images built in code from real Debian
//! bookworm packages, for the integration tests and the benchmarks.
//!
//! Each family (python, postgres, nginx, ...) is one OCI layout under
//! `CACHE/corpus/FAMILY` with three tags: `v1` (every package at its oldest
//! version in the archive), `v2` (every package at its newest) and `point`
//! (v1 with the app's packages and three base packages at their newest).
//! The images are layered like official ones: `base` (a bookworm-slim-like
//! rootfs), `deps` (the app's dependency closure), `app` (the app's own
//! packages) and `config` (what a Dockerfile adds last: entrypoint, config
//! file, deletions as whiteouts, an opaque directory, an xattr, a setuid file
//! and a hardlink). Packages are unpacked like dpkg does (through the
//! merged-/usr symlinks) with a real dpkg database, and each layer is the
//! diff of the staging rootfs before and after its step. Builds are
//! deterministic: a rebuild gives byte-identical blobs.
//!
//! Needs root (ownership), `apt-get`/`apt-cache`/`dpkg-deb`/`ldconfig`, and
//! Debian's archive. This module uses no breakfs crate on purpose: it is the
//! independent producer of the images the breakfs crates consume.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use filetime::FileTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One of the three builds of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Build {
    /// Every package at its oldest version.
    V1,
    /// v1 with the app packages and three base packages at their newest version.
    Point,
    /// Every package at its newest version.
    V2,
}

impl Build {
    /// All builds, in publication order.
    pub const ALL: [Build; 3] = [Build::V1, Build::Point, Build::V2];

    /// The tag of this build in the family's layout.
    pub fn tag(self) -> &'static str {
        match self {
            Build::V1 => "v1",
            Build::Point => "point",
            Build::V2 => "v2",
        }
    }

    fn days_after_v1(self) -> i64 {
        match self {
            Build::V1 => 0,
            Build::Point => 30,
            Build::V2 => 181,
        }
    }
}

/// An image family: one application, built three times.
#[derive(Debug)]
pub struct Family {
    /// Family name, also the layout directory name.
    pub name: &'static str,
    /// The packages of the app layer (the app itself, not its libraries).
    pub app_packages: &'static [&'static str],
    /// A real command that proves the image works (run in a chroot).
    pub command: &'static [&'static str],
    /// The app binary that gets an xattr in the config layer (may be a symlink).
    pub binary: &'static str,
    /// `true`: the xattr is `security.capability` (cap_net_bind_service+ep);
    /// `false`: `user.breakfs.component`.
    pub capability: bool,
    /// A directory the config layer replaces (opaque whiteout), keeping two files.
    pub opaque_dir: &'static str,
    /// Paths of lower layers the config layer deletes (whiteouts).
    pub removed: &'static [&'static str],
    /// A service user the config layer adds (name, uid = gid), if any.
    pub user: Option<(&'static str, u32)>,
    /// A data directory the config layer creates, owned by `user` if any.
    pub data_dir: &'static str,
}

/// Every family of the corpus.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "python",
        app_packages: &[
            "python3",
            "python3-minimal",
            "libpython3-stdlib",
            "python3.11",
            "python3.11-minimal",
            "libpython3.11-minimal",
            "libpython3.11-stdlib",
        ],
        command: &["python3", "-c", "import json, ssl, sqlite3"],
        binary: "/usr/bin/python3.11",
        capability: false,
        opaque_dir: "/etc/python3.11",
        removed: &[
            "/usr/share/doc/python3.11",
            "/usr/lib/python3.11/pydoc_data/topics.py",
        ],
        user: None,
        data_dir: "/usr/src/app",
    },
    Family {
        name: "postgres",
        app_packages: &[
            "postgresql-15",
            "postgresql-client-15",
            "postgresql-common",
            "postgresql-client-common",
        ],
        command: &["/usr/lib/postgresql/15/bin/postgres", "--version"],
        binary: "/usr/lib/postgresql/15/bin/postgres",
        capability: false,
        opaque_dir: "/etc/postgresql-common",
        removed: &[
            "/usr/share/doc/postgresql-15",
            "/usr/share/postgresql/15/man",
        ],
        user: Some(("postgres", 999)),
        data_dir: "/var/lib/postgresql/data",
    },
    Family {
        name: "nginx",
        app_packages: &["nginx", "nginx-common"],
        command: &["nginx", "-v"],
        binary: "/usr/sbin/nginx",
        capability: true,
        opaque_dir: "/etc/nginx/sites-available",
        removed: &["/usr/share/doc/nginx-common", "/etc/nginx/koi-win"],
        user: Some(("nginx", 101)),
        data_dir: "/var/cache/nginx",
    },
    Family {
        name: "redis",
        app_packages: &["redis-server", "redis-tools"],
        command: &["redis-server", "--version"],
        binary: "/usr/bin/redis-server",
        capability: false,
        opaque_dir: "/etc/redis",
        removed: &["/usr/share/doc/redis-tools", "/etc/init.d/redis-server"],
        user: Some(("redis", 999)),
        data_dir: "/data",
    },
    Family {
        name: "httpd",
        app_packages: &["apache2", "apache2-bin", "apache2-data", "apache2-utils"],
        command: &["apache2", "-v"],
        binary: "/usr/sbin/apache2",
        capability: true,
        opaque_dir: "/etc/apache2/sites-available",
        removed: &["/usr/share/doc/apache2", "/var/www/html"],
        user: None,
        data_dir: "/usr/local/apache2/htdocs",
    },
    Family {
        name: "node",
        app_packages: &["nodejs", "libnode108"],
        command: &["node", "-e", "require('zlib'); require('crypto')"],
        binary: "/usr/bin/node",
        capability: false,
        opaque_dir: "/usr/share/bash-completion/completions",
        removed: &["/usr/share/doc/libnode108", "/usr/share/nodejs/@types"],
        user: Some(("node", 1000)),
        data_dir: "/home/node",
    },
    Family {
        name: "openjdk",
        app_packages: &["openjdk-17-jre-headless"],
        command: &["java", "-version"],
        binary: "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
        capability: false,
        opaque_dir: "/etc/java-17-openjdk/management",
        removed: &[
            "/usr/share/doc/openjdk-17-jre-headless",
            "/usr/lib/jvm/java-17-openjdk-amd64/man",
        ],
        user: None,
        data_dir: "/opt/app",
    },
    Family {
        name: "mariadb",
        app_packages: &[
            "mariadb-server",
            "mariadb-server-core",
            "mariadb-client",
            "mariadb-client-core",
            "mariadb-common",
        ],
        command: &["mariadbd", "--version"],
        binary: "/usr/sbin/mariadbd",
        capability: false,
        opaque_dir: "/etc/mysql/mariadb.conf.d",
        removed: &[
            "/usr/share/doc/mariadb-server",
            "/usr/share/mysql/mini-benchmark",
        ],
        user: Some(("mysql", 999)),
        data_dir: "/var/lib/mysql",
    },
];

/// Families whose application runs on another family's runtime (a Django
/// site on the python family's interpreter): their images hold that
/// family's packages at the same versions plus their own. Not in
/// [`FAMILIES`], so "every family" keeps meaning the runtimes.
pub const APP_FAMILIES: &[Family] = &[Family {
    name: "django",
    app_packages: &["python3-django"],
    command: &["python3", "-c", "import django, sqlparse, asgiref"],
    binary: "/usr/bin/django-admin",
    capability: false,
    opaque_dir: "/usr/lib/python3/dist-packages/django/conf/project_template/project_name",
    removed: &[
        "/usr/share/doc/python3-django",
        "/usr/lib/python3/dist-packages/django/conf/locale/af",
    ],
    user: Some(("app", 1000)),
    data_dir: "/home/app",
}];

/// The smallest families, built by the integration tests.
pub const TEST_FAMILIES: &[&str] = &["redis", "nginx"];

/// One layer of a built image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInfo {
    /// `base`, `deps`, `app` or `config`.
    pub name: String,
    /// Digest of the gzip blob (`sha256:...`).
    pub digest: String,
    /// Digest of the uncompressed tar (`sha256:...`).
    pub diff_id: String,
    /// Size of the gzip blob.
    pub size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Number of tar entries (whiteouts included).
    pub entries: u64,
    /// Packages installed by this layer's step.
    pub packages: usize,
}

/// Facts about a build, kept beside its recipe so that a cache hit has them too.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildStats {
    manifest_digest: String,
    layers: Vec<LayerInfo>,
    build_seconds: f64,
    removed: Vec<String>,
    opaque_dir: String,
    xattr_path: String,
    xattr_name: String,
    xattr_value: Vec<u8>,
}

/// A built image of the corpus.
#[derive(Debug, Clone)]
pub struct CorpusImage {
    /// Family name.
    pub family: &'static str,
    /// Which build.
    pub build: Build,
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The tag in the layout (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// `oci:LAYOUT:TAG`.
    pub reference: String,
    /// A command that proves the image works.
    pub command: Vec<String>,
    /// Every installed package as (name, version), layer by layer.
    pub packages: Vec<(String, String)>,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// The layers, bottom first.
    pub layers: Vec<LayerInfo>,
    /// Paths the config layer deleted (absent from the merged view).
    pub removed: Vec<String>,
    /// The directory the config layer made opaque.
    pub opaque_dir: String,
    /// The file carrying the xattr (real path, no symlink).
    pub xattr_path: String,
    /// Name of that xattr.
    pub xattr_name: String,
    /// Value of that xattr.
    pub xattr_value: Vec<u8>,
    /// Seconds the build took when it was built (not this call's time).
    pub build_seconds: f64,
    /// Whether this call found the build in the cache.
    pub cache_hit: bool,
}

impl CorpusImage {
    /// Total size of the layer blobs.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Total size of the uncompressed layer tars.
    pub fn uncompressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.uncompressed_size).sum()
    }
}

/// Bump when the builder's output changes, so cached builds are redone.
const BUILDER_VERSION: &str = "breakfs corpus builder 1";

/// 2025-01-10T00:00:00Z: the build time of the first family's v1.
const EPOCH_V1: i64 = 1_736_467_200;

/// The packages of a debian:bookworm-slim-like base (their dependency closure is taken).
const BASE_PACKAGES: &[&str] = &[
    "apt",
    "base-files",
    "base-passwd",
    "bash",
    "bsdutils",
    "coreutils",
    "dash",
    "debconf",
    "debianutils",
    "diffutils",
    "dpkg",
    "findutils",
    "gcc-12-base",
    "grep",
    "gzip",
    "hostname",
    "init-system-helpers",
    "libc-bin",
    "login",
    "mawk",
    "mount",
    "ncurses-base",
    "ncurses-bin",
    "passwd",
    "perl-base",
    "sed",
    "sysvinit-utils",
    "tar",
    "tzdata",
    "usr-is-merged",
    "util-linux",
];

/// Alternatives that maintainer scripts would set up: (package, link, name, path).
const ALTERNATIVES: &[(&str, &str, &str, &str)] = &[
    ("mawk", "/usr/bin/awk", "awk", "/usr/bin/mawk"),
    ("mawk", "/usr/bin/nawk", "nawk", "/usr/bin/mawk"),
    (
        "debianutils",
        "/usr/bin/which",
        "which",
        "/usr/bin/which.debianutils",
    ),
    ("gawk", "/usr/bin/awk", "awk", "/usr/bin/gawk"),
    (
        "openjdk-17-jre-headless",
        "/usr/bin/java",
        "java",
        "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
    ),
    (
        "openjdk-17-jre-headless",
        "/usr/bin/keytool",
        "keytool",
        "/usr/lib/jvm/java-17-openjdk-amd64/bin/keytool",
    ),
];

/// debian:bookworm-slim's /etc/dpkg/dpkg.cfg.d/docker (as debuerreotype writes it).
const SLIM_DPKG_CFG: &str = "# This is the \"slim\" variant of the Debian base image.\n\
# Many files which are normally unnecessary in containers are excluded,\n\
# and this configuration file keeps them that way.\n\
path-exclude /usr/share/doc/*\n\
path-include /usr/share/doc/*/copyright\n\
path-exclude /usr/share/groff/*\n\
path-exclude /usr/share/info/*\n\
path-exclude /usr/share/linda/*\n\
path-exclude /usr/share/lintian/*\n\
path-exclude /usr/share/locale/*\n\
path-include /usr/share/locale/locale.alias\n\
path-exclude /usr/share/man/*\n";

/// Whether dpkg skips `path` (relative, no leading `./`) under [`SLIM_DPKG_CFG`].
/// Directories a kept file needs (`usr/share/doc/PKG`) are kept.
fn slim_excluded(path: &str, is_dir: bool) -> bool {
    if let Some(rest) = path.strip_prefix("usr/share/doc/") {
        let depth = rest.split('/').count();
        return if is_dir {
            depth > 1
        } else {
            !(depth == 2 && rest.ends_with("/copyright"))
        };
    }
    if path == "usr/share/locale/locale.alias" {
        return false;
    }
    ["groff", "info", "linda", "lintian", "locale", "man"]
        .iter()
        .any(|d| path.starts_with(&format!("usr/share/{d}/")))
}

pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cache root: `$BREAKFS_CACHE`, else `~/.cache/breakfs`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BREAKFS_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| OsString::from("/root"));
    PathBuf::from(home).join(".cache").join("breakfs")
}

/// Look a family up by name.
pub fn family(name: &str) -> Result<&'static Family> {
    let all = || FAMILIES.iter().chain(APP_FAMILIES);
    all().find(|f| f.name == name).ok_or_else(|| {
        let names: Vec<&str> = all().map(|f| f.name).collect();
        anyhow!(
            "no corpus family {name:?}: pick one of {}",
            names.join(", ")
        )
    })
}

/// Build (or find in the cache) the three builds of several families.
pub fn build_families(names: &[&str]) -> Result<Vec<CorpusImage>> {
    let mut out = Vec::new();
    for name in names {
        out.extend(build_family(name)?);
    }
    Ok(out)
}

/// Build (or find in the cache) the three builds of one family: v1, point, v2.
pub fn build_family(name: &str) -> Result<Vec<CorpusImage>> {
    let fam = family(name)?;
    let cache = cache_dir();
    ensure_apt_lists()?;
    let plan =
        cached_plan(fam, &cache).with_context(|| format!("planning corpus family {name}"))?;

    let layout = cache.join("corpus").join(fam.name);
    fs::create_dir_all(layout.join("blobs").join("sha256"))
        .with_context(|| format!("creating OCI layout {}", layout.display()))?;
    fs::create_dir_all(layout.join("recipes"))?;
    let lock_path = layout.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening lock file {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;

    let mut images = Vec::new();
    for build in Build::ALL {
        let recipe = plan.recipe(fam, build);
        let image = match cached_build(fam, build, &layout, &recipe)? {
            Some(image) => {
                eprintln!(
                    "corpus: {} {}: cached ({} packages, {:.1} MB)",
                    fam.name,
                    build.tag(),
                    image.packages.len(),
                    mb(image.compressed_size())
                );
                image
            }
            None => {
                let image = build_image(fam, build, &plan, &layout, &recipe, &cache).with_context(
                    || format!("building corpus image {} {}", fam.name, build.tag()),
                )?;
                eprintln!(
                    "corpus: {} {}: built in {:.0}s, {} packages, {:.1} MB tar, {:.1} MB gz",
                    fam.name,
                    build.tag(),
                    image.build_seconds,
                    image.packages.len(),
                    mb(image.uncompressed_size()),
                    mb(image.compressed_size())
                );
                image
            }
        };
        images.push(image);
    }
    collect_garbage(&layout)?;
    drop(lock);
    Ok(images)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Unpack `image` with umoci into `dir` (which must not exist) and run its
/// command in a chroot of the rootfs, in new mount and pid namespaces with
/// /proc mounted (as a container has it: the JVM needs /proc/self/exe to
/// find its libraries); returns the rootfs path. Needs root.
pub fn unpack_and_run(image: &CorpusImage, dir: &Path) -> Result<PathBuf> {
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{}", image.layout.display(), image.tag))
        .arg(dir))
    .with_context(|| format!("umoci unpack of {}", image.reference))?;
    let rootfs = dir.join("rootfs");
    let out = run_in_rootfs(&rootfs, &image.command).context("running unshare + chroot")?;
    ensure!(
        out.status.success(),
        "{:?} in {} failed ({}): {}{}",
        image.command,
        image.reference,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(rootfs)
}

/// Run `command` chrooted into `rootfs`, in new mount and pid namespaces
/// with /proc mounted and the image's PATH, stdin closed.
pub fn run_in_rootfs(rootfs: &Path, command: &[String]) -> std::io::Result<std::process::Output> {
    Command::new("unshare")
        .args(["--mount", "--pid", "--fork"])
        .arg(format!("--mount-proc={}", rootfs.join("proc").display()))
        .arg("chroot")
        .arg(rootfs)
        .args(command)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .output()
}

// ---------------------------------------------------------------------------
// Planning: package sets and versions.

/// The package plan of a family: names per layer (in install order) and versions.
#[derive(Serialize, Deserialize)]
struct Plan {
    base: Vec<String>,
    deps: Vec<String>,
    app: Vec<String>,
    /// Every known version of every package, oldest first.
    versions: BTreeMap<String, Vec<String>>,
}

impl Plan {
    fn version(&self, fam: &Family, build: Build, pkg: &str) -> String {
        let vs = &self.versions[pkg];
        let newest = vs[vs.len() - 1].clone();
        match build {
            Build::V1 => vs[0].clone(),
            Build::V2 => newest,
            Build::Point => {
                if fam.app_packages.contains(&pkg) || self.point_base().contains(&pkg) {
                    newest
                } else {
                    vs[0].clone()
                }
            }
        }
    }

    /// The base packages updated in the point build: the first three, by
    /// name, that have more than one version.
    fn point_base(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .base
            .iter()
            .filter(|p| self.versions[p.as_str()].len() > 1)
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.truncate(3);
        names
    }

    fn layers(&self) -> [(&'static str, &[String]); 3] {
        [
            ("base", &self.base),
            ("deps", &self.deps),
            ("app", &self.app),
        ]
    }

    fn packages(&self, fam: &Family, build: Build, layer: &[String]) -> Vec<(String, String)> {
        layer
            .iter()
            .map(|p| (p.clone(), self.version(fam, build, p)))
            .collect()
    }

    fn recipe(&self, fam: &Family, build: Build) -> String {
        let mut r = format!(
            "{BUILDER_VERSION}\nfamily {} build {} time {}\n",
            fam.name,
            build.tag(),
            rfc3339(build_time(fam, build))
        );
        for (name, layer) in self.layers() {
            r.push_str(&format!("layer {name}\n"));
            for (p, v) in self.packages(fam, build, layer) {
                r.push_str(&format!("{p}={v}\n"));
            }
        }
        r.push_str(&format!(
            "layer config\ncommand {:?}\nbinary {} capability {}\nopaque {}\nremoved {:?}\nuser {:?}\ndata {}\n",
            fam.command, fam.binary, fam.capability, fam.opaque_dir, fam.removed, fam.user, fam.data_dir
        ));
        r
    }
}

fn build_time(fam: &Family, build: Build) -> i64 {
    let index = FAMILIES
        .iter()
        .chain(APP_FAMILIES)
        .position(|f| f.name == fam.name)
        .unwrap_or(0) as i64;
    EPOCH_V1 + index * 3600 + build.days_after_v1() * 86_400
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed?)"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

fn ensure_apt_lists() -> Result<()> {
    let out = run(Command::new("apt-cache").args(["madison", "bash"]))?;
    if !String::from_utf8_lossy(&out).contains("deb.debian.org") {
        eprintln!("corpus: apt lists are empty, running apt-get update");
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    Ok(())
}

/// The dependency closure of `roots`, as apt would install it on an empty
/// system (first alternatives, no recommends), in apt's install order.
fn resolve(roots: &[&str], cache: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(cache)?;
    let status = cache.join("apt-empty-status");
    if !status.exists() {
        fs::write(&status, b"")?;
    }
    let out = run(Command::new("apt-get")
        .arg("-s")
        .arg("-o")
        .arg(format!("Dir::State::status={}", status.display()))
        .args(["-o", "APT::Install-Recommends=false", "install"])
        .args(roots))?;
    let mut names = Vec::new();
    for line in String::from_utf8_lossy(&out).lines() {
        if let Some(rest) = line.strip_prefix("Inst ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && !names.iter().any(|n: &String| n == name) {
                names.push(name.to_string());
            }
        }
    }
    ensure!(
        !names.is_empty(),
        "apt-get -s install {roots:?} installs nothing: are the apt lists there (apt-get update)?"
    );
    Ok(names)
}

fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    if a == b {
        return Ordering::Equal;
    }
    let lt = Command::new("dpkg")
        .args(["--compare-versions", a, "lt", b])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if lt {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// Every version of `names` in Debian's archive (bookworm, -updates, -security), oldest first.
fn archive_versions(names: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for chunk in names.chunks(200) {
        let out = run(Command::new("apt-cache").arg("madison").args(chunk))?;
        for line in String::from_utf8_lossy(&out).lines() {
            let fields: Vec<&str> = line.split('|').map(str::trim).collect();
            if fields.len() != 3
                || !fields[2].contains("deb.debian.org")
                || !fields[2].ends_with("Packages")
            {
                continue;
            }
            let list = versions.entry(fields[0].to_string()).or_default();
            if !list.iter().any(|v| v == fields[1]) {
                list.push(fields[1].to_string());
            }
        }
    }
    for name in names {
        let list = versions.get_mut(name).ok_or_else(|| {
            anyhow!("apt-cache madison shows no version of {name} in Debian's archive")
        })?;
        list.sort_by(|a, b| compare_versions(a, b));
    }
    Ok(versions)
}

/// [`plan_family`], kept under `cache/plans` by the family and the apt
/// lists it was made from (their names, sizes and times): resolving the
/// closure and listing every version with apt takes seconds per family on
/// each run, and the answer changes only with `apt-get update`.
fn cached_plan(fam: &Family, cache: &Path) -> Result<Plan> {
    let mut key = Sha256::new();
    key.update(fam.name.as_bytes());
    for p in BASE_PACKAGES.iter().chain(fam.app_packages) {
        key.update(b"\0");
        key.update(p.as_bytes());
    }
    let lists = Path::new("/var/lib/apt/lists");
    let mut entries: Vec<(OsString, u64, i64, i64)> = fs::read_dir(lists)
        .with_context(|| format!("reading {}", lists.display()))?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.file_name(), m.len(), m.mtime(), m.mtime_nsec()))
        })
        .collect();
    entries.sort();
    for (name, len, secs, nsecs) in &entries {
        key.update(name.as_encoded_bytes());
        key.update(format!(" {len} {secs}.{nsecs}\n").as_bytes());
    }
    let dir = cache.join("plans");
    let path = dir.join(format!(
        "{}-{}.json",
        fam.name,
        &hex::encode(key.finalize())[..16]
    ));
    if let Ok(text) = fs::read_to_string(&path)
        && let Ok(plan) = serde_json::from_str::<Plan>(&text)
    {
        return Ok(plan);
    }
    let plan = plan_family(fam, cache)?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = path.with_extension(format!("partial{}", std::process::id()));
    fs::write(&partial, serde_json::to_vec(&plan)?)?;
    fs::rename(&partial, &path)?;
    Ok(plan)
}

fn plan_family(fam: &Family, cache: &Path) -> Result<Plan> {
    let base = resolve(BASE_PACKAGES, cache)?;
    let mut roots: Vec<&str> = BASE_PACKAGES.to_vec();
    roots.extend(fam.app_packages);
    let all = resolve(&roots, cache)?;
    for app in fam.app_packages {
        ensure!(
            all.iter().any(|p| p == app),
            "app package {app} of family {} is not in its own dependency closure",
            fam.name
        );
    }
    let deps: Vec<String> = all
        .iter()
        .filter(|p| !base.contains(p) && !fam.app_packages.contains(&p.as_str()))
        .cloned()
        .collect();
    let app: Vec<String> = all
        .iter()
        .filter(|p| fam.app_packages.contains(&p.as_str()))
        .cloned()
        .collect();
    let mut names = base.clone();
    names.extend(deps.iter().cloned());
    names.extend(app.iter().cloned());
    let versions = archive_versions(&names)?;
    Ok(Plan {
        base,
        deps,
        app,
        versions,
    })
}

// ---------------------------------------------------------------------------
// The .deb cache.

/// The cached .deb of every (package, version), downloading what is missing.
fn fetch_debs(packages: &[(String, String)], cache: &Path) -> Result<HashMap<String, PathBuf>> {
    let dir = cache.join("debs");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let find = |name: &str, version: &str| -> Result<Option<PathBuf>> {
        let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.starts_with(&prefix) && file.ends_with(".deb") {
                return Ok(Some(entry.path()));
            }
        }
        Ok(None)
    };
    let mut found = HashMap::new();
    let mut missing = Vec::new();
    for (name, version) in packages {
        match find(name, version)? {
            Some(path) => {
                found.insert(name.clone(), path);
            }
            None => missing.push(format!("{name}={version}")),
        }
    }
    if !missing.is_empty() {
        eprintln!("corpus: downloading {} packages", missing.len());
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&dir)?;
        for chunk in missing.chunks(100) {
            run(Command::new("apt-get")
                .current_dir(tmp.path())
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .args(chunk))?;
        }
        for entry in fs::read_dir(tmp.path())? {
            let entry = entry?;
            fs::rename(entry.path(), dir.join(entry.file_name()))?;
        }
        for (name, version) in packages {
            if !found.contains_key(name) {
                let path = find(name, version)?.ok_or_else(|| {
                    anyhow!(
                        "apt-get download {name}={version} gave no .deb in {}",
                        dir.display()
                    )
                })?;
                found.insert(name.clone(), path);
            }
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// Building one image.

fn cached_build(
    fam: &'static Family,
    build: Build,
    layout: &Path,
    recipe: &str,
) -> Result<Option<CorpusImage>> {
    let recipe_path = layout.join("recipes").join(format!("{}.txt", build.tag()));
    let stats_path = layout.join("recipes").join(format!("{}.json", build.tag()));
    match fs::read_to_string(&recipe_path) {
        Ok(old) if old == recipe => {}
        _ => return Ok(None),
    }
    let Ok(stats_json) = fs::read(&stats_path) else {
        return Ok(None);
    };
    let Ok(stats) = serde_json::from_slice::<BuildStats>(&stats_json) else {
        return Ok(None);
    };
    let index = read_index(layout)?;
    let tagged = index_entries(&index)
        .iter()
        .any(|m| ref_name(m) == Some(build.tag()) && m["digest"] == stats.manifest_digest.as_str());
    let blobs_present = std::iter::once(&stats.manifest_digest)
        .chain(stats.layers.iter().map(|l| &l.digest))
        .all(|d| blob_path(layout, d).is_some_and(|p| p.exists()));
    if !tagged || !blobs_present {
        return Ok(None);
    }
    Ok(Some(image_from(fam, build, layout, recipe, stats, true)))
}

fn image_from(
    fam: &'static Family,
    build: Build,
    layout: &Path,
    recipe: &str,
    stats: BuildStats,
    cache_hit: bool,
) -> CorpusImage {
    let mut packages = Vec::new();
    let mut in_packages = false;
    for line in recipe.lines() {
        if let Some(layer) = line.strip_prefix("layer ") {
            in_packages = layer != "config";
        } else if let Some((p, v)) = line.split_once('=').filter(|_| in_packages) {
            packages.push((p.to_string(), v.to_string()));
        }
    }
    CorpusImage {
        family: fam.name,
        build,
        layout: layout.to_path_buf(),
        tag: build.tag().to_string(),
        reference: format!("oci:{}:{}", layout.display(), build.tag()),
        command: fam.command.iter().map(|s| s.to_string()).collect(),
        packages,
        manifest_digest: stats.manifest_digest,
        layers: stats.layers,
        removed: stats.removed,
        opaque_dir: stats.opaque_dir,
        xattr_path: stats.xattr_path,
        xattr_name: stats.xattr_name,
        xattr_value: stats.xattr_value,
        build_seconds: stats.build_seconds,
        cache_hit,
    }
}

fn build_image(
    fam: &'static Family,
    build: Build,
    plan: &Plan,
    layout: &Path,
    recipe: &str,
    cache: &Path,
) -> Result<CorpusImage> {
    let started = Instant::now();
    let time = build_time(fam, build);
    let mut all = Vec::new();
    for (_, layer) in plan.layers() {
        all.extend(plan.packages(fam, build, layer));
    }
    let debs = fetch_debs(&all, cache)?;

    let staging_parent = cache.join("staging");
    fs::create_dir_all(&staging_parent)?;
    let staging = tempfile::Builder::new()
        .prefix(&format!("{}-{}-", fam.name, build.tag()))
        .tempdir_in(&staging_parent)?;
    let root = staging.path().join("rootfs");
    fs::create_dir(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;

    let mut stage = Stage {
        root: root.clone(),
        time,
        status: BTreeMap::new(),
        snapshot: BTreeMap::new(),
    };
    let mut layers = Vec::new();
    let mut history = Vec::new();
    for (name, layer) in plan.layers() {
        let packages = plan.packages(fam, build, layer);
        let step_start = SystemTime::now();
        if name == "base" {
            stage.merged_usr()?;
            let cfg = stage.path(Path::new("etc/dpkg/dpkg.cfg.d"));
            fs::create_dir_all(&cfg)?;
            stage.write_generated(&cfg.join("docker"), SLIM_DPKG_CFG.as_bytes(), 0o644)?;
        }
        let mut extracted = BTreeSet::new();
        for (pkg, version) in &packages {
            let deb = &debs[pkg];
            stage
                .install(pkg, deb, &mut extracted)
                .with_context(|| format!("installing {pkg}={version} from {}", deb.display()))?;
        }
        if name == "base" {
            stage.write_accounts()?;
        }
        stage.alternatives(&packages)?;
        stage.write_status()?;
        stage.ldconfig()?;
        stage.normalize(step_start, &extracted)?;
        let change = stage.diff(&BTreeSet::new(), &BTreeSet::new())?;
        let info = write_layer(
            layout,
            &stage,
            name,
            &change,
            &BTreeMap::new(),
            packages.len(),
        )?;
        eprintln!(
            "corpus: {} {}: layer {name}: {} packages, {} entries, {:.1} MB tar, {:.1} MB gz",
            fam.name,
            build.tag(),
            packages.len(),
            info.entries,
            mb(info.uncompressed_size),
            mb(info.size)
        );
        history.push(match name {
            "base" => format!(
                "/bin/sh -c #(nop) ADD file:rootfs.tar.xz in / # debian:bookworm-slim-like, {} packages",
                packages.len()
            ),
            _ => format!(
                "RUN /bin/sh -c apt-get update && apt-get install -y --no-install-recommends {} && rm -rf /var/lib/apt/lists/* # buildkit",
                packages
                    .iter()
                    .map(|(p, v)| format!("{p}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        });
        layers.push(info);
    }

    let step_start = SystemTime::now();
    let config = stage.config_step(fam)?;
    stage.normalize(step_start, &BTreeSet::new())?;
    let change = stage.diff(&config.opaque, &config.force)?;
    let info = write_layer(layout, &stage, "config", &change, &config.xattrs, 0)?;
    eprintln!(
        "corpus: {} {}: layer config: {} entries, {:.1} MB tar",
        fam.name,
        build.tag(),
        info.entries,
        mb(info.uncompressed_size)
    );
    history.push(format!(
        "COPY docker-entrypoint.sh /usr/local/bin/ && {} # buildkit",
        config.summary
    ));
    layers.push(info);

    let manifest_digest = write_image(layout, fam, time, &layers, &history)?;
    let stats = BuildStats {
        manifest_digest: manifest_digest.clone(),
        layers,
        build_seconds: started.elapsed().as_secs_f64(),
        removed: fam.removed.iter().map(|s| s.to_string()).collect(),
        opaque_dir: fam.opaque_dir.to_string(),
        xattr_path: config.xattr_path,
        xattr_name: config.xattr_name,
        xattr_value: config.xattr_value,
    };
    let recipes = layout.join("recipes");
    write_atomic(
        &recipes.join(format!("{}.json", build.tag())),
        &serde_json::to_vec_pretty(&stats)?,
    )?;
    write_atomic(
        &recipes.join(format!("{}.txt", build.tag())),
        recipe.as_bytes(),
    )?;
    tag_manifest(layout, build, &manifest_digest)?;
    drop(staging);
    Ok(image_from(fam, build, layout, recipe, stats, false))
}

// ---------------------------------------------------------------------------
// The staging rootfs.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

/// What the diff compares; a path whose `Meta` changed goes into the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    ino: u64,
    nlink: u64,
    target: Option<PathBuf>,
}

fn meta_of(path: &Path) -> Result<Meta> {
    let m = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    Ok(Meta {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        size: if kind == Kind::File { m.size() } else { 0 },
        ino: m.ino(),
        nlink: if kind == Kind::Dir { 0 } else { m.nlink() },
        target: if kind == Kind::Symlink {
            Some(fs::read_link(path)?)
        } else {
            None
        },
    })
}

/// Every path under `root` (relative, root itself excluded), depth-first in name order.
fn walk(root: &Path) -> Result<BTreeMap<PathBuf, Meta>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<OsString> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let child = rel.join(&name);
            let meta = meta_of(&root.join(&child))?;
            if meta.kind == Kind::Dir {
                stack.push(child.clone());
            }
            out.insert(child, meta);
        }
    }
    Ok(out)
}

/// One installed package's dpkg status stanza.
struct Installed {
    stanza: String,
}

struct Stage {
    root: PathBuf,
    time: i64,
    status: BTreeMap<String, Installed>,
    snapshot: BTreeMap<PathBuf, Meta>,
}

/// A layer's content: changed paths and deleted paths.
struct Change {
    /// (path, None) for an entry to write, (path, Some(deleted)) for a whiteout.
    items: Vec<(PathBuf, Option<PathBuf>)>,
    opaque: BTreeSet<PathBuf>,
}

/// What the config step did, for the layer writer and the recorded stats.
struct ConfigStep {
    opaque: BTreeSet<PathBuf>,
    force: BTreeSet<PathBuf>,
    xattrs: BTreeMap<PathBuf, Vec<(String, Vec<u8>)>>,
    xattr_path: String,
    xattr_name: String,
    xattr_value: Vec<u8>,
    summary: String,
}

fn rel(path: &str) -> PathBuf {
    PathBuf::from(path.trim_start_matches('/'))
}

fn set_mtime(path: &Path, time: i64) -> Result<()> {
    filetime::set_symlink_file_times(
        path,
        FileTime::from_unix_time(time, 0),
        FileTime::from_unix_time(time, 0),
    )
    .with_context(|| format!("setting the mtime of {}", path.display()))
}

impl Stage {
    fn path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Follow `rel` inside the root like dpkg does (symlinks resolved against
    /// the root, never escaping it). With `create`, missing directories are
    /// made. With `follow_last`, a symlink in the last component is followed.
    fn resolve(&self, rel: &Path, create: bool, follow_last: bool) -> Result<PathBuf> {
        let mut queue: VecDeque<OsString> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        let mut cur = PathBuf::new();
        let mut hops = 0;
        while let Some(name) = queue.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let cand = cur.join(&name);
            let full = self.path(&cand);
            let last = queue.is_empty();
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() && (!last || follow_last) => {
                    hops += 1;
                    ensure!(hops < 40, "too many symlinks resolving {}", rel.display());
                    let target = fs::read_link(&full)?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    let mut parts: Vec<OsString> = target
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    while let Some(p) = parts.pop() {
                        queue.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() || last => cur = cand,
                Ok(_) => bail!("{} is not a directory", full.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if create && !last {
                        fs::create_dir(&full)
                            .with_context(|| format!("creating {}", full.display()))?;
                        fs::set_permissions(&full, fs::Permissions::from_mode(0o755))?;
                    } else if !last {
                        bail!("{} does not exist", full.display());
                    }
                    cur = cand;
                }
                Err(e) => return Err(e).with_context(|| format!("stat {}", full.display())),
            }
        }
        Ok(cur)
    }

    /// The merged-/usr symlinks debootstrap makes before unpacking anything.
    fn merged_usr(&self) -> Result<()> {
        for dir in ["usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"] {
            let p = self.path(Path::new(dir));
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        }
        for link in ["bin", "sbin", "lib", "lib64"] {
            let p = self.path(Path::new(link));
            std::os::unix::fs::symlink(format!("usr/{link}"), &p)?;
            set_mtime(&p, self.time)?;
        }
        Ok(())
    }

    /// Unpack one .deb like dpkg (through existing directory symlinks, keeping
    /// owners, modes and the archive's mtimes) and register it in the dpkg database.
    fn install(&mut self, pkg: &str, deb: &Path, extracted: &mut BTreeSet<PathBuf>) -> Result<()> {
        let control_dir = tempfile::tempdir()?;
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb)
            .arg(control_dir.path()))?;
        let control = fs::read_to_string(control_dir.path().join("control"))?;
        let field = |name: &str| -> Option<String> {
            control.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
        };
        let arch = field("Architecture").unwrap_or_else(|| "amd64".to_string());
        let info_name = if field("Multi-Arch").as_deref() == Some("same") {
            format!("{pkg}:{arch}")
        } else {
            pkg.to_string()
        };

        let mut child = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running dpkg-deb --fsys-tarfile")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("dpkg-deb gave no stdout"))?;
        let mut list = Vec::new();
        let mut archive = tar::Archive::new(stdout);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path()?.into_owned();
            let name = raw
                .to_string_lossy()
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            if name.is_empty() || name == "." {
                list.push("/.".to_string());
                continue;
            }
            let header = entry.header().clone();
            if slim_excluded(&name, header.entry_type() == tar::EntryType::Directory) {
                continue;
            }
            list.push(format!("/{name}"));
            let relp = PathBuf::from(&name);
            let parent = relp.parent().unwrap_or(Path::new(""));
            let file_name = relp
                .file_name()
                .ok_or_else(|| anyhow!("bad path {name} in {}", deb.display()))?;
            let real = self.resolve(parent, true, true)?.join(file_name);
            let full = self.path(&real);
            let mode = header.mode()? & 0o7777;
            let uid = header.uid()? as u32;
            let gid = header.gid()? as u32;
            let mtime = header.mtime()? as i64;
            let existing = fs::symlink_metadata(&full).ok();
            match header.entry_type() {
                tar::EntryType::Directory => {
                    let is_dir = existing.is_some()
                        && self
                            .resolve(&real, false, true)
                            .map(|r| self.path(&r).is_dir())
                            .unwrap_or(false);
                    if !is_dir {
                        if existing.is_some() {
                            fs::remove_file(&full)?;
                        }
                        fs::create_dir(&full)
                            .with_context(|| format!("creating {}", full.display()))?;
                        std::os::unix::fs::chown(&full, Some(uid), Some(gid))?;
                        fs::set_permissions(&full, fs::Permissions::from_mode(mode))?;
                    }
                    continue;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    remove_non_dir(&full, existing.as_ref())?;
                    let mut out = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&full)
                        .with_context(|| format!("creating {}", full.display()))?;
                    io::copy(&mut entry, &mut out)?;
                    drop(out);
                    std::os::unix::fs::chown(&full, Some(uid), Some(gid))?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(mode))?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()?
                        .ok_or_else(|| anyhow!("symlink {name} without target"))?
                        .into_owned();
                    remove_non_dir(&full, existing.as_ref())?;
                    std::os::unix::fs::symlink(&target, &full)?;
                    std::os::unix::fs::lchown(&full, Some(uid), Some(gid))?;
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()?
                        .ok_or_else(|| anyhow!("hardlink {name} without target"))?
                        .into_owned();
                    let target = target
                        .to_string_lossy()
                        .trim_start_matches("./")
                        .to_string();
                    let src = self.path(&self.resolve(Path::new(&target), false, false)?);
                    remove_non_dir(&full, existing.as_ref())?;
                    fs::hard_link(&src, &full).with_context(|| {
                        format!("hardlinking {} to {}", full.display(), src.display())
                    })?;
                    extracted.insert(real);
                    continue;
                }
                other => bail!(
                    "unsupported tar entry {other:?} for {name} in {}",
                    deb.display()
                ),
            }
            set_mtime(&full, mtime)?;
            extracted.insert(real);
        }
        let status = child.wait_with_output()?;
        ensure!(
            status.status.success(),
            "dpkg-deb --fsys-tarfile {} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        );

        // The dpkg database: info/PKG.list, the control files, the status stanza.
        let info = self.path(Path::new("var/lib/dpkg/info"));
        fs::create_dir_all(&info)?;
        let mut list_text = list.join("\n");
        list_text.push('\n');
        self.write_generated(
            &info.join(format!("{info_name}.list")),
            list_text.as_bytes(),
            0o644,
        )?;
        let mut control_files: Vec<OsString> = fs::read_dir(control_dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        control_files.sort();
        for file in control_files {
            if file == "control" {
                continue;
            }
            let src = control_dir.path().join(&file);
            let data = fs::read(&src)?;
            let mode = if fs::metadata(&src)?.mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            self.write_generated(
                &info.join(format!("{info_name}.{}", file.to_string_lossy())),
                &data,
                mode,
            )?;
        }
        let mut stanza = String::new();
        for line in control.lines() {
            if line.trim().is_empty() {
                continue;
            }
            stanza.push_str(line);
            stanza.push('\n');
            if line.starts_with("Package:") {
                stanza.push_str("Status: install ok installed\n");
            }
        }
        if let Ok(conffiles) = fs::read_to_string(control_dir.path().join("conffiles")) {
            let mut lines = Vec::new();
            for conffile in conffiles
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with('/'))
            {
                let real = self.resolve(&rel(conffile), false, true)?;
                let data = fs::read(self.path(&real)).unwrap_or_default();
                lines.push(format!(" {conffile} {}", md5_hex(&data)?));
            }
            if !lines.is_empty() {
                // dpkg puts Conffiles after Version-ish fields; before Description is where it lands.
                let at = stanza
                    .find("\nDescription:")
                    .map(|i| i + 1)
                    .unwrap_or(stanza.len());
                stanza.insert_str(at, &format!("Conffiles:\n{}\n", lines.join("\n")));
            }
        }
        self.status.insert(info_name, Installed { stanza });
        Ok(())
    }

    /// Write a file the build generates (dpkg database, accounts, config): build-time mtime, root-owned.
    fn write_generated(&self, path: &Path, data: &[u8], mode: u32) -> Result<()> {
        let tmp = path.with_extension("corpus-tmp");
        fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)?;
        set_mtime(path, self.time)
    }

    /// /etc/passwd, group, shadow, gshadow as base-passwd's and passwd's maintainer scripts make them.
    fn write_accounts(&self) -> Result<()> {
        let master = self.path(Path::new("usr/share/base-passwd"));
        let passwd = fs::read_to_string(master.join("passwd.master"))
            .context("base-passwd's passwd.master is missing")?;
        let group = fs::read_to_string(master.join("group.master"))
            .context("base-passwd's group.master is missing")?;
        let day = self.time / 86_400;
        let shadow: String = passwd
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(|u| format!("{u}:*:{day}:0:99999:7:::\n"))
            .collect();
        let gshadow: String = group
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(|g| format!("{g}:*::\n"))
            .collect();
        let etc = self.path(Path::new("etc"));
        self.write_generated(&etc.join("passwd"), passwd.as_bytes(), 0o644)?;
        self.write_generated(&etc.join("group"), group.as_bytes(), 0o644)?;
        for (name, data) in [("shadow", shadow), ("gshadow", gshadow)] {
            let path = etc.join(name);
            self.write_generated(&path, data.as_bytes(), 0o640)?;
            std::os::unix::fs::chown(&path, Some(0), Some(42))?;
        }
        Ok(())
    }

    /// The update-alternatives links the installed packages' postinsts would make.
    fn alternatives(&self, packages: &[(String, String)]) -> Result<()> {
        for (pkg, link, name, target) in ALTERNATIVES {
            if !packages.iter().any(|(p, _)| p == pkg) {
                continue;
            }
            let target_real = self.resolve(&rel(target), false, true);
            if !target_real.is_ok_and(|t| self.path(&t).exists()) {
                continue;
            }
            let alt = self.path(Path::new("etc/alternatives"));
            fs::create_dir_all(&alt)?;
            let alt_link = alt.join(name);
            let _ = fs::remove_file(&alt_link);
            std::os::unix::fs::symlink(target, &alt_link)?;
            set_mtime(&alt_link, self.time)?;
            let link_real = self.path(&self.resolve(&rel(link), true, false)?);
            if fs::symlink_metadata(&link_real).is_ok() {
                fs::remove_file(&link_real)?;
            }
            std::os::unix::fs::symlink(format!("/etc/alternatives/{name}"), &link_real)?;
            set_mtime(&link_real, self.time)?;
        }
        Ok(())
    }

    fn write_status(&self) -> Result<()> {
        let mut text = String::new();
        for installed in self.status.values() {
            text.push_str(&installed.stanza);
            text.push('\n');
        }
        let dir = self.path(Path::new("var/lib/dpkg"));
        fs::create_dir_all(&dir)?;
        self.write_generated(&dir.join("status"), text.as_bytes(), 0o644)
    }

    /// /etc/ld.so.cache as libc-bin's trigger makes it.
    fn ldconfig(&self) -> Result<()> {
        if !self.path(Path::new("etc/ld.so.conf")).exists() {
            return Ok(());
        }
        run(Command::new("ldconfig").arg("-r").arg(&self.root))?;
        // The aux cache records inode numbers and ctimes: not reproducible.
        let aux = self.path(Path::new("var/cache/ldconfig/aux-cache"));
        if aux.exists() {
            fs::remove_file(aux)?;
        }
        Ok(())
    }

    /// Give every directory, and every file the step made other than by
    /// unpacking, the build time as mtime, so that rebuilds are identical.
    fn normalize(&self, step_start: SystemTime, extracted: &BTreeSet<PathBuf>) -> Result<()> {
        let start = step_start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64 - 2)
            .unwrap_or(0);
        for (path, meta) in walk(&self.root)? {
            let touched =
                meta.kind == Kind::Dir || (meta.mtime >= start && !extracted.contains(&path));
            if touched && meta.mtime != self.time {
                set_mtime(&self.path(&path), self.time)?;
            }
        }
        set_mtime(&self.root, self.time)
    }

    /// The layer of the step that just ran; the snapshot moves on.
    fn diff(&mut self, opaque: &BTreeSet<PathBuf>, force: &BTreeSet<PathBuf>) -> Result<Change> {
        let after = walk(&self.root)?;
        let mut include: BTreeSet<PathBuf> = BTreeSet::new();
        for (path, meta) in &after {
            if self.snapshot.get(path) != Some(meta)
                || force.contains(path)
                || opaque.iter().any(|o| path.starts_with(o))
            {
                include.insert(path.clone());
            }
        }
        let mut whiteouts = BTreeSet::new();
        for path in self.snapshot.keys() {
            if after.contains_key(path) {
                continue;
            }
            let parent = path.parent().unwrap_or(Path::new(""));
            let parent_gone = !parent.as_os_str().is_empty()
                && self.snapshot.contains_key(parent)
                && !after.contains_key(parent);
            if parent_gone || opaque.iter().any(|o| path.starts_with(o) && path != o) {
                continue;
            }
            whiteouts.insert(path.clone());
        }
        let mut ancestors = BTreeSet::new();
        for path in include.iter().chain(whiteouts.iter()) {
            let mut p = path.parent();
            while let Some(a) = p {
                if a.as_os_str().is_empty() {
                    break;
                }
                ancestors.insert(a.to_path_buf());
                p = a.parent();
            }
        }
        include.extend(ancestors);
        let mut items: Vec<(PathBuf, Option<PathBuf>)> =
            include.into_iter().map(|p| (p, None)).collect();
        for deleted in whiteouts {
            let parent = deleted.parent().unwrap_or(Path::new("")).to_path_buf();
            let name = deleted
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            items.push((parent.join(format!(".wh.{name}")), Some(deleted)));
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));
        self.snapshot = after;
        Ok(Change {
            items,
            opaque: opaque.clone(),
        })
    }

    /// What an official Dockerfile does last.
    fn config_step(&mut self, fam: &Family) -> Result<ConfigStep> {
        let t = self.time;
        let mut force = BTreeSet::new();
        let mut opaque = BTreeSet::new();
        let mut xattrs = BTreeMap::new();

        // Service user and data directory.
        let mut owner = 0;
        if let Some((user, id)) = fam.user {
            owner = id;
            let etc = self.path(Path::new("etc"));
            let passwd = fs::read_to_string(etc.join("passwd"))?;
            if !passwd.lines().any(|l| l.starts_with(&format!("{user}:"))) {
                let home = if fam.data_dir.starts_with("/home/") {
                    fam.data_dir.to_string()
                } else {
                    format!("/var/lib/{user}")
                };
                let add = |file: &str, line: String| -> Result<()> {
                    let path = etc.join(file);
                    let meta = fs::metadata(&path)?;
                    let mut text = fs::read_to_string(&path)?;
                    text.push_str(&line);
                    self.write_generated(&path, text.as_bytes(), meta.mode() & 0o7777)?;
                    std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()))?;
                    Ok(())
                };
                add("passwd", format!("{user}:x:{id}:{id}::{home}:/bin/bash\n"))?;
                add("group", format!("{user}:x:{id}:\n"))?;
                add("shadow", format!("{user}:!:{}::::::\n", t / 86_400))?;
                add("gshadow", format!("{user}:!::\n"))?;
            }
        }
        let data = self.path(&rel(fam.data_dir));
        fs::create_dir_all(&data)?;
        std::os::unix::fs::chown(&data, Some(owner), Some(owner))?;
        fs::set_permissions(
            &data,
            fs::Permissions::from_mode(if owner == 0 { 0o755 } else { 0o750 }),
        )?;

        // Deletions of lower layers' files.
        for path in fam.removed {
            let p = self.path(&rel(path));
            let m = fs::symlink_metadata(&p).with_context(|| {
                format!(
                    "family {} removes {path}, which the image does not have",
                    fam.name
                )
            })?;
            if m.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }

        // The opaque directory: replaced by two of its files plus our config.
        let dir_rel = rel(fam.opaque_dir);
        let dir = self.path(&dir_rel);
        let dmeta = fs::symlink_metadata(&dir).with_context(|| {
            format!(
                "family {}'s opaque dir {} is missing",
                fam.name, fam.opaque_dir
            )
        })?;
        ensure!(dmeta.is_dir(), "{} is not a directory", fam.opaque_dir);
        let mut names: Vec<OsString> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        let mut keep = Vec::new();
        for name in names {
            let p = dir.join(&name);
            let m = fs::symlink_metadata(&p)?;
            if m.is_file() && keep.len() < 2 {
                keep.push((name, fs::read(&p)?, m));
            }
        }
        fs::remove_dir_all(&dir)?;
        fs::create_dir(&dir)?;
        std::os::unix::fs::chown(&dir, Some(dmeta.uid()), Some(dmeta.gid()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(dmeta.mode() & 0o7777))?;
        for (name, data, m) in keep {
            let p = dir.join(name);
            fs::write(&p, data)?;
            std::os::unix::fs::chown(&p, Some(m.uid()), Some(m.gid()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            set_mtime(&p, m.mtime())?;
        }
        let conf = format!(
            "# {name} settings added by the image (breakfs corpus)\n# see https://hub.docker.com/_/{name}\nlisten 0.0.0.0\ndata {data}\n",
            name = fam.name,
            data = fam.data_dir
        );
        self.write_generated(
            &dir.join(format!("docker-{}.conf", fam.name)),
            conf.as_bytes(),
            0o644,
        )?;
        opaque.insert(dir_rel);

        // The entrypoint, with the compat hardlink at /.
        let bin = self.path(Path::new("usr/local/bin"));
        fs::create_dir_all(&bin)?;
        let entry = format!(
            "#!/bin/sh\nset -e\n# first arg is `-f` or `--some-option`\nif [ \"${{1#-}}\" != \"$1\" ]; then\n\tset -- {} \"$@\"\nfi\nexec \"$@\"\n",
            fam.command[0]
        );
        let entry_path = bin.join("docker-entrypoint.sh");
        self.write_generated(&entry_path, entry.as_bytes(), 0o755)?;
        fs::hard_link(&entry_path, self.path(Path::new("docker-entrypoint.sh")))?;

        // gosu-like setuid helper (a copy of setpriv).
        let setpriv = self.path(&self.resolve(&rel("/usr/bin/setpriv"), false, true)?);
        let gosu = bin.join("gosu");
        fs::copy(&setpriv, &gosu)
            .with_context(|| format!("copying {} (util-linux's setpriv)", setpriv.display()))?;
        fs::set_permissions(&gosu, fs::Permissions::from_mode(0o4755))?;
        set_mtime(&gosu, t)?;

        // The xattr on the app binary (setcap in a RUN line copies it up).
        let binary = self
            .resolve(&rel(fam.binary), false, true)
            .with_context(|| format!("resolving the app binary {}", fam.binary))?;
        ensure!(
            self.path(&binary).is_file(),
            "app binary {} of family {} is not a file",
            fam.binary,
            fam.name
        );
        let (xattr_name, xattr_value) = if fam.capability {
            (
                "security.capability".to_string(),
                capability_net_bind_service(),
            )
        } else {
            (
                "user.breakfs.component".to_string(),
                fam.name.as_bytes().to_vec(),
            )
        };
        force.insert(binary.clone());
        xattrs.insert(
            binary.clone(),
            vec![(xattr_name.clone(), xattr_value.clone())],
        );

        let summary = format!(
            "RUN /bin/sh -c chmod u+s /usr/local/bin/gosu && rm -rf {} && setfattr -n {xattr_name} /{} && ln /usr/local/bin/docker-entrypoint.sh /",
            fam.removed.join(" "),
            binary.display()
        );
        Ok(ConfigStep {
            opaque,
            force,
            xattrs,
            xattr_path: format!("/{}", binary.display()),
            xattr_name,
            xattr_value,
            summary,
        })
    }
}

fn remove_non_dir(full: &Path, existing: Option<&fs::Metadata>) -> Result<()> {
    if let Some(m) = existing {
        ensure!(
            !m.is_dir(),
            "{} is a directory, a package wants a file there",
            full.display()
        );
        fs::remove_file(full)?;
    }
    Ok(())
}

fn md5_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running md5sum")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A VFS_CAP_REVISION_2 `security.capability` value: cap_net_bind_service=+ep.
pub fn capability_net_bind_service() -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2 | effective
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted: CAP_NET_BIND_SERVICE
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted (high word)
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable (high word)
    v
}

// ---------------------------------------------------------------------------
// Layers, blobs, the layout.

/// A writer that hashes and counts what passes through.
struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn blob_path(layout: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    Some(layout.join("blobs").join("sha256").join(hex))
}

fn temp_blob(layout: &Path) -> Result<tempfile::NamedTempFile> {
    Ok(tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(layout.join("blobs").join("sha256"))?)
}

fn commit_blob(layout: &Path, tmp: tempfile::NamedTempFile, digest: &str) -> Result<()> {
    let path = blob_path(layout, digest).ok_or_else(|| anyhow!("bad digest {digest}"))?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path)
        .with_context(|| format!("storing blob {}", path.display()))?;
    Ok(())
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, u64)> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let mut tmp = temp_blob(layout)?;
    tmp.write_all(data)?;
    commit_blob(layout, tmp, &digest)?;
    Ok((digest, data.len() as u64))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn tar_name(path: &Path, dir: bool) -> Result<String> {
    let mut s = path
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", path.display()))?
        .to_string();
    if dir {
        s.push('/');
    }
    Ok(s)
}

/// Append one entry, with PAX records for xattrs and for names too long for ustar.
fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    name: &str,
    link: Option<&str>,
    mut pax: Vec<(String, Vec<u8>)>,
    data: &mut dyn Read,
) -> Result<()> {
    if header.set_path(name).is_err() {
        pax.push(("path".to_string(), name.as_bytes().to_vec()));
        let short: String = name
            .chars()
            .rev()
            .take(90)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        header.set_path(short.trim_start_matches('/'))?;
    }
    if let Some(link) = link
        && (link.len() > 100 || header.set_link_name(link).is_err())
    {
        pax.push(("linkpath".to_string(), link.as_bytes().to_vec()));
        header.set_link_name("././@LongLink")?;
    }
    if !pax.is_empty() {
        pax.sort();
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    header.set_cksum();
    builder.append(&header, data)?;
    Ok(())
}

fn header(
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid as u64);
    h.set_gid(gid as u64);
    h.set_mtime(mtime.max(0) as u64);
    h.set_size(size);
    h
}

fn write_layer(
    layout: &Path,
    stage: &Stage,
    name: &str,
    change: &Change,
    xattrs: &BTreeMap<PathBuf, Vec<(String, Vec<u8>)>>,
    packages: usize,
) -> Result<LayerInfo> {
    let tmp = temp_blob(layout)?;
    let file = tmp.reopen()?;
    let blob = HashWriter::new(BufWriter::new(file));
    let gz = flate2::GzBuilder::new().write(blob, flate2::Compression::new(6));
    let tarw = HashWriter::new(gz);
    let mut builder = tar::Builder::new(tarw);
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut entries = 0u64;
    for (path, deleted) in &change.items {
        entries += 1;
        if deleted.is_some() {
            let h = header(tar::EntryType::Regular, 0o644, 0, 0, stage.time, 0);
            append(
                &mut builder,
                h,
                &tar_name(path, false)?,
                None,
                Vec::new(),
                &mut io::empty(),
            )?;
            continue;
        }
        let full = stage.path(path);
        let m = fs::symlink_metadata(&full)?;
        let mode = m.mode() & 0o7777;
        let pax: Vec<(String, Vec<u8>)> = xattrs
            .get(path)
            .into_iter()
            .flatten()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
            .collect();
        let ft = m.file_type();
        if ft.is_dir() {
            let h = header(
                tar::EntryType::Directory,
                mode,
                m.uid(),
                m.gid(),
                m.mtime(),
                0,
            );
            append(
                &mut builder,
                h,
                &tar_name(path, true)?,
                None,
                pax,
                &mut io::empty(),
            )?;
            if change.opaque.contains(path) {
                entries += 1;
                let h = header(tar::EntryType::Regular, 0o644, 0, 0, m.mtime(), 0);
                let marker = tar_name(&path.join(".wh..wh..opq"), false)?;
                append(&mut builder, h, &marker, None, Vec::new(), &mut io::empty())?;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&full)?;
            let target = target
                .to_str()
                .ok_or_else(|| anyhow!("non-UTF-8 symlink target at {}", full.display()))?;
            let h = header(
                tar::EntryType::Symlink,
                mode,
                m.uid(),
                m.gid(),
                m.mtime(),
                0,
            );
            append(
                &mut builder,
                h,
                &tar_name(path, false)?,
                Some(target),
                pax,
                &mut io::empty(),
            )?;
        } else if ft.is_file() {
            let key = (m.dev(), m.ino());
            if m.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    let h = header(tar::EntryType::Link, mode, m.uid(), m.gid(), m.mtime(), 0);
                    let first = first.clone();
                    append(
                        &mut builder,
                        h,
                        &tar_name(path, false)?,
                        Some(&first),
                        pax,
                        &mut io::empty(),
                    )?;
                    continue;
                }
                links.insert(key, tar_name(path, false)?);
            }
            let h = header(
                tar::EntryType::Regular,
                mode,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.size(),
            );
            let mut f = File::open(&full).with_context(|| format!("reading {}", full.display()))?;
            append(&mut builder, h, &tar_name(path, false)?, None, pax, &mut f)?;
        } else {
            bail!("{} is a special file; the corpus has none", full.display());
        }
    }
    let tarw = builder.into_inner()?;
    let (gz, diff_id, uncompressed_size) = tarw.finish();
    let blob = gz.finish()?;
    let (mut buf, digest, size) = blob.finish();
    buf.flush()?;
    drop(buf);
    commit_blob(layout, tmp, &digest)?;
    Ok(LayerInfo {
        name: name.to_string(),
        digest,
        diff_id,
        size,
        uncompressed_size,
        entries,
        packages,
    })
}

/// "2025-01-10T00:00:00Z" for a unix time.
pub fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Config and manifest blobs; returns the manifest digest.
fn write_image(
    layout: &Path,
    fam: &Family,
    time: i64,
    layers: &[LayerInfo],
    history: &[String],
) -> Result<String> {
    let created = rfc3339(time);
    let mut cmd: Vec<&str> = fam.command.to_vec();
    if cmd.is_empty() {
        cmd.push("/bin/sh");
    }
    let config = serde_json::json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [format!("PATH={IMAGE_PATH}")],
            "Entrypoint": ["docker-entrypoint.sh"],
            "Cmd": cmd,
            "WorkingDir": fam.data_dir,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history.iter().map(|h| serde_json::json!({
            "created": created,
            "created_by": h,
            "comment": "breakfs corpus",
        })).collect::<Vec<_>>(),
    });
    let (config_digest, config_size) = write_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let (digest, _) = write_blob(layout, &serde_json::to_vec(&manifest)?)?;
    Ok(digest)
}

fn read_index(layout: &Path) -> Result<serde_json::Value> {
    match fs::read(layout.join("index.json")) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("parsing {}/index.json", layout.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
        })),
        Err(e) => Err(e).with_context(|| format!("reading {}/index.json", layout.display())),
    }
}

fn index_entries(index: &serde_json::Value) -> Vec<serde_json::Value> {
    index["manifests"].as_array().cloned().unwrap_or_default()
}

fn ref_name(m: &serde_json::Value) -> Option<&str> {
    m["annotations"]["org.opencontainers.image.ref.name"].as_str()
}

/// Point `tag` at the manifest in index.json (written last, atomically).
fn tag_manifest(layout: &Path, build: Build, digest: &str) -> Result<()> {
    write_atomic(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut index = read_index(layout)?;
    let size = fs::metadata(blob_path(layout, digest).ok_or_else(|| anyhow!("bad digest"))?)?.len();
    let mut entries: Vec<serde_json::Value> = index_entries(&index)
        .into_iter()
        .filter(|m| ref_name(m) != Some(build.tag()))
        .collect();
    entries.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": size,
        "annotations": { "org.opencontainers.image.ref.name": build.tag() },
        "platform": { "architecture": "amd64", "os": "linux" },
    }));
    let order = |m: &serde_json::Value| {
        Build::ALL
            .iter()
            .position(|b| Some(b.tag()) == ref_name(m))
            .unwrap_or(Build::ALL.len())
    };
    entries.sort_by_key(order);
    index["manifests"] = serde_json::Value::Array(entries);
    write_atomic(&layout.join("index.json"), &serde_json::to_vec(&index)?)
}

/// Remove blobs no tagged manifest refers to (older recipes, interrupted builds).
fn collect_garbage(layout: &Path) -> Result<()> {
    let index = read_index(layout)?;
    let mut keep = BTreeSet::new();
    for m in index_entries(&index) {
        let Some(digest) = m["digest"].as_str() else {
            continue;
        };
        keep.insert(digest.to_string());
        let Some(path) = blob_path(layout, digest) else {
            continue;
        };
        let manifest: serde_json::Value = serde_json::from_slice(&fs::read(path)?)?;
        if let Some(d) = manifest["config"]["digest"].as_str() {
            keep.insert(d.to_string());
        }
        for l in manifest["layers"].as_array().into_iter().flatten() {
            if let Some(d) = l["digest"].as_str() {
                keep.insert(d.to_string());
            }
        }
    }
    for entry in fs::read_dir(layout.join("blobs").join("sha256"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&format!("sha256:{name}")) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
