//! The decisions of a pooled PostgreSQL client, with no I/O (pure): [`Machine`] takes the
//! client's messages and its server connection's, and says what to forward, what the portal
//! answers itself, and when to take a server connection or give it back. The client's task
//! (`frontend.rs`, `backend.rs`) reads and writes around it.
//!
//! A transaction holds its server connection from its first message to the ReadyForQuery with
//! status `I` that ends it: through blocks (`T`, `E`), COPY, and an extended-protocol sequence
//! until its Sync. Session mode, and a client pinned by session state, hold it to the end.
//! With nothing in flight the portal answers a Sync, a statement Close, DEALLOCATE and a named
//! Parse followed by Sync itself. Named prepared statements are renamed per server connection
//! and prepared where missing. A lost server connection fails what was in flight on it.
//!
//! May import: `wire` and the rest of `pool` (`inflight`, `pinning`, `sql`,
//! `statements`).

use std::collections::{HashMap, VecDeque};

use crate::wire::postgres::{
    backend::{Backend, ERROR_RESPONSE, PARAMETER_STATUS, READY_FOR_QUERY},
    error_response,
    frontend::{Frontend, TargetKind},
    ready_for_query, ReadyStatus,
};

mod prepared;

use super::inflight::{Expect, InFlight, Sent};
use super::pinning::{self, PinReason};
use super::statements::{self, Definition, ServerStatements, Special};

/// Counters the task adds to the pool's statistics.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub(super) queries: u64,
    pub(super) prepared_hits: u64,
    pub(super) prepared_misses: u64,
    pub(super) failed_in_flight: u64,
    /// The client was just pinned, for this reason.
    pub(super) pinned: Option<PinReason>,
}

/// Bytes for the server connection and for the client, in order.
#[derive(Debug, Default)]
pub(super) struct Out {
    pub(super) server: Vec<u8>,
    pub(super) client: Vec<u8>,
}

/// What the task does after a client message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ClientStep {
    /// Done; on to the next message.
    Next,
    /// Done, with the Sync that follows it: skip that too.
    NextWithSync,
    /// Take a server connection ([`Machine::acquired`]) and give the same message again;
    /// when none comes, [`Machine::refuse`] it.
    Acquire,
    /// The client leaves.
    Terminate,
}

/// What the task does after a server message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ServerStep {
    Next,
    /// A FATAL error: the server ends the connection. Not forwarded (nor consumed): the
    /// client hears of it as a lost connection ([`Machine::on_server_lost`]).
    Ended,
}

/// What the task does after losing the server connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lost {
    /// The client carries on (after what was written for it, if anything).
    Continue,
    /// Part of a message reached the client: nothing more can be said in protocol.
    Close,
    /// The session's state is gone: FATAL with this text.
    Fatal(String),
}

/// The text a client gets at its first message after its transaction block was lost.
const LOST_TRANSACTION: &str = "the transaction was lost: its server connection closed (the leader changed); it was rolled back, start it again";

/// A pooled client's decisions.
pub(super) struct Machine {
    /// Transaction mode (else session mode).
    transaction: bool,
    max_prepared: usize,
    /// Session state keeps the client on its server connection until it disconnects.
    pinned: Option<PinReason>,
    /// After an error the portal made up in an extended-protocol sequence: skip to Sync.
    discard_until_sync: bool,
    /// The client's open transaction block was lost with its server connection (failover):
    /// its next message gets an error, then it starts afresh.
    lost_transaction: bool,
    /// The client's named prepared statements.
    statements: HashMap<Vec<u8>, Definition>,
    /// The client's unnamed statement, when a Sync ended the request that prepared it
    /// (libpq's `PQprepare(conn, "", …)`, psql's `\gdesc`): its Bind or Describe comes in a
    /// later request, which may run on another server connection.
    unnamed: Option<Definition>,
    /// The reported parameters the client gave at startup: what its `RESET` returns them to
    /// (a server connection's own startup values are the server's defaults).
    startup_values: Vec<(String, String)>,
    /// What is in flight on the held server connection; `None` when none is held.
    held: Option<InFlight>,
    /// Counters not yet added to the pool's statistics.
    pub(super) tally: Tally,
}

impl Machine {
    pub(super) fn new(transaction: bool, max_prepared: usize) -> Machine {
        Machine {
            transaction,
            max_prepared,
            pinned: None,
            discard_until_sync: false,
            lost_transaction: false,
            statements: HashMap::new(),
            unnamed: None,
            startup_values: Vec::new(),
            held: None,
            tally: Tally::default(),
        }
    }

    /// The reported parameters the client gave at startup (names as the server reports them).
    pub(super) fn set_startup_values(
        &mut self,
        values: &std::collections::BTreeMap<String, String>,
    ) {
        self.startup_values = values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }

    /// Why the client is pinned, if it is.
    pub(super) fn pinned(&self) -> Option<PinReason> {
        self.pinned
    }

    /// A server connection is held now.
    /// `expect` is an empty queue to use (its capacity kept with the connection).
    pub(super) fn acquired(&mut self, expect: VecDeque<Expect>) {
        self.held = Some(InFlight {
            expect,
            status: ReadyStatus::Idle,
            unsynced: false,
            has_unnamed: false,
        });
    }

    /// The server connection was let go.
    /// Gives back the queue of what was in flight (empty when the connection is clean).
    pub(super) fn released(&mut self) -> Option<VecDeque<Expect>> {
        self.held.take().map(|h| h.expect)
    }

