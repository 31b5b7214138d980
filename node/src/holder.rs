//! Mounts that outlive the daemon process: a small long-lived process, the
//! *holder*, keeps a duplicate of each daemon mount's `/dev/fuse`
//! descriptor, so that the kernel's connection, and every request queued
//! on it, lives on while no daemon runs (SIGTERM and start, or a crash and
//! restart); the next daemon takes the descriptors back and serves them
//! (docs/restarts.md).
//!
//! The holder ([`run_holder`]) listens on a Unix seqpacket socket: one
//! JSON message per packet, a descriptor riding along (`SCM_RIGHTS`) where
//! one is handed over. The daemon's connection is its lease: while no
//! daemon is connected, the holder keeps its mounts for a bounded time,
//! then unmounts them (lazily) and exits, saying so in its log. A mount
//! whose connection the kernel ended (unmounted, from anywhere) is let go
//! at once, and a holder with nothing to hold and no daemon exits.

use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType, recvmsg, sendmsg,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a daemon keeps its mounts served across its restarts.
#[derive(Clone, Debug)]
pub struct KeepMounts {
    /// How long the holder keeps mounts that no daemon serves before it
    /// unmounts them.
    pub orphan_after: Duration,
    /// The command that runs [`run_holder`] (program and leading
    /// arguments); the socket path and `orphan_after` in seconds follow.
    pub holder: Vec<OsString>,
}

/// The largest message (a mount's description).
const MAX_MESSAGE: usize = 64 << 10;
/// How long a holder nobody connected to waits for its first daemon.
const FIRST_DAEMON: Duration = Duration::from_secs(60);
/// How long the daemon waits for an answer from the holder.
const ANSWER: Duration = Duration::from_secs(10);

/// A request from the daemon.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// A daemon starts: every held mount comes back (`Held` each, then
    /// `Done`); this connection is its lease from now on.
    Hello,
    /// Hold the descriptor that comes with this message.
    Hold {
        mountpoint: PathBuf,
        /// What the daemon needs to serve it again (opaque here).
        meta: serde_json::Value,
    },
    /// Let the mount's descriptor go (it was unmounted).
    Release { mountpoint: PathBuf },
}

/// An answer from the holder.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Reply {
    /// A held mount, its descriptor with the message.
    Held {
        mountpoint: PathBuf,
        meta: serde_json::Value,
    },
    /// The request is done.
    Done,
    /// The request was refused.
    Refused { reason: String },
}

fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor"));
    }
    sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// The next message and the descriptor with it; `None` once the peer
/// closed the connection.
fn recv<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
) -> std::io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..got.bytes.min(buf.len())])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fd)))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

fn connect(path: &Path) -> std::io::Result<OwnedFd> {
    let sock = seqpacket()?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(path)?)?;
    Ok(sock)
}

/// A mount the holder keeps.
struct Held {
    mountpoint: PathBuf,
    meta: serde_json::Value,
    fd: OwnedFd,
}

