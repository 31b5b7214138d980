//! Hostile input, round two (issue 22): a manifest that repeats a layer,
//! `umount` of a mount breakfs did not make, a failed extraction, names
//! no path can hold, a TOC too big to use, messages that must name the
//! real cause, and local paths asked for over the network. Each test is
//! the regression test of one defect.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use breakfs_index::{TocEntry, TocEntryType};

use crate::hostile::{Run, Sandbox, file_header, short, timed};
use crate::mount::{Mount, breakfs};
use crate::support::images::{Layer, T, digest, estargz_layer, tar_of};

/// `breakfs pull --extract` of `reference` into `dest`, with cache `cache`.
fn pull_into(what: &str, reference: &str, cache: &Path, dest: &Path) -> Run {
    timed(
        what,
        Command::new(env!("CARGO_BIN_EXE_breakfs"))
            .args(["pull", "--cache"])
            .arg(cache)
            .arg("--extract")
            .arg(dest)
            .arg(reference),
    )
}

/// Every regular file under `root`, relative path and content.
fn files_under(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            for (p, b) in files_under(&e.path()) {
                out.push((format!("{}/{p}", e.file_name().to_string_lossy()), b));
            }
        } else if t.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            out.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
    out.sort();
    out
}

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

#[test]
fn a_failed_extraction_leaves_no_wrong_file_and_a_retry_works() {
    let s = Sandbox::new();
    let files: [(&str, &[u8]); 2] = [("a", b"aaaa"), ("b", b"bbbb")];
    s.image(
        "bad",
        vec![estargz_layer(&files, |toc| {
            toc.entries[0].digest = digest(b"evil");
            toc.entries[0].chunk_digest = digest(b"evil");
        })],
    );
    s.image("good", vec![estargz_layer(&files, |_| {})]);
    let (cache, dest) = (s.out("cache"), s.out("x"));
    for attempt in 0..2 {
        pull_into("pull bad", &s.reference("bad"), &cache, &dest).refused(&["digest mismatch"]);
        // Nothing under its final name holds other bytes than the image's.
        for (p, b) in files_under(&dest) {
            let want = files.iter().find(|(n, _)| *n == p).map(|f| f.1);
            assert_eq!(
                Some(b.as_slice()),
                want,
                "attempt {attempt}: {p} is left with wrong content"
            );
        }
    }
    // A retry into the same directory works.
    pull_into("pull good", &s.reference("good"), &cache, &dest).ok_within(128);
    let want: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .collect();
    assert_eq!(files_under(&dest), want);
    s.assert_contained();
}

#[test]
fn names_no_path_can_hold_are_refused_naming_the_entry() {
    let s = Sandbox::new();
    s.image(
        "toc",
        vec![estargz_layer(&[("a", b"aaaa")], |toc| {
            toc.entries[0].name = "bin/sh\0.evil".into();
        })],
    );
    s.image(
        "link",
        vec![estargz_layer(&[("a", b"aaaa")], |toc| {
            let mut l = TocEntry::new("l", TocEntryType::Symlink);
            l.link_name = "a\0b".into();
            toc.entries.push(l);
        })],
    );
    // A PAX path may hold a NUL where a header's name field cannot.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"etc/pass\0wd"[..])])
        .unwrap();
    let mut pax = b.into_inner().unwrap();
    pax.truncate(pax.len() - 1024);
    pax.extend_from_slice(&file_header("placeholder", 1));
    pax.extend_from_slice(&[7u8; 512]);
    pax.extend_from_slice(&[0u8; 1024]);
    let layer = Layer::gzip(pax);
    let d = short(&layer);
    s.image("pax", vec![layer]);

    s.refused_lazily("toc", &["bin/sh\\0.evil", "NUL"]);
    s.refused_lazily("link", &["\"l\"", "a\\0b", "NUL"]);
    s.refused_everywhere("pax", &[&d, "etc/pass\\0wd", "NUL"]);
    s.assert_contained();
}

#[test]
fn a_toc_that_cannot_be_used_is_named_and_its_files_never_show() {
    let s = Sandbox::new();
    let files: [(&str, &[u8]); 2] = [("big", b"data"), ("small", b"ok")];
    s.image(
        "toc",
        vec![estargz_layer(&files, |toc| {
            toc.entries[0].size = 1 << 50;
            toc.entries[0].chunk_size = 1 << 50;
        })],
    );
    let needles = ["\"big\"", "TOC", "whole"];
    let m = s.mount("toc", &s.reference("toc"));
    let names: Vec<String> = std::fs::read_dir(&m.point)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let log = m.log();
    drop(m);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["big", "small"], "the mounted tree");
    for n in needles {
        assert!(log.contains(n), "the mount's log does not say {n:?}: {log}");
    }

    let run = s.pull("toc", &s.reference("toc"));
    run.ok_within(128);
    let got: Vec<String> = files_under(&s.extracted("toc"))
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(got, ["big", "small"], "the extracted tree");
    let err = run.stderr();
    for n in needles {
        assert!(err.contains(n), "pull does not warn {n:?}: {err}");
    }

    // inspect agrees: the TOC is not what the layer is read by.
    let out = crate::mount::ok(breakfs().arg("inspect").arg(s.reference("toc")));
    assert!(
        out.contains("\"big\"") && !out.contains(" yes "),
        "inspect does not say the TOC is unusable: {out}"
    );
    s.assert_contained();
}

