//! `breakfs node --keep-mounts`: a mount served by the node daemon keeps
//! answering a reader across daemon restarts (SIGTERM and start, SIGKILL
//! and start), files it never read before included, with zero failed or
//! wrong reads; a daemon that never comes back has its mounts unmounted
//! after the bound; nothing is left behind after unmount and stop.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mount::{Mount, Shaper, corpus, files_of, hex_sha256, ok, refactor_into};
use crate::node::Node;
use crate::support::registry::TestRegistry;

/// What the reader saw.
#[derive(Default)]
struct Tally {
    /// How many files the reader may read for the first time.
    allow: AtomicU64,
    /// Whole-file reads that returned the right bytes.
    good: AtomicU64,
    /// Of those, files read for the first time.
    first: AtomicU64,
    /// Reads of the file kept open from the start (through its old handle).
    kept_open: AtomicU64,
    /// Reads that failed or returned other bytes: what went wrong.
    bad: Mutex<Vec<String>>,
    /// A read of a file not read before is under way now.
    in_first_read: AtomicBool,
}

/// Read `files` of `root`, comparing each with `expected`: a file not
/// read before whenever `tally.allow` lets it, else one read before again
/// (paced); one file stays open the whole time and is read through that
/// one handle too. Until `stop`.
fn reader(
    root: PathBuf,
    files: Vec<String>,
    expected: Arc<BTreeMap<String, String>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let kept = files[0].clone();
    let kept_file = std::fs::File::open(root.join(&kept)).unwrap();
    let kept_len = kept_file.metadata().unwrap().len() as usize;
    let (mut new, mut old) = (1usize, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let first = tally.first.load(Ordering::Relaxed) < tally.allow.load(Ordering::Relaxed)
            && new < files.len();
        let p = if first {
            new += 1;
            &files[new - 1]
        } else {
            // Pacing only: nothing new to read yet.
            std::thread::sleep(Duration::from_millis(10));
            old = (old + 1) % new;
            &files[old]
        };
        tally.in_first_read.store(first, Ordering::Relaxed);
        let got = std::fs::File::open(root.join(p)).and_then(|mut f| {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map(|_| b)
        });
        tally.in_first_read.store(false, Ordering::Relaxed);
        match got {
            Ok(b) if hex_sha256(&b) == expected[p] => {
                tally.good.fetch_add(1, Ordering::Relaxed);
                if first {
                    tally.first.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(b) => tally
                .bad
                .lock()
                .unwrap()
                .push(format!("{p}: {} bytes, not the image's", b.len())),
            Err(e) => tally.bad.lock().unwrap().push(format!("{p}: {e}")),
        }
        let mut kept_bytes = vec![0u8; kept_len];
        match kept_file.read_exact_at(&mut kept_bytes, 0) {
            Ok(()) if hex_sha256(&kept_bytes) == expected[&kept] => {
                tally.kept_open.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => tally
                .bad
                .lock()
                .unwrap()
                .push(format!("{kept} (kept open): not the image's bytes")),
            Err(e) => tally
                .bad
                .lock()
                .unwrap()
                .push(format!("{kept} (kept open): {e}")),
        }
    }
}

/// The content hash of every regular file under `root`, by relative path.
fn hashes(root: &Path) -> BTreeMap<String, String> {
    files_of(root)
        .into_iter()
        .map(|(p, _)| {
            let b = std::fs::read(root.join(&p)).unwrap();
            (p, hex_sha256(&b))
        })
        .collect()
}

/// Wait until `what` holds, up to `secs`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool, log: impl Fn() -> String) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < until,
            "{what}: not within {secs} s\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mounted(point: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&point.display().to_string()))
}

/// Processes whose command line names `needle` (the holder names its socket).
fn processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .filter(|pid| crate::mount::running(*pid))
        .collect()
}

/// The mount at `point` as the daemon lists it (`GET /mounts`), if it does.
fn listed(node: &Node, point: &Path) -> Option<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sSf", "--max-time", "10", "--unix-socket"])
        .arg(&node.socket)
        .arg("http://node/mounts")
        .output()
        .ok()?;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    all.as_array()?
        .iter()
        .find(|m| m["mountpoint"].as_str() == Some(&point.display().to_string()))
        .cloned()
}

