//! The README's commands, run as written.
//!
//! Convention: every block of README.md fenced as ```` ```sh ```` is run,
//! in order, as one bash script (`set -euxo pipefail`: the first command
//! that fails stops it); blocks fenced as ```` ```sh-example ```` are
//! illustrative (installing, systemd units, images from Docker Hub) and
//! are not run. A `sh` block may use what the README asks the reader to
//! have, which this test provides in a scratch directory, with real parts:
//! `REG` (a real docker-registry on loopback, plain HTTP, with
//! `BREAKFS_PLAIN_HTTP=1`), `images/app` (an OCI layout with tags `v1` and
//! `v2` of a small image built here from the host's own `sh`, `ls` and
//! `cat` and their libraries, so runc and chroot can run it), `HOME` (the
//! default content store under it), and the `breakfs` under test first on
//! `PATH`. Blocks clean up what they start (mounts, background processes);
//! this test kills and unmounts whatever is left anyway.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::images::{Layer, T, tar_of, write_image};
use crate::support::registry::TestRegistry;

/// How long the README's commands may take in all.
const LIMIT: Duration = Duration::from_secs(300);

/// The marker the script prints after its last command.
const DONE: &str = "readme-check: every block ran";

/// The `sh` blocks of `markdown`, each with the line its fence opens on.
fn sh_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match current.as_mut() {
            None if line.trim_end() == "```sh" => current = Some((i + 1, String::new())),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "README.md: a ```sh block is not closed");
    blocks
}

/// Where the image keeps a host file: under usr/, as merged-/usr Debian has
/// it (the image's /bin, /lib and /lib64 are symlinks into usr/).
fn image_path(host: &Path) -> String {
    let p = host.to_string_lossy();
    let p = p.trim_start_matches('/');
    for top in ["bin/", "lib/", "lib64/"] {
        if p.starts_with(top) {
            return format!("usr/{p}");
        }
    }
    p.to_string()
}

/// The host's programs `progs` with the libraries `ldd` names, as
/// (image path, content, mode).
fn programs_with_libraries(progs: &[&str]) -> Vec<(String, Vec<u8>, u32)> {
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    for prog in progs {
        let host = Path::new("/usr/bin").join(prog);
        files.push((
            format!("usr/bin/{prog}"),
            std::fs::read(&host).unwrap(),
            0o755,
        ));
        let out = Command::new("ldd").arg(&host).output().unwrap();
        assert!(out.status.success(), "ldd {}: {out:?}", host.display());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; vdso has no file.
            let path = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next())
                .filter(|s| s.starts_with('/'));
            if let Some(path) = path {
                let name = image_path(Path::new(path));
                if files.iter().all(|(n, _, _)| *n != name) {
                    files.push((name, std::fs::read(path).unwrap(), 0o755));
                }
            }
        }
    }
    files
}

/// An image of `files` over the host's sh, ls and cat, as one layer for
/// the programs and one for `files`.
fn write_app(layout: &Path, tag: &str, files: &[(&str, &[u8])]) {
    let programs = programs_with_libraries(&["sh", "ls", "cat"]);
    let mut dirs: Vec<String> = vec!["usr".into(), "etc".into(), "tmp".into()];
    for (name, _, _) in &programs {
        let mut p = Path::new(name).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.push(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    let mut base: Vec<T> = dirs.iter().map(|d| T::Dir(d)).collect();
    base.extend([
        T::Symlink("bin", "usr/bin"),
        T::Symlink("lib", "usr/lib"),
        T::Symlink("lib64", "usr/lib64"),
    ]);
    base.extend(programs.iter().map(|(n, c, m)| T::File(n, c, *m)));
    let mut app = vec![T::Dir("etc"), T::Dir("srv"), T::Dir("srv/app")];
    app.extend(files.iter().map(|(n, c)| T::File(n, c, 0o644)));
    write_image(
        layout,
        tag,
        &[Layer::gzip(tar_of(&base)), Layer::gzip(tar_of(&app))],
    );
}

/// Kills the script's process group and unmounts what is left under the
/// scratch directory, also when the test fails.
struct Cleanup {
    pgid: Option<u32>,
    scratch: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
        let scratch = self.scratch.to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&scratch))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", p]).status();
        }
    }
}

#[test]
fn readme_commands_run_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    // Browse, container, node, sched, refactor, shape, verify: a README
    // that lost its checked blocks must not pass by running nothing.
    assert!(
        blocks.len() >= 7,
        "README.md has {} ```sh blocks, expected one per use section at least",
        blocks.len()
    );

    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("work");
    let home = tmp.path().join("home");
    for d in [&scratch, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    let layout = scratch.join("images/app");
    write_app(&layout, "v1", &[("srv/app/version", b"1\n")]);
    write_app(
        &layout,
        "v2",
        &[
            ("srv/app/version", b"2\n"),
            ("srv/app/notes", b"new in v2\n"),
        ],
    );
    let registry = TestRegistry::start();

    let mut script = String::from("set -euxo pipefail\n");
    for (line, text) in &blocks {
        script.push_str(&format!("# README.md line {line}\n{text}"));
    }
    script.push_str(&format!("echo '{DONE}'\n"));
    let script_path = tmp.path().join("readme.sh");
    std::fs::write(&script_path, &script).unwrap();
    let log_path = tmp.path().join("readme.log");
    let log = std::fs::File::create(&log_path).unwrap();

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_breakfs")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cleanup = Cleanup {
        pgid: None,
        scratch: tmp.path().to_path_buf(),
    };
    let mut child = {
        use std::os::unix::process::CommandExt as _;
        Command::new("bash")
            .arg(&script_path)
            .current_dir(&scratch)
            .env("PATH", path)
            .env("HOME", &home)
            .env("REG", registry.host())
            .env("BREAKFS_PLAIN_HTTP", "1")
            .env("BREAKFS_RUN_DIR", tmp.path().join("run"))
            .env_remove("BREAKFS_STORE")
            .env_remove("BREAKFS_CACHE")
            .env_remove("BREAKFS_NODE")
            .env_remove("BREAKFS_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    cleanup.pgid = Some(child.id());
    let until = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > until {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = out.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let tail = tail.join("\n");
    match status {
        None => {
            panic!("the README's commands did not finish within {LIMIT:?}; the last lines:\n{tail}")
        }
        Some(s) => assert!(
            s.success() && out.contains(&format!("\n{DONE}")),
            "a command of the README failed ({s}); the script is {}, the last lines \
             (`+` lines are the commands, `# README.md line N` the block):\n{tail}",
            script_path.display()
        ),
    }
    // The whole run, for `--nocapture`.
    eprintln!("{out}");
    // What the commands should have shown, not only their exit codes.
    for shown in [
        "hello from the container",
        "hello from a chroot",
        "hello from containerd",
        "breakfs_fetch_bytes_total",
        "node-a",
    ] {
        assert!(
            out.lines()
                .any(|l| !l.starts_with('+') && l.contains(shown)),
            "the README's commands ran but never printed {shown:?}:\n{tail}"
        );
    }
    drop(cleanup);
}
