//! Session state a pooled server connection cannot carry from one client to the next (pure):
//! the SQL that creates it, recognised in simple queries and in Parse. A client that runs
//! such a statement is pinned to its server connection until it disconnects (then the
//! connection is reset with DISCARD ALL), so it never finds its state gone or another
//! client's state in its way. The reported parameters the portal replays itself
//! ([`REPLAYED`], with [`replay_sql`]) are no such state.
//!
//! Only statements that [`may_pin`] reads in full: the others are told by their first word.
//!
//! May import: nothing of the crate but the rest of `pool` (`sql`).

use super::sql;

/// The reported parameters the portal replays with SET on a server connection whose value
/// differs from the client's (the others, such as server_version, are the server's own).
/// Only parameters the server reports with ParameterStatus can be followed: a `SET` of any
/// other (search_path among them: PostgreSQL 15 does not report it) pins the client.
pub const REPLAYED: [&str; 6] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// What pinned a client: the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// LISTEN: notifications go to the server connection that listens.
    Listen,
    /// pg_advisory_lock and its session-level kin.
    AdvisoryLock,
    /// CREATE TEMP TABLE (or view, sequence).
    TempTable,
    /// DECLARE … WITH HOLD: a cursor that outlives its transaction.
    HoldCursor,
    /// SQL-level PREPARE.
    Prepare,
    /// SET SESSION AUTHORIZATION, SET ROLE.
    SessionAuthorization,
    /// SET (or `set_config(…)`) of a parameter the portal does not replay (anything but the
    /// reported ones).
    Set,
}

impl PinReason {
    pub const ALL: [PinReason; 7] = [
        PinReason::Listen,
        PinReason::AdvisoryLock,
        PinReason::TempTable,
        PinReason::HoldCursor,
        PinReason::Prepare,
        PinReason::SessionAuthorization,
        PinReason::Set,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::TempTable => "temp_table",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::Prepare => "prepare",
            PinReason::SessionAuthorization => "session_authorization",
            PinReason::Set => "set",
        }
    }
}

/// The SQL text without string literals, quoted identifiers and comments, lower-cased, with
/// `;` kept as a statement separator.
fn skeleton(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                // Skip to the closing quote (a doubled quote continues the literal).
                while let Some(d) = chars.next() {
                    if d == c {
                        if chars.peek() == Some(&c) {
                            chars.next();
                            continue;
                        }
                        break;
                    }
                }
                out.push(' ');
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
                out.push(' ');
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
                out.push(' ');
            }
            '$' => {
                // A dollar-quoted string: $tag$ … $tag$.
                let mut tag = String::from("$");
                let mut rest = chars.clone();
                let mut ok = false;
                for d in rest.by_ref() {
                    tag.push(d);
                    if d == '$' {
                        ok = true;
                        break;
                    }
                    if !(d.is_alphanumeric() || d == '_') {
                        break;
                    }
                }
                if ok {
                    let body: String = rest.collect();
                    match body.find(&tag) {
                        Some(end) => {
                            let skip = tag.len() - 1 + end + tag.len();
                            for _ in 0..skip {
                                chars.next();
                            }
                        }
                        None => return out,
                    }
                    out.push(' ');
                } else {
                    out.push(c);
                }
            }
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// Parameters the portal replays (lower-case), whose SET needs no pinning.
fn replayed(name: &str) -> bool {
    REPLAYED
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name.trim_matches('"')))
}

/// `CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] …`: the words after CREATE.
fn temporary(rest: &[&str]) -> bool {
    let rest = match rest {
        ["or", "replace", tail @ ..] => tail,
        tail => tail,
    };
    let rest = match rest {
        ["global" | "local", tail @ ..] => tail,
        tail => tail,
    };
    matches!(rest.first(), Some(&"temp" | &"temporary"))
}

/// The first words of the statements that can leave session state behind: any other
/// statement is told by its first word alone ([`may_pin`]).
const PINNING_WORDS: [&[u8]; 5] = [b"listen", b"prepare", b"declare", b"create", b"set"];

