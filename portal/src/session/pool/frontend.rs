//! What a pooled PostgreSQL client sends: each message is forwarded to the server connection
//! the client holds (taken at a transaction's first message), answered by the portal itself
//! (Close of a statement, DEALLOCATE, a named Parse before Sync), or refused; named prepared
//! statements are renamed per server connection and prepared where missing.
//!
//! May import: `metrics`, `wire` and the rest of `pool`.

use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::statements::{Definition, Special};

use crate::{
    metrics::CloseReason,
    wire::postgres::{frame, message, ready_for_query, ReadyStatus, HEADER_LEN, MAX_MESSAGE},
};

use super::held::{due_locals, Expect};
use super::{pinning, statements, Client};

/// The query text of a statement's definition.
pub(super) fn def_query(def: &[u8]) -> &[u8] {
    crate::wire::postgres::cstr(def).map_or(def, |(q, _)| q)
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Handles every complete message the client sent.
    pub(super) async fn process(&mut self) -> Result<(), CloseReason> {
        let mut pos = 0;
        let mut out: Vec<u8> = Vec::new();
        let result = loop {
            let n = match frame(&self.cin[pos..], MAX_MESSAGE) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => {
                    self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
                    debug!(error = %e, "malformed message; closing the client");
                    if !out.is_empty() {
                        let _ = self.write_server(&out).await;
                    }
                    break Err(self.fatal("08P01", &format!("invalid message: {e}")).await);
                }
            };
            let tag = self.cin[pos];
            if self.discard_until_sync {
                if tag == b'S' {
                    self.discard_until_sync = false;
                    if let Err(r) = self.send(&ready_for_query(ReadyStatus::Idle)).await {
                        break Err(r);
                    }
                }
                pos += n;
                continue;
            }
            if tag == b'X' {
                if !out.is_empty() {
                    let _ = self.write_server(&out).await;
                }
                break Err(CloseReason::Done);
            }
            if self.lost_transaction {
                self.lost_transaction = false;
                pos += n;
                let text = "the transaction was lost: its server connection closed (the leader changed); it was rolled back, start it again";
                if let Err(r) = self.refuse(tag, "ERROR", "08006", text).await {
                    break Err(r);
                }
                continue;
            }
            if self.held.is_none() {
                match tag {
                    // A Sync or Flush with nothing in flight: nothing to take a connection for.
                    b'S' => {
                        pos += n;
                        if let Err(r) = self.send(&ready_for_query(ReadyStatus::Idle)).await {
                            break Err(r);
                        }
                        continue;
                    }
                    b'H' | b'c' | b'd' | b'f' => {
                        pos += n;
                        continue;
                    }
                    _ => {}
                }
                // A named Parse then Sync with nothing in flight (libpq's PQprepare): the
                // statement is recorded and prepared on a server connection when it is first
                // used, so a client preparing never waits for a connection (a client in an
                // open transaction may be the one to give one back). An invalid statement
                // fails at its first use.
                if tag == b'P' {
                    if let Some(answer) = self.prepare_locally(pos, n) {
                        pos += n + 5;
                        if let Err(r) = self.send(&answer).await {
                            break Err(r);
                        }
                        continue;
                    }
                }
                // Closing a statement or DEALLOCATE with nothing in flight: answered here.
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    pos += n;
                    if let Err(r) = self.send(&answer).await {
                        break Err(r);
                    }
                    continue;
                }
                if let Err((sqlstate, text)) = self.acquire().await {
                    if sqlstate == "53300" {
                        break Err(self.fatal(sqlstate, &text).await);
                    }
                    pos += n;
                    if let Err(r) = self.refuse(tag, "ERROR", sqlstate, &text).await {
                        break Err(r);
                    }
                    continue;
                }
            }
            let mut local = Vec::new();
            self.forward(tag, pos, n, &mut out, &mut local);
            if !local.is_empty() {
                if let Err(r) = self.send(&local).await {
                    break Err(r);
                }
            }
            pos += n;
            if out.len() >= 64 << 10 {
                if let Err(r) = self.write_server(&out).await {
                    break Err(r);
                }
                out.clear();
            }
        };
        self.cin.drain(..pos);
        if result.is_ok() && !out.is_empty() {
            self.write_server(&out).await?;
        }
        result
    }

    /// The portal's own answer to a statement Close or a DEALLOCATE (the client's statement is
    /// forgotten; the server connections keep theirs, bounded), when the message is one.
    pub(super) fn answer_locally(&mut self, tag: u8, pos: usize, n: usize) -> Option<Vec<u8>> {
        let body = &self.cin[pos + HEADER_LEN..pos + n];
        match tag {
            b'C' => match statements::parse_target(body) {
                Some((b'S', name)) if !name.is_empty() => {
                    self.statements.remove(name);
                    Some(message(b'3', &[]))
                }
                _ => None,
            },
            b'Q' => {
                let (tag_text, all) = match statements::special(body)? {
                    Special::Deallocate(name) => {
                        self.statements.remove(name.as_bytes());
                        ("DEALLOCATE", false)
                    }
                    Special::DeallocateAll => ("DEALLOCATE ALL", true),
                    Special::DiscardAll => return None,
                };
                if all {
                    self.statements.clear();
                }
                let status = self.held.as_ref().map_or(ReadyStatus::Idle, |h| h.status);
                let mut out = message(b'C', format!("{tag_text}\0").as_bytes());
                out.extend_from_slice(&ready_for_query(status));
                Some(out)
            }
            _ => None,
        }
    }

    /// ParseComplete and ReadyForQuery for a named Parse at `pos` followed by a Sync, the
    /// statement recorded for its first use; `None` for anything else.
    pub(super) fn prepare_locally(&mut self, pos: usize, n: usize) -> Option<Vec<u8>> {
        let next = self.cin.get(pos + n..pos + n + 5)?;
        if next != [b'S', 0, 0, 0, 4] {
            return None;
        }
        let (name, def) = statements::parse_parse(&self.cin[pos + HEADER_LEN..pos + n])?;
        if name.is_empty() || statements::special(def_query(&def)).is_some() {
            return None;
        }
        self.statements.insert(name.to_vec(), def);
        let mut out = message(b'1', &[]);
        out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
        Some(out)
    }

    /// The server's name for a client statement's definition, preparing it there first
    /// (a Parse the client does not see) when the connection lacks it.
    pub(super) fn ensure(&mut self, def: &Definition, out: &mut Vec<u8>) -> String {
        let max = self.settings.max_prepared_statements;
        let h = self.held.as_mut().expect("held");
        if let Some(name) = h.conn.statements.get(def) {
            self.hub.stats.prepared_hits.fetch_add(1, Relaxed);
            return name;
        }
        self.hub.stats.prepared_misses.fetch_add(1, Relaxed);
        let (name, evicted) = h.conn.statements.insert(def.clone(), max);
        if let Some(old) = evicted {
            out.extend_from_slice(&statements::close_statement(&old));
            h.expect.push_back(Expect::Server {
                tag: b'C',
                swallow: true,
                forget: None,
            });
        }
        out.extend_from_slice(&statements::parse_message(&name, def));
        h.expect.push_back(Expect::Server {
            tag: b'P',
            swallow: true,
            forget: Some(def.clone()),
        });
        name
    }

    /// Queues the client's message at `pos` (`n` bytes) for the held server connection, with
    /// named statements renamed to the server's; answers that are due at once go to `local`.
    pub(super) fn forward(
        &mut self,
        tag: u8,
        pos: usize,
        n: usize,
        out: &mut Vec<u8>,
        local: &mut Vec<u8>,
    ) {
        let body = self.cin[pos + HEADER_LEN..pos + n].to_vec();
        let expect = |this: &mut Self, tag: u8, forget: Option<Definition>| {
            let h = this.held.as_mut().expect("held");
            h.expect.push_back(Expect::Server {
                tag,
                swallow: false,
                forget,
            });
        };
        let mut as_is = true;
        if self.settings.transaction && self.pinned.is_none() && matches!(tag, b'Q' | b'P') {
            let sql = match tag {
                b'Q' => crate::wire::postgres::cstr(&body).map(|(q, _)| q),
                _ => crate::wire::postgres::cstr(&body)
                    .and_then(|(_, rest)| crate::wire::postgres::cstr(rest))
                    .map(|(q, _)| q),
            };
            if let Some(reason) = sql
                .and_then(|q| std::str::from_utf8(q).ok())
                .and_then(pinning::pin_reason)
            {
                self.pinned = Some(reason);
                self.hub.stats.pin(reason, 1);
                info!(
                    reason = reason.as_str(),
                    user = %self.user,
                    "client pinned to its server connection until it disconnects: its session state cannot move to another one"
                );
            }
        }
        match tag {
            b'Q' => {
                self.hub.stats.queries.fetch_add(1, Relaxed);
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    self.held
                        .as_mut()
                        .expect("held")
                        .expect
                        .push_back(Expect::Local(answer));
                    as_is = false;
                } else {
                    if statements::special(&body) == Some(Special::DiscardAll) {
                        self.statements.clear();
                        self.held.as_mut().expect("held").conn.statements.clear();
                    }
                    expect(self, b'Q', None);
                }
            }
            b'S' | b'F' => expect(self, tag, None),
            b'E' => {
                self.hub.stats.queries.fetch_add(1, Relaxed);
                expect(self, b'E', None);
            }
            b'P' => match statements::parse_parse(&body) {
                Some((_, def)) if statements::special(def_query(&def)).is_some() => {
                    // DEALLOCATE or DISCARD ALL through the extended protocol: the client's
                    // statements are forgotten, and the server's: DEALLOCATE of one name runs
                    // as DEALLOCATE ALL there (the client's name is not the server's), and the
                    // portal prepares again what it needs.
                    if let Some(Special::Deallocate(name)) = statements::special(def_query(&def)) {
                        self.statements.remove(name.as_bytes());
                        out.extend_from_slice(&statements::parse_message(
                            "",
                            b"DEALLOCATE ALL\0\0\0",
                        ));
                    } else {
                        self.statements.clear();
                        out.extend_from_slice(&self.cin[pos..pos + n]);
                    }
                    self.held.as_mut().expect("held").conn.statements.clear();
                    expect(self, b'P', None);
                    as_is = false;
                }
                Some((name, def)) if !name.is_empty() => {
                    self.statements.insert(name.to_vec(), def.clone());
                    let h = self.held.as_mut().expect("held");
                    if h.conn.statements.get(&def).is_some() {
                        self.hub.stats.prepared_hits.fetch_add(1, Relaxed);
                        h.expect.push_back(Expect::Local(message(b'1', &[])));
                    } else {
                        self.hub.stats.prepared_misses.fetch_add(1, Relaxed);
                        let max = self.settings.max_prepared_statements;
                        let (server_name, evicted) = h.conn.statements.insert(def.clone(), max);
                        if let Some(old) = evicted {
                            out.extend_from_slice(&statements::close_statement(&old));
                            h.expect.push_back(Expect::Server {
                                tag: b'C',
                                swallow: true,
                                forget: None,
                            });
                        }
                        out.extend_from_slice(&statements::parse_message(&server_name, &def));
                        expect(self, b'P', Some(def));
                    }
                    as_is = false;
                }
                _ => expect(self, b'P', None),
            },
            b'B' => {
                let named = statements::parse_bind(&body)
                    .filter(|(_, stmt, _)| !stmt.is_empty())
                    .and_then(|(portal, stmt, after)| {
                        let def = self.statements.get(stmt)?.clone();
                        Some((portal.to_vec(), def, after.to_vec()))
                    });
                if let Some((portal, def, after)) = named {
                    let server_name = self.ensure(&def, out);
                    out.extend_from_slice(&statements::bind_message(&portal, &server_name, &after));
                    as_is = false;
                }
                expect(self, b'B', None);
            }
            b'D' => {
                let named = statements::parse_target(&body)
                    .filter(|(kind, name)| *kind == b'S' && !name.is_empty())
                    .and_then(|(_, name)| self.statements.get(name).cloned());
                if let Some(def) = named {
                    let server_name = self.ensure(&def, out);
                    out.extend_from_slice(&statements::target_message(b'D', &server_name));
                    as_is = false;
                }
                expect(self, b'D', None);
            }
            b'C' => {
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    self.held
                        .as_mut()
                        .expect("held")
                        .expect
                        .push_back(Expect::Local(answer));
                    as_is = false;
                } else {
                    expect(self, b'C', None);
                }
            }
            // Flush, COPY data, done and fail: no answer of their own.
            _ => {}
        }
        if as_is {
            out.extend_from_slice(&self.cin[pos..pos + n]);
        }
        let h = self.held.as_mut().expect("held");
        if !h.waits_for_server() {
            due_locals(&mut h.expect, local);
        }
    }
}
