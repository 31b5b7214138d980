//! Hostile input, round two (issue 22): a manifest that repeats a layer,
//! `umount` of a mount breakfs did not make, a failed extraction, names
//! no path can hold, a TOC too big to use, messages that must name the
//! real cause, and local paths asked for over the network. Each test is
//! the regression test of one defect.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::hostile::Sandbox;
use crate::mount::breakfs;
use crate::support::images::{Layer, T, tar_of};

#[test]
fn a_manifest_that_repeats_a_layer_refactors_on_the_first_run() {
    let s = Sandbox::new();
    let tar = tar_of(&[T::Dir("etc/"), T::File("etc/hosts", b"127.0.0.1\n", 0o644)]);
    for n in [2, 10, 49] {
        let layers: Vec<Layer> = (0..n).map(|_| Layer::gzip(tar.clone())).collect();
        let tag = format!("x{n}");
        s.image(&tag, layers);
        // A fresh work directory each time: nothing left by an earlier run.
        s.refactor(&tag).ok_within(256);
        s.pull(&tag, &s.refactored(&tag)).ok_within(128);
        assert_eq!(
            std::fs::read(s.extracted(&tag).join("etc/hosts")).unwrap(),
            b"127.0.0.1\n"
        );
    }
    s.assert_contained();
}

/// Whether `path` is a mountpoint, per the kernel.
fn mounted(path: &Path) -> bool {
    breakfs_fs::is_mountpoint(&path.canonicalize().unwrap())
}

#[test]
fn umount_refuses_what_breakfs_did_not_mount_and_leaves_it_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let tm = tmp.path().join("tm");
    std::fs::create_dir_all(&tm).unwrap();
    crate::mount::ok(Command::new("mount").args(["-t", "tmpfs", "none"]).arg(&tm));
    std::fs::write(tm.join("kept"), b"kept").unwrap();
    let out = breakfs().arg("umount").arg(&tm).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let still = mounted(&tm);
    let _ = Command::new("umount").arg(&tm).status();
    assert!(
        !out.status.success(),
        "breakfs umount of a tmpfs succeeded: {err}"
    );
    assert!(still, "breakfs umount removed a tmpfs mount");
    for needle in ["not a breakfs mount", "tmpfs"] {
        assert!(
            err.contains(needle),
            "the error does not say {needle:?}: {err}"
        );
    }
}