/// What a refused standalone mount printed and logged.
fn refused_mount_text(s: &Sandbox, name: &str, reference: &str) -> String {
    let (point, cache) = (s.out(&format!("mnt-{name}")), s.out(&format!("c-{name}")));
    let out = Mount::try_new(reference, &point, &cache, &["--standalone"]);
    assert!(!out.status.success(), "the mount of {name} came up");
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    for e in std::fs::read_dir(cache.join("logs")).into_iter().flatten() {
        text.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
    }
    text
}

#[test]
fn a_standalone_mount_never_blames_a_peer() {
    let s = Sandbox::new();
    let mut pinned = estargz_layer(&[("a", b"aaaa")], |_| {});
    let claimed = digest(b"another toc");
    pinned.annotations.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        claimed.clone(),
    );
    s.image("annotation", vec![pinned]);
    let text = refused_mount_text(&s, "annotation", &s.reference("annotation"));
    assert!(text.contains(&claimed), "{text}");
    assert!(
        !text.contains("a peer"),
        "a mount without peers blames a peer: {text}"
    );
}

#[test]
fn oci_references_over_tcp_are_refused_with_the_reason() {
    let s = Sandbox::new();
    s.image("t", vec![Layer::gzip(tar_of(&[T::File("a", b"a", 0o644)]))]);
    let node = crate::node::Node::start(&s.out("node"), &[], &[]);
    let local = s.reference("t");
    let call = crate::security::call;
    let bodies = [
        serde_json::json!({"images": [local]}),
        serde_json::json!({"image": local, "layers": [digest(b"x")]}),
    ];
    for body in &bodies {
        let body = body.to_string();
        let (status, answer) = call(
            "POST",
            &format!("{}/prefetch", node.url),
            None,
            Some(body.as_bytes()),
        );
        assert_eq!(status, 400, "{body} over TCP: {answer}");
        for n in [local.as_str(), "registry reference", "control socket"] {
            assert!(
                answer.contains(n),
                "the answer does not say {n:?}: {answer}"
            );
        }
    }
    // Nothing of the layout reached the store.
    let index = node.get("/cache/index");
    assert!(!index.contains("sha256"), "{index}");
    // The local socket may still name a layout.
    let sock = format!("unix:{} http://node/prefetch", node.socket.display());
    let body = bodies[0].to_string();
    let (status, answer) = call("POST", &sock, None, Some(body.as_bytes()));
    assert_eq!(status, 202, "over the control socket: {answer}");
}

/// A control request: method, path, body, the status it must get and what
/// the answer must say.
type Ask<'a> = (&'a str, &'a str, Option<String>, u16, &'a [&'a str]);

#[test]
fn the_mount_control_socket_refuses_hostile_requests_with_the_reason_and_keeps_serving() {
    let s = Sandbox::new();
    let node = crate::node::Node::start(&s.out("node"), &[], &[]);
    let call = |method: &str, path: &str, body: Option<&str>| {
        let target = format!("unix:{} http://node{path}", node.socket.display());
        crate::security::call(method, &target, None, body.map(str::as_bytes))
    };
    let tm = s.out("tm");
    std::fs::create_dir_all(&tm).unwrap();
    crate::mount::ok(Command::new("mount").args(["-t", "tmpfs", "none"]).arg(&tm));
    let image = "oci:/nonexistent:x";
    let mount = |point: &str| serde_json::json!({"image": image, "mountpoint": point}).to_string();
    let cases: [Ask; 6] = [
        // Over a mount breakfs did not make: no advice to unmount it.
        (
            "POST",
            "/mounts",
            Some(mount(&tm.display().to_string())),
            422,
            &["(tmpfs) is already mounted", "give another directory"],
        ),
        (
            "POST",
            "/mounts",
            Some(mount("/")),
            422,
            &["already mounted"],
        ),
        // Relative to the daemon's working directory, not the caller's.
        (
            "POST",
            "/mounts",
            Some(mount("relative/dir")),
            422,
            &["absolute path"],
        ),
        ("POST", "/mounts", Some(mount("/tmp/a\0b")), 422, &["NUL"]),
        (
            "DELETE",
            &format!("/mounts?mountpoint={}", tm.display()),
            None,
            409,
            &["does not serve a mount"],
        ),
        (
            "POST",
            "/mounts",
            Some("[".repeat(10_000)),
            400,
            &["not a mount request"],
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, body, want, needles) in &cases {
        let (status, answer) = call(method, path, body.as_deref());
        eprintln!("{method} {path}: {status} {answer}");
        if status != *want || needles.iter().any(|n| !answer.contains(n)) {
            failures.push(format!("{method} {path} {body:?}: {status} {answer}"));
        }
    }
    let still = mounted(&tm);
    let _ = Command::new("umount").arg(&tm).status();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(still, "the tmpfs was unmounted");
    assert!(!answer_says_unmount_root(
        &call("POST", "/mounts", Some(&mount("/"))).1
    ));
    assert_eq!(
        call("GET", "/mounts", None).0,
        200,
        "the node stopped serving"
    );
}

/// Whether an answer advises `breakfs umount /`.
fn answer_says_unmount_root(answer: &str) -> bool {
    answer.contains("breakfs umount /\n") || answer.contains("breakfs umount /)")
}