/// The holder process: listen on `socket` and hold what daemons hand over,
/// until nothing is held and no daemon is connected, or no daemon has been
/// connected for `orphan_after` (then its mounts are unmounted). Blocking;
/// it logs on stderr.
pub fn run_holder(socket: &Path, orphan_after: Duration) -> Result<()> {
    let what = |w: &str| format!("{w} the mount holder's socket {}", socket.display());
    if connect(socket).is_ok() {
        return Err(Error::SocketInUse(socket.to_path_buf()));
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket().map_err(|e| Error::io(what("creating"), e))?;
    rustix::net::bind(
        &listener,
        &SocketAddrUnix::new(socket).map_err(|e| Error::io(what("naming"), e.into()))?,
    )
    .map_err(|e| Error::io(what("binding"), e.into()))?;
    rustix::net::listen(&listener, 8).map_err(|e| Error::io(what("listening on"), e.into()))?;
    eprintln!(
        "breakfs fuse-holder: holding mounts for the node daemon on {}",
        socket.display()
    );
    let mut holder = Holder {
        held: Vec::new(),
        daemon: None,
        alone_since: Instant::now(),
        served: false,
    };
    holder.run(&listener, orphan_after);
    let _ = std::fs::remove_file(socket);
    eprintln!("breakfs fuse-holder: done");
    Ok(())
}

struct Holder {
    held: Vec<Held>,
    /// The connected daemon (its lease).
    daemon: Option<OwnedFd>,
    /// When the last daemon went (or the holder started).
    alone_since: Instant,
    /// A daemon has connected.
    served: bool,
}

impl Holder {
    fn run(&mut self, listener: &OwnedFd, orphan_after: Duration) {
        loop {
            let mut timeout = None;
            if self.daemon.is_none() {
                let alone = self.alone_since.elapsed();
                if self.held.is_empty() && (self.served || alone >= FIRST_DAEMON) {
                    return;
                }
                let bound = if self.held.is_empty() {
                    FIRST_DAEMON
                } else {
                    orphan_after
                };
                if alone >= bound {
                    self.give_up(orphan_after);
                    return;
                }
                timeout = Some(bound - alone);
            }
            let (accept, from_daemon, ended) = match self.wait(listener, timeout) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("breakfs fuse-holder: poll failed: {e}");
                    continue;
                }
            };
            for i in ended.into_iter().rev() {
                let h = self.held.remove(i);
                eprintln!(
                    "breakfs fuse-holder: the connection of {} ended (unmounted); let go",
                    h.mountpoint.display()
                );
            }
            if from_daemon {
                self.serve_daemon();
            }
            if accept {
                match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
                    Ok(conn) => {
                        if self.daemon.replace(conn).is_some() {
                            eprintln!(
                                "breakfs fuse-holder: a new daemon replaces the connected one"
                            );
                        }
                        self.served = true;
                    }
                    Err(e) => eprintln!("breakfs fuse-holder: accepting a daemon: {e}"),
                }
            }
        }
    }

    /// Poll the listener, the daemon and the held descriptors: whether a
    /// daemon is knocking, whether the daemon sent something (or went),
    /// and which held connections the kernel ended.
    fn wait(
        &self,
        listener: &OwnedFd,
        timeout: Option<Duration>,
    ) -> std::io::Result<(bool, bool, Vec<usize>)> {
        let mut fds = vec![PollFd::new(listener, PollFlags::IN)];
        if let Some(d) = &self.daemon {
            fds.push(PollFd::new(d, PollFlags::IN));
        }
        let first_held = fds.len();
        // No events asked: /dev/fuse reports an error once its connection
        // is gone, and that is all the holder waits for.
        fds.extend(
            self.held
                .iter()
                .map(|h| PollFd::new(&h.fd, PollFlags::empty())),
        );
        let ts = timeout.map(|t| Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: t.subsec_nanos() as i64,
        });
        match poll(&mut fds, ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok((false, false, Vec::new())),
            Err(e) => return Err(e.into()),
        }
        let accept = !fds[0].revents().is_empty();
        let from_daemon = self.daemon.is_some() && !fds[1].revents().is_empty();
        let ended = fds[first_held..]
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.revents().is_empty())
            .map(|(i, _)| i)
            .collect();
        Ok((accept, from_daemon, ended))
    }

    /// Answer one request of the daemon, or note that it went.
    fn serve_daemon(&mut self) {
        let Some(conn) = self.daemon.take() else {
            return;
        };
        let got = recv::<Request>(conn.as_fd());
        let (req, fd) = match got {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => {
                self.alone_since = Instant::now();
                if !self.held.is_empty() {
                    eprintln!(
                        "breakfs fuse-holder: the node daemon went; holding {} mounts until one \
                         comes back",
                        self.held.len()
                    );
                }
                return;
            }
        };
        let sock = conn.as_fd();
        let sent = match req {
            Request::Hello => self
                .held
                .iter()
                .try_for_each(|h| {
                    let msg = Reply::Held {
                        mountpoint: h.mountpoint.clone(),
                        meta: h.meta.clone(),
                    };
                    send(sock, &msg, Some(h.fd.as_fd()))
                })
                .and_then(|()| send(sock, &Reply::Done, None)),
            Request::Hold { mountpoint, meta } => match fd {
                Some(fd) => {
                    self.held.retain(|h| h.mountpoint != mountpoint);
                    eprintln!("breakfs fuse-holder: holding {}", mountpoint.display());
                    self.held.push(Held {
                        mountpoint,
                        meta,
                        fd,
                    });
                    send(sock, &Reply::Done, None)
                }
                None => send(
                    sock,
                    &Reply::Refused {
                        reason: "no descriptor came with the mount".into(),
                    },
                    None,
                ),
            },
            Request::Release { mountpoint } => {
                self.held.retain(|h| h.mountpoint != mountpoint);
                send(sock, &Reply::Done, None)
            }
        };
        match sent {
            Ok(()) => self.daemon = Some(conn),
            Err(e) => {
                eprintln!("breakfs fuse-holder: answering the daemon: {e}");
                self.alone_since = Instant::now();
            }
        }
    }

    /// No daemon came back in time: unmount the held mounts (lazily: their
    /// users see ENOTCONN once the descriptors close) and let them go.
    fn give_up(&mut self, orphan_after: Duration) {
        for h in self.held.drain(..) {
            let ours = breakfs_fs::mount_type(&h.mountpoint)
                .is_some_and(|(fstype, device)| breakfs_fs::is_breakfs_type(&fstype, &device));
            if ours {
                let _ = nix::mount::umount2(&h.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
            breakfs_fs::remove_status(&h.mountpoint);
            eprintln!(
                "breakfs fuse-holder: no node daemon served {} for {} s: unmounted it",
                h.mountpoint.display(),
                orphan_after.as_secs()
            );
        }
    }
}

/// The daemon's side: its lease on the holder, and the requests on it.
pub(crate) struct HolderClient {
    conn: Mutex<OwnedFd>,
}

/// A mount the holder kept: where, what the daemon said about it, and the
/// descriptor of its connection.
pub(crate) type HeldConnection = (PathBuf, serde_json::Value, OwnedFd);

impl HolderClient {
    /// Connect to the holder of the store at `cache` (under `CACHE/holder`),
    /// starting it with `keep.holder` if none answers.
    pub(crate) fn start(keep: &KeepMounts, cache: &Path) -> Result<HolderClient> {
        let dir = cache.join("holder");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let socket = dir.join("holder.sock");
        let conn = match connect(&socket) {
            Ok(c) => c,
            Err(_) => spawn_holder(keep, &socket, &dir.join("holder.log"))?,
        };
        rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(ANSWER),
        )
        .map_err(|e| Error::io("setting the holder connection's timeout", e.into()))?;
        Ok(HolderClient {
            conn: Mutex::new(conn),
        })
    }

    /// Every mount the holder keeps (this daemon serves them from now on).
    pub(crate) fn take_back(&self) -> Result<Vec<HeldConnection>> {
        let conn = self.conn.lock();
        let what = "taking the held mounts back from the holder";
        send(conn.as_fd(), &Request::Hello, None).map_err(|e| Error::io(what, e))?;
        let mut held = Vec::new();
        loop {
            match recv::<Reply>(conn.as_fd()).map_err(|e| Error::io(what, e))? {
                Some((Reply::Held { mountpoint, meta }, Some(fd))) => {
                    held.push((mountpoint, meta, fd))
                }
                Some((Reply::Done, _)) => return Ok(held),
                Some((Reply::Refused { reason }, _)) => {
                    return Err(Error::io(what, std::io::Error::other(reason)));
                }
                Some((Reply::Held { mountpoint, .. }, None)) => {
                    tracing::error!(
                        "the holder sent {} without its descriptor",
                        mountpoint.display()
                    )
                }
                None => return Err(Error::io(what, std::io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// Hand the holder `fd`, the connection of the mount at `mountpoint`.
    pub(crate) fn hold(
        &self,
        mountpoint: &Path,
        meta: serde_json::Value,
        fd: BorrowedFd<'_>,
    ) -> Result<()> {
        let req = Request::Hold {
            mountpoint: mountpoint.to_path_buf(),
            meta,
        };
        self.ask(
            &req,
            Some(fd),
            &format!("handing {} to the holder", mountpoint.display()),
        )
    }

    /// Tell the holder the mount at `mountpoint` is gone.
    pub(crate) fn release(&self, mountpoint: &Path) -> Result<()> {
        let req = Request::Release {
            mountpoint: mountpoint.to_path_buf(),
        };
        self.ask(
            &req,
            None,
            &format!("telling the holder {} is unmounted", mountpoint.display()),
        )
    }

    fn ask(&self, req: &Request, fd: Option<BorrowedFd<'_>>, what: &str) -> Result<()> {
        let conn = self.conn.lock();
        send(conn.as_fd(), req, fd).map_err(|e| Error::io(what, e))?;
        match recv::<Reply>(conn.as_fd()).map_err(|e| Error::io(what, e))? {
            Some((Reply::Done, _)) => Ok(()),
            Some((Reply::Refused { reason }, _)) => {
                Err(Error::io(what, std::io::Error::other(reason)))
            }
            Some((Reply::Held { .. }, _)) | None => Err(Error::io(
                what,
                std::io::Error::other("the holder answered out of turn or went"),
            )),
        }
    }
}

/// Start the holder at `socket` (its own process group, so that a signal
/// to the daemon's group spares it; stderr to `log`) and connect to it.
fn spawn_holder(keep: &KeepMounts, socket: &Path, log: &Path) -> Result<OwnedFd> {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = keep.holder.split_first() else {
        return Err(Error::Control(
            "no command to start the mount holder with".into(),
        ));
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    let mut child = Command::new(program)
        .args(args)
        .arg(socket)
        .arg(keep.orphan_after.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the mount holder", e))?;
    let until = Instant::now() + ANSWER;
    loop {
        if let Ok(conn) = connect(socket) {
            // Reap it whenever it ends.
            std::thread::spawn(move || child.wait());
            return Ok(conn);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Control(format!(
                "the mount holder exited ({status}): {}",
                text.lines().last().unwrap_or("")
            )));
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Control(format!(
                "the mount holder did not listen on {} within {} s",
                socket.display(),
                ANSWER.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn client(cache: &Path) -> HolderClient {
        // No command: a holder must already listen.
        let keep = KeepMounts {
            orphan_after: Duration::from_secs(30),
            holder: Vec::new(),
        };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match HolderClient::start(&keep, cache) {
                Ok(c) => return c,
                Err(e) => assert!(Instant::now() < until, "no holder: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A held descriptor comes back to the next daemon as the same open
    /// file, with what the daemon said about it; one whose peer is gone
    /// (poll reports it) is let go; with nothing held and no daemon the
    /// holder exits and removes its socket.
    #[test]
    fn the_holder_keeps_descriptors_for_the_next_daemon_and_lets_go() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let socket = dir.path().join("holder/holder.sock");
        std::fs::create_dir_all(dir.path().join("holder")).expect("the holder dir");
        let at = socket.clone();
        let holder = std::thread::spawn(move || run_holder(&at, Duration::from_secs(30)));

        let first = client(dir.path());
        assert!(first.take_back().expect("hello").is_empty());
        let (kept_r, mut kept_w) = std::io::pipe().expect("a pipe");
        let (gone_r, gone_w) = std::io::pipe().expect("a pipe");
        let meta = serde_json::json!({ "image": "docker://reg/app@sha256:00" });
        first
            .hold(Path::new("/mnt/kept"), meta.clone(), kept_r.as_fd())
            .expect("hold");
        first
            .hold(Path::new("/mnt/gone"), meta.clone(), gone_r.as_fd())
            .expect("hold");
        drop((kept_r, gone_r));
        // The daemon dies; the peer of one held descriptor goes too.
        drop(first);
        drop(gone_w);

        let second = client(dir.path());
        let until = Instant::now() + Duration::from_secs(10);
        let held = loop {
            let held = second.take_back().expect("hello");
            if held.len() == 1 {
                break held;
            }
            assert!(Instant::now() < until, "{} held", held.len());
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mountpoint, got_meta, fd) = held.into_iter().next().expect("one");
        assert_eq!(mountpoint, Path::new("/mnt/kept"));
        assert_eq!(got_meta, meta);
        kept_w.write_all(b"same pipe").expect("write");
        let mut buf = [0u8; 9];
        std::fs::File::from(fd).read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"same pipe");

        second.release(Path::new("/mnt/kept")).expect("release");
        assert!(second.take_back().expect("hello").is_empty());
        drop(second);
        holder
            .join()
            .expect("the holder thread")
            .expect("the holder ends cleanly");
        assert!(!socket.exists(), "the holder left its socket");
    }
}
