//! The Kubernetes path (issue 19, acceptance 6): containerd's CRI plugin
//! runs a pod whose containers' root filesystems are breakfs snapshots.
//! No kubelet or API server runs here, so the test plays kubelet over the
//! CRI socket with a Rust CRI client (`tests/cri`): PullImage,
//! RunPodSandbox with host networking (no CNI is set up: containerd only
//! needs one for a pod with its own network namespace), CreateContainer,
//! StartContainer, ContainerStatus until it exits, its log, then
//! StopPodSandbox, RemovePodSandbox, RemoveImage, and nothing is left.
//! The images come from a real docker-registry; the pause image is
//! Debian's busybox-static, the pod's image the same refactored by
//! breakfs, so its layers have TOCs and can go lazy.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use breakfs_cri_api::runtime as cri;
use breakfs_cri_api::{ImageServiceClient, RuntimeServiceClient};
use breakfs_node::snapshots_api::snapshots as pb;
use tonic::transport::Channel;

use crate::mount::{breakfs, ok};
use crate::node::{Node, layers_of};
use crate::snapshotter::{PLUGIN, records, runtime, snapshotter_node, wait_for};
use crate::support::containerd::{CRI_NAMESPACE, ContainerdOptions, TestContainerd};
use crate::support::corpus::cache_dir;
use crate::support::images::{Layer, T, tar_of, write_image_with};
use crate::support::registry::TestRegistry;

/// Whether the pod image's layers (refactored: each has a TOC) are
/// committed as remote (lazy) snapshots when the CRI plugin pulls them
/// with its `containerd.io/snapshot/cri.*` labels: they are, so
/// containerd downloads none of them (`false` would expect the ordinary
/// path, where containerd downloads and unpacks each layer).
const POD_IMAGE_LAYERS_LAZY: bool = true;

/// The CRI labels containerd's CRI plugin puts on a layer's Prepare when
/// `disable_snapshot_annotations = false`.
const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// What the pod's container prints, and the status it exits with.
const MESSAGE: &str = "hello from a pod on breakfs";
const EXIT_CODE: i32 = 7;