/// Functions, called anywhere in a statement, that leave session state (a call needs a `(`:
/// text without one names none).
const PINNING_FUNCTIONS: [&[u8]; 2] = [b"advisory", b"set_config"];

/// Whether `sql` may leave session state: it starts with one of [`PINNING_WORDS`] or
/// cannot be told by its first word (a comment or parenthesis first), holds more than one
/// statement, or names one of [`PINNING_FUNCTIONS`]. Everything else (the common case) is
/// settled here without reading the text in full.
fn may_pin(sql: &[u8]) -> bool {
    let by_word = match sql::lead(sql) {
        Some(c) if c.is_ascii_alphabetic() => sql::starts_with_any(sql, &PINNING_WORDS),
        // No first word to go by.
        _ => true,
    };
    by_word
        || sql::several_statements(sql)
        || (memchr::memchr(b'(', sql).is_some()
            && PINNING_FUNCTIONS
                .iter()
                .any(|f| sql::contains_ignore_case(sql, f)))
}

/// The first statement of `sql` that leaves session state behind, if any.
pub fn pin_reason(sql: &[u8]) -> Option<PinReason> {
    if !may_pin(sql) {
        return None;
    }
    in_full(sql)
}

/// [`pin_reason`] read on the whole text: the same answer for every text (the fuzz target
/// checks it), at the cost of a lower-cased copy.
pub fn in_full(sql: &[u8]) -> Option<PinReason> {
    let text = skeleton(&String::from_utf8_lossy(sql));
    let calls = text.contains('(');
    if calls && (text.contains("pg_advisory_lock") || text.contains("pg_try_advisory_lock")) {
        return Some(PinReason::AdvisoryLock);
    }
    // set_config(name, value, is_local): pinned whatever is_local says (read conservatively).
    if calls && text.contains("set_config") {
        return Some(PinReason::Set);
    }
    for statement in text.split(';') {
        let words: Vec<&str> = statement
            .split(|c: char| c.is_whitespace() || c == '(' || c == '=')
            .filter(|w| !w.is_empty())
            .collect();
        let reason = match words.as_slice() {
            ["listen", ..] => Some(PinReason::Listen),
            ["prepare", ..] => Some(PinReason::Prepare),
            ["declare", rest @ ..] if rest.windows(2).any(|w| w == ["with", "hold"]) => {
                Some(PinReason::HoldCursor)
            }
            ["create", rest @ ..] if temporary(rest) => Some(PinReason::TempTable),
            ["set", "session", "authorization", ..] | ["set", "role", ..] => {
                Some(PinReason::SessionAuthorization)
            }
            ["set", "session", "characteristics", ..] => Some(PinReason::Set),
            ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => None,
            ["set", "session", name, ..] | ["set", name, ..] => {
                (!replayed(name)).then_some(PinReason::Set)
            }
            _ => None,
        };
        if reason.is_some() {
            return reason;
        }
    }
    None
}

