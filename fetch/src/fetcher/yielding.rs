//! Background work yields at the link: a delay-based controller per source,
//! LEDBAT-style (RFC 6817) at the level of range requests.
//!
//! Every request to a source (on-demand and background alike) is a sample:
//! its bytes `b` and how long it took `t`. The lower envelope of the
//! samples of the last [`BASE_HISTORY`] gives the source's base round trip
//! `R` and its capacity `C` (`t ≈ R + b / C` when nothing queues); what a
//! request took beyond that, `t − R − b / C`, is its queuing delay (the
//! link's queue, or a busy peer), filtered as the least of the last
//! [`CURRENT_FILTER`] samples. Background requests to the source keep at
//! most a window of bytes in flight: it grows by up to one [`UNIT`] per
//! window's worth of completed background bytes while the queuing delay is
//! under [`TARGET`], and shrinks in proportion to how far over it the
//! delay is, whatever request measured it: another node's on-demand reads
//! on a shared link slow this node's background requests and so shrink its
//! window. A request bigger than the window goes alone and the next waits
//! as long as it took times how far over the window it was, so background
//! moves about a window per round trip. On-demand requests are never held:
//! they only measure. As in LEDBAT, the base is what the link did at its
//! best lately: a source that queued from its first request on reads as a
//! slower one until it is seen uncongested.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The queuing delay background work aims to stay under, by default
/// ([`crate::FetchOptions::background_target`]).
pub const TARGET: Duration = Duration::from_millis(25);
/// The window's step: growth per window of completed background bytes at
/// zero queuing delay.
pub const UNIT: u64 = 64 << 10;
/// The window of a source not yet measured.
pub const INITIAL_WINDOW: u64 = 2 * UNIT;
/// The smallest window: one small request in flight, and a big one paced.
pub const MIN_WINDOW: u64 = 16 << 10;
/// The largest window.
pub const MAX_WINDOW: u64 = 4 << 20;
/// How long samples count towards the base round trip and capacity.
pub const BASE_HISTORY: Duration = Duration::from_secs(120);
/// Samples the current queuing delay is the least of.
pub const CURRENT_FILTER: usize = 3;
/// The envelope's samples are kept per bucket of this length.
const BUCKET: Duration = Duration::from_secs(10);
/// Most a window may shrink for one sample (a fraction of it), so that one
/// outlier does not close it.
const MAX_SHRINK: f64 = 0.5;

/// What the controller of one source reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct YieldStats {
    /// Background bytes allowed in flight now.
    pub window: u64,
    /// The largest window so far.
    pub window_peak: u64,
    /// The smallest window since it last peaked.
    pub window_low: u64,
    /// Base round trip, seconds.
    pub base_rtt: f64,
    /// Capacity, bytes per second (0: not measured yet).
    pub capacity: f64,
    /// Current queuing delay, seconds.
    pub queuing: f64,
    /// Samples measured (requests of either priority).
    pub samples: u64,
    /// Samples whose queuing delay was over the target.
    pub over_target: u64,
    /// Background requests that had to wait for the window or its pacing
    /// (counted when they begin to wait).
    pub held: u64,
    /// Of those, requests let through at once because a reader came to
    /// wait on their chunks.
    pub promoted: u64,
}

/// One request: bytes, seconds it took.
#[derive(Clone, Copy, Debug)]
struct Sample {
    bytes: f64,
    secs: f64,
}

/// The lower envelope's candidates within one bucket of time: the fastest
/// request, and the one with the best throughput.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    began: Instant,
    fastest: Sample,
    best_rate: Sample,
}

/// The controller of one source.
#[derive(Debug)]
pub(super) struct Window {
    buckets: VecDeque<Bucket>,
    recent: VecDeque<f64>,
    /// Base round trip and capacity fitted to the buckets.
    base: (f64, f64),
    cwnd: f64,
    in_flight: u64,
    /// Background requests to this source may not start before this.
    not_before: Option<Instant>,
    stats: YieldStats,
}

impl Default for Window {
    fn default() -> Self {
        let stats = YieldStats {
            window: INITIAL_WINDOW,
            window_peak: INITIAL_WINDOW,
            window_low: INITIAL_WINDOW,
            ..YieldStats::default()
        };
        Window {
            buckets: VecDeque::new(),
            recent: VecDeque::new(),
            base: (0.0, f64::INFINITY),
            cwnd: INITIAL_WINDOW as f64,
            in_flight: 0,
            not_before: None,
            stats,
        }
    }
}