    /// Whether the held connection has nothing in flight, no transaction open and no
    /// extended-protocol sequence waiting for its Sync.
    pub(super) fn is_clean(&self) -> bool {
        self.held
            .as_ref()
            .is_none_or(|h| h.expect.is_empty() && h.status == ReadyStatus::Idle && !h.unsynced)
    }

    /// Whether the connection is to be given back now: a transaction ended (transaction mode,
    /// not pinned). The task also needs every server byte forwarded.
    pub(super) fn release_due(&self) -> bool {
        self.transaction && self.pinned.is_none() && self.held.is_some() && self.is_clean()
    }

    /// Whether the session keeps its server connection to the end (session mode, or pinned):
    /// it is reset with DISCARD ALL before it goes back.
    pub(super) fn keeps_connection(&self) -> bool {
        !self.transaction || self.pinned.is_some()
    }

    /// One message from the client. `raw` is the whole message, `then_sync` whether a Sync
    /// follows it in what was read, `conn` the statements of the held connection's server.
    pub(super) fn on_client(
        &mut self,
        msg: Frontend<'_>,
        raw: &[u8],
        then_sync: bool,
        conn: Option<&mut ServerStatements>,
        out: &mut Out,
    ) -> ClientStep {
        if self.discard_until_sync {
            if msg == Frontend::Sync {
                self.discard_until_sync = false;
                out.client
                    .extend_from_slice(&ready_for_query(ReadyStatus::Idle));
            }
            return ClientStep::Next;
        }
        if msg == Frontend::Terminate {
            return ClientStep::Terminate;
        }
        if self.lost_transaction {
            self.lost_transaction = false;
            self.refuse(msg, "ERROR", "08006", LOST_TRANSACTION, &mut out.client);
            return ClientStep::Next;
        }
        let Some(conn) = conn.filter(|_| self.held.is_some()) else {
            match msg {
                // A Sync or Flush with nothing in flight: nothing to take a connection for.
                Frontend::Sync => {
                    out.client
                        .extend_from_slice(&ready_for_query(ReadyStatus::Idle));
                    return ClientStep::Next;
                }
                Frontend::Flush
                | Frontend::CopyData(_)
                | Frontend::CopyDone
                | Frontend::CopyFail { .. } => return ClientStep::Next,
                _ => {}
            }
            // A named Parse then Sync with nothing in flight (libpq's PQprepare): the
            // statement is recorded and prepared on a server connection when it is first
            // used, so a client preparing never waits for a connection (a client in an open
            // transaction may be the one to give one back). An invalid statement fails at its
            // first use.
            if then_sync {
                if let Some(answer) = self.prepare_locally(msg) {
                    out.client.extend_from_slice(&answer);
                    return ClientStep::NextWithSync;
                }
            }
            // Closing a statement or DEALLOCATE with nothing in flight: answered here.
            if let Some(answer) = self.answer_locally(msg) {
                out.client.extend_from_slice(&answer);
                return ClientStep::Next;
            }
            return ClientStep::Acquire;
        };
        if let Frontend::Parse {
            name: b"",
            query,
            definition,
        } = msg
        {
            if statements::special(query).is_none() {
                self.unnamed = then_sync.then(|| definition.into());
                self.in_flight().has_unnamed = true;
            }
        }
        self.forward(msg, raw, conn, out);
        ClientStep::Next
    }

    /// The portal's answer to a message it cannot forward: an ErrorResponse, then what ends
    /// the client's sequence (ReadyForQuery for a query, skipping to Sync for extended
    /// protocol).
    pub(super) fn refuse(
        &mut self,
        msg: Frontend<'_>,
        severity: &str,
        sqlstate: &str,
        text: &str,
        client: &mut Vec<u8>,
    ) {
        client.extend_from_slice(&error_response(severity, sqlstate, text));
        match msg {
            Frontend::Query { .. } | Frontend::Sync | Frontend::FunctionCall { .. } => {
                client.extend_from_slice(&ready_for_query(ReadyStatus::Idle))
            }
            Frontend::Parse { .. }
            | Frontend::Bind { .. }
            | Frontend::Describe { .. }
            | Frontend::Execute { .. }
            | Frontend::Close { .. }
            | Frontend::Flush => self.discard_until_sync = true,
            _ => {}
        }
    }

