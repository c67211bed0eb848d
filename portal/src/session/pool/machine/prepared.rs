//! The client's statements as the server sees them (pure, part of [`Machine`]): what the
//! portal answers itself (a statement Close, a DEALLOCATE of a protocol-level statement, a
//! named Parse followed by Sync), how a named statement is prepared on the connection that
//! runs it, DEALLOCATE and DISCARD ALL through the extended protocol, and the `SET`s that
//! follow a client's RESET.
//!
//! May import: `wire` and the rest of `pool` (`inflight`, `sql`, `statements`).

use crate::wire::postgres::{
    backend::Backend,
    frontend::{Frontend, TargetKind},
    ready_for_query, ReadyStatus,
};

use super::super::inflight::{Expect, Sent};
use super::super::sql;
use super::super::statements::{self, Definition, ServerStatements, Special};
use super::Machine;

impl Machine {
    /// After the client's `RESET name`, `RESET TIME ZONE`, `SET name TO DEFAULT`, `SET TIME
    /// ZONE DEFAULT | LOCAL`, `RESET ALL` or `DISCARD ALL` (the whole of a simple query): the
    /// `SET`s that give the server connection the client's startup values again, where the
    /// server's reset went to its own defaults.
    pub(super) fn after_reset(&self, sql: &[u8]) -> Option<String> {
        if self.startup_values.is_empty()
            || !sql::starts_with_any(sql, &[b"reset", b"discard", b"set"])
        {
            return None;
        }
        let text = std::str::from_utf8(sql.strip_suffix(&[0]).unwrap_or(sql)).ok()?;
        let text = text.trim().trim_end_matches(';').replace('=', " = ");
        let mut words: Vec<&str> = text.split_whitespace().collect();
        let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
        if words.len() > 2 && is(words[0], "set") && is(words[1], "session") {
            words.remove(1);
        }
        let name: &str = match words.as_slice() {
            [r, a] if (is(r, "reset") || is(r, "discard")) && is(a, "all") => {
                return self.sets_of_startup_values(|_| true);
            }
            [r, t, z] if is(r, "reset") && is(t, "time") && is(z, "zone") => "timezone",
            [s, t, z, d] if is(s, "set") && is(t, "time") && is(z, "zone") => {
                if !(is(d, "default") || is(d, "local")) {
                    return None;
                }
                "timezone"
            }
            [r, name] if is(r, "reset") => name,
            [s, name, to, d]
                if is(s, "set") && (is(to, "to") || *to == "=") && is(d, "default") =>
            {
                name
            }
            _ => return None,
        };
        let name = name.trim_matches('"');
        self.sets_of_startup_values(|k| k.eq_ignore_ascii_case(name))
    }

    /// `SET`s of the client's startup values whose names `pick` chooses, if any.
    fn sets_of_startup_values(&self, pick: impl Fn(&str) -> bool) -> Option<String> {
        let sql: String = self
            .startup_values
            .iter()
            .filter(|(k, _)| pick(k))
            .map(|(k, v)| format!("SET {k} TO '{}';", v.replace('\'', "''")))
            .collect();
        (!sql.is_empty()).then_some(sql)
    }

    /// The portal's own answer to a statement Close or a DEALLOCATE of one of the client's
    /// protocol-level statements (forgotten; the server connections keep theirs, bounded),
    /// when the message is one. A DEALLOCATE of another name (an SQL-level PREPARE, or none)
    /// and DEALLOCATE ALL go to the server, which answers as it would a direct client.
    pub(super) fn answer_locally(&mut self, msg: Frontend<'_>) -> Option<Vec<u8>> {
        match msg {
            Frontend::Close {
                kind: TargetKind::Statement,
                name,
            } if !name.is_empty() => {
                self.statements.remove(name);
                Some(Backend::CloseComplete.to_bytes())
            }
            Frontend::Query { sql } => {
                let tag: &[u8] = match statements::special(sql)? {
                    Special::Deallocate(name) => {
                        self.statements.remove(name.as_bytes())?;
                        b"DEALLOCATE"
                    }
                    Special::DeallocateAll | Special::DiscardAll => return None,
                };
                let status = self.held.as_ref().map_or(ReadyStatus::Idle, |h| h.status);
                let mut out = Backend::CommandComplete { tag }.to_bytes();
                out.extend_from_slice(&ready_for_query(status));
                Some(out)
            }
            _ => None,
        }
    }

