//! The deployment files: the containerd drop-in (`deploy/containerd/`)
//! imported by a real containerd 1.6 next to a Debian-style `config.toml`
//! with the CRI settings docs/snapshotter.md gives, and the Kubernetes
//! manifests (`deploy/kubernetes/`) parsed into the API's types and checked
//! against each other and against what `breakfs node` and `breakfs sched`
//! accept and serve. No API server runs here.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Pod, PodSpec, PodTemplateSpec, Service, ServiceAccount, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;

use crate::node::Node;
use crate::support::containerd::{ContainerdOptions, TestContainerd, output_with_timeout};

/// The proxy plugin's name.
const PLUGIN: &str = "breakfs";

/// The drop-in's socket, as the daemon's flags and node.toml name it.
const SOCKET: &str = "/run/breakfs/snapshotter.sock";

/// The CRI plugin's section of Debian 12's /etc/containerd/config.toml
/// (containerd 1.6.20~ds1-1): a node's config.toml has settings of its own
/// there, which an imported CRI section would drop.
const DEBIAN_CRI: &str = r#"[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The first ```` ```toml ```` block of docs/snapshotter.md holding `needle`.
fn docs_toml_block(needle: &str) -> String {
    let docs = read("docs/snapshotter.md");
    let mut block: Option<String> = None;
    for line in docs.lines() {
        match block.as_mut() {
            None if line.trim_end() == "```toml" => block = Some(String::new()),
            None => {}
            Some(b) if line.trim_end() == "```" => {
                if b.contains(needle) {
                    return b.clone();
                }
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    panic!("docs/snapshotter.md has no ```toml block with {needle:?}")
}

/// The drop-in with its socket moved to `socket`.
fn drop_in_at(socket: &Path) -> String {
    let text = read("deploy/containerd/breakfs.toml");
    let from = format!("address = \"{SOCKET}\"");
    assert!(
        text.contains(&from),
        "deploy/containerd/breakfs.toml should name {SOCKET}"
    );
    text.replace(&from, &format!("address = \"{}\"", socket.display()))
}

/// `containerd config dump` of `config`: the merged configuration
/// containerd runs with, imports applied.
fn config_dump(config: &Path) -> toml::Table {
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(config).args(["config", "dump"]);
    let out = output_with_timeout(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(
        out.status.success(),
        "containerd config dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// The value at `path` (table keys) in `t`.
fn at<'a>(t: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let (last, tables) = path.split_last().unwrap();
    let mut cur = t;
    for k in tables {
        cur = cur
            .get(*k)
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("no table {k} on the way to {path:?}"));
    }
    cur.get(*last)
        .unwrap_or_else(|| panic!("no {path:?} in the dump"))
}

const CRI: &str = "io.containerd.grpc.v1.cri";

/// A real containerd started before the daemon, as on a node where the
/// daemon runs as a pod or its unit starts late: its config.toml is
/// Debian's CRI section plus the docs' CRI lines and an `imports` glob
/// that picks up the drop-in. It loads the proxy snapshotter and the CRI
/// plugin with snapshotter `breakfs` and snapshot annotations on, keeps
/// config.toml's own CRI settings, and reaches the daemon once it is up.
#[test]
fn containerd_loads_the_drop_in_and_cri_uses_breakfs() {
    let work = tempfile::Builder::new()
        .prefix("dep")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = work.path().join("snap.sock");
    let conf_d = work.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    std::fs::write(conf_d.join("breakfs.toml"), drop_in_at(&sock)).unwrap();
    let cri_lines = docs_toml_block(&format!("[plugins.\"{CRI}\".containerd]"));
    let ctrd = TestContainerd::start_with(ContainerdOptions {
        snapshotter: Some(PLUGIN.into()),
        imports: vec![conf_d.join("*.toml")],
        cri: true,
        extra_config: format!("{DEBIAN_CRI}\n{cri_lines}"),
        ..Default::default()
    })
    .unwrap();
    for (kind, id) in [
        ("io.containerd.snapshotter.v1", PLUGIN),
        ("io.containerd.grpc.v1", "cri"),
    ] {
        assert!(
            ctrd.plugin_ok(kind, id).unwrap(),
            "containerd did not load {kind} {id}; its log:\n{}",
            ctrd.log()
        );
    }

    // What the CRI plugin started with, in its own words.
    let log = ctrd.log();
    let started = log
        .lines()
        .find(|l| l.contains("Start cri plugin with config"))
        .unwrap_or_else(|| panic!("no CRI start line in containerd's log:\n{log}"));
    for want in [
        "Snapshotter:breakfs ",
        "DisableSnapshotAnnotations:false ",
        "NetworkPluginBinDir:/usr/lib/cni ",
    ] {
        assert!(started.contains(want), "{want:?} not in {started}");
    }
    // The same from the merged config.
    let dump = config_dump(&ctrd.dir().join("config.toml"));
    let proxy = ["proxy_plugins", PLUGIN];
    assert_eq!(
        at(&dump, &[proxy[0], proxy[1], "type"]).as_str(),
        Some("snapshot")
    );
    assert_eq!(
        at(&dump, &[proxy[0], proxy[1], "address"]).as_str(),
        sock.to_str()
    );
    let cri = |k: &str| at(&dump, &["plugins", CRI, "containerd", k]).clone();
    assert_eq!(cri("snapshotter").as_str(), Some(PLUGIN));
    assert_eq!(cri("disable_snapshot_annotations").as_bool(), Some(false));
    assert_eq!(
        at(&dump, &["plugins", CRI, "cni", "bin_dir"]).as_str(),
        Some("/usr/lib/cni"),
        "config.toml's own CRI setting was lost"
    );

    // The daemon comes up after containerd: containerd redials the socket.
    let mut node = Node::start(
        &work.path().join("node"),
        &[],
        &["--snapshotter-socket", &sock.to_string_lossy()],
    );
    let snapshots = |args: &[&str]| {
        let mut cmd = ctrd.ctr();
        cmd.args(["snapshots", "--snapshotter", PLUGIN]).args(args);
        output_with_timeout(&mut cmd, Duration::from_secs(10)).unwrap()
    };
    let until = Instant::now() + Duration::from_secs(60);
    while !snapshots(&["ls"]).status.success() {
        assert!(
            Instant::now() < until,
            "containerd did not reach the daemon started after it; containerd log:\n{}\nnode log:\n{}",
            ctrd.log(),
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let prepared = snapshots(&["prepare", "deploy-check"]);
    assert!(prepared.status.success(), "{prepared:?}");
    let ls = String::from_utf8_lossy(&snapshots(&["ls"]).stdout).into_owned();
    assert!(ls.contains("deploy-check"), "{ls}");
    assert!(snapshots(&["rm", "deploy-check"]).status.success());
    drop(ctrd);
    node.stop();
}

/// Why the drop-in holds no CRI settings: containerd 1.6 replaces
/// config.toml's whole section of a plugin by an imported file's, so a CRI
/// section in a drop-in drops config.toml's CRI settings (here Debian's CNI
/// directory); the proxy plugin merges by name and drops nothing.
#[test]
fn a_cri_section_in_a_drop_in_would_replace_config_toml_s() {
    let work = tempfile::tempdir().unwrap();
    let with_cri = work.path().join("with-cri.toml");
    let cri_lines = docs_toml_block(&format!("[plugins.\"{CRI}\".containerd]"));
    std::fs::write(
        &with_cri,
        format!(
            "{}\n{cri_lines}",
            drop_in_at(&work.path().join("snap.sock"))
        ),
    )
    .unwrap();
    let main = |import: &Path| {
        let path = work.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "version = 2\nimports = [{:?}]\n{DEBIAN_CRI}",
                import.display().to_string()
            ),
        )
        .unwrap();
        config_dump(&path)
    };
    let bin_dir = |t: &toml::Table| {
        at(t, &["plugins", CRI, "cni", "bin_dir"])
            .as_str()
            .map(str::to_string)
    };
    let dump = main(&with_cri);
    assert_eq!(
        at(&dump, &["plugins", CRI, "containerd", "snapshotter"]).as_str(),
        Some(PLUGIN)
    );
    assert_ne!(
        bin_dir(&dump).as_deref(),
        Some("/usr/lib/cni"),
        "containerd now merges an imported CRI section into config.toml's: \
         the CRI lines could move into deploy/containerd/breakfs.toml"
    );
    let plain = work.path().join("breakfs.toml");
    std::fs::write(&plain, drop_in_at(&work.path().join("snap.sock"))).unwrap();
    let dump = main(&plain);
    assert_eq!(bin_dir(&dump).as_deref(), Some("/usr/lib/cni"));
    assert!(at(&dump, &["proxy_plugins", PLUGIN, "address"]).is_str());
}

/// One manifest document, typed by its kind.
enum Object {
    ConfigMap(ConfigMap),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    Service(Service),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Pod(Pod),
}

/// The first path where `theirs` lacks or changes what `ours` has.
fn lost(ours: &serde_yaml::Value, theirs: &serde_yaml::Value, path: &str) -> Option<String> {
    use serde_yaml::Value as V;
    match (ours, theirs) {
        (V::Mapping(a), V::Mapping(b)) => a.iter().find_map(|(k, v)| {
            let key = k.as_str().unwrap_or("?");
            match b.get(k) {
                Some(w) => lost(v, w, &format!("{path}.{key}")),
                None => Some(format!("{path}.{key}")),
            }
        }),
        (V::Sequence(a), V::Sequence(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| lost(v, w, &format!("{path}[{i}]"))),
        (a, b) if a == b => None,
        _ => Some(format!("{path} ({ours:?} became {theirs:?})")),
    }
}

/// `doc` as a `T`, refusing fields the API type does not know (serde
/// skips them silently: a typo would pass).
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &serde_yaml::Value, file: &str) -> T {
    let t: T = serde_yaml::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: a document does not parse as its kind: {e}"));
    let back = serde_yaml::to_value(&t).unwrap();
    if let Some(path) = lost(doc, &back, "") {
        panic!("{file}: {path} is not a field of its kind (a typo?)");
    }
    t
}

/// Every document of the manifests in deploy/kubernetes, with its file;
/// an unknown kind fails. The KubeSchedulerConfiguration (no API object)
/// comes back untyped.
fn manifests() -> (Vec<(String, Object)>, serde_yaml::Value) {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut objects = Vec::new();
    let mut sched_config = None;
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(file.ends_with(".yaml"), "{file}: not a .yaml manifest");
        let text = std::fs::read_to_string(&path).unwrap();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
            let kind = doc["kind"].as_str().unwrap_or("").to_string();
            let object = match kind.as_str() {
                "ConfigMap" => Object::ConfigMap(typed(&doc, &file)),
                "DaemonSet" => Object::DaemonSet(typed(&doc, &file)),
                "Deployment" => Object::Deployment(typed(&doc, &file)),
                "Service" => Object::Service(typed(&doc, &file)),
                "ServiceAccount" => Object::ServiceAccount(typed(&doc, &file)),
                "ClusterRole" => Object::ClusterRole(typed(&doc, &file)),
                "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(&doc, &file)),
                "Pod" => Object::Pod(typed(&doc, &file)),
                "KubeSchedulerConfiguration" => {
                    assert_eq!(
                        doc["apiVersion"].as_str(),
                        Some("kubescheduler.config.k8s.io/v1"),
                        "{file}"
                    );
                    assert!(sched_config.replace(doc).is_none(), "two scheduler configs");
                    continue;
                }
                other => panic!("{file}: unknown kind {other:?}: add its type to this test"),
            };
            objects.push((file.clone(), object));
        }
    }
    (
        objects,
        sched_config.expect("no KubeSchedulerConfiguration in deploy/kubernetes"),
    )
}

/// The one object of a kind named `name`.
macro_rules! one {
    ($objects:expr, $kind:ident, $name:expr) => {{
        let found: Vec<&$kind> = $objects
            .iter()
            .filter_map(|(_, o)| match o {
                Object::$kind(x) if x.metadata.name.as_deref() == Some($name) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {} named {}",
            stringify!($kind),
            $name
        );
        found[0]
    }};
}

const NAMESPACE: &str = "kube-system";

/// The pod template's spec, after checking the selector picks the
/// template's labels and its volumes and mounts agree.
fn template_spec<'a>(
    what: &str,
    selector: &BTreeMap<String, String>,
    template: &'a PodTemplateSpec,
) -> &'a PodSpec {
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{what}: selector {k}={v} misses its pods"
        );
    }
    let spec = template.spec.as_ref().unwrap();
    volumes_agree(what, spec);
    spec
}