    /// Queues the client's message for the held server connection, with named statements
    /// renamed to the server's; answers that are due at once go to the client.
    fn forward(
        &mut self,
        msg: Frontend<'_>,
        raw: &[u8],
        conn: &mut ServerStatements,
        out: &mut Out,
    ) {
        if self.transaction && self.pinned.is_none() {
            if let Some(reason) = msg.sql().and_then(pinning::pin_reason) {
                self.pinned = Some(reason);
                self.tally.pinned = Some(reason);
            }
        }
        match msg {
            Frontend::Sync => self.in_flight().unsynced = false,
            Frontend::Parse { .. }
            | Frontend::Bind { .. }
            | Frontend::Describe { .. }
            | Frontend::Execute { .. }
            | Frontend::Close { .. }
            | Frontend::Flush => self.in_flight().unsynced = true,
            _ => {}
        }
        let mut as_is = true;
        match msg {
            Frontend::Query { sql } => {
                self.tally.queries += 1;
                if let Some(answer) = self.answer_locally(msg) {
                    self.in_flight().expect.push_back(Expect::Local(answer));
                    as_is = false;
                } else if let Some(set) = self.after_reset(sql) {
                    // The client's RESET, then the portal's own SET (answer swallowed; the
                    // ParameterStatus it brings reaches the client).
                    out.server.extend_from_slice(raw);
                    out.server.extend_from_slice(
                        &Frontend::Query {
                            sql: set.as_bytes(),
                        }
                        .to_bytes(),
                    );
                    if statements::special(sql) == Some(Special::DiscardAll) {
                        self.statements.clear();
                        conn.clear();
                    }
                    let h = self.in_flight();
                    h.wait(Sent::Query, None);
                    h.expect.push_back(Expect::Server {
                        sent: Sent::Query,
                        swallow: true,
                        forget: None,
                    });
                    as_is = false;
                } else {
                    if let Some(Special::DiscardAll | Special::DeallocateAll) =
                        statements::special(sql)
                    {
                        // The server forgets every prepared statement, the portal's too.
                        self.statements.clear();
                        conn.clear();
                    }
                    self.in_flight().wait(Sent::Query, None);
                }
            }
            Frontend::Sync => self.in_flight().wait(Sent::Sync, None),
            Frontend::FunctionCall { .. } => self.in_flight().wait(Sent::FunctionCall, None),
            Frontend::Execute { .. } => {
                self.tally.queries += 1;
                self.in_flight().wait(Sent::Execute, None);
            }
            Frontend::Parse {
                name,
                query,
                definition,
            } => as_is = self.forward_parse(name, query, definition, conn, &mut out.server),
            Frontend::Bind {
                portal,
                statement,
                rest,
            } => {
                if statement.is_empty() {
                    self.ensure_unnamed(&mut out.server);
                }
                let named = (!statement.is_empty())
                    .then(|| self.statements.get(statement).cloned())
                    .flatten();
                if let Some(def) = named {
                    let server_name = self.ensure(&def, conn, &mut out.server);
                    out.server.extend_from_slice(&statements::bind_message(
                        portal,
                        &server_name,
                        rest,
                    ));
                    as_is = false;
                }
                self.in_flight().wait(Sent::Bind, None);
            }
            Frontend::Describe { kind, name } => {
                if kind == TargetKind::Statement && name.is_empty() {
                    self.ensure_unnamed(&mut out.server);
                }
                let named = (kind == TargetKind::Statement && !name.is_empty())
                    .then(|| self.statements.get(name).cloned())
                    .flatten();
                if let Some(def) = named {
                    let server_name = self.ensure(&def, conn, &mut out.server);
                    out.server
                        .extend_from_slice(&statements::describe_statement(&server_name));
                    as_is = false;
                }
                self.in_flight().wait(Sent::Describe, None);
            }
            Frontend::Close { .. } => {
                if let Some(answer) = self.answer_locally(msg) {
                    self.in_flight().expect.push_back(Expect::Local(answer));
                    as_is = false;
                } else {
                    self.in_flight().wait(Sent::Close, None);
                }
            }
            // Flush, COPY data, done and fail: no answer of their own.
            _ => {}
        }
        if as_is {
            out.server.extend_from_slice(raw);
        }
        let h = self.in_flight();
        if !h.waits_for_server() {
            h.due_locals(&mut out.client);
        }
    }

    fn in_flight(&mut self) -> &mut InFlight {
        self.held.as_mut().expect("a server connection is held")
    }

    /// Whether a server message with `tag` goes to the client as it is and changes nothing
    /// here, so that the task may pass it on without decoding it or calling
    /// [`Machine::on_server`] (which would do the same): while the answer at the front is the
    /// client's (not the portal's own), any message that does not complete it, except those
    /// the machine reads (ParameterStatus, ErrorResponse, ReadyForQuery).
    pub(super) fn passes_through(&self, tag: u8) -> bool {
        let front = self.held.as_ref().and_then(|h| h.expect.front());
        let Some(Expect::Server {
            sent,
            swallow: false,
            ..
        }) = front
        else {
            return false;
        };
        !matches!(tag, PARAMETER_STATUS | ERROR_RESPONSE | READY_FOR_QUERY)
            && !sent.completed_by(tag)
    }

    /// One complete message from the held server connection (`raw` the whole of it): what
    /// goes to the client, following ReadyForQuery and the answers the client waits for (the
    /// portal's own answers go in between, its own messages' answers are dropped).
    pub(super) fn on_server(
        &mut self,
        msg: Backend<'_>,
        raw: &[u8],
        conn: &mut ServerStatements,
        client: &mut Vec<u8>,
    ) -> ServerStep {
        let h = self.in_flight();
        match msg {
            Backend::ParameterStatus { .. }
            | Backend::NoticeResponse(_)
            | Backend::NotificationResponse { .. } => {
                client.extend_from_slice(raw);
                return ServerStep::Next;
            }
            // A FATAL error ends the server connection, not the client's session.
            Backend::ErrorResponse(fields) if fields.is_fatal() => return ServerStep::Ended,
            Backend::ReadyForQuery(status) => h.status = status,
            _ => {}
        }
        h.due_locals(client);
        let Some(Expect::Server {
            sent: front,
            swallow,
            ..
        }) = h.expect.front()
        else {
            // Nothing expected (a server speaking out of turn): passed on.
            client.extend_from_slice(raw);
            return ServerStep::Next;
        };
        let (front, swallow) = (*front, *swallow);
        if matches!(msg, Backend::ErrorResponse(_)) && !front.ends_at_ready() {
            // An extended-protocol message failed: the server skips to the next Sync, and so
            // do the answers the client waits for.
            client.extend_from_slice(raw);
            while let Some(e) = h.expect.front() {
                if matches!(
                    e,
                    Expect::Server {
                        sent: Sent::Sync,
                        ..
                    }
                ) {
                    break;
                }
                if let Some(Expect::Server {
                    forget: Some(def), ..
                }) = h.expect.pop_front()
                {
                    conn.remove(&def);
                }
            }
            return ServerStep::Next;
        }
        if let Backend::ReadyForQuery(_) = msg {
            // Completes the Query or Sync at the front (and anything left before it); the
            // portal's own query's ReadyForQuery is not the client's.
            let mut own = false;
            while let Some(e) = h.expect.pop_front() {
                match e {
                    Expect::Server { sent, swallow, .. } if sent.ends_at_ready() => {
                        own = swallow;
                        break;
                    }
                    Expect::Local(bytes) => client.extend_from_slice(&bytes),
                    Expect::Server { .. } => {}
                }
            }
            if !own {
                client.extend_from_slice(raw);
            }
        } else if front.completed_by(raw[0]) {
            h.expect.pop_front();
            if !swallow {
                client.extend_from_slice(raw);
            }
        } else if !swallow {
            client.extend_from_slice(raw);
        }
        h.due_locals(client);
        ServerStep::Next
    }

