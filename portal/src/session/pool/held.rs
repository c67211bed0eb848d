//! A server connection a pooled PostgreSQL client holds: the connection (which knows its
//! holder's place in the pool, woken when its backend is retired, and holds the server's bytes
//! not yet forwarded in its read buffer), its pool, and how much of a message is still to be
//! passed on. What is in flight on it is the client's [`Machine`](super::machine::Machine)'s
//! to know.
//!
//! May import: the rest of `pool`.

use std::sync::Arc;

use super::conn::ServerConn;
use super::server::Pool;

/// A server connection a client holds.
pub(super) struct Held {
    pub(super) conn: Box<ServerConn>,
    pub(super) pool: Arc<Pool>,
    /// Bytes of a server message being forwarded without inspection.
    pub(super) skip: usize,
}
