//! A replay: every deployment started at its arrival time on a thread of
//! its own, timed until its image's command has run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::interrupt::{INTERRUPTED, check_interrupt};
use super::workload::Deployment;
use super::world::World;

/// Every deployment of a replay reaching its ready point (or failing).
struct AllReady<'h> {
    n: usize,
    count: Mutex<usize>,
    cv: std::sync::Condvar,
    /// Run once when the last deployment is ready (or failed), before any
    /// is let go to its check.
    at_all_ready: &'h (dyn Fn() + Sync),
    released: AtomicBool,
    /// Deployments being checked and cleaned up now.
    checking: Mutex<usize>,
    /// Signalled when a check turn ends (a condvar serves one mutex).
    check_cv: std::sync::Condvar,
}

/// Wait on `cv` with `guard` while `waiting` holds and no interrupt came
/// (woken at least every 200 ms to look at the interrupt).
fn wait_while<'a>(
    cv: &std::sync::Condvar,
    mut guard: std::sync::MutexGuard<'a, usize>,
    waiting: impl Fn(usize) -> bool,
) -> std::sync::MutexGuard<'a, usize> {
    while waiting(*guard) && !INTERRUPTED.load(Ordering::SeqCst) {
        guard = cv
            .wait_timeout(guard, Duration::from_millis(200))
            .unwrap()
            .0;
    }
    guard
}

/// Deployments checked (and cleaned up) at once. All 32 at once read
/// thousands of sampled files through 16 nodes' lazy mounts on this
/// 2-core machine, and reads waited past their 30 s deadline; the
/// checks are not timed, so they take turns.
const CHECKS_AT_ONCE: usize = 4;

impl AllReady<'_> {
    fn arrive(&self) {
        let last = {
            let mut c = self.count.lock().unwrap();
            *c += 1;
            *c == self.n
        };
        if last {
            (self.at_all_ready)();
            self.released.store(true, Ordering::SeqCst);
        }
        let _c = self.count.lock().unwrap();
        self.cv.notify_all();
    }

    fn arrive_and_wait(&self) {
        self.arrive();
        let c = self.count.lock().unwrap();
        drop(wait_while(&self.cv, c, |_| {
            !self.released.load(Ordering::SeqCst)
        }));
    }

    /// Wait for a turn to check (see [`CHECKS_AT_ONCE`]).
    fn take_check_turn(&self) {
        let n = self.checking.lock().unwrap();
        *wait_while(&self.check_cv, n, |n| n >= CHECKS_AT_ONCE) += 1;
    }

    fn end_check_turn(&self) {
        *self.checking.lock().unwrap() -= 1;
        self.check_cv.notify_all();
    }
}

/// One deployment's clock: started at the decision, read when the image's
/// command has run.
pub struct Ready<'a> {
    t: Instant,
    secs: Mutex<Option<f64>>,
    all: &'a AllReady<'a>,
    what: &'a str,
    i: usize,
    d: &'a Deployment,
    /// Whether it holds a turn to check ([`AllReady::take_check_turn`]).
    checking: AtomicBool,
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if self.checking.load(Ordering::SeqCst) {
            self.all.end_check_turn();
        }
    }
}

impl Ready<'_> {
    /// The deployment is ready: record the time, then hold it (mounts up)
    /// until every deployment is, so that the checks against the original
    /// images and the clean-up run after the measured part (they would
    /// otherwise take CPU and link from deployments still starting).
    pub fn now(&self) -> f64 {
        let secs = self.t.elapsed().as_secs_f64();
        *self.secs.lock().unwrap() = Some(secs);
        let k = *self.all.count.lock().unwrap() + 1;
        eprintln!(
            "testbed: {} deployment {} (cluster {}, arrived at {:.1} s) ready in {secs:.2} s [{k}/{}]",
            self.what, self.i, self.d.cluster, self.d.at, self.all.n
        );
        self.all.arrive_and_wait();
        self.all.take_check_turn();
        self.checking.store(true, Ordering::SeqCst);
        secs
    }
}

/// Run `deploy` for every deployment at its arrival time, each on its own
/// thread (deployments overlap as they arrive); `deploy` calls
/// [`Ready::now`] when the image's command has run, then checks and
/// cleans up. Returns the seconds to ready.
pub fn replay(
    w: &World,
    what: &str,
    deps: &[Deployment],
    deploy: impl Fn(usize, &Deployment, &Ready) -> Result<()> + Sync,
) -> Result<Vec<f64>> {
    replay_then(w, what, deps, deploy, &|| {})
}

/// [`replay`], running `at_all_ready` once every deployment is ready and
/// before any is checked (the checks read files, which a lazy mount
/// fetches: measure before them). Once every deployment is ready the
/// cloud links are lifted (nothing is measured any more), so the checks
/// and what `at_all_ready` waits for do not wait on them.
pub fn replay_then(
    w: &World,
    what: &str,
    deps: &[Deployment],
    deploy: impl Fn(usize, &Deployment, &Ready) -> Result<()> + Sync,
    at_all_ready: &(dyn Fn() + Sync),
) -> Result<Vec<f64>> {
    let start = Instant::now();
    let hook = || {
        eprintln!(
            "testbed: {what}: every deployment ready {:.0} s after the first arrived; links lifted for the checks",
            start.elapsed().as_secs_f64()
        );
        for l in w.links {
            l.lift();
        }
        at_all_ready();
        eprintln!("testbed: {what}: checking every rootfs against the original image");
    };
    let all = AllReady {
        n: deps.len(),
        count: Mutex::new(0),
        cv: std::sync::Condvar::new(),
        at_all_ready: &hook,
        released: AtomicBool::new(false),
        checking: Mutex::new(0),
        check_cv: std::sync::Condvar::new(),
    };
    let results: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = deps
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (deploy, all) = (&deploy, &all);
                s.spawn(move || {
                    let due = start + Duration::from_secs_f64(d.at);
                    while Instant::now() < due && !INTERRUPTED.load(Ordering::SeqCst) {
                        std::thread::sleep((due - Instant::now()).min(Duration::from_millis(100)));
                    }
                    let ready = Ready {
                        t: Instant::now(),
                        secs: Mutex::new(None),
                        all,
                        what,
                        i,
                        d,
                        checking: AtomicBool::new(false),
                    };
                    let r = check_interrupt().and_then(|()| deploy(i, d, &ready));
                    let secs = *ready.secs.lock().unwrap();
                    if secs.is_none() {
                        all.arrive(); // failed before it was ready
                    }
                    r.with_context(|| format!("{what} deployment {i}"))?;
                    secs.ok_or_else(|| anyhow!("{what} deployment {i} never became ready"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a deployment thread panicked")))
            })
            .collect()
    });
    eprintln!(
        "testbed: {what}: checked and cleaned up {:.0} s after the first arrived",
        start.elapsed().as_secs_f64()
    );
    results.into_iter().collect()
}