#[test]
fn a_reader_never_fails_across_ten_daemon_restarts() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    // A slow link: reads of files not read before wait on fetches, so the
    // daemon dies with requests in its hands.
    let slow = Shaper::start(&reg.host(), 20, 40);
    let reference = refs[0].replace(&reg.host(), &slow.1);
    let unpacked = tmp.path().join("umoci");
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{}", img.layout.display(), img.tag))
        .arg(&unpacked));
    let expected = Arc::new(hashes(&unpacked.join("rootfs")));

    let dir = tmp.path().join("n");
    let mut node = Node::start(&dir, &[], &["--keep-mounts", "120"]);
    let point = tmp.path().join("mnt");
    std::fs::create_dir_all(&point).unwrap();
    // No hydration and no dependency prefetch: a file not read before is
    // fetched when it is read, by whichever daemon runs then.
    let m = Mount::new(
        &reference,
        &point,
        &dir.join("unused-cache"),
        &[
            "--node",
            &node.control(),
            "--no-hydrate",
            "--no-dependency-prefetch",
        ],
    );
    let files: Vec<String> = files_of(&m.point)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| expected.contains_key(p))
        .collect();
    assert!(files.len() > 100, "{} files", files.len());

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let (root, files, expected) = (m.point.clone(), files.clone(), expected.clone());
        let (tally, stop) = (tally.clone(), stop.clone());
        std::thread::spawn(move || reader(root, files, expected, tally, stop))
    };
    let firsts = || tally.first.load(Ordering::Relaxed);
    let no_bad = || tally.bad.lock().unwrap().is_empty();
    let mut mid_read = 0;
    for round in 0..10 {
        // Let the reader at six new files; restart once it has read two,
        // while it fetches the next (a slow link): the rest, and the read
        // under way, are the next daemon's to answer.
        let before = firsts();
        tally.allow.fetch_add(6, Ordering::Relaxed);
        wait_for(
            120,
            &format!("round {round}: the reader reads new files"),
            || firsts() >= before + 2 || !no_bad(),
            || node.log_text(),
        );
        if tally.in_first_read.load(Ordering::Relaxed) {
            mid_read += 1;
        }
        let old = node.pid();
        if round % 2 == 0 {
            assert!(node.stop().success(), "{}", node.log_text());
        } else {
            node.sigkill();
        }
        assert!(
            mounted(&m.point),
            "round {round}: the mount went with the daemon"
        );
        node.start_again();
        assert_ne!(node.pid(), old);
        wait_for(
            60,
            &format!("round {round}: the new daemon serves the mount"),
            || listed(&node, &m.point).is_some_and(|r| r["pid"] == node.pid()),
            || node.log_text(),
        );
    }
    tally.allow.fetch_add(6, Ordering::Relaxed);
    let allowed = tally.allow.load(Ordering::Relaxed);
    wait_for(
        120,
        "the reader reads every new file it was let at",
        || firsts() >= allowed || !no_bad(),
        || node.log_text(),
    );
    stop.store(true, Ordering::Relaxed);
    reading.join().unwrap();
    let bad = tally.bad.lock().unwrap().clone();
    eprintln!(
        "10 restarts: {} good reads ({} files first read, of {}), {} reads of the file \
         kept open, {} failed or wrong; {mid_read} restarts while a first read was under way",
        tally.good.load(Ordering::Relaxed),
        firsts(),
        files.len(),
        tally.kept_open.load(Ordering::Relaxed),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{} bad reads: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );

    // `breakfs status` shows the mount, served by the daemon now up.
    let st = m.status();
    assert_eq!(st["pid"], node.pid(), "{st}");
    assert_eq!(st["image"], reference.as_str(), "{st}");
    // A new mount works, and reads right.
    let point2 = tmp.path().join("mnt2");
    let m2 = node.mount(&reference, &point2);
    let p = &files[files.len() / 2];
    assert_eq!(
        hex_sha256(&std::fs::read(m2.point.join(p)).unwrap()),
        expected[p]
    );

    // Unmounted and stopped, nothing is left: no mount, no holder.
    let holder_socket = node.cache.join("holder/holder.sock");
    assert_eq!(
        processes_naming(&holder_socket.display().to_string()).len(),
        1,
        "one holder while the daemon runs"
    );
    let (p1, p2) = (m.point.clone(), m2.point.clone());
    drop(m);
    drop(m2);
    assert!(!mounted(&p1) && !mounted(&p2));
    assert!(node.stop().success(), "{}", node.log_text());
    wait_for(
        20,
        "the holder exits once nothing is held and the daemon is gone",
        || processes_naming(&holder_socket.display().to_string()).is_empty(),
        || std::fs::read_to_string(node.cache.join("holder/holder.log")).unwrap_or_default(),
    );
    assert!(!holder_socket.exists());
}

#[test]
fn mounts_no_daemon_serves_are_unmounted_after_the_bound() {
    let images = corpus();
    let img = images.iter().find(|i| i.tag == "v1").unwrap();
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let refs = refactor_into(&reg, std::slice::from_ref(img), &tmp.path().join("work"));
    let dir = tmp.path().join("n");
    let mut node = Node::start(&dir, &[], &["--keep-mounts", "3"]);
    let m = node.mount(&refs[0], &tmp.path().join("mnt"));
    let point = m.point.clone();
    node.sigkill();
    assert!(mounted(&point), "the mount went with the daemon at once");
    let holder_socket = node.cache.join("holder/holder.sock");
    let log = || std::fs::read_to_string(node.cache.join("holder/holder.log")).unwrap_or_default();
    wait_for(
        30,
        "the holder unmounts what no daemon serves after 3 s, and exits",
        || !mounted(&point) && processes_naming(&holder_socket.display().to_string()).is_empty(),
        log,
    );
    assert!(log().contains("no node daemon served"), "{}", log());
    // The path is free for a new mount.
    let mut node = node;
    node.start_again();
    drop(m);
    let again = node.mount(&refs[0], &point);
    assert!(!files_of(&again.point).is_empty());
}
