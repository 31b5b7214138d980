//! The systemd readiness protocol (`sd_notify`), without libsystemd.
//!
//! A `Type=notify` service tells systemd it is ready (`READY=1`), that it is
//! stopping (`STOPPING=1`) or what it is doing (`STATUS=...`) by sending one
//! datagram to the Unix socket named in `$NOTIFY_SOCKET`: a filesystem path,
//! or an abstract socket name written with a leading `@`. Outside systemd the
//! variable is unset and notifying does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `"READY=1"`) to `$NOTIFY_SOCKET`; `Ok(false)` when
/// the variable is unset or empty (not run by systemd), `Ok(true)` once sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => {
            let socket = socket.into_string().map_err(|s| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={s:?} is not UTF-8: expected a path or @name"),
                )
            })?;
            notify_to(&socket, state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` as one datagram to `socket`: an absolute path, or
/// `@name` for the abstract socket `name` (as `$NOTIFY_SOCKET` spells them).
pub fn notify_to(socket: &str, state: &str) -> io::Result<()> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("notify socket {socket:?} is neither an absolute path nor an @abstract name"),
        ));
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "notify socket {socket} took {sent} of the {} bytes of {state:?}",
                state.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(receive(&listener), "READY=1");
        notify_to(path.to_str().unwrap(), "STATUS=serving 2 mounts").unwrap();
        assert_eq!(receive(&listener), "STATUS=serving 2 mounts");
    }

    #[test]
    fn sends_to_an_abstract_name() {
        // Abstract names are machine-wide: make this one unique.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("breakfs-notify-test-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn rejects_a_relative_path_and_reports_a_missing_socket() {
        let err = notify_to("notify.sock", "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody-listens.sock");
        assert!(notify_to(missing.to_str().unwrap(), "READY=1").is_err());
    }
}