/// How long one CRI call may take (a pull or a sandbox start included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn kubelet_runs_a_pod_through_cri_on_the_snapshotter() {
    let work = tempfile::Builder::new()
        .prefix("cri")
        .tempdir_in("/tmp")
        .unwrap();
    let w = work.path();
    let registry = TestRegistry::start();
    let (pause, app) = push_images(&registry, w);

    let sock = w.join("snap.sock");
    let mut node = snapshotter_node(w, &[]);
    let ctrd = containerd_with_cri(&sock, &pause, &registry, w);
    assert!(
        ctrd.plugin_ok("io.containerd.grpc.v1", "cri").unwrap(),
        "containerd did not load its CRI plugin; its log:\n{}",
        ctrd.log()
    );
    let mut k = Kubelet::connect(&ctrd, &node);

    let v = k.call("Version", |r, _| {
        Box::pin(r.version(cri::VersionRequest {
            version: "v1".into(),
        }))
    });
    assert_eq!(v.runtime_name, "containerd", "{v:?}");
    assert_eq!(v.runtime_api_version, "v1", "{v:?}");
    let ready = k.call("Status", |r, _| {
        Box::pin(r.status(cri::StatusRequest { verbose: false }))
    });
    let condition = |name: &str| {
        ready
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == name))
            .map(|c| c.status)
    };
    assert_eq!(
        condition("RuntimeReady"),
        Some(true),
        "the CRI runtime is not ready: {ready:?}"
    );
    // No CNI config: the pod network is not ready, and a host-network pod
    // does not need it.
    assert_eq!(condition("NetworkReady"), Some(false), "{ready:?}");

    // Pull the pod's image; the sandbox image is pulled by RunPodSandbox.
    let image_ref = k
        .call("PullImage", |_, i| {
            Box::pin(i.pull_image(cri::PullImageRequest {
                image: Some(image_spec(&app)),
                ..Default::default()
            }))
        })
        .image_ref;
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    let logs = w.join("pod-logs");
    std::fs::create_dir(&logs).unwrap();
    let pod_config = pod_config(&logs);
    let pod = k
        .call("RunPodSandbox", |r, _| {
            Box::pin(r.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: String::new(),
            }))
        })
        .pod_sandbox_id;
    let container = k
        .call("CreateContainer", |r, _| {
            Box::pin(r.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(&image_ref)),
                sandbox_config: Some(pod_config.clone()),
            }))
        })
        .container_id;
    k.call("StartContainer", |r, _| {
        Box::pin(r.start_container(cri::StartContainerRequest {
            container_id: container.clone(),
        }))
    });
    let status = k.wait_exited(&container, Duration::from_secs(60));
    assert_eq!(
        status.exit_code, EXIT_CODE,
        "the container's exit code; its status: {status:?}"
    );
    assert_eq!(
        stdout_of_cri_log(&status.log_path),
        format!("{MESSAGE}\n"),
        "the container's log {}",
        status.log_path
    );

    // The pod's and its container's root filesystems are breakfs
    // snapshots (containerd names them by the sandbox's and container's
    // ids, below its namespace's prefix), over the layers breakfs holds.
    let snapshots = records(&sock);
    for (what, id) in [("sandbox", &pod), ("container", &container)] {
        let (_, rootfs) = snapshots
            .iter()
            .find(|(name, _)| name.ends_with(&format!("/{id}")))
            .unwrap_or_else(|| panic!("no breakfs snapshot for the {what} {id}: {snapshots:#?}"));
        assert_eq!(rootfs.kind, pb::Kind::Active as i32, "{rootfs:?}");
        assert!(
            snapshots.contains_key(&rootfs.parent),
            "the {what}'s parent {} is not a breakfs snapshot",
            rootfs.parent
        );
    }

    // The CRI plugin labelled every layer it prepared with the image and
    // the layer's digest, which is what lets breakfs make a layer lazy.
    for (reference, lazy_expected) in [(&pause, false), (&app, POD_IMAGE_LAYERS_LAZY)] {
        let layers = layers_of(&format!("docker://{reference}"));
        // What makes a layer eligible to go lazy: its TOC.
        assert_eq!(
            tocs_of(reference),
            vec![reference == &app; layers.len()],
            "which layers of {reference} have TOCs (the pod image's all, the pause image's none)"
        );
        let labelled: Vec<(&String, &pb::Info)> = snapshots
            .iter()
            .filter(|(_, i)| i.labels.get(IMAGE_REF) == Some(reference))
            .collect();
        let digests: BTreeSet<&str> = labelled
            .iter()
            .filter_map(|(_, i)| i.labels.get(LAYER_DIGEST).map(String::as_str))
            .collect();
        assert_eq!(
            digests,
            layers.iter().map(String::as_str).collect(),
            "the snapshots of {reference} and their {LAYER_DIGEST} labels: {labelled:#?}"
        );
        for (name, info) in &labelled {
            assert_eq!(info.kind, pb::Kind::Committed as i32, "{name}: {info:?}");
            let digest = &info.labels[LAYER_DIGEST];
            assert!(
                info.labels
                    .get(IMAGE_LAYERS)
                    .is_some_and(|l| l.split(',').any(|d| d == digest)),
                "{name} lacks its digest in {IMAGE_LAYERS}: {info:?}"
            );
            let remote = committed_remote(&node, name);
            assert_eq!(
                remote,
                lazy_expected,
                "layer {digest} of {reference} committed {} (expected {}): see \
                 POD_IMAGE_LAYERS_LAZY",
                if remote { "remote (lazy)" } else { "ordinary" },
                if lazy_expected { "lazy" } else { "ordinary" },
            );
        }
    }

    // The pod's cgroups (containerd puts them at NAMESPACE/ID).
    let cgroups = |id: &str| -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|c| c.path().join(CRI_NAMESPACE).join(id))
            .filter(|p| p.exists())
            .collect()
    };
    assert!(!cgroups(&pod).is_empty(), "the running pod has no cgroup");

    // Tear down as kubelet does, then remove the images.
    k.call("StopPodSandbox", |r, _| {
        Box::pin(r.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
    });
    k.call("RemovePodSandbox", |r, _| {
        Box::pin(r.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }))
    });
    for reference in [&app, &pause] {
        k.call("RemoveImage", |_, i| {
            Box::pin(i.remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(reference)),
            }))
        });
    }
    k.assert_nothing_left();
    drop(k);
    wait_for(
        Duration::from_secs(30),
        "containerd's GC removes every breakfs snapshot",
        || records(&sock).is_empty(),
    );
    let dirs: Vec<_> = std::fs::read_dir(node.cache.join("snapshotter/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(dirs.is_empty(), "snapshot dirs left behind: {dirs:?}");
    wait_for(Duration::from_secs(30), "the shims exit", || {
        ctrd.shim_pids().is_empty()
    });
    for id in [&pod, &container] {
        let left = cgroups(id);
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
    let mounts = ctrd.mounts_below_dir();
    assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    drop(ctrd);
    node.stop();
}

/// Build the pause image (Debian's busybox-static sleeping) and the pod's
/// image (busybox and a message, refactored by breakfs so its layers carry
/// TOCs), push both to `registry`; their references.
fn push_images(registry: &TestRegistry, work: &Path) -> (String, String) {
    let busybox = busybox_static(work);
    let layout = work.join("layout");
    let bin = || {
        Layer::gzip(tar_of(&[
            T::Dir("bin"),
            T::File("bin/busybox", &busybox, 0o755),
        ]))
    };
    let env = serde_json::json!(["PATH=/bin"]);
    // A pause container only has to stay until it is killed.
    let sleep = ["/bin/busybox", "sleep", "2147483647"];
    write_image_with(
        &layout,
        "pause",
        &[bin()],
        serde_json::json!({"Env": env, "Entrypoint": sleep}),
    );
    write_image_with(
        &layout,
        "app",
        &[
            bin(),
            Layer::gzip(tar_of(&[
                T::Dir("etc"),
                T::File("etc/pod-message", format!("{MESSAGE}\n").as_bytes(), 0o644),
            ])),
        ],
        serde_json::json!({"Env": env}),
    );
    let pause = format!("{}/cri/pause:v1", registry.host());
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:pause", layout.display()),
        &format!("docker://{pause}"),
    ]));
    let app = format!("{}/cri/app:v1", registry.host());
    ok(breakfs()
        .args(["refactor", "--plain-http", "--work-dir"])
        .arg(work.join("refactor"))
        .args([
            "--to",
            &format!("docker://{app}"),
            &format!("oci:{}:app", layout.display()),
        ]));
    (pause, app)
}