/// `SET name TO 'value'` statements that give a server connection the client's values.
pub fn replay_sql(
    client: &std::collections::BTreeMap<String, String>,
    server: &std::collections::BTreeMap<String, String>,
) -> String {
    let backslashes = server
        .get("standard_conforming_strings")
        .is_some_and(|v| v == "off");
    let mut sql = String::new();
    for name in REPLAYED {
        let Some(want) = client.get(name) else {
            continue;
        };
        if server.get(name) == Some(want) {
            continue;
        }
        let mut value = want.replace('\'', "''");
        if backslashes {
            value = value.replace('\\', "\\\\");
        }
        sql.push_str(&format!("SET {name} TO '{value}';"));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_leave_state() {
        for (sql, reason) in [
            ("LISTEN jobs", Some(PinReason::Listen)),
            ("select 1; listen \"Jobs\";", Some(PinReason::Listen)),
            ("SELECT pg_advisory_lock(42)", Some(PinReason::AdvisoryLock)),
            (
                "SELECT pg_try_advisory_lock_shared(1, 2)",
                Some(PinReason::AdvisoryLock),
            ),
            ("SELECT pg_advisory_xact_lock(42)", None),
            ("CREATE TEMP TABLE x (a int)", Some(PinReason::TempTable)),
            (
                "create global temporary table x (a int)",
                Some(PinReason::TempTable),
            ),
            ("CREATE TABLE temp (a int)", None),
            (
                "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
                Some(PinReason::TempTable),
            ),
            ("CREATE TABLE t (a int)", None),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Some(PinReason::HoldCursor),
            ),
            ("DECLARE c CURSOR FOR SELECT 1", None),
            ("PREPARE p AS SELECT 1", Some(PinReason::Prepare)),
            (
                "SET SESSION AUTHORIZATION app",
                Some(PinReason::SessionAuthorization),
            ),
            ("SET ROLE app", Some(PinReason::SessionAuthorization)),
            ("SET statement_timeout = 100", Some(PinReason::Set)),
            ("SET SESSION work_mem TO '8MB'", Some(PinReason::Set)),
            ("SET TimeZone TO 'UTC'", None),
            ("SET search_path = myschema", Some(PinReason::Set)),
            ("set search_path to public, \"Other\"", Some(PinReason::Set)),
            (
                "SELECT set_config('search_path', 'x', false)",
                Some(PinReason::Set),
            ),
            (
                "SELECT SET_CONFIG('work_mem', '8MB', true)",
                Some(PinReason::Set),
            ),
            ("set application_name = 'x'", None),
            ("SET LOCAL statement_timeout = 100", None),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("SELECT 'LISTEN x; PREPARE y'", None),
            ("SELECT 1 -- LISTEN x\n", None),
            ("SELECT /* prepare */ 1", None),
            ("SELECT $$ LISTEN x $$", None),
            (
                "SELECT $f$ ; LISTEN x $f$ ; LISTEN y",
                Some(PinReason::Listen),
            ),
            ("INSERT INTO t VALUES ($1)", None),
        ] {
            assert_eq!(pin_reason(sql.as_bytes()), reason, "{sql}");
        }
    }

    /// The first-word look settles only what the whole text would settle the same way.
    #[test]
    fn the_first_word_says_what_the_whole_text_says() {
        let mut texts: Vec<String> = Vec::new();
        for head in [
            "", " ", "\n", "/* x */ ", "-- x\n", "(", "'a' ", "\"set\" ", "$$ x $$ ", "é ",
        ] {
            for body in [
                "SELECT 1",
                "select pg_advisory_lock(1)",
                "SELECT PG_TRY_ADVISORY_LOCK(1)",
                "LISTEN x",
                "listen\"x\"",
                "SET search_path = x",
                "set_config('a', 'b', false)",
                "SET LOCAL x = 1",
                "Prepare p AS SELECT 1",
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                "create temp table t (a int)",
                "CREATE TABLE t (a int)",
                "INSERT INTO t VALUES (';listen x')",
                "SELECT 1; LISTEN x",
                "SELECT 1;",
                "UPDATE t SET a = 1",
                "WITH x AS (SELECT 1) SELECT * FROM x",
                "SELECT 'advisory'",
                "SELECT set_config('a', 'b', false)",
                "SELECT pg_advisory_lock",
                "SELECT 'pg_advisory_lock(' AS x",
                "SELECT \"set_config\" FROM t WHERE a IN (1)",
                "select PG_ADVISORY_LOCK (1)",
            ] {
                texts.push(format!("{head}{body}"));
            }
        }
        for text in texts {
            assert_eq!(
                pin_reason(text.as_bytes()),
                in_full(text.as_bytes()),
                "{text}"
            );
        }
    }

    #[test]
    fn unterminated_quotes_and_odd_bytes_never_panic() {
        for sql in [
            "'", "\"", "$a", "$$", "/*", "--", "$a$ x", "é'ü", "set", ";;;",
        ] {
            let _ = pin_reason(sql.as_bytes());
        }
    }
}