/// The base round trip and capacity under `samples`: the line
/// `t = R + b / C` through the fastest sample and below every bigger one
/// (the lower envelope's first edge). Samples no bigger than the fastest
/// one say nothing of capacity: a slower one of the same size queued.
fn envelope(samples: &[Sample]) -> (f64, f64) {
    let Some(f) = samples
        .iter()
        .copied()
        .min_by(|a, b| a.secs.total_cmp(&b.secs))
    else {
        return (0.0, f64::INFINITY);
    };
    let cap = samples
        .iter()
        .filter(|s| s.bytes > f.bytes * 1.25 + 1024.0)
        .map(|s| (s.bytes - f.bytes) / (s.secs - f.secs).max(1e-6))
        .fold(0.0, f64::max);
    if cap > 0.0 {
        ((f.secs - f.bytes / cap).max(0.0), cap)
    } else {
        (f.secs, f64::INFINITY)
    }
}

impl Window {
    /// Whether a background request of `bytes` may start at `now`; if so it
    /// counts as in flight until [`Window::finish`].
    pub(super) fn try_start(&mut self, bytes: u64, now: Instant) -> bool {
        if self.not_before.is_some_and(|t| t > now) {
            return false;
        }
        let fits = self.in_flight == 0 || (self.in_flight + bytes) as f64 <= self.cwnd;
        if fits {
            self.in_flight += bytes;
        }
        fits
    }

    /// When a held request should look again: the pacing's end, if any.
    pub(super) fn not_before(&self) -> Option<Instant> {
        self.not_before
    }

    /// A request of `bytes` took `took`, ending at `now`: measure it; a
    /// background one (`background`) leaves the flight, grows the window if
    /// the delay is under target, and paces the next when it was bigger
    /// than the window. A failed background request (`ok` false) halves
    /// the window.
    pub(super) fn finish(
        &mut self,
        (bytes, took): (u64, Duration),
        now: Instant,
        target: Duration,
        background: bool,
        ok: bool,
    ) {
        if background {
            self.in_flight = self.in_flight.saturating_sub(bytes);
        }
        if !ok {
            if background {
                self.cwnd = (self.cwnd / 2.0).max(MIN_WINDOW as f64);
                self.publish();
            }
            return;
        }
        let q = self.measure(bytes, took, now, target);
        let target = target.as_secs_f64();
        let off = (target - q) / target;
        let acked = bytes as f64;
        if off < 0.0 {
            // Over target: shrink in proportion, whoever measured it.
            let cut = (-off * acked * UNIT as f64 / self.cwnd).min(MAX_SHRINK * self.cwnd);
            self.cwnd = (self.cwnd - cut).max(MIN_WINDOW as f64);
        } else if background {
            // RFC 6817: grow only while the window is what limits the flight.
            let grown = self.cwnd + off * acked * UNIT as f64 / self.cwnd;
            let limit = (self.in_flight + bytes + UNIT) as f64;
            self.cwnd = grown.min(limit.max(self.cwnd)).min(MAX_WINDOW as f64);
        }
        if background && acked > self.cwnd {
            // Alone and over the window: pace so that about a window goes
            // per round trip.
            let wait = took.as_secs_f64() * (acked / self.cwnd - 1.0);
            self.not_before = Some(now + Duration::from_secs_f64(wait.min(30.0)));
        }
        self.publish();
    }

    /// Add a sample; returns the current queuing delay in seconds.
    fn measure(&mut self, bytes: u64, took: Duration, now: Instant, target: Duration) -> f64 {
        let s = Sample {
            bytes: bytes as f64,
            secs: took.as_secs_f64(),
        };
        while self
            .buckets
            .front()
            .is_some_and(|b| now.saturating_duration_since(b.began) > BASE_HISTORY)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some(b) if now.saturating_duration_since(b.began) < BUCKET => {
                if s.secs < b.fastest.secs {
                    b.fastest = s;
                }
                if s.bytes / s.secs.max(1e-6) > b.best_rate.bytes / b.best_rate.secs.max(1e-6) {
                    b.best_rate = s;
                }
            }
            _ => self.buckets.push_back(Bucket {
                began: now,
                fastest: s,
                best_rate: s,
            }),
        }
        let all: Vec<Sample> = self
            .buckets
            .iter()
            .flat_map(|b| [b.fastest, b.best_rate])
            .collect();
        self.base = envelope(&all);
        let (rtt, cap) = self.base;
        let q = (s.secs - rtt - s.bytes / cap).max(0.0);
        self.recent.push_back(q);
        while self.recent.len() > CURRENT_FILTER {
            self.recent.pop_front();
        }
        let current = self.recent.iter().copied().fold(f64::INFINITY, f64::min);
        self.stats.samples += 1;
        if current > target.as_secs_f64() {
            self.stats.over_target += 1;
        }
        self.stats.queuing = current;
        current
    }

    fn publish(&mut self) {
        let w = self.cwnd as u64;
        let st = &mut self.stats;
        st.window = w;
        if w > st.window_peak {
            st.window_peak = w;
            st.window_low = w;
        }
        st.window_low = st.window_low.min(w);
        st.base_rtt = self.base.0;
        st.capacity = if self.base.1.is_finite() {
            self.base.1
        } else {
            0.0
        };
    }

    /// The report of this controller.
    pub(super) fn stats(&self) -> YieldStats {
        self.stats.clone()
    }
}

