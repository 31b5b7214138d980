//! A shaping TCP proxy: one-way delay and a bandwidth limit per direction,
//! shared by every connection through the proxy (like a link), for tests
//! and benchmarks on a kernel without netem (`breakfs shape`).
//!
//! [`run_shaping_proxy`] serves one route, [`run_shaping_routes`] several
//! routes over one shared link, and [`run_switchable_routes`] lets the
//! caller lift the shaping and put it back ([`lift_on_signals`]);
//! [`LinkShape`] says how one direction behaves. [`run`] is `breakfs
//! shape`: the routes bound, Ctrl-C and the lifting signals wired.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

mod error;

pub use error::{Error, Result};

/// How one direction of the link behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkShape {
    /// One-way delay added to every byte.
    pub delay: Duration,
    /// Bytes per second, shared by all connections; `None` is unlimited.
    pub bytes_per_sec: Option<u64>,
}

impl LinkShape {
    /// A link with `rtt_ms` round-trip time (half each way) and `mbit`
    /// Mbit/s in this direction (0 = unlimited).
    pub fn from_rtt_mbit(rtt_ms: u64, mbit: u64) -> LinkShape {
        LinkShape {
            delay: Duration::from_micros(rtt_ms * 500),
            bytes_per_sec: (mbit > 0).then_some(mbit * 1_000_000 / 8),
        }
    }
}

/// A link as `breakfs shape` is given it.
#[derive(Clone, Debug)]
pub struct Link {
    /// The routes through it, listen address → upstream.
    pub routes: Vec<(SocketAddr, SocketAddr)>,
    /// Round-trip time added, in milliseconds.
    pub rtt_ms: u64,
    /// Bandwidth in Mbit/s toward the clients (0 = unlimited).
    pub mbit: u64,
    /// Bandwidth in Mbit/s toward the upstreams.
    pub up_mbit: u64,
}

/// Shape `link` until Ctrl-C: bind its routes, lift the shaping on SIGUSR1
/// and put it back on SIGUSR2 ([`lift_on_signals`]).
pub async fn run(link: Link) -> Result<()> {
    let mut listeners = Vec::new();
    for (l, u) in &link.routes {
        let listener = TcpListener::bind(l)
            .await
            .map_err(|source| Error::Listen { addr: *l, source })?;
        listeners.push((listener, *u));
    }
    let down = LinkShape::from_rtt_mbit(link.rtt_ms, link.mbit);
    let up = LinkShape::from_rtt_mbit(link.rtt_ms, link.up_mbit);
    let rx = shutdown_on_ctrl_c();
    let lifted = Arc::new(AtomicBool::new(false));
    lift_on_signals(lifted.clone()).map_err(Error::Signals)?;
    let names: Vec<String> = link
        .routes
        .iter()
        .map(|(l, u)| format!("{l} -> {u}"))
        .collect();
    eprintln!(
        "shaping {}: rtt {} ms, {} Mbit/s down, {} Mbit/s up (0 = unlimited); Ctrl-C stops, SIGUSR1 lifts, SIGUSR2 puts back",
        names.join(", "),
        link.rtt_ms,
        link.mbit,
        link.up_mbit
    );
    run_switchable_routes(listeners, up, down, lifted, rx)
        .await
        .map_err(Error::Proxy)
}

/// The time the shared link is next free, per direction.
type Pacer = Arc<Mutex<Instant>>;

const CHUNK: usize = 16 * 1024;

/// Serve connections on `listener`, forwarding each to `upstream` with
/// `up` shaping client→upstream bytes and `down` the replies, until
/// `shutdown` turns true.
pub async fn run_shaping_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
    up: LinkShape,
    down: LinkShape,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    run_shaping_routes(vec![(listener, upstream)], up, down, shutdown).await
}

/// Like [`run_shaping_proxy`] for several routes (listener → upstream)
/// that share one link: the bandwidth of each direction is shared by every
/// connection of every route (a link between two sites, whatever host of
/// the far site a connection goes to).
pub async fn run_shaping_routes(
    routes: Vec<(TcpListener, SocketAddr)>,
    up: LinkShape,
    down: LinkShape,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    run_switchable_routes(routes, up, down, Arc::default(), shutdown).await
}

/// [`run_shaping_routes`] with a switch: while `lifted` is true, bytes
/// pass at once in both directions, as on loopback (connections open at
/// that moment included). A benchmark measures through the slow link,
/// then lifts it to check its results without waiting on the link.
pub async fn run_switchable_routes(
    routes: Vec<(TcpListener, SocketAddr)>,
    up: LinkShape,
    down: LinkShape,
    lifted: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let up_pacer: Pacer = Arc::new(Mutex::new(Instant::now()));
    let down_pacer: Pacer = Arc::new(Mutex::new(Instant::now()));
    let mut accepting: tokio::task::JoinSet<std::io::Result<()>> = tokio::task::JoinSet::new();
    for (listener, upstream) in routes {
        let (upp, downp) = (up_pacer.clone(), down_pacer.clone());
        let lifted = lifted.clone();
        accepting.spawn(async move {
            loop {
                let (client, _) = listener.accept().await?;
                let (upp, downp) = (upp.clone(), downp.clone());
                let (lift_up, lift_down) = (lifted.clone(), lifted.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let a = tokio::spawn(pipe(cr, sw, up, upp, lift_up));
                        let b = tokio::spawn(pipe(sr, cw, down, downp, lift_down));
                        let _ = tokio::join!(a, b);
                    }
                });
            }
        });
    }
    loop {
        tokio::select! {
            done = accepting.join_next() => {
                match done {
                    Some(Ok(Err(e))) => return Err(e),
                    Some(_) => {}
                    None => return Ok(()),
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// A shutdown signal for the proxy that turns true on Ctrl-C (SIGINT).
pub fn shutdown_on_ctrl_c() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    rx
}

/// SIGUSR1 lifts the shaping (sets `lifted`) and SIGUSR2 puts it back, as
/// `breakfs shape` says.
pub fn lift_on_signals(lifted: Arc<AtomicBool>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    for (kind, lift) in [
        (SignalKind::user_defined1(), true),
        (SignalKind::user_defined2(), false),
    ] {
        let mut sig = signal(kind)?;
        let lifted = lifted.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                lifted.store(lift, Ordering::Relaxed);
                eprintln!(
                    "shaping {}",
                    if lift {
                        "lifted (SIGUSR1)"
                    } else {
                        "back on (SIGUSR2)"
                    }
                );
            }
        });
    }
    Ok(())
}

