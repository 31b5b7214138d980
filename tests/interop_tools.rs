//! The test support itself against real tools: a private containerd pulls
//! an image from a real registry and runs a real static binary from it, and
//! `tree::snapshot` of a `umoci unpack` and of containerd's merged view
//! (overlayfs and native) matches what the layers hold.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::support::containerd::{ContainerdOptions, TestContainerd};
use crate::support::images::{Layer, T, tar_of, write_image};
use crate::support::registry::TestRegistry;
use crate::support::tree::{self, CompareOptions, Kind, Node};

const HELLO_C: &str = r#"#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == '!') return 3;
    if (argc > 1 && argv[1][0] == '@') sleep(600);
    printf("hello from breakfs:");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    return 0;
}
"#;

/// A statically linked binary built with gcc, so the image needs no distro.
pub(crate) fn static_hello(dir: &Path) -> Vec<u8> {
    let src = dir.join("hello.c");
    std::fs::write(&src, HELLO_C).unwrap();
    let bin = dir.join("hello");
    let out = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("running gcc (apt-get install build-essential)");
    assert!(
        out.status.success(),
        "gcc -static failed (is libc6-dev installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&bin).unwrap()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn containerd_pulls_from_registry_and_runs_a_static_binary() {
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let hello = static_hello(work.path());
    let layout = work.path().join("layout");
    write_image(
        &layout,
        "v1",
        &[Layer::gzip(tar_of(&[
            T::Dir("bin"),
            T::File("bin/hello", &hello, 0o755),
            T::Symlink("bin/hi", "hello"),
        ]))],
    );
    let registry = TestRegistry::start();
    let reference = format!("{}/interop/hello:v1", registry.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reference}"),
    ]));
    let t_push = t0.elapsed();

    let ctrd = TestContainerd::start().unwrap();
    let t_start = t0.elapsed();
    ctrd.pull_plain_http(&reference)
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", ctrd.log()));
    let t_pull = t0.elapsed();

    let out = ctrd
        .run(&reference, &["/bin/hi", "edge", "cloud"])
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", ctrd.log()));
    let t_run = t0.elapsed();
    assert!(
        out.status.success(),
        "container exited with {}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from breakfs: edge cloud\n"
    );

    let out = ctrd.run(&reference, &["/bin/hello", "!"]).unwrap();
    assert_eq!(out.status.code(), Some(3), "the exit status passes through");
    assert!(out.stdout.is_empty());

    let out = ctrd.run(&reference, &["/bin/missing"]).unwrap();
    assert!(!out.status.success(), "a missing binary must fail the run");

    // A hung container is killed at the deadline and removed.
    let t_hang = Instant::now();
    let err = ctrd
        .run_with_timeout(&reference, &["/bin/hello", "@"], Duration::from_secs(2))
        .unwrap_err();
    assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    assert!(t_hang.elapsed() < Duration::from_secs(15));
    let tasks = ctrd
        .ctr_checked(&["task", "ls", "--quiet"], Duration::from_secs(10))
        .unwrap();
    let containers = ctrd
        .ctr_checked(&["container", "ls", "--quiet"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tasks.stdout).trim(), "");
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), "");

    eprintln!(
        "snapshotter {}; push {:?}, containerd up {:?}, pull {:?}, first run {:?}, all {:?}",
        ctrd.snapshotter(),
        t_push,
        t_start - t_push,
        t_pull - t_start,
        t_run - t_pull,
        t0.elapsed()
    );
}

/// One entry of a hand-made layer, with everything `tree::Node` records.
struct E {
    path: &'static str,
    kind: EKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (u64, u32),
    xattrs: &'static [(&'static str, &'static [u8])],
}

