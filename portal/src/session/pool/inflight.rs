//! What a pooled PostgreSQL client waits for from the server connection it holds, in order
//! (pure): the answers to the messages sent there, which server message completes each, and
//! the portal's own answers queued between them; with the transaction status the server last
//! reported.
//!
//! May import: `wire` and the rest of `pool` (`statements`).

use std::collections::VecDeque;

use crate::wire::postgres::{
    backend::{
        BIND_COMPLETE, CLOSE_COMPLETE, COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, NO_DATA,
        PARSE_COMPLETE, PORTAL_SUSPENDED, READY_FOR_QUERY, ROW_DESCRIPTION,
    },
    ReadyStatus,
};

use super::statements::Definition;

/// A message sent to the server whose answer someone waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sent {
    Query,
    FunctionCall,
    Sync,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
}

impl Sent {
    /// A Query, FunctionCall or Sync: answered up to ReadyForQuery.
    pub(super) fn ends_at_ready(self) -> bool {
        matches!(self, Sent::Query | Sent::FunctionCall | Sent::Sync)
    }

    /// Whether a server message with `tag` completes the answer.
    pub(super) fn completed_by(self, tag: u8) -> bool {
        match self {
            Sent::Query | Sent::FunctionCall | Sent::Sync => tag == READY_FOR_QUERY,
            Sent::Parse => tag == PARSE_COMPLETE,
            Sent::Bind => tag == BIND_COMPLETE,
            Sent::Close => tag == CLOSE_COMPLETE,
            Sent::Describe => matches!(tag, ROW_DESCRIPTION | NO_DATA),
            Sent::Execute => matches!(
                tag,
                COMMAND_COMPLETE | EMPTY_QUERY_RESPONSE | PORTAL_SUSPENDED
            ),
        }
    }
}

/// What a client waits for from its server connection, in order.
#[derive(Debug)]
pub(super) enum Expect {
    /// The answer to a message sent to the server. `swallow`: the portal's own (a
    /// re-prepare, an LRU close), not forwarded unless it fails. `forget`: a Parse whose
    /// failure means the server lacks the statement.
    Server {
        sent: Sent,
        swallow: bool,
        forget: Option<Definition>,
    },
    /// An answer of the portal's own, due once everything before it is answered.
    Local(Vec<u8>),
}

/// What is in flight on the server connection the client holds.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) expect: VecDeque<Expect>,
    pub(super) status: ReadyStatus,
    /// Extended-protocol messages sent since the last Sync: the server keeps the unnamed
    /// statement and portal, and an implicit transaction, until a Sync ends them.
    pub(super) unsynced: bool,
    /// The client's unnamed statement is the one on this connection (a Parse of it was sent
    /// while the connection was held).
    pub(super) has_unnamed: bool,
}

impl InFlight {
    /// Queries, Syncs and FunctionCalls whose ReadyForQuery has not come.
    pub(super) fn pending(&self) -> usize {
        self.expect
            .iter()
            .filter(|e| matches!(e, Expect::Server { sent, .. } if sent.ends_at_ready()))
            .count()
    }

    /// Extended-protocol messages sent since the last Sync.
    pub(super) fn extended(&self) -> bool {
        self.expect
            .iter()
            .rev()
            .find_map(|e| match e {
                Expect::Server { sent, .. } => Some(!sent.ends_at_ready()),
                Expect::Local(_) => None,
            })
            .unwrap_or(false)
    }

    pub(super) fn waits_for_server(&self) -> bool {
        self.expect
            .iter()
            .any(|e| matches!(e, Expect::Server { .. }))
    }

    pub(super) fn wait(&mut self, sent: Sent, forget: Option<Definition>) {
        self.expect.push_back(Expect::Server {
            sent,
            swallow: false,
            forget,
        });
    }

    /// The Local answers now due (at the front), moved to `out`.
    pub(super) fn due_locals(&mut self, out: &mut Vec<u8>) {
        while let Some(Expect::Local(_)) = self.expect.front() {
            if let Some(Expect::Local(bytes)) = self.expect.pop_front() {
                out.extend_from_slice(&bytes);
            }
        }
    }
}