    /// ParseComplete and ReadyForQuery for a named Parse followed by a Sync, the statement
    /// recorded for its first use; `None` for anything else.
    pub(super) fn prepare_locally(&mut self, msg: Frontend<'_>) -> Option<Vec<u8>> {
        let Frontend::Parse {
            name,
            query,
            definition,
        } = msg
        else {
            return None;
        };
        if name.is_empty() || statements::special(query).is_some() {
            return None;
        }
        self.statements.insert(name.to_vec(), definition.into());
        let mut out = Backend::ParseComplete.to_bytes();
        out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
        Some(out)
    }

    /// The server's name for a client statement's definition, preparing it there first (a
    /// Parse the client does not see) when the connection lacks it.
    pub(super) fn ensure(
        &mut self,
        def: &Definition,
        conn: &mut ServerStatements,
        out: &mut Vec<u8>,
    ) -> String {
        if let Some(name) = conn.get(def) {
            self.tally.prepared_hits += 1;
            return name;
        }
        self.tally.prepared_misses += 1;
        let h = self.held.as_mut().expect("held");
        let (name, evicted) = conn.insert(def.clone(), self.max_prepared);
        if let Some(old) = evicted {
            out.extend_from_slice(&statements::close_statement(&old));
            h.expect.push_back(Expect::Server {
                sent: Sent::Close,
                swallow: true,
                forget: None,
            });
        }
        out.extend_from_slice(&statements::parse_message(&name, def));
        h.expect.push_back(Expect::Server {
            sent: Sent::Parse,
            swallow: true,
            forget: Some(def.clone()),
        });
        name
    }

    /// Before a Bind or Describe of the unnamed statement: the client's, prepared on this
    /// connection first (a Parse the client does not see) when the request that prepared it
    /// ran on another one.
    pub(super) fn ensure_unnamed(&mut self, out: &mut Vec<u8>) {
        let Some(def) = &self.unnamed else { return };
        let h = self.held.as_mut().expect("held");
        if h.has_unnamed {
            return;
        }
        h.has_unnamed = true;
        out.extend_from_slice(&statements::parse_message("", def));
        h.expect.push_back(Expect::Server {
            sent: Sent::Parse,
            swallow: true,
            forget: None,
        });
    }

    /// A Parse (`raw` not yet queued): DEALLOCATE, DEALLOCATE ALL and DISCARD ALL through the
    /// extended protocol, and named statements renamed and prepared once per connection.
    /// Whether the message goes to the server as it is.
    pub(super) fn forward_parse(
        &mut self,
        name: &[u8],
        query: &[u8],
        definition: &[u8],
        conn: &mut ServerStatements,
        server: &mut Vec<u8>,
    ) -> bool {
        let special = statements::special(query);
        let own = match &special {
            Some(Special::Deallocate(n)) => self.statements.remove(n.as_bytes()),
            _ => None,
        };
        if let Some(def) = own {
            // DEALLOCATE of one of the client's protocol-level statements through the
            // extended protocol: it runs on the server's name for it (prepared first
            // if this connection lacks it), so the client gets the server's answer.
            let server_name = self.ensure(&def, conn, server);
            conn.remove(&def);
            let sql = format!("DEALLOCATE {server_name}");
            let mut body = sql.into_bytes();
            body.extend_from_slice(&[0, 0, 0]);
            server.extend_from_slice(&statements::parse_message("", &body));
            self.in_flight().wait(Sent::Parse, None);
            return false;
        } else if matches!(special, Some(Special::DiscardAll | Special::DeallocateAll)) {
            // The server forgets every prepared statement, the portal's too.
            self.statements.clear();
            conn.clear();
            self.in_flight().wait(Sent::Parse, None);
        } else if special.is_some() {
            // DEALLOCATE of a name the portal does not know: the server's to answer.
            self.in_flight().wait(Sent::Parse, None);
        } else if !name.is_empty() {
            let def: Definition = definition.into();
            self.statements.insert(name.to_vec(), def.clone());
            if conn.get(&def).is_some() {
                self.tally.prepared_hits += 1;
                let done = Backend::ParseComplete.to_bytes();
                self.in_flight().expect.push_back(Expect::Local(done));
            } else {
                self.tally.prepared_misses += 1;
                let (server_name, evicted) = conn.insert(def.clone(), self.max_prepared);
                if let Some(old) = evicted {
                    server.extend_from_slice(&statements::close_statement(&old));
                    self.in_flight().expect.push_back(Expect::Server {
                        sent: Sent::Close,
                        swallow: true,
                        forget: None,
                    });
                }
                server.extend_from_slice(&statements::parse_message(&server_name, &def));
                self.in_flight().wait(Sent::Parse, Some(def));
            }
            return false;
        } else {
            self.in_flight().wait(Sent::Parse, None);
        }
        true
    }
}
