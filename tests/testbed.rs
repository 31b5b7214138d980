//! The edge testbed end to end, small (2 clusters × 2 nodes, the two
//! families the rest of the suite builds): every strategy deploys every image through a real command
//! and every rootfs matches the original image on sampled hashes (the run
//! fails otherwise); then a run interrupted with SIGINT in the middle of
//! the breakfs strategy leaves no process, mount or directory behind.
//! Correctness only: speed is the benchmark's (`cargo bench --bench
//! testbed`).

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// The benchmark's own code (it brings its copies of the support modules).
#[path = "../benches/testbed/main.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod bench;

use bench::{Opts, Strategy};

use crate::support::corpus::TEST_FAMILIES;

/// Set in the child process of the interrupted run (the value marks every
/// process the run starts).
const CHILD: &str = "BREAKFS_TESTBED_CHILD";

fn small(strategies: Vec<Strategy>) -> Opts {
    Opts {
        clusters: 2,
        nodes: 2,
        // The suite's own families: a fresh machine builds no other, and
        // converts and refactors only their six images.
        families: TEST_FAMILIES.iter().map(|f| f.to_string()).collect(),
        deployments: 5,
        replay_secs: 6.0,
        strategies,
        // gzip level 1 (ctr-remote's default is 9): the same layouts, made
        // in a fraction of the time on a fresh machine.
        estargz_level: Some(1),
        ..Opts::default()
    }
}

/// Processes whose environment carries `marker` (the child's and every
/// process it started).
fn marked_processes(marker: &str) -> Vec<(String, String)> {
    let needle = format!("{CHILD}={marker}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

#[test]
fn small_testbed_checks_every_rootfs_and_an_interrupt_leaves_nothing_behind() {
    if std::env::var_os(CHILD).is_some() {
        // The child of the second half: run until interrupted.
        bench::catch_interrupts();
        if let Err(e) = bench::run_testbed(&small(vec![Strategy::Breakfs])) {
            eprintln!("testbed child: {e:#}");
        }
        return;
    }

    // 1. A whole small run: every strategy, every deployment checked.
    let all = vec![
        Strategy::DockerLike,
        Strategy::Containerd,
        Strategy::Estargz,
        Strategy::EstargzOptimized,
        Strategy::Breakfs,
    ];
    let r = bench::run_testbed(&small(all.clone())).expect("the small testbed run");
    assert!(r.deployments >= 3, "{} deployments", r.deployments);
    assert_eq!(r.results.iter().map(|(s, _)| *s).collect::<Vec<_>>(), all);
    for (s, o) in &r.results {
        assert_eq!(o.secs.len(), r.deployments, "{s:?}");
        assert!(o.secs.iter().all(|t| *t > 0.0), "{s:?}: {:?}", o.secs);
        // Every strategy got its bytes from somewhere and kept some.
        assert!(o.cloud > 0, "{s:?} fetched nothing from the registry");
        assert!(o.cache > 0, "{s:?} cached nothing");
    }
    for needle in ["Machine:", "Seed 1", "50 ms / 100 Mbit/s", "| breakfs |"] {
        assert!(
            r.markdown.contains(needle),
            "no {needle:?} in\n{}",
            r.markdown
        );
    }
    assert!(r.svg.starts_with("<svg"), "{}", r.svg);
    let leftover: Vec<PathBuf> = bench_mounts();
    assert!(leftover.is_empty(), "mounts left behind: {leftover:?}");

    // 2. The same, interrupted with SIGINT once breakfs deployments run.
    let marker = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_testbed::small_testbed_checks_every_rootfs_and_an_interrupt_leaves_nothing_behind",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &marker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut workdir: Option<PathBuf> = None;
    let mut log = Vec::new();
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let l = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!(
                    "the child run never reached a breakfs deployment:\n{}",
                    log.join("\n")
                )
            });
        if let Some(d) = l.strip_prefix("testbed: working in ") {
            workdir = Some(PathBuf::from(d));
        }
        let reached = l.contains("testbed: breakfs deployment");
        log.push(l);
        if reached {
            break;
        }
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let stop = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < stop,
            "the interrupted run did not stop within 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        log.push(l);
    }
    let log = log.join("\n");
    assert!(
        log.contains("interrupted"),
        "the child did not say it was interrupted:\n{log}"
    );
    // Give orphaned grandchildren a moment to go (they were signalled too).
    let mut left = marked_processes(&marker);
    let settle = Instant::now() + Duration::from_secs(20);
    while !left.is_empty() && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
        left = marked_processes(&marker);
    }
    assert!(left.is_empty(), "processes left behind: {left:?}\n{log}");
    let workdir = workdir.expect("the child named its working directory");
    assert!(
        !workdir.exists(),
        "{} left behind\n{log}",
        workdir.display()
    );
    let leftover: Vec<PathBuf> = bench_mounts();
    assert!(
        leftover.is_empty(),
        "mounts left behind: {leftover:?}\n{log}"
    );
}

/// Mounts of any testbed run (they all live under a `breakfs-testbed*`
/// temp dir).
fn bench_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.contains("/breakfs-testbed"))
        .map(PathBuf::from)
        .collect()
}