/// Volumes and mounts agree: every mount names a volume, every volume is
/// mounted by some container.
fn volumes_agree(what: &str, spec: &PodSpec) {
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut used = BTreeSet::new();
    for c in containers {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(m.name.as_str()),
                "{what}: container {} mounts volume {} that the pod does not have",
                c.name,
                m.name
            );
            used.insert(m.name.as_str());
        }
    }
    assert_eq!(volumes, used, "{what}: a volume no container mounts");
}

/// The container's args with `$(VAR)` replaced by a sample value of the
/// container's env var of that name (each must be defined).
fn expanded_args(c: &Container) -> Vec<String> {
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    c.args
        .iter()
        .flatten()
        .map(|a| {
            let mut out = a.clone();
            while let Some(start) = out.find("$(") {
                let end = out[start..].find(')').unwrap() + start;
                let var = out[start + 2..end].to_string();
                assert!(
                    env.contains(var.as_str()),
                    "container {}: $({var}) in its args but no such env var",
                    c.name
                );
                out.replace_range(start..=end, "192.0.2.10");
            }
            out
        })
        .collect()
}

/// Fail unless the breakfs binary accepts `args` (a subcommand and its
/// flags): clap parses them up to the `--help` put after them, and stops
/// with an error at an unknown flag or a bad value.
fn breakfs_accepts(args: &[String]) {
    let run = |args: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_breakfs"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap()
    };
    let out = run(args);
    assert!(
        out.status.success(),
        "breakfs {} refused: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    // The check tells: an unknown flag before --help fails.
    let mut bad = args.to_vec();
    bad.push("--no-such-flag".into());
    assert!(!run(&bad).status.success(), "clap took an unknown flag");
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("no {name} in {args:?}"));
    &args[i + 1]
}

