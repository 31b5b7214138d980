//! The containerd snapshotter (`breakfs node --snapshotter-socket`):
//! a real containerd 1.6 loads the node daemon as a proxy snapshotter,
//! pulls a plain gzip image from a real registry into it and runs a real
//! static binary from it; the snapshots survive a `SIGKILL` of the
//! daemon; `ctr image rm --sync` removes them again. Bad requests, sent
//! straight to the socket as containerd would, get containerd's codes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use breakfs_node::snapshots_api::snapshots as pb;

use crate::interop_tools::static_hello;
use crate::mount::ok;
use crate::node::Node;
use crate::support::containerd::{ContainerdOptions, TestContainerd};
use crate::support::images::{Layer, T, tar_of, write_image};
use crate::support::registry::TestRegistry;

/// The proxy plugin's name in containerd's config.
pub(crate) const PLUGIN: &str = "breakfs";

/// A node daemon serving the snapshots API on `dir/snap.sock`.
pub(crate) fn snapshotter_node(dir: &Path, flags: &[&str]) -> Node {
    let sock = dir.join("snap.sock");
    let sock = sock.to_string_lossy();
    let mut all = vec!["--snapshotter-socket", &sock];
    all.extend_from_slice(flags);
    Node::start(&dir.join("node"), &[], &all)
}

/// A private containerd that pulls and runs with the node's snapshotter.
pub(crate) fn containerd_with(sock: &Path) -> TestContainerd {
    TestContainerd::start_with(ContainerdOptions {
        snapshotter: Some(PLUGIN.into()),
        extra_config: format!(
            "[proxy_plugins.{PLUGIN}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            sock.display()
        ),
        ..Default::default()
    })
    .unwrap()
}

/// The snapshots the daemon holds, by key, with their kinds.
pub(crate) fn listed(sock: &Path) -> Vec<(String, i32)> {
    records(sock)
        .into_values()
        .map(|i| (i.name, i.kind))
        .collect()
}

