//! A server connection a pooled PostgreSQL client holds, with what the client waits for from
//! it, in order: the server's answers, and the portal's own answers queued between them.
//!
//! May import: `wire` and the rest of `pool`.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::watch;

use super::conn::ServerConn;
use super::server::Pool;
use super::statements::Definition;

use crate::wire::postgres::ReadyStatus;

/// A server connection a client holds, with what is in flight on it.
pub(super) struct Held {
    pub(super) conn: ServerConn,
    pub(super) pool: Arc<Pool>,
    pub(super) retired: watch::Receiver<bool>,
    /// Server bytes not yet forwarded.
    pub(super) sbuf: Vec<u8>,
    /// Bytes of a server message being forwarded without inspection.
    pub(super) skip: usize,
    /// What the client waits for, in order.
    pub(super) expect: VecDeque<Expect>,
    pub(super) status: ReadyStatus,
}

/// What a client waits for from its server connection, in order.
pub(super) enum Expect {
    /// The response to a message sent to the server (`tag`): a Query or FunctionCall ends at
    /// ReadyForQuery, as a Sync does; an extended-protocol message at its own completion
    /// message or an error. `swallow`: the portal's own (a re-prepare, an LRU close), not
    /// forwarded unless it fails. `forget`: a Parse whose failure means the server lacks
    /// the statement.
    Server {
        tag: u8,
        swallow: bool,
        forget: Option<Definition>,
    },
    /// An answer of the portal's own, due once everything before it is answered.
    Local(Vec<u8>),
}

impl Held {
    /// Queries, Syncs and FunctionCalls whose ReadyForQuery has not come.
    pub(super) fn pending(&self) -> usize {
        self.expect
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Expect::Server {
                        tag: b'Q' | b'F' | b'S',
                        ..
                    }
                )
            })
            .count()
    }

    /// Extended-protocol messages sent since the last Sync.
    pub(super) fn extended(&self) -> bool {
        self.expect
            .iter()
            .rev()
            .find_map(|e| match e {
                Expect::Server { tag, .. } => Some(!matches!(tag, b'Q' | b'F' | b'S')),
                Expect::Local(_) => None,
            })
            .unwrap_or(false)
    }

    pub(super) fn waits_for_server(&self) -> bool {
        self.expect
            .iter()
            .any(|e| matches!(e, Expect::Server { .. }))
    }

    /// Whether `tag` from the server completes the response to `front`.
    pub(super) fn completes(front: u8, tag: u8) -> bool {
        match front {
            b'Q' | b'F' | b'S' => tag == b'Z',
            b'P' => tag == b'1',
            b'B' => tag == b'2',
            b'C' => tag == b'3',
            b'D' => matches!(tag, b'T' | b'n'),
            b'E' => matches!(tag, b'C' | b'I' | b's'),
            _ => false,
        }
    }
}

/// The Local answers now due (at the front of `expect`), moved to `out`.
pub(super) fn due_locals(expect: &mut VecDeque<Expect>, out: &mut Vec<u8>) {
    while let Some(Expect::Local(_)) = expect.front() {
        if let Some(Expect::Local(bytes)) = expect.pop_front() {
            out.extend_from_slice(&bytes);
        }
    }
}