enum EKind {
    Dir,
    File(&'static [u8]),
    Symlink(&'static str),
    Hardlink(&'static str),
    Char(u32, u32),
    Fifo,
    Whiteout,
}

const T0: u64 = 1_700_000_000;

fn e(path: &'static str, kind: EKind, mode: u32) -> E {
    E {
        path,
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: (T0, 0),
        xattrs: &[],
    }
}

/// The tar of `entries`, with PAX records for nanosecond mtimes and xattrs.
fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for x in entries {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if x.mtime.1 != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", x.mtime.0, x.mtime.1).into_bytes(),
            ));
        }
        for (k, v) in x.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.to_vec()));
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(x.mode);
        h.set_uid(x.uid.into());
        h.set_gid(x.gid.into());
        h.set_mtime(x.mtime.0);
        h.set_size(0);
        let mut data: &[u8] = b"";
        let mut path = x.path.to_string();
        match &x.kind {
            EKind::Dir => h.set_entry_type(tar::EntryType::Directory),
            EKind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                data = d;
            }
            EKind::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(t).unwrap();
            }
            EKind::Hardlink(t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name(t).unwrap();
            }
            EKind::Char(ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
            }
            EKind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
            EKind::Whiteout => {
                let (dir, name) = x.path.rsplit_once('/').unwrap_or(("", x.path));
                path = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                h.set_entry_type(tar::EntryType::Regular);
            }
        }
        b.append_data(&mut h, &path, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The merged tree the layers describe, as `tree::snapshot` would see it.
fn expected_tree(layers: &[&[E]]) -> BTreeMap<String, Node> {
    let mut m: BTreeMap<String, Node> = BTreeMap::new();
    m.insert(
        ".".into(),
        Node {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            sha256: None,
            link_target: None,
            rdev: None,
            hardlinks: Vec::new(),
            xattrs: BTreeMap::new(),
        },
    );
    let mut links: Vec<(String, String)> = Vec::new();
    for layer in layers {
        for x in *layer {
            let p = x.path.to_string();
            if let EKind::Whiteout = x.kind {
                m.retain(|k, _| k != &p && !k.starts_with(&format!("{p}/")));
                links.retain(|(a, b)| a != &p && b != &p);
                continue;
            }
            if let EKind::Hardlink(t) = x.kind {
                let target = m[t].clone();
                m.insert(p.clone(), target);
                links.push((p, t.to_string()));
                continue;
            }
            let mut n = Node {
                kind: Kind::Dir,
                mode: x.mode,
                uid: x.uid,
                gid: x.gid,
                size: 0,
                mtime: x.mtime.0 as i64,
                mtime_nsec: x.mtime.1.into(),
                sha256: None,
                link_target: None,
                rdev: None,
                hardlinks: Vec::new(),
                xattrs: x
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect(),
            };
            match &x.kind {
                EKind::Dir => {}
                EKind::File(d) => {
                    n.kind = Kind::File;
                    n.size = d.len() as u64;
                    n.sha256 = Some(format!("sha256:{}", hex::encode(Sha256::digest(d))));
                }
                EKind::Symlink(t) => {
                    n.kind = Kind::Symlink;
                    n.link_target = Some(t.to_string());
                }
                EKind::Char(ma, mi) => {
                    n.kind = Kind::Char;
                    n.rdev = Some((*ma, *mi));
                }
                EKind::Fifo => n.kind = Kind::Fifo,
                EKind::Hardlink(_) | EKind::Whiteout => unreachable!(),
            }
            m.insert(p, n);
        }
    }
    for (a, b) in &links {
        let mut group = vec![a.clone(), b.clone()];
        group.sort();
        for p in [a, b] {
            m.get_mut(p.as_str()).unwrap().hardlinks = group.clone();
        }
    }
    m
}

/// Two layers covering every entry kind, PAX times and xattrs, a
/// whiteout, and an upper layer changing a directory and a file.
fn sample_layers() -> (Vec<E>, Vec<E>) {
    const CAP: &[u8] = &[
        0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let lower = vec![
        E {
            mtime: (T0 - 100, 0),
            ..e("etc", EKind::Dir, 0o755)
        },
        e("etc/conf", EKind::File(b"old = 1\n"), 0o644),
        e("etc/gone", EKind::File(b"deleted above\n"), 0o600),
        e("usr", EKind::Dir, 0o755),
        e("usr/bin", EKind::Dir, 0o755),
        E {
            uid: 1000,
            gid: 50,
            mtime: (T0 + 5, 123_456_789),
            xattrs: &[("user.breakfs.note", b"kept"), ("security.capability", CAP)],
            ..e("usr/bin/tool", EKind::File(b"\x7fELF not really\n"), 0o4755)
        },
        // Real tar writers give a hardlink entry its inode's metadata; the
        // containerd applier sets a link entry's mode, owner, times and
        // xattrs on the shared inode, so anything else would clobber it.
        E {
            uid: 1000,
            gid: 50,
            mtime: (T0 + 5, 123_456_789),
            xattrs: &[("user.breakfs.note", b"kept"), ("security.capability", CAP)],
            ..e(
                "usr/bin/tool-alias",
                EKind::Hardlink("usr/bin/tool"),
                0o4755,
            )
        },
        e("usr/bin/sh", EKind::Symlink("tool"), 0o777),
        e("dev", EKind::Dir, 0o755),
        e("dev/null", EKind::Char(1, 3), 0o666),
        e("dev/initctl", EKind::Fifo, 0o600),
        e("tmp", EKind::Dir, 0o1777),
    ];
    let upper = vec![
        E {
            mtime: (T0 + 200, 0),
            ..e("etc", EKind::Dir, 0o750)
        },
        E {
            uid: 7,
            gid: 8,
            ..e("etc/conf", EKind::File(b"new = 2\n"), 0o640)
        },
        e("etc/gone", EKind::Whiteout, 0o644),
        e("home", EKind::Dir, 0o700),
        e("home/empty", EKind::File(b""), 0o400),
    ];
    (lower, upper)
}

#[test]
fn tree_snapshot_of_umoci_unpack_matches_the_layers() {
    let (lower, upper) = sample_layers();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_image(
        &layout,
        "v1",
        &[
            Layer::gzip(layer_tar(&lower)),
            Layer::gzip(layer_tar(&upper)),
        ],
    );
    let out = work.path().join("bundle");
    let t0 = Instant::now();
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&out),
    );
    let got = tree::snapshot(&out.join("rootfs")).unwrap();
    let want = expected_tree(&[&lower, &upper]);
    let diffs = tree::compare(
        &want,
        &got,
        &CompareOptions {
            ignore_root_mtime: true,
            ..Default::default()
        },
    );
    assert!(
        diffs.is_empty(),
        "umoci's rootfs differs from the layers (left: layers, right: rootfs):\n{}",
        diffs.join("\n")
    );
    eprintln!("umoci unpack + snapshot: {:?}", t0.elapsed());

    // And the comparison notices what a broken unpack would get wrong.
    let rootfs = out.join("rootfs");
    let t = |s| filetime::FileTime::from_unix_time(T0 as i64 + 5, s);
    filetime::set_file_mtime(rootfs.join("usr/bin/tool"), t(0)).unwrap();
    xattr::remove(rootfs.join("usr/bin/tool"), "user.breakfs.note").unwrap();
    std::fs::remove_file(rootfs.join("usr/bin/tool-alias")).unwrap();
    std::fs::copy(
        rootfs.join("usr/bin/tool"),
        rootfs.join("usr/bin/tool-alias"),
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/gone"), b"resurrected").unwrap();
    let got = tree::snapshot(&rootfs).unwrap();
    let diffs = tree::compare(
        &want,
        &got,
        &CompareOptions {
            ignore_root_mtime: true,
            ignore_dir_mtime: true,
            ignore_mtime_of: ["usr/bin/tool-alias".to_string()].into(),
            ..Default::default()
        },
    );
    assert_eq!(
        diffs,
        [
            "only in right: etc/gone",
            "usr/bin/tool: mtime nanoseconds 123456789 vs 0",
            r#"usr/bin/tool: hardlink group ["usr/bin/tool", "usr/bin/tool-alias"] vs []"#,
            r#"usr/bin/tool: xattr user.breakfs.note "kept" vs missing"#,
            "usr/bin/tool-alias: uid 1000 vs 0",
            "usr/bin/tool-alias: gid 50 vs 0",
            r#"usr/bin/tool-alias: hardlink group ["usr/bin/tool", "usr/bin/tool-alias"] vs []"#,
            "usr/bin/tool-alias: xattr security.capability 0x0100000200040000000000000000000000000000 vs missing",
            r#"usr/bin/tool-alias: xattr user.breakfs.note "kept" vs missing"#,
        ]
    );
}

#[test]
fn containerd_merged_views_match_the_layers() {
    let (lower, upper) = sample_layers();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_image(
        &layout,
        "v1",
        &[
            Layer::gzip(layer_tar(&lower)),
            Layer::gzip(layer_tar(&upper)),
        ],
    );
    let registry = TestRegistry::start();
    let reference = format!("{}/interop/tree:v1", registry.host());
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{reference}"),
    ]));
    for snapshotter in ["overlayfs", "native"] {
        let ctrd = TestContainerd::start_with(ContainerdOptions {
            snapshotter: Some(snapshotter.into()),
            ..Default::default()
        })
        .unwrap();
        ctrd.pull_plain_http(&reference).unwrap();
        let target = work.path().join(format!("mnt-{snapshotter}"));
        std::fs::create_dir(&target).unwrap();
        let mount = ctrd
            .mount_image(&reference, &target)
            .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", ctrd.log()));
        let got = tree::snapshot(mount.path()).unwrap();
        drop(mount);
        let diffs = tree::compare(
            &expected_tree(&[&lower, &upper]),
            &got,
            &CompareOptions {
                ignore_root_mtime: true,
                ..Default::default()
            },
        );
        assert!(
            diffs.is_empty(),
            "containerd's {snapshotter} view differs from the layers (left: layers, right: mount):\n{}",
            diffs.join("\n")
        );
        assert!(
            std::fs::read_dir(&target).unwrap().next().is_none(),
            "the image is unmounted when the guard drops"
        );
    }
}