/// Copy `from` to `to`: each chunk leaves `delay` after it arrived, and no
/// sooner than the shared link has sent what was queued before it; at
/// once while `lifted`.
async fn pipe<R, W>(mut from: R, mut to: W, shape: LinkShape, pacer: Pacer, lifted: Arc<AtomicBool>)
where
    R: AsyncReadExt + Unpin + Send + 'static,
    W: AsyncWriteExt + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    while let Some((arrived, data)) = rx.recv().await {
        if lifted.load(Ordering::Relaxed) {
            if to.write_all(&data).await.is_err() {
                break;
            }
            continue;
        }
        let mut due = arrived + shape.delay;
        if let Some(bps) = shape.bytes_per_sec {
            let cost = Duration::from_secs_f64(data.len() as f64 / bps as f64);
            let mut next = pacer.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + cost;
            due = due.max(start + cost);
        }
        tokio::time::sleep_until(due).await;
        if to.write_all(&data).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers every connection with `payload` bytes
    /// after one byte arrives.
    async fn upstream(payload: usize) -> SocketAddr {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&vec![7u8; payload]).await;
                    }
                });
            }
        });
        addr
    }

    async fn proxy(
        up: LinkShape,
        down: LinkShape,
        payload: usize,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let upstream = upstream(payload).await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(run_shaping_proxy(l, upstream, up, down, rx));
        (addr, tx)
    }

    async fn fetch(addr: SocketAddr) -> (Duration, usize) {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        (t.elapsed(), got.len())
    }

    #[tokio::test]
    async fn adds_the_round_trip_delay() {
        let shape = LinkShape::from_rtt_mbit(100, 0);
        let (addr, _stop) = proxy(shape, shape, 10).await;
        let (took, n) = fetch(addr).await;
        assert_eq!(n, 10);
        // Request and reply each cross one 50 ms leg.
        assert!(took >= Duration::from_millis(100), "{took:?}");
    }

    #[tokio::test]
    async fn limits_bandwidth_and_shares_it_between_connections() {
        let up = LinkShape::from_rtt_mbit(0, 0);
        // 8 Mbit/s = 1 MB/s down; two clients fetch 500 kB each at once.
        let down = LinkShape::from_rtt_mbit(0, 8);
        let (addr, _stop) = proxy(up, down, 500_000).await;
        let t = Instant::now();
        let (a, b) = tokio::join!(fetch(addr), fetch(addr));
        assert_eq!((a.1, b.1), (500_000, 500_000));
        // 1 MB over a shared 1 MB/s link takes at least ~1 s.
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn routes_reach_their_own_upstream_and_share_the_link() {
        let up = LinkShape::from_rtt_mbit(0, 0);
        let down = LinkShape::from_rtt_mbit(0, 8);
        let mut routes = Vec::new();
        let mut addrs = Vec::new();
        for payload in [400_000, 600_000] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            routes.push((l, upstream(payload).await));
        }
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(run_shaping_routes(routes, up, down, rx));
        let t = Instant::now();
        let (a, b) = tokio::join!(fetch(addrs[0]), fetch(addrs[1]));
        assert_eq!((a.1, b.1), (400_000, 600_000));
        // 1 MB over one shared 1 MB/s link, whichever route it took.
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_lifted_link_passes_bytes_at_once_and_shapes_again_when_put_back() {
        // 1 Mbit/s down and 400 ms: 2 MB would take 16 s shaped.
        let up = LinkShape::from_rtt_mbit(400, 0);
        let down = LinkShape::from_rtt_mbit(400, 1);
        let lifted = Arc::new(AtomicBool::new(true));
        let (_stop, rx) = watch::channel(false);
        let mut routes = Vec::new();
        let mut addrs = Vec::new();
        for payload in [2_000_000, 10] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap());
            routes.push((l, upstream(payload).await));
        }
        tokio::spawn(run_switchable_routes(routes, up, down, lifted.clone(), rx));
        let (took, n) = fetch(addrs[0]).await;
        assert_eq!(n, 2_000_000);
        assert!(
            took < Duration::from_secs(8),
            "lifted, yet shaped: {took:?}"
        );
        lifted.store(false, Ordering::Relaxed);
        let (took, n) = fetch(addrs[1]).await;
        assert_eq!(n, 10);
        assert!(
            took >= Duration::from_millis(400),
            "put back, yet not shaped: {took:?}"
        );
    }

    #[tokio::test]
    async fn stops_on_shutdown() {
        let shape = LinkShape::from_rtt_mbit(0, 0);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = watch::channel(false);
        let upstream = "127.0.0.1:9".parse().unwrap();
        let task = tokio::spawn(run_shaping_proxy(l, upstream, shape, shape, rx));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