/// Whether each layer of `reference` has a TOC, as `breakfs inspect` says.
fn tocs_of(reference: &str) -> Vec<bool> {
    let text = ok(breakfs().args(["inspect", "--plain-http", &format!("docker://{reference}")]));
    // Layer rows: index, digest, size, tar size, entries, TOC, ...
    text.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().nth(5) == Some("yes"))
        .collect()
}

/// `/bin/busybox` of Debian's busybox-static: its .deb is kept in the
/// corpus' .deb cache (`apt-get download` once), unpacked with `dpkg-deb`.
pub(crate) fn busybox_static(work: &Path) -> Vec<u8> {
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let cached = || -> Option<PathBuf> {
        std::fs::read_dir(&debs).ok()?.flatten().find_map(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            (name.starts_with("busybox-static_") && name.ends_with(".deb")).then(|| e.path())
        })
    };
    let deb = match cached() {
        Some(deb) => deb,
        None => {
            let tmp = tempfile::Builder::new()
                .prefix(".download-")
                .tempdir_in(&debs)
                .unwrap();
            let out = Command::new("apt-get")
                .current_dir(tmp.path())
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg("busybox-static")
                .output()
                .expect("running apt-get");
            assert!(
                out.status.success(),
                "apt-get download busybox-static failed (are the apt lists there? \
                 apt-get update): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for e in std::fs::read_dir(tmp.path()).unwrap().flatten() {
                std::fs::rename(e.path(), debs.join(e.file_name())).unwrap();
            }
            cached().expect("apt-get download busybox-static gave no .deb")
        }
    };
    let root = work.join("busybox-static");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    std::fs::read(root.join("bin/busybox")).unwrap()
}