/// The port number a container calls `name`.
fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c.name))
        .container_port
}

/// `port` (a number or a container port's name) as a number.
fn port_number(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container_port(c, name),
    }
}

/// The port of an `ADDR:PORT` flag value.
fn listen_port(addr: &str) -> i32 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The container's volume mount holding `path` (the deepest), and the
/// pod's volume behind it.
fn volume_at<'a>(spec: &'a PodSpec, c: &'a Container, path: &str) -> (&'a VolumeMount, &'a Volume) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("container {}: {path} is on no volume", c.name));
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    (m, v)
}

/// Fail unless `path` is on a hostPath volume mounted at its own path
/// (the pod and the host see the same file there).
fn on_host_at_same_path<'a>(spec: &'a PodSpec, c: &'a Container, path: &str) -> &'a VolumeMount {
    let (m, v) = volume_at(spec, c, path);
    assert_eq!(
        v.host_path.as_ref().map(|h| h.path.as_str()),
        Some(m.mount_path.as_str()),
        "{path}: the pod's {} is not the host's",
        m.mount_path
    );
    m
}

#[test]
fn kubernetes_manifests_parse_and_agree() {
    let (objects, kube_sched) = manifests();
    // breakfs' own objects in kube-system (the example workload goes
    // wherever its user wants it), the RBAC ones cluster-wide.
    for (file, o) in &objects {
        let (meta, want) = match o {
            Object::ConfigMap(x) => (&x.metadata, Some(NAMESPACE)),
            Object::DaemonSet(x) => (&x.metadata, Some(NAMESPACE)),
            Object::Deployment(x) => (&x.metadata, Some(NAMESPACE)),
            Object::Service(x) => (&x.metadata, Some(NAMESPACE)),
            Object::ServiceAccount(x) => (&x.metadata, Some(NAMESPACE)),
            Object::ClusterRole(x) => (&x.metadata, None),
            Object::ClusterRoleBinding(x) => (&x.metadata, None),
            Object::Pod(x) => (&x.metadata, None),
        };
        assert!(meta.name.is_some(), "{file}: an object without a name");
        assert_eq!(
            meta.namespace.as_deref(),
            want,
            "{file}: {:?} in the wrong namespace",
            meta.name
        );
    }

    // The node daemon.
    let ds = one!(objects, DaemonSet, "breakfs-node");
    let ds_spec = ds.spec.as_ref().unwrap();
    let spec = template_spec(
        "DaemonSet breakfs-node",
        ds_spec.selector.match_labels.as_ref().unwrap(),
        &ds_spec.template,
    );
    assert_eq!(
        spec.host_network,
        Some(true),
        "peers reach the node's address"
    );
    let node = spec.containers.iter().find(|c| c.name == "node").unwrap();
    assert_eq!(
        node.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let args = expanded_args(node);
    assert_eq!(args[0], "node");
    breakfs_accepts(&args);
    let peer = container_port(node, "peer");
    assert_eq!(listen_port(flag(&args, "--listen")), peer);
    assert_eq!(listen_port(flag(&args, "--advertise")), peer);
    let scrape = ds_spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(scrape["prometheus.io/port"], peer.to_string());
    let node_probe = node
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(port_number(node, &node_probe.port), peer);
    // Paths the host (containerd, the kernel's mounts) sees as the daemon
    // does: same path in the pod and on the host, mounts propagated back.
    let snap_sock = flag(&args, "--snapshotter-socket");
    let cache = flag(&args, "--cache");
    for path in [snap_sock, flag(&args, "--socket"), cache] {
        let m = on_host_at_same_path(spec, node, path);
        assert_eq!(
            m.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{}: mounts made there must reach the host",
            m.mount_path
        );
    }
    // The drop-in: the ConfigMap's is the file, and names the daemon's
    // socket and snapshot directory.
    let cm = one!(objects, ConfigMap, "breakfs-node");
    let drop_in = &cm.data.as_ref().unwrap()["breakfs.toml"];
    assert_eq!(
        drop_in,
        &read("deploy/containerd/breakfs.toml"),
        "the ConfigMap breakfs-node's breakfs.toml differs from deploy/containerd/breakfs.toml"
    );
    let drop_in: toml::Table = toml::from_str(drop_in).unwrap();
    let proxy = &drop_in["proxy_plugins"][PLUGIN];
    assert_eq!(proxy["type"].as_str(), Some("snapshot"));
    assert_eq!(proxy["address"].as_str(), Some(snap_sock));
    assert_eq!(proxy["address"].as_str(), Some(SOCKET));
    assert_eq!(
        proxy["exports"]["root"].as_str().map(PathBuf::from),
        Some(Path::new(cache).join("snapshotter"))
    );
    // ... installed by the init container into the host's conf.d.
    let init = spec.init_containers.as_ref().unwrap();
    let install = init.iter().find(|c| c.name == "containerd-config").unwrap();
    let cmd = install.command.as_ref().unwrap();
    let (src, dst) = (&cmd[cmd.len() - 2], &cmd[cmd.len() - 1]);
    let (src_mount, src_volume) = volume_at(spec, install, src);
    assert_eq!(
        src_volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("breakfs-node")
    );
    assert_eq!(
        Path::new(src).strip_prefix(&src_mount.mount_path).unwrap(),
        Path::new("breakfs.toml")
    );
    on_host_at_same_path(spec, install, dst);
    assert_eq!(
        Path::new(dst).parent(),
        Some(Path::new("/etc/containerd/conf.d"))
    );

    // The scheduler extender.
    let dep = one!(objects, Deployment, "breakfs-sched");
    let dep_spec = dep.spec.as_ref().unwrap();
    let spec = template_spec(
        "Deployment breakfs-sched",
        dep_spec.selector.match_labels.as_ref().unwrap(),
        &dep_spec.template,
    );
    let labels = dep_spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let sched = &spec.containers[0];
    let args = expanded_args(sched);
    assert_eq!(args[0], "sched");
    breakfs_accepts(&args);
    // Its config: the ConfigMap mounted where --config reads it.
    let config_path = flag(&args, "--config");
    let (mount, volume) = volume_at(spec, sched, config_path);
    let cm = one!(
        objects,
        ConfigMap,
        &volume.config_map.as_ref().unwrap().name
    );
    let key = Path::new(config_path)
        .strip_prefix(&mount.mount_path)
        .unwrap();
    let text = &cm.data.as_ref().unwrap()[key.to_str().unwrap()];
    let cfg = breakfs_sched::SchedConfig::from_yaml(text).unwrap();
    assert!(
        cfg.kubernetes.enabled,
        "in a cluster it finds the daemons through the API"
    );
    let extender_port = container_port(sched, "extender");
    assert_eq!(listen_port(&cfg.listen), extender_port);
    // RBAC: the pod's account, bound to the role, holding what the glue
    // uses (list and watch Nodes and Pods, patch Node labels), no more.
    let account = spec.service_account_name.as_deref().unwrap();
    one!(objects, ServiceAccount, account);
    let binding = one!(objects, ClusterRoleBinding, account);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let role = one!(objects, ClusterRole, &binding.role_ref.name);
    let subjects = binding.subjects.as_ref().unwrap();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(NAMESPACE)),
        "the binding does not name the pod's ServiceAccount"
    );
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        for r in rule.resources.iter().flatten() {
            granted
                .entry(r.clone())
                .or_default()
                .extend(rule.verbs.iter().cloned());
        }
    }
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        granted,
        BTreeMap::from([
            ("nodes".to_string(), set(&["list", "watch", "patch"])),
            ("pods".to_string(), set(&["list", "watch"])),
        ]),
        "the ClusterRole should grant what sched/src/k8s.rs uses, no more"
    );
    // The Service: picks the extender's pods, forwards to its port.
    let svc = one!(objects, Service, "breakfs-sched");
    let svc_spec = svc.spec.as_ref().unwrap();
    for (k, v) in svc_spec.selector.as_ref().unwrap() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service's selector misses the pods"
        );
    }
    let svc_ports = svc_spec.ports.as_ref().unwrap();
    assert_eq!(svc_ports.len(), 1);
    let target = svc_ports[0].target_port.as_ref().unwrap();
    assert_eq!(port_number(sched, target), extender_port);
    // kube-scheduler's extender URL: the Service's name, namespace and
    // port, the config's prefix; the verbs are routes the extender serves.
    let ext = &kube_sched["extenders"][0];
    let url_prefix = ext["urlPrefix"].as_str().unwrap();
    let rest = url_prefix.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    assert_eq!(
        host,
        format!("breakfs-sched.{NAMESPACE}.svc:{}", svc_ports[0].port)
    );
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    assert_eq!(
        path,
        cfg.prefix.trim_end_matches('/'),
        "urlPrefix's path is not the extender's prefix"
    );
    let verbs = [
        ext["filterVerb"].as_str().unwrap(),
        ext["prioritizeVerb"].as_str().unwrap(),
    ];
    let profiles = kube_sched["profiles"].as_sequence().unwrap();
    let pod = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .unwrap();
    let scheduler = pod.spec.as_ref().unwrap().scheduler_name.as_deref();
    assert!(
        profiles
            .iter()
            .any(|p| p["schedulerName"].as_str() == scheduler),
        "the example pod's schedulerName {scheduler:?} is no profile of kube-scheduler's"
    );
    let probe = sched
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(port_number(sched, &probe.port), extender_port);
    extender_serves(cfg, &path, &verbs, probe.path.as_deref().unwrap());
    node_serves(&[
        node_probe.path.as_deref().unwrap(),
        &scrape["prometheus.io/path"],
    ]);
}

