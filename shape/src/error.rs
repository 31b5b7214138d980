//! The one error type of the shaping proxy.

use std::net::SocketAddr;

/// What can go wrong running the shaping proxy ([`crate::run`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A route's address could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The SIGUSR1/SIGUSR2 handlers could not be installed.
    #[error("listening for SIGUSR1/SIGUSR2")]
    Signals(#[source] std::io::Error),
    /// The proxy stopped on an error.
    #[error("shaping proxy")]
    Proxy(#[source] std::io::Error),
}

/// Result with the shaping proxy's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