/// A private containerd with its CRI plugin on the node's snapshotter:
/// `snapshotter = "breakfs"`, the CRI labels on layer snapshots, the
/// pause image from the test registry (plain HTTP through a hosts.toml),
/// the CNI dirs in `work` (with no CNI config, as here, only host-network
/// pods can run; the default dirs would be created on the host), and no
/// OOM score below containerd's own (the sandbox's default, -998, needs
/// `CAP_SYS_RESOURCE`, which this sandbox lacks: runc fails to start it).
fn containerd_with_cri(
    sock: &Path,
    pause: &str,
    registry: &TestRegistry,
    work: &Path,
) -> TestContainerd {
    let certs = work.join("certs.d");
    let host = registry.host();
    std::fs::create_dir_all(certs.join(&host)).unwrap();
    std::fs::write(
        certs.join(&host).join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    TestContainerd::start_with(ContainerdOptions {
        snapshotter: Some(PLUGIN.into()),
        cri: true,
        extra_config: format!(
            "[proxy_plugins.{PLUGIN}]\n  type = \"snapshot\"\n  address = \"{sock}\"\n\n\
             [{cri}]\n  sandbox_image = \"{pause}\"\n  restrict_oom_score_adj = true\n\n\
             [{cri}.containerd]\n  snapshotter = \"{PLUGIN}\"\n  \
             disable_snapshot_annotations = false\n\n\
             [{cri}.cni]\n  bin_dir = \"{bin}\"\n  conf_dir = \"{conf}\"\n\n\
             [{cri}.registry]\n  config_path = \"{certs}\"\n",
            sock = sock.display(),
            bin = work.join("cni/bin").display(),
            conf = work.join("cni/net.d").display(),
            certs = certs.display(),
        ),
        ..Default::default()
    })
    .unwrap()
}

fn image_spec(reference: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: reference.into(),
        ..Default::default()
    }
}

/// A pod in the node's network namespace (no CNI needed), logging below
/// `logs`.
fn pod_config(logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "breakfs-pod".into(),
            uid: format!("breakfs-pod-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's one container: print the message from its image, exit 7.
fn container_config(image_ref: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(image_spec(image_ref)),
        command: ["/bin/busybox", "sh", "-c"].map(String::from).to_vec(),
        args: vec![format!(
            "/bin/busybox cat /etc/pod-message && exit {EXIT_CODE}"
        )],
        log_path: "app.log".into(),
        ..Default::default()
    }
}

/// The stdout of a container from its CRI log (`TIME STREAM TAG TEXT`
/// lines; tag `F` ends a line, `P` is part of one).
fn stdout_of_cri_log(path: &str) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the container log {path}: {e}"));
    let mut out = String::new();
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (_time, stream, tag, body) = (f.next(), f.next(), f.next(), f.next());
        if stream == Some("stdout") {
            out.push_str(body.unwrap_or(""));
            if tag == Some("F") {
                out.push('\n');
            }
        }
    }
    out
}