/// A real node daemon answers GETs of the DaemonSet's `paths` (its
/// readiness probe, the metrics Prometheus scrapes).
fn node_serves(paths: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let mut node = Node::start(work.path(), &[], &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for path in paths {
        let url = format!("{}{path}", node.url);
        let status = rt.block_on(async { reqwest::get(&url).await.unwrap().status() });
        assert_eq!(status, 200, "GET {url}");
    }
    node.stop();
}

/// The extender, started in-process with the manifest's config (no API
/// server here: the watch off, port 0), answers kube-scheduler's POSTs to
/// `path/VERB` and the probe's GET.
fn extender_serves(mut cfg: breakfs_sched::SchedConfig, path: &str, verbs: &[&str], probe: &str) {
    cfg.kubernetes.enabled = false;
    cfg.listen = "127.0.0.1:0".into();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.unwrap();
        let server = breakfs_sched::Server::start(cfg, None, listener)
            .await
            .unwrap();
        let base = format!("http://{}", server.local_addr());
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(server.serve(stop.clone()));
        let http = reqwest::Client::new();
        let args = serde_json::json!({"Pod": {"metadata": {"name": "p"}}, "NodeNames": []});
        for verb in verbs {
            let url = format!("{base}{path}/{verb}");
            let r = http.post(&url).json(&args).send().await.unwrap();
            assert_eq!(r.status(), 200, "POST {url}: {}", r.text().await.unwrap());
        }
        let url = format!("{base}{probe}");
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {url}");
        stop.cancel();
        serving.await.unwrap().unwrap();
    });
}