/// The controllers of a fetcher's sources, by source name.
pub(super) struct Yielder {
    target: Duration,
    windows: Mutex<HashMap<String, Window>>,
    /// Told when a window's flight shrinks or its pacing may have ended.
    pub(super) changed: Notify,
}

impl Yielder {
    /// Controllers that keep queuing delay under `target`.
    pub(super) fn new(target: Duration) -> Yielder {
        Yielder {
            target,
            windows: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }

    /// [`Window::try_start`] on `source`'s window; `Err` with when to look
    /// again (at the latest) when the request must wait.
    pub(super) fn try_start(&self, source: &str, bytes: u64) -> Result<(), Option<Instant>> {
        let mut ws = self.windows.lock();
        let w = ws.entry(source.to_string()).or_default();
        if w.try_start(bytes, Instant::now()) {
            Ok(())
        } else {
            Err(w.not_before())
        }
    }

    /// [`Window::finish`] on `source`'s window; wakes held requests.
    pub(super) fn finish(
        &self,
        source: &str,
        bytes: u64,
        took: Duration,
        background: bool,
        ok: bool,
    ) {
        self.windows
            .lock()
            .entry(source.to_string())
            .or_default()
            .finish((bytes, took), Instant::now(), self.target, background, ok);
        if background {
            self.changed.notify_waiters();
        }
    }

    /// A request of `bytes` to `source` ended without a measurement (the
    /// source did not have the bytes, or was busy): a background one
    /// (`background`) leaves the flight.
    pub(super) fn release(&self, source: &str, bytes: u64, background: bool) {
        if !background {
            return;
        }
        if let Some(w) = self.windows.lock().get_mut(source) {
            w.in_flight = w.in_flight.saturating_sub(bytes);
        }
        self.changed.notify_waiters();
    }

    /// Count a background request to `source` that waited (`held`) or was
    /// let through for a reader (`promoted`).
    pub(super) fn count(&self, source: &str, held: bool, promoted: bool) {
        let mut ws = self.windows.lock();
        let st = &mut ws.entry(source.to_string()).or_default().stats;
        st.held += u64::from(held);
        st.promoted += u64::from(promoted);
    }

    /// The largest background request worth making now: the smallest window
    /// of the sources measured so far (a bigger request would go alone and
    /// be paced), at least one [`UNIT`] (smaller requests would cost a peer
    /// more per byte than they spare the link).
    pub(super) fn range_cap(&self) -> u64 {
        self.windows
            .lock()
            .values()
            .filter(|w| w.stats.samples > 0)
            .map(|w| w.cwnd as u64)
            .min()
            .unwrap_or(MAX_WINDOW)
            .max(UNIT)
    }

    /// Every source's report.
    pub(super) fn stats(&self) -> BTreeMap<String, YieldStats> {
        self.windows
            .lock()
            .iter()
            .map(|(k, w)| (k.clone(), w.stats()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A link of `rtt` and `bytes_per_sec` with `queued` seconds of queue.
    fn took(bytes: u64, rtt: f64, bytes_per_sec: f64, queued: f64) -> Duration {
        Duration::from_secs_f64(rtt + bytes as f64 / bytes_per_sec + queued)
    }

    #[test]
    fn the_envelope_finds_round_trip_and_capacity_from_mixed_sizes() {
        let (rtt, cap) = (0.05, 12.5e6);
        let samples: Vec<Sample> = [4 << 10, 64 << 10, 512 << 10, 200 << 10]
            .iter()
            .map(|&b| Sample {
                bytes: b as f64,
                secs: took(b, rtt, cap, 0.0).as_secs_f64(),
            })
            .collect();
        let (r, c) = envelope(&samples);
        assert!((r - rtt).abs() < 1e-3, "round trip {r}");
        assert!((c - cap).abs() / cap < 0.05, "capacity {c}");
    }

    #[test]
    fn the_window_grows_while_the_link_does_not_queue() {
        let mut w = Window::default();
        let t0 = Instant::now();
        let mut now = t0;
        for i in 0..200 {
            let b = if i % 3 == 0 { 8 << 10 } else { 128 << 10 };
            assert!(w.try_start(b, now) || w.not_before().is_some());
            now += took(b, 0.05, 12.5e6, 0.0);
            w.finish((b, took(b, 0.05, 12.5e6, 0.0)), now, TARGET, true, true);
            if let Some(t) = w.not_before() {
                now = now.max(t);
            }
        }
        let st = w.stats();
        // One request in flight at a time: the window grows to that flight
        // and one unit more (RFC 6817's bound), not beyond.
        assert_eq!(st.window, (128 << 10) + UNIT, "{st:?}");
        assert_eq!(st.over_target, 0, "{st:?}");
        assert!((st.base_rtt - 0.05).abs() < 2e-3, "{st:?}");
    }

    #[test]
    fn the_window_shrinks_to_its_floor_when_the_round_trip_grows() {
        let mut w = Window::default();
        let mut now = Instant::now();
        for _ in 0..100 {
            let b = 128 << 10;
            w.try_start(b, now);
            now += ms(100);
            w.finish((b, took(b, 0.05, 12.5e6, 0.0)), now, TARGET, true, true);
        }
        let peak = w.stats().window;
        // Another node's reads fill the link: 200 ms of queue.
        for _ in 0..40 {
            let b = 128 << 10;
            now += ms(300);
            w.finish((b, took(b, 0.05, 12.5e6, 0.2)), now, TARGET, true, true);
        }
        let st = w.stats();
        assert_eq!(st.window, MIN_WINDOW, "{st:?} (peak {peak})");
        assert!(st.queuing > TARGET.as_secs_f64(), "{st:?}");
        // A request over the window goes alone, and the next one waits.
        assert!(w.not_before().is_some_and(|t| t > now));
        assert!(!w.try_start(4 << 10, now));
    }

    #[test]
    fn on_demand_requests_shrink_the_window_but_never_grow_it() {
        let mut w = Window::default();
        let mut now = Instant::now();
        for i in 0..6 {
            let b = if i % 2 == 0 { 4 << 10 } else { 256 << 10 };
            now += ms(100);
            w.finish((b, took(b, 0.05, 12.5e6, 0.0)), now, TARGET, false, true);
        }
        assert_eq!(w.stats().window, INITIAL_WINDOW);
        for _ in 0..5 {
            now += ms(300);
            w.finish(
                (256 << 10, took(256 << 10, 0.05, 12.5e6, 0.15)),
                now,
                TARGET,
                false,
                true,
            );
        }
        assert!(w.stats().window < INITIAL_WINDOW, "{:?}", w.stats());
    }

    #[test]
    fn one_slow_sample_among_fast_ones_does_not_shrink_the_window() {
        let mut w = Window::default();
        let mut now = Instant::now();
        for i in 0..30 {
            let extra = if i == 20 { 0.5 } else { 0.0 };
            now += ms(100);
            w.try_start(64 << 10, now);
            w.finish(
                (64 << 10, took(64 << 10, 0.02, 1e7, extra)),
                now,
                TARGET,
                true,
                true,
            );
        }
        assert_eq!(w.stats().over_target, 0, "{:?}", w.stats());
    }

    #[test]
    fn the_flight_is_bounded_by_the_window_but_one_request_always_goes() {
        let mut w = Window::default();
        let now = Instant::now();
        assert!(w.try_start(INITIAL_WINDOW, now));
        assert!(!w.try_start(1, now));
        w.finish((INITIAL_WINDOW, ms(60)), now, TARGET, true, true);
        // Bigger than the window, but nothing is in flight.
        let mut w = Window::default();
        assert!(w.try_start(10 * INITIAL_WINDOW, now));
    }

    #[test]
    fn a_failed_background_request_halves_the_window() {
        let mut w = Window::default();
        let now = Instant::now();
        w.try_start(1024, now);
        w.finish((1024, ms(10)), now, TARGET, true, false);
        assert_eq!(w.stats().window, INITIAL_WINDOW / 2);
    }

    #[test]
    fn old_samples_leave_the_base() {
        let mut w = Window::default();
        let t0 = Instant::now();
        w.finish((1024, ms(10)), t0, TARGET, false, true);
        let later = t0 + BASE_HISTORY + BUCKET;
        w.finish((1024, ms(40)), later, TARGET, false, true);
        assert!((w.base.0 - 0.04).abs() < 2e-3, "{:?}", w.base);
    }
}
