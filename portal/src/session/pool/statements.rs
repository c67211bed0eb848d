//! Prepared statements across pooled server connections (pure): the client's named
//! statements by name, each server connection's statements by definition (query and parameter
//! types) under a name of the portal's, bounded and closed least recently used first; the
//! rewriting of Parse, Bind and Describe to the server's names; and the simple queries the
//! portal answers or follows itself (DEALLOCATE, DISCARD ALL), told by their first word before
//! anything else is read.
//!
//! May import: `wire` and the rest of `pool` (`sql`).

use std::{collections::HashMap, sync::Arc};

use crate::wire::postgres::{
    cstr,
    frontend::{Frontend, TargetKind},
};

/// A statement's definition: the Parse body after its name (query, parameter types).
pub type Definition = Arc<[u8]>;

/// A Parse message for `name` with `def`.
pub fn parse_message(name: &str, def: &[u8]) -> Vec<u8> {
    let query = cstr(def).map_or(def, |(q, _)| q);
    Frontend::Parse {
        name: name.as_bytes(),
        query,
        definition: def,
    }
    .to_bytes()
}

/// A Close of the statement `name`.
pub fn close_statement(name: &str) -> Vec<u8> {
    Frontend::Close {
        kind: TargetKind::Statement,
        name: name.as_bytes(),
    }
    .to_bytes()
}

/// A Describe of the statement `name`.
pub fn describe_statement(name: &str) -> Vec<u8> {
    Frontend::Describe {
        kind: TargetKind::Statement,
        name: name.as_bytes(),
    }
    .to_bytes()
}

/// A Bind message with the statement renamed (`rest`: the body after the statement's name).
pub fn bind_message(portal: &[u8], statement: &str, rest: &[u8]) -> Vec<u8> {
    Frontend::Bind {
        portal,
        statement: statement.as_bytes(),
        rest,
    }
    .to_bytes()
}

/// A simple query the portal handles itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Special {
    /// `DEALLOCATE [PREPARE] name`: forget the client's statement (answered locally).
    Deallocate(String),
    /// `DEALLOCATE [PREPARE] ALL`: forget all of them (answered locally).
    DeallocateAll,
    /// `DISCARD ALL`: forwarded; the client's statements and the server's are gone.
    DiscardAll,
}

/// Recognises DEALLOCATE and DISCARD ALL as the whole of a simple query.
pub fn special(query: &[u8]) -> Option<Special> {
    if !super::sql::starts_with_any(query, &[b"deallocate", b"discard"]) {
        return None;
    }
    let text = std::str::from_utf8(query.strip_suffix(&[0]).unwrap_or(query)).ok()?;
    let text = text.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let is = |w: &str, s: &str| w.eq_ignore_ascii_case(s);
    match words.as_slice() {
        [d, a] if is(d, "DISCARD") && is(a, "ALL") => Some(Special::DiscardAll),
        [d, p, rest @ ..] if is(d, "DEALLOCATE") && is(p, "PREPARE") && rest.len() == 1 => {
            name(rest[0])
        }
        [d, n] if is(d, "DEALLOCATE") => name(n),
        _ => None,
    }
}

fn name(word: &str) -> Option<Special> {
    if word.eq_ignore_ascii_case("ALL") {
        return Some(Special::DeallocateAll);
    }
    let name = if let Some(q) = word.strip_prefix('"') {
        q.strip_suffix('"')?.replace("\"\"", "\"")
    } else {
        if !word
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            return None;
        }
        word.to_lowercase()
    };
    Some(Special::Deallocate(name))
}

/// The statements prepared on one server connection, by definition.
#[derive(Debug, Default)]
pub struct ServerStatements {
    by_def: HashMap<Definition, (String, u64)>,
    tick: u64,
    next: u64,
}

impl ServerStatements {
    /// The server's name for `def`, marking it used.
    pub fn get(&mut self, def: &Definition) -> Option<String> {
        self.tick += 1;
        let tick = self.tick;
        self.by_def.get_mut(def).map(|(n, t)| {
            *t = tick;
            n.clone()
        })
    }

    /// Records `def` under a new name; returns the name and, when the cache is past `max`,
    /// the least recently used name to close.
    pub fn insert(&mut self, def: Definition, max: usize) -> (String, Option<String>) {
        self.tick += 1;
        self.next += 1;
        let name = format!("dbportal_{}", self.next);
        self.by_def.insert(def, (name.clone(), self.tick));
        let evicted = if self.by_def.len() > max.max(1) {
            let oldest = self
                .by_def
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(d, _)| d.clone());
            oldest.and_then(|d| self.by_def.remove(&d)).map(|(n, _)| n)
        } else {
            None
        };
        (name, evicted)
    }

    /// Forgets `def` (its Parse failed).
    pub fn remove(&mut self, def: &Definition) {
        self.by_def.remove(def);
    }

    /// Forgets everything (DISCARD ALL ran on the server).
    pub fn clear(&mut self) {
        self.by_def.clear();
    }

    pub fn len(&self) -> usize {
        self.by_def.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_def.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bind_describe_close_round_trip() {
        let mut def = b"SELECT $1\0".to_vec();
        def.extend_from_slice(&1u16.to_be_bytes());
        def.extend_from_slice(&23u32.to_be_bytes());
        let p = parse_message("dbportal_1", &def);
        assert_eq!(
            Frontend::decode(p[0], &p[5..]).unwrap(),
            Frontend::Parse {
                name: b"dbportal_1",
                query: b"SELECT $1",
                definition: &def
            }
        );
        let b = bind_message(b"", "dbportal_1", b"\0\0\0\0\0\0");
        assert_eq!(
            Frontend::decode(b[0], &b[5..]),
            Ok(Frontend::Bind {
                portal: b"",
                statement: b"dbportal_1",
                rest: b"\0\0\0\0\0\0"
            })
        );
        assert_eq!(
            Frontend::decode(b'D', &describe_statement("x")[5..]),
            Ok(Frontend::Describe {
                kind: TargetKind::Statement,
                name: b"x"
            })
        );
        assert_eq!(
            Frontend::decode(b'C', &close_statement("x")[5..]),
            Ok(Frontend::Close {
                kind: TargetKind::Statement,
                name: b"x"
            })
        );
    }

    #[test]
    fn specials() {
        assert_eq!(special(b"DISCARD ALL\0"), Some(Special::DiscardAll));
        assert_eq!(
            special(b" deallocate  prepare S1 ;\0"),
            Some(Special::Deallocate("s1".into()))
        );
        assert_eq!(
            special(b"DEALLOCATE \"My\"\"S\"\0"),
            Some(Special::Deallocate("My\"S".into()))
        );
        assert_eq!(special(b"DEALLOCATE ALL\0"), Some(Special::DeallocateAll));
        assert_eq!(special(b"DEALLOCATE a; SELECT 1\0"), None);
        assert_eq!(special(b"SELECT 1\0"), None);
    }

    #[test]
    fn the_cache_is_bounded_and_closes_the_least_recently_used() {
        let mut s = ServerStatements::default();
        let d = |q: &str| -> Definition { q.as_bytes().into() };
        let (a, _) = s.insert(d("a"), 2);
        let (_b, _) = s.insert(d("b"), 2);
        assert_eq!(s.get(&d("a")), Some(a.clone()));
        let (_c, evicted) = s.insert(d("c"), 2);
        assert_eq!(evicted.as_deref(), Some("dbportal_2"));
        assert_eq!(s.len(), 2);
        assert!(s.get(&d("b")).is_none());
        assert_eq!(s.get(&d("a")), Some(a));
    }
}