/// Whether breakfs committed snapshot `name` as a remote (lazy) layer,
/// from its record in the snapshotter's metadata (`metadata.json`, then
/// the changes its journal `metadata.log` puts and removes): a `remote`
/// entry in the record (`remote: {image, layer}`), or the
/// `containerd.io/snapshot/remote` label other remote snapshotters set.
fn committed_remote(node: &Node, name: &str) -> bool {
    let path = node.cache.join("snapshotter/metadata.json");
    let mut record = match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()["snapshots"][name].clone()
        }
        Err(_) => serde_json::Value::Null,
    };
    let journal = std::fs::read_to_string(node.cache.join("snapshotter/metadata.log"));
    for line in journal.unwrap_or_default().lines() {
        let change: serde_json::Value = serde_json::from_str(line).unwrap();
        if change["del"]
            .as_array()
            .is_some_and(|d| d.iter().any(|k| k == name))
        {
            record = serde_json::Value::Null;
        }
        if change["put"][name].is_object() {
            record = change["put"][name].clone();
        }
    }
    assert!(
        record.is_object(),
        "no record of {name} in {} or its journal",
        path.display()
    );
    !record["remote"].is_null() || !record["labels"]["containerd.io/snapshot/remote"].is_null()
}

type Call<'c, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + 'c>,
>;

/// The test's kubelet: CRI clients on containerd's socket; a failed call
/// fails the test naming the call, its gRPC status and both daemons' logs.
struct Kubelet<'a> {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    ctrd: &'a TestContainerd,
    node: &'a Node,
}

impl<'a> Kubelet<'a> {
    fn connect(ctrd: &'a TestContainerd, node: &'a Node) -> Kubelet<'a> {
        let rt = runtime();
        let channel = rt
            .block_on(breakfs_cri_api::connect(&ctrd.address()))
            .unwrap_or_else(|e| panic!("connecting to the CRI on {:?}: {e}", ctrd.address()));
        Kubelet {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            ctrd,
            node,
        }
    }

    /// Make the CRI call `what`; its answer.
    fn call<T>(
        &mut self,
        what: &str,
        f: impl for<'c> FnOnce(
            &'c mut RuntimeServiceClient<Channel>,
            &'c mut ImageServiceClient<Channel>,
        ) -> Call<'c, T>,
    ) -> T {
        let call = f(&mut self.runtime, &mut self.images);
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await })
        {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) => self.fail(&format!(
                "CRI {what} failed: {:?}: {}",
                status.code(),
                status.message()
            )),
            Err(_) => self.fail(&format!(
                "CRI {what} did not answer within {CALL_TIMEOUT:?}"
            )),
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\ncontainerd log (last lines):\n{}\nnode log (last lines):\n{}",
            last_lines(&self.ctrd.log(), 60),
            last_lines(&self.node.log_text(), 30)
        )
    }

    /// Poll ContainerStatus until `id` has exited; its status.
    fn wait_exited(&mut self, id: &str, limit: Duration) -> cri::ContainerStatus {
        let until = Instant::now() + limit;
        loop {
            let status = self
                .call("ContainerStatus", |r, _| {
                    Box::pin(r.container_status(cri::ContainerStatusRequest {
                        container_id: id.into(),
                        verbose: false,
                    }))
                })
                .status
                .unwrap_or_else(|| self.fail("ContainerStatus answered no status"));
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status;
            }
            if Instant::now() > until {
                self.fail(&format!(
                    "the container did not exit within {limit:?}: {status:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// No pod, container or image is left in the CRI's view.
    fn assert_nothing_left(&mut self) {
        let pods = self.call("ListPodSandbox", |r, _| {
            Box::pin(r.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))
        });
        assert!(pods.items.is_empty(), "pods left: {:?}", pods.items);
        let containers = self.call("ListContainers", |r, _| {
            Box::pin(r.list_containers(cri::ListContainersRequest { filter: None }))
        });
        assert!(
            containers.containers.is_empty(),
            "containers left: {:?}",
            containers.containers
        );
        let images = self.call("ListImages", |_, i| {
            Box::pin(i.list_images(cri::ListImagesRequest { filter: None }))
        });
        assert!(images.images.is_empty(), "images left: {:?}", images.images);
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