/// Every snapshot the daemon holds, by key, as List answers it.
pub(crate) fn records(sock: &Path) -> BTreeMap<String, pb::Info> {
    runtime().block_on(async {
        let mut c = breakfs_node::snapshots_client(sock).await.unwrap();
        let mut stream = c
            .list(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut all = BTreeMap::new();
        while let Some(batch) = stream.message().await.unwrap() {
            all.extend(batch.info.into_iter().map(|i| (i.name.clone(), i)));
        }
        all
    })
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Poll `cond` every 50 ms until it holds; fail after `limit` with `what`.
pub(crate) fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `args` in a container of `reference`; its stdout, or fail with
/// both daemons' logs.
pub(crate) fn run(ctrd: &TestContainerd, node: &Node, reference: &str, args: &[&str]) -> String {
    let out = ctrd.run(reference, args).unwrap_or_else(|e| {
        panic!(
            "{e:#}\ncontainerd log:\n{}\nnode log:\n{}",
            ctrd.log(),
            node.log_text()
        )
    });
    assert!(
        out.status.success(),
        "the container exited with {}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ordinary path, like containerd's overlayfs snapshotter: a plain
/// two-layer gzip image (the second deletes a file of the first) is
/// pulled, unpacked and run through the daemon's snapshots; they are still
/// there after the daemon is killed and started again, a new container
/// starts from them, and removing the image removes them.
#[test]
fn containerd_pulls_and_runs_a_plain_image_through_the_snapshotter() {
    let work = tempfile::Builder::new()
        .prefix("snap")
        .tempdir_in("/tmp")
        .unwrap();
    let hello = static_hello(work.path());
    let layout = work.path().join("layout");
    write_image(
        &layout,
        "v1",
        &[
            Layer::gzip(tar_of(&[
                T::Dir("bin"),
                T::File("bin/hello", &hello, 0o755),
                T::Dir("etc"),
                T::File("etc/kept", b"from the first layer\n", 0o644),
                T::File("etc/gone", b"deleted by the second layer\n", 0o644),
            ])),
            Layer::gzip(tar_of(&[
                T::Dir("etc"),
                T::File("etc/.wh.gone", b"", 0o644),
                T::File("etc/added", b"from the second layer\n", 0o644),
                T::Symlink("bin/hi", "hello"),
            ])),
        ],
    );
    let registry = TestRegistry::start();
    let reference = format!("{}/snap/hello:v1", registry.host());
    ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reference}"),
    ]));

    let sock = work.path().join("snap.sock");
    let mut node = snapshotter_node(work.path(), &[]);
    let ctrd = containerd_with(&sock);
    assert!(
        ctrd.plugin_ok("io.containerd.snapshotter.v1", PLUGIN)
            .unwrap(),
        "containerd did not load the proxy snapshotter; its log:\n{}",
        ctrd.log()
    );
    ctrd.pull_plain_http(&reference).unwrap_or_else(|e| {
        panic!(
            "{e:#}\ncontainerd log:\n{}\nnode log:\n{}",
            ctrd.log(),
            node.log_text()
        )
    });
    let committed: Vec<_> = listed(&sock)
        .into_iter()
        .filter(|(_, k)| *k == pb::Kind::Committed as i32)
        .collect();
    assert_eq!(
        committed.len(),
        2,
        "one committed snapshot per layer: {committed:?}"
    );

    assert_eq!(
        run(&ctrd, &node, &reference, &["/bin/hi", "edge"]),
        "hello from breakfs: edge\n"
    );

    // The merged tree: the second layer's file and whiteout took effect.
    let target = work.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    {
        let m = ctrd.mount_image(&reference, &target).unwrap();
        let etc = m.path().join("etc");
        assert_eq!(
            std::fs::read_to_string(etc.join("kept")).unwrap(),
            "from the first layer\n"
        );
        assert_eq!(
            std::fs::read_to_string(etc.join("added")).unwrap(),
            "from the second layer\n"
        );
        assert!(!etc.join("gone").exists(), "the whiteout did not apply");
        assert!(!etc.join(".wh.gone").exists(), "a whiteout file leaked");
    }

    // SIGKILL: the records are on disk, the layers' dirs are kept.
    let before = listed(&sock);
    node.restart_after_kill();
    assert_eq!(listed(&sock), before, "the snapshots changed across a kill");
    // containerd redials the socket after its gRPC back-off.
    let mut ls = String::new();
    wait_for(
        Duration::from_secs(60),
        "containerd reaches the restarted snapshotter",
        || {
            let out = ctrd
                .ctr()
                .args(["snapshot", "--snapshotter", PLUGIN, "ls"])
                .output()
                .unwrap();
            ls = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success()
        },
    );
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{ls}"
    );
    assert_eq!(
        run(&ctrd, &node, &reference, &["/bin/hello", "again"]),
        "hello from breakfs: again\n"
    );

    // containerd's GC removes what no image or container uses any more.
    ok(ctrd.ctr().args(["image", "rm", "--sync", &reference]));
    wait_for(Duration::from_secs(30), "the snapshots are removed", || {
        listed(&sock).is_empty()
    });
    let dirs: Vec<_> = std::fs::read_dir(node.cache.join("snapshotter/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(dirs.is_empty(), "snapshot dirs left behind: {dirs:?}");
    drop(ctrd);
    node.stop();
}

/// Fail unless `r` was refused with `code` and a message saying `says`.
pub(crate) fn refused(r: Result<(), tonic::Status>, code: tonic::Code, says: &str) {
    let st = r.expect_err("a refusal");
    assert_eq!(st.code(), code, "{st:?}");
    assert!(
        st.message().contains(says),
        "{says:?} not in {:?}",
        st.message()
    );
}

/// Requests containerd could send wrongly, straight to the socket: each
/// gets the code containerd maps (NotFound, AlreadyExists,
/// FailedPrecondition, InvalidArgument) with a reason naming the
/// snapshot, and nothing changes.
#[test]
fn bad_snapshot_requests_get_containerd_codes() {
    let work = tempfile::Builder::new()
        .prefix("snap")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = work.path().join("snap.sock");
    let mut node = snapshotter_node(work.path(), &[]);
    runtime().block_on(async {
        let mut c = breakfs_node::snapshots_client(&sock).await.unwrap();
        let prepare = |key: &str, parent: &str| pb::PrepareSnapshotRequest {
            snapshotter: PLUGIN.into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        };

        let base = c
            .prepare(prepare("base-extract", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(base.mounts.len(), 1);
        assert_eq!(base.mounts[0].r#type, "bind");

        refused(
            c.stat(pb::StatSnapshotRequest {
                snapshotter: PLUGIN.into(),
                key: "no-such-key".into(),
            })
            .await
            .map(drop),
            tonic::Code::NotFound,
            "no-such-key",
        );
        refused(
            c.mounts(pb::MountsRequest {
                snapshotter: PLUGIN.into(),
                key: "no-such-key".into(),
            })
            .await
            .map(drop),
            tonic::Code::NotFound,
            "no-such-key",
        );
        refused(
            c.prepare(prepare("child", "no-such-parent"))
                .await
                .map(drop),
            tonic::Code::NotFound,
            "no-such-parent",
        );
        refused(
            c.prepare(prepare("child", "base-extract")).await.map(drop),
            tonic::Code::InvalidArgument,
            "not a committed snapshot",
        );
        refused(
            c.prepare(prepare("base-extract", "")).await.map(drop),
            tonic::Code::AlreadyExists,
            "base-extract",
        );
        c.commit(pb::CommitSnapshotRequest {
            snapshotter: PLUGIN.into(),
            name: "base".into(),
            key: "base-extract".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
        refused(
            c.commit(pb::CommitSnapshotRequest {
                snapshotter: PLUGIN.into(),
                name: "again".into(),
                key: "base".into(),
                labels: Default::default(),
            })
            .await
            .map(drop),
            tonic::Code::FailedPrecondition,
            "only an active snapshot",
        );
        c.prepare(prepare("child", "base")).await.unwrap();
        refused(
            c.remove(pb::RemoveSnapshotRequest {
                snapshotter: PLUGIN.into(),
                key: "base".into(),
            })
            .await
            .map(drop),
            tonic::Code::FailedPrecondition,
            "has children",
        );
        refused(
            c.list(pb::ListSnapshotsRequest {
                snapshotter: PLUGIN.into(),
                filters: vec!["name~=b.*".into()],
            })
            .await
            .map(drop),
            tonic::Code::InvalidArgument,
            "regular expression",
        );
    });
    let kinds = listed(&sock);
    assert_eq!(
        kinds,
        [
            ("base".to_string(), pb::Kind::Committed as i32),
            ("child".to_string(), pb::Kind::Active as i32)
        ],
        "a refused request changed the snapshots"
    );
    node.stop();
}