    /// The held connection is gone (closed, broken, or its backend stopped leading; `midway`:
    /// part of a message reached the client): what was in flight fails with an ErrorResponse;
    /// a client idle between transactions notices nothing. Session mode ends the session: its
    /// state is gone.
    pub(super) fn on_server_lost(&mut self, why: &str, midway: bool, client: &mut Vec<u8>) -> Lost {
        let Some(h) = self.held.take() else {
            return Lost::Continue;
        };
        if midway {
            return Lost::Close;
        }
        if self.keeps_connection() {
            return Lost::Fatal(format!("{why}: the session's server connection was closed"));
        }
        let (pending, extended) = (h.pending(), h.extended());
        if pending > 0 || extended {
            self.tally.failed_in_flight += 1;
            client.extend_from_slice(&error_response(
                "ERROR",
                "08006",
                &format!("{why}: the transaction in flight was rolled back or may not have completed; start it again"),
            ));
            for _ in 0..pending {
                client.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
            }
            self.discard_until_sync = extended;
        } else if h.status != ReadyStatus::Idle {
            self.tally.failed_in_flight += 1;
            self.lost_transaction = true;
        }
        Lost::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::postgres::{
        backend::{is_streamed, CopyFormat, Fields},
        frame, query, HEADER_LEN, MAX_MESSAGE,
    };

    /// A client's machine driven as its task drives it: byte scripts in, bytes and the
    /// connection's comings and goings out.
    struct Script {
        m: Machine,
        conn: ServerStatements,
        held: bool,
        /// What happened to the server connection, in order: `+` taken, `-` given back.
        events: String,
        /// The tags of the server's messages the task would pass on without the machine.
        passed: String,
    }

    /// The tags of the messages in `bytes`, as text (`SELECT`'s answer reads `TDCZ`).
    fn tags(bytes: &[u8]) -> String {
        let mut out = String::new();
        let mut rest = bytes;
        while let Some(n) = frame(rest, MAX_MESSAGE).unwrap() {
            out.push(rest[0] as char);
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "a partial message");
        out
    }

    fn ready(status: ReadyStatus) -> Vec<u8> {
        ready_for_query(status).to_vec()
    }

    fn complete(tag: &str) -> Vec<u8> {
        Backend::CommandComplete {
            tag: tag.as_bytes(),
        }
        .to_bytes()
    }

    /// A row of one column and its description.
    fn rows(n: usize) -> Vec<u8> {
        let mut out = Backend::RowDescription {
            fields: 1,
            body: b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        }
        .to_bytes();
        for _ in 0..n {
            out.extend(
                Backend::DataRow {
                    columns: 1,
                    body: b"\0\x01\0\0\0\x011",
                }
                .to_bytes(),
            );
        }
        out
    }

    fn error(severity: &str) -> Vec<u8> {
        error_response(severity, "42601", "syntax error")
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut def = sql.as_bytes().to_vec();
        def.extend_from_slice(&[0, 0, 0]);
        statements::parse_message(name, &def)
    }

    fn bind(statement: &str) -> Vec<u8> {
        statements::bind_message(b"", statement, &[0, 0, 0, 0, 0, 0])
    }

    fn execute() -> Vec<u8> {
        Frontend::Execute {
            portal: b"",
            max_rows: 0,
        }
        .to_bytes()
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    impl Script {
        /// A client in transaction mode (`true`) or session mode, which holds a server
        /// connection from its login on.
        fn new(transaction: bool) -> Script {
            let mut s = Script {
                m: Machine::new(transaction, 100),
                conn: ServerStatements::default(),
                held: false,
                events: String::new(),
                passed: String::new(),
            };
            if !transaction {
                s.m.acquired(VecDeque::new());
                s.held = true;
            }
            s
        }

        /// The client sends `bytes`: what goes to the server, what the client gets, and the
        /// last step.
        fn client(&mut self, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, ClientStep) {
            let mut out = Out::default();
            let mut pos = 0;
            let mut last = ClientStep::Next;
            while let Some(n) = frame(&bytes[pos..], MAX_MESSAGE).unwrap() {
                let raw = &bytes[pos..pos + n];
                let msg = Frontend::decode(raw[0], &raw[HEADER_LEN..]).unwrap();
                let then_sync =
                    crate::wire::postgres::frontend::starts_with_sync(&bytes[pos + n..]);
                let conn = self.held.then_some(&mut self.conn);
                last = self.m.on_client(msg, raw, then_sync, conn, &mut out);
                if last == ClientStep::Acquire {
                    self.m.acquired(VecDeque::new());
                    self.held = true;
                    self.events.push('+');
                    last = self
                        .m
                        .on_client(msg, raw, then_sync, Some(&mut self.conn), &mut out);
                }
                match last {
                    ClientStep::NextWithSync => pos += n + HEADER_LEN,
                    ClientStep::Terminate => break,
                    _ => pos += n,
                }
            }
            (out.server, out.client, last)
        }

        /// The server sends `bytes`: what the client gets (rows and COPY data streamed past
        /// the machine, as the task does); the connection is given back when due.
        fn server(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut client = Vec::new();
            let mut rest = bytes;
            while let Some(n) = frame(rest, MAX_MESSAGE).unwrap() {
                let raw = &rest[..n];
                if is_streamed(raw[0]) {
                    client.extend_from_slice(raw);
                } else {
                    let msg = Backend::decode(raw[0], &raw[HEADER_LEN..]).unwrap();
                    // What the task passes on without the machine, the machine would pass on
                    // as it is, changing nothing.
                    let state = |m: &Machine| format!("{:?} {:?} {:?}", m.held, m.tally, m.pinned);
                    let passed = self.m.passes_through(raw[0]).then(|| state(&self.m));
                    let at = client.len();
                    let step = self.m.on_server(msg, raw, &mut self.conn, &mut client);
                    assert_eq!(step, ServerStep::Next);
                    if let Some(before) = passed {
                        assert_eq!(
                            &client[at..],
                            raw,
                            "{} not passed on as it is",
                            raw[0] as char
                        );
                        assert_eq!(
                            state(&self.m),
                            before,
                            "{} changed the state",
                            raw[0] as char
                        );
                        self.passed.push(raw[0] as char);
                    }
                }
                rest = &rest[n..];
            }
            if self.m.release_due() {
                self.m.released();
                self.held = false;
                self.events.push('-');
            }
            client
        }
    }

    #[test]
    fn a_simple_query_holds_a_connection_until_ready_for_query() {
        let mut s = Script::new(true);
        let (server, client, step) = s.client(&query("SELECT 1"));
        assert_eq!(
            (tags(&server), client.len(), step),
            ("Q".into(), 0, ClientStep::Next)
        );
        assert_eq!(s.events, "+");
        let answer = cat(&[&rows(1), &complete("SELECT 1")]);
        assert_eq!(tags(&s.server(&answer)), "TDC");
        assert_eq!(
            s.passed, "TC",
            "the description and the completion pass on as they are"
        );
        assert_eq!(s.events, "+", "no ReadyForQuery yet");
        assert_eq!(tags(&s.server(&ready(ReadyStatus::Idle))), "Z");
        assert_eq!(s.events, "+-");
        assert_eq!(s.m.tally.queries, 1);
    }

    #[test]
    fn a_block_holds_its_connection_from_begin_to_commit() {
        let mut s = Script::new(true);
        s.client(&query("BEGIN"));
        s.server(&cat(&[
            &complete("BEGIN"),
            &ready(ReadyStatus::InTransaction),
        ]));
        s.client(&query("SELECT 1"));
        s.server(&cat(&[
            &rows(1),
            &complete("SELECT 1"),
            &ready(ReadyStatus::InTransaction),
        ]));
        assert_eq!(s.events, "+");
        assert!(!s.m.is_clean());
        let (server, _, _) = s.client(&query("COMMIT"));
        assert_eq!(tags(&server), "Q");
        let client = s.server(&cat(&[&complete("COMMIT"), &ready(ReadyStatus::Idle)]));
        assert_eq!((tags(&client), s.events.as_str()), ("CZ".into(), "+-"));
    }

    #[test]
    fn an_error_in_a_block_keeps_the_connection_until_rollback() {
        let mut s = Script::new(true);
        s.client(&query("BEGIN"));
        s.server(&cat(&[
            &complete("BEGIN"),
            &ready(ReadyStatus::InTransaction),
        ]));
        s.client(&query("SELEC 1"));
        let client = s.server(&cat(&[&error("ERROR"), &ready(ReadyStatus::Failed)]));
        assert_eq!((tags(&client), s.events.as_str()), ("EZ".into(), "+"));
        s.client(&query("ROLLBACK"));
        s.server(&cat(&[&complete("ROLLBACK"), &ready(ReadyStatus::Idle)]));
        assert_eq!(s.events, "+-");
    }

    #[test]
    fn an_extended_sequence_runs_to_its_sync() {
        let mut s = Script::new(true);
        let describe = Frontend::Describe {
            kind: TargetKind::Portal,
            name: b"",
        }
        .to_bytes();
        let sequence = cat(&[
            &parse("", "SELECT 1"),
            &bind(""),
            &describe,
            &execute(),
            &Frontend::Sync.to_bytes(),
        ]);
        let (server, client, _) = s.client(&sequence);
        assert_eq!((tags(&server), client.len()), ("PBDES".into(), 0));
        let answer = cat(&[
            &Backend::ParseComplete.to_bytes(),
            &Backend::BindComplete.to_bytes(),
            &rows(2),
            &complete("SELECT 2"),
        ]);
        assert_eq!(tags(&s.server(&answer)), "12TDDC");
        assert_eq!(s.passed, "", "each of them completes an answer waited for");
        assert_eq!(s.events, "+", "the Sync is not answered yet");
        assert_eq!(tags(&s.server(&ready(ReadyStatus::Idle))), "Z");
        assert_eq!(s.events, "+-");
        // An error skips the rest of the answers to the Sync, and the Sync's answer ends it.
        let (server, _, _) = s.client(&sequence);
        assert_eq!(tags(&server), "PBDES");
        let client = s.server(&cat(&[&error("ERROR"), &ready(ReadyStatus::Idle)]));
        assert_eq!((tags(&client), s.events.as_str()), ("EZ".into(), "+-+-"));
    }

    #[test]
    fn an_extended_sequence_with_flush_is_answered_as_it_goes() {
        let mut s = Script::new(true);
        let sequence = cat(&[
            &parse("", "SELECT 1"),
            &bind(""),
            &execute(),
            &Frontend::Flush.to_bytes(),
        ]);
        let (server, _, _) = s.client(&sequence);
        assert_eq!((tags(&server), s.events.as_str()), ("PBEH".into(), "+"));
        let client = s.server(&cat(&[
            &Backend::ParseComplete.to_bytes(),
            &Backend::BindComplete.to_bytes(),
        ]));
        assert_eq!((tags(&client), s.events.as_str()), ("12".into(), "+"));
        // Every answer in, but no Sync yet: the unnamed statement and portal and the implicit
        // transaction are still on the connection, which stays with this client.
        let client = s.server(&cat(&[&rows(1), &complete("SELECT 1")]));
        assert_eq!((tags(&client), s.events.as_str()), ("TDC".into(), "+"));
        let (server, _, _) = s.client(&Frontend::Sync.to_bytes());
        assert_eq!((tags(&server), s.events.as_str()), ("S".into(), "+"));
        assert_eq!(tags(&s.server(&ready(ReadyStatus::Idle))), "Z");
        assert_eq!(s.events, "+-", "given back after the Sync's ReadyForQuery");
        // A Sync or Flush with nothing held is the portal's to answer.
        let mut idle = Script::new(true);
        let (server, client, _) = idle.client(&Frontend::Sync.to_bytes());
        assert_eq!((tags(&server), tags(&client)), ("".into(), "Z".into()));
        let (server, client, _) = idle.client(&Frontend::Flush.to_bytes());
        assert_eq!(
            (server.len(), client.len(), idle.events.as_str()),
            (0, 0, "")
        );
    }

    #[test]
    fn copy_from_stdin_and_to_stdout() {
        let mut s = Script::new(true);
        s.client(&query("COPY t FROM STDIN"));
        let format = CopyFormat {
            format: 0,
            columns: &[0, 0],
        };
        let client = s.server(&Backend::CopyInResponse(format).to_bytes());
        assert_eq!((tags(&client), s.events.as_str()), ("G".into(), "+"));
        let data = cat(&[
            &Frontend::CopyData(b"1\n").to_bytes(),
            &Frontend::CopyData(b"2\n").to_bytes(),
            &Frontend::CopyDone.to_bytes(),
        ]);
        let (server, _, _) = s.client(&data);
        assert_eq!(tags(&server), "ddc");
        let client = s.server(&cat(&[&complete("COPY 2"), &ready(ReadyStatus::Idle)]));
        assert_eq!((tags(&client), s.events.as_str()), ("CZ".into(), "+-"));

        s.client(&query("COPY t TO STDOUT"));
        let answer = cat(&[
            &Backend::CopyOutResponse(format).to_bytes(),
            &Backend::CopyData(b"1\n").to_bytes(),
            &Backend::CopyDone.to_bytes(),
            &complete("COPY 1"),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(tags(&s.server(&answer)), "HdcCZ");
        assert_eq!(s.events, "+-+-");
    }

    #[test]
    fn a_pinning_statement_keeps_the_connection_in_transaction_mode() {
        let mut s = Script::new(true);
        s.client(&query("LISTEN jobs"));
        assert_eq!(s.m.tally.pinned, Some(PinReason::Listen));
        s.server(&cat(&[&complete("LISTEN"), &ready(ReadyStatus::Idle)]));
        assert_eq!(s.events, "+");
        assert!(s.m.keeps_connection() && s.m.is_clean());
        // A notification between queries is passed on.
        let notify = Backend::NotificationResponse {
            pid: 1,
            channel: b"jobs",
            payload: b"",
        }
        .to_bytes();
        assert_eq!(tags(&s.server(&notify)), "A");
    }

    #[test]
    fn session_mode_holds_the_connection_throughout() {
        let mut s = Script::new(false);
        s.client(&query("SELECT 1"));
        s.server(&cat(&[
            &rows(1),
            &complete("SELECT 1"),
            &ready(ReadyStatus::Idle),
        ]));
        assert_eq!(s.events, "");
        assert!(s.held && s.m.keeps_connection());
        let mut out = Vec::new();
        let lost = s.m.on_server_lost("gone", false, &mut out);
        assert!(matches!(lost, Lost::Fatal(t) if t.contains("session's server connection")));
    }

    #[test]
    fn terminate_mid_transaction_leaves_it_unclean() {
        let mut s = Script::new(true);
        s.client(&query("BEGIN"));
        s.server(&cat(&[
            &complete("BEGIN"),
            &ready(ReadyStatus::InTransaction),
        ]));
        let (server, _, step) =
            s.client(&cat(&[&query("SELECT 1"), &Frontend::Terminate.to_bytes()]));
        assert_eq!((tags(&server), step), ("Q".into(), ClientStep::Terminate));
        assert!(
            !s.m.is_clean(),
            "a connection left mid-transaction is closed"
        );
    }

    #[test]
    fn a_lost_connection_fails_the_transaction_in_flight() {
        // Lost with an open block and nothing in flight: the next message hears of it.
        let mut s = Script::new(true);
        s.client(&query("BEGIN"));
        s.server(&cat(&[
            &complete("BEGIN"),
            &ready(ReadyStatus::InTransaction),
        ]));
        let mut out = Vec::new();
        assert_eq!(
            s.m.on_server_lost("failover", false, &mut out),
            Lost::Continue
        );
        s.held = false;
        assert_eq!((out.len(), s.m.tally.failed_in_flight), (0, 1));
        let (server, client, _) = s.client(&query("SELECT 1"));
        assert_eq!((server.len(), tags(&client)), (0, "EZ".into()));
        assert_eq!(s.events, "+", "no connection taken for the refused message");
        s.client(&query("SELECT 1"));
        assert_eq!(s.events, "++");

        // Lost with a query in flight: an error and its ReadyForQuery at once.
        let mut s = Script::new(true);
        s.client(&query("SELECT pg_sleep(10)"));
        let mut out = Vec::new();
        assert_eq!(
            s.m.on_server_lost("failover", false, &mut out),
            Lost::Continue
        );
        assert_eq!(tags(&out), "EZ");

        // Lost in an extended sequence: an error, then the rest is skipped to the Sync.
        let mut s = Script::new(true);
        s.client(&cat(&[&parse("", "SELECT 1"), &bind("")]));
        let mut out = Vec::new();
        s.m.on_server_lost("failover", false, &mut out);
        s.held = false;
        assert_eq!(tags(&out), "E");
        let (server, client, _) = s.client(&cat(&[&execute(), &Frontend::Sync.to_bytes()]));
        assert_eq!((server.len(), tags(&client)), (0, "Z".into()));

        // Part of a row reached the client: nothing more can be said.
        let mut s = Script::new(true);
        s.client(&query("SELECT 1"));
        assert_eq!(s.m.on_server_lost("x", true, &mut Vec::new()), Lost::Close);

        // A FATAL error from the server ends the connection, unforwarded.
        let mut s = Script::new(true);
        s.client(&query("SELECT 1"));
        let fatal = error("FATAL");
        let msg = Backend::decode(fatal[0], &fatal[HEADER_LEN..]).unwrap();
        let mut client = Vec::new();
        assert_eq!(
            s.m.on_server(msg, &fatal, &mut s.conn, &mut client),
            ServerStep::Ended
        );
        assert!(client.is_empty());
    }

    #[test]
    fn named_statements_are_prepared_where_they_are_used() {
        let mut s = Script::new(true);
        // PQprepare with nothing held: answered by the portal.
        let (server, client, step) = s.client(&cat(&[
            &parse("s1", "SELECT $1"),
            &Frontend::Sync.to_bytes(),
        ]));
        assert_eq!(
            (server.len(), tags(&client), step, s.events.as_str()),
            (0, "1Z".into(), ClientStep::NextWithSync, "")
        );
        // Its first use prepares it on the connection under the portal's name, unseen.
        let (server, _, _) = s.client(&cat(&[&bind("s1"), &execute(), &Frontend::Sync.to_bytes()]));
        assert_eq!(tags(&server), "PBES");
        assert!(server.windows(10).any(|w| w == b"dbportal_1"));
        let answer = cat(&[
            &Backend::ParseComplete.to_bytes(),
            &Backend::BindComplete.to_bytes(),
            &complete("SELECT 1"),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(
            tags(&s.server(&answer)),
            "2CZ",
            "the portal's Parse is swallowed"
        );
        assert_eq!((s.m.tally.prepared_misses, s.events.as_str()), (1, "+-"));
        // Closing it, and DEALLOCATE of one of the client's protocol-level statements, with
        // nothing held: answered by the portal.
        let close = Frontend::Close {
            kind: TargetKind::Statement,
            name: b"s1",
        }
        .to_bytes();
        let (server, client, _) = s.client(&close);
        assert_eq!((server.len(), tags(&client)), (0, "3".into()));
        s.client(&cat(&[
            &parse("s2", "SELECT 2"),
            &Frontend::Sync.to_bytes(),
        ]));
        let (server, client, _) = s.client(&query("DEALLOCATE s2"));
        assert_eq!((server.len(), tags(&client)), (0, "CZ".into()));
        assert_eq!(s.events, "+-");
        // Another name (an SQL-level PREPARE) and DEALLOCATE ALL are the server's to answer.
        for sql in ["DEALLOCATE q1", "DEALLOCATE ALL"] {
            let (server, client, _) = s.client(&query(sql));
            assert_eq!((tags(&server), client.len()), ("Q".into(), 0), "{sql}");
            let answer = cat(&[&complete("DEALLOCATE"), &ready(ReadyStatus::Idle)]);
            assert_eq!(tags(&s.server(&answer)), "CZ");
        }
        assert_eq!(s.events, "+-+-+-");
    }

    /// psql's `\gdesc`: the unnamed statement prepared in one request (Parse, Sync) and
    /// described in the next, which takes a connection anew: the portal prepares it there
    /// first, unseen. Within one request, or after a Parse not ended by Sync, as it is.
    #[test]
    fn the_unnamed_statement_follows_the_client_to_its_next_request() {
        let mut s = Script::new(true);
        let (server, _, _) = s.client(&cat(&[&parse("", "SELECT 1"), &Frontend::Sync.to_bytes()]));
        assert_eq!(tags(&server), "PS");
        let done = cat(&[
            &Backend::ParseComplete.to_bytes(),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(tags(&s.server(&done)), "1Z");
        let describe = Frontend::Describe {
            kind: TargetKind::Statement,
            name: b"",
        }
        .to_bytes();
        let (server, _, _) = s.client(&cat(&[&describe, &Frontend::Sync.to_bytes()]));
        assert_eq!(tags(&server), "PDS", "prepared again on the new connection");
        assert!(server.windows(8).any(|w| w == b"SELECT 1"));
        let answer = cat(&[
            &Backend::ParseComplete.to_bytes(),
            &Backend::ParameterDescription { types: b"" }.to_bytes(),
            &Backend::NoData.to_bytes(),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(
            tags(&s.server(&answer)),
            "tnZ",
            "the portal's Parse is swallowed"
        );
        // Parse, Bind, Execute, Sync in one request: nothing added, and nothing kept.
        let (server, _, _) = s.client(&cat(&[
            &parse("", "SELECT 2"),
            &bind(""),
            &execute(),
            &Frontend::Sync.to_bytes(),
        ]));
        assert_eq!(tags(&server), "PBES");
        s.server(&cat(&[
            &Backend::ParseComplete.to_bytes(),
            &Backend::BindComplete.to_bytes(),
            &complete("SELECT 1"),
            &ready(ReadyStatus::Idle),
        ]));
        let (server, _, _) = s.client(&cat(&[&describe, &Frontend::Sync.to_bytes()]));
        assert_eq!(tags(&server), "DS");
        assert_eq!(s.events, "+-+-+-+");
    }

    /// RESET returns a replayed parameter to the client's startup value, not the server
    /// connection's: the portal's SET follows it, its answer unseen but for ParameterStatus.
    #[test]
    fn a_reset_is_followed_by_the_clients_startup_values() {
        let mut s = Script::new(true);
        s.m.set_startup_values(&[("DateStyle".to_string(), "Postgres, MDY".to_string())].into());
        let (server, _, _) = s.client(&query("RESET datestyle"));
        assert_eq!(tags(&server), "QQ");
        assert!(String::from_utf8_lossy(&server).contains("SET DateStyle TO 'Postgres, MDY';"));
        let answer = cat(&[
            &Backend::ParameterStatus {
                name: b"DateStyle",
                value: b"ISO, MDY",
            }
            .to_bytes(),
            &complete("RESET"),
            &ready(ReadyStatus::Idle),
            &Backend::ParameterStatus {
                name: b"DateStyle",
                value: b"Postgres, MDY",
            }
            .to_bytes(),
            &complete("SET"),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(tags(&s.server(&answer)), "SCZS");
        assert_eq!(s.events, "+-", "held until the portal's SET is answered");
        // Other statements, and RESET of a parameter the client did not give, as they are.
        for sql in ["RESET work_mem", "SELECT 1", "RESET TimeZone"] {
            let (server, _, _) = s.client(&query(sql));
            assert_eq!(tags(&server), "Q", "{sql}");
            s.server(&cat(&[&complete("RESET"), &ready(ReadyStatus::Idle)]));
        }
        // Every spelling of a reset of a startup value: RESET TIME ZONE, SET ... TO DEFAULT.
        let mut s = Script::new(true);
        s.m.set_startup_values(&[("TimeZone".to_string(), "PST8PDT".to_string())].into());
        for sql in [
            "RESET TIME ZONE",
            "SET TIME ZONE DEFAULT",
            "set session time zone local;",
            "SET timezone TO DEFAULT",
            "SET SESSION \"TimeZone\"=default",
            "RESET ALL",
        ] {
            let (server, _, _) = s.client(&query(sql));
            assert_eq!(tags(&server), "QQ", "{sql}");
            assert!(
                String::from_utf8_lossy(&server).contains("SET TimeZone TO 'PST8PDT';"),
                "{sql}"
            );
            s.server(&cat(&[
                &complete("SET"),
                &ready(ReadyStatus::Idle),
                &complete("SET"),
                &ready(ReadyStatus::Idle),
            ]));
        }
        for sql in [
            "SET TIME ZONE 'UTC'",
            "SET timezone TO 'UTC'",
            "SET LOCAL timezone TO DEFAULT",
        ] {
            let (server, _, _) = s.client(&query(sql));
            assert_eq!(tags(&server), "Q", "{sql}");
            s.server(&cat(&[&complete("SET"), &ready(ReadyStatus::Idle)]));
        }
    }

    #[test]
    fn notices_and_parameters_pass_through_in_order() {
        let mut s = Script::new(true);
        s.client(&query("SET TimeZone TO 'UTC'"));
        let answer = cat(&[
            &Backend::NoticeResponse(Fields(b"SNOTICE\0Mhi\0\0")).to_bytes(),
            &Backend::ParameterStatus {
                name: b"TimeZone",
                value: b"UTC",
            }
            .to_bytes(),
            &complete("SET"),
            &ready(ReadyStatus::Idle),
        ]);
        assert_eq!(tags(&s.server(&answer)), "NSCZ");
        assert_eq!(s.events, "+-");
    }
}
