//! What the multiplexer does with each command, decided from its name and arguments alone
//! (pure, unit-tested): forward it on a shared server connection, answer it in the portal,
//! pin the client to a dedicated connection because it creates per-connection state, or send
//! it on a connection of its own because it must reach a server busy with a script.
//!
//! May import: nothing outside `multiplex`.

/// Why a client holds a dedicated server connection. The name is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// MULTI … EXEC/DISCARD.
    Multi,
    /// WATCH … EXEC/DISCARD/UNWATCH.
    Watch,
    /// A blocking command (BLPOP, XREAD BLOCK, WAIT, …) until its reply.
    Blocking,
    /// SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE until the last unsubscribe.
    Subscribe,
    /// MONITOR: until the client leaves.
    Monitor,
    /// SELECT of a database other than 0, until SELECT 0.
    Select,
    /// CLIENT TRACKING on, until off.
    Tracking,
    /// CLIENT REPLY OFF/SKIP, CLIENT CACHING, CLIENT NO-EVICT/NO-TOUCH, SCRIPT DEBUG YES/SYNC:
    /// until the client leaves.
    ClientMode,
    /// HELLO 3 (RESP3): until the client leaves.
    Resp3,
    /// SYNC, PSYNC, REPLCONF: the client is a replica, its connection a replication stream,
    /// until it leaves.
    Replica,
}

impl PinReason {
    pub const ALL: [PinReason; 10] = [
        PinReason::Multi,
        PinReason::Watch,
        PinReason::Blocking,
        PinReason::Subscribe,
        PinReason::Monitor,
        PinReason::Select,
        PinReason::Tracking,
        PinReason::ClientMode,
        PinReason::Resp3,
        PinReason::Replica,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Multi => "multi",
            PinReason::Watch => "watch",
            PinReason::Blocking => "blocking",
            PinReason::Subscribe => "subscribe",
            PinReason::Monitor => "monitor",
            PinReason::Select => "select",
            PinReason::Tracking => "tracking",
            PinReason::ClientMode => "client_mode",
            PinReason::Resp3 => "resp3",
            PinReason::Replica => "replica",
        }
    }

    /// Whether the state lasts as long as the client: the dedicated connection is closed
    /// afterwards instead of being cleaned and reused.
    pub fn sticky(self) -> bool {
        matches!(
            self,
            PinReason::Monitor | PinReason::ClientMode | PinReason::Resp3 | PinReason::Replica
        )
    }
}

/// A command the portal answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// AUTH [user] password.
    Auth,
    /// HELLO [2] [AUTH user password] [SETNAME name].
    Hello,
    ClientId,
    ClientSetName,
    ClientGetName,
    /// CLIENT SETINFO: accepted, nothing kept.
    ClientSetInfo,
    /// SELECT 0 on a client that is not pinned: nothing to do.
    SelectZero,
    /// UNSUBSCRIBE, PUNSUBSCRIBE, SUNSUBSCRIBE on a client that is not pinned, so subscribed
    /// to nothing: one reply per channel named (or one), each with a count of 0.
    Unsubscribe,
    /// RESET on a client that is not pinned.
    Reset,
    Quit,
    /// An empty inline line: no reply, as Redis does.
    Nothing,
}

/// What to do with one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward on a shared server connection (or the dedicated one while pinned).
    Plain,
    Local(Local),
    /// Needs a dedicated server connection.
    Pin(PinReason),
    /// Sent on a server connection opened for it alone: SCRIPT KILL, FUNCTION KILL and
    /// SHUTDOWN must reach a server busy with a script, and the server reads nothing more from
    /// the connection running the script, which may be the shared one this client uses; so
    /// must CLIENT UNPAUSE reach a server holding paused commands on that connection.
    OutOfBand,
}

/// Upper-cases ASCII into `out` (command names arrive in any case).
fn upper<'a>(name: &[u8], out: &'a mut [u8; 24]) -> &'a [u8] {
    let n = name.len().min(out.len());
    for (o, b) in out.iter_mut().zip(&name[..n]) {
        *o = b.to_ascii_uppercase();
    }
    if name.len() > out.len() {
        return b"";
    }
    &out[..n]
}

/// Whether `arg` equals `word` ignoring ASCII case.
pub fn is(arg: Option<&[u8]>, word: &str) -> bool {
    arg.is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
}

/// Decides what to do with a command whose arguments are `args(i)` (0 is the name).
pub fn classify<'a>(argc: usize, args: impl Fn(usize) -> Option<&'a [u8]>) -> Action {
    let Some(name) = args(0) else {
        return Action::Local(Local::Nothing);
    };
    let mut buf = [0u8; 24];
    let name = upper(name, &mut buf);
    match name {
        b"GET" | b"SET" | b"INCR" | b"MGET" | b"MSET" | b"DEL" | b"EXPIRE" | b"HGET" | b"HSET"
        | b"LPUSH" | b"RPUSH" | b"LPOP" | b"RPOP" | b"SADD" | b"PING" => Action::Plain,
        b"AUTH" => Action::Local(Local::Auth),
        b"HELLO" => match args(1) {
            Some(v) if v == b"3" => Action::Pin(PinReason::Resp3),
            _ => Action::Local(Local::Hello),
        },
        b"QUIT" => Action::Local(Local::Quit),
        b"RESET" => Action::Local(Local::Reset),
        b"SELECT" => match args(1) {
            Some(b"0") => Action::Local(Local::SelectZero),
            _ => Action::Pin(PinReason::Select),
        },
        b"MULTI" => Action::Pin(PinReason::Multi),
        b"WATCH" => Action::Pin(PinReason::Watch),
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"WAIT" | b"WAITAOF" => Action::Pin(PinReason::Blocking),
        b"XREAD" | b"XREADGROUP" => {
            if (1..argc).any(|i| is(args(i), "BLOCK")) {
                Action::Pin(PinReason::Blocking)
            } else {
                Action::Plain
            }
        }
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" => Action::Pin(PinReason::Subscribe),
        b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"SUNSUBSCRIBE" => Action::Local(Local::Unsubscribe),
        // No reply (REPLCONF ACK), or a stream that is not replies (SYNC's RDB payload).
        b"SYNC" | b"PSYNC" | b"REPLCONF" => Action::Pin(PinReason::Replica),
        // The connection becomes a Lua debugging session.
        b"SCRIPT" if is(args(1), "DEBUG") && !is(args(2), "NO") => {
            Action::Pin(PinReason::ClientMode)
        }
        b"MONITOR" => Action::Pin(PinReason::Monitor),
        b"SCRIPT" | b"FUNCTION" if is(args(1), "KILL") => Action::OutOfBand,
        b"SHUTDOWN" => Action::OutOfBand,
        // What ends a pause must reach the server past the commands it holds.
        b"CLIENT" if argc == 2 && is(args(1), "UNPAUSE") => Action::OutOfBand,
        b"CLIENT" => {
            let mut sub = [0u8; 24];
            let sub = upper(args(1).unwrap_or_default(), &mut sub);
            match sub {
                b"ID" => Action::Local(Local::ClientId),
                b"SETNAME" => Action::Local(Local::ClientSetName),
                b"GETNAME" => Action::Local(Local::ClientGetName),
                b"SETINFO" => Action::Local(Local::ClientSetInfo),
                b"TRACKING" => {
                    if is(args(2), "off") {
                        Action::Plain
                    } else {
                        Action::Pin(PinReason::Tracking)
                    }
                }
                b"REPLY" => {
                    if is(args(2), "on") {
                        Action::Plain
                    } else {
                        Action::Pin(PinReason::ClientMode)
                    }
                }
                b"CACHING" | b"NO-EVICT" | b"NO-TOUCH" => Action::Pin(PinReason::ClientMode),
                _ => Action::Plain,
            }
        }
        _ => Action::Plain,
    }
}

/// Whether a command runs a script or a function (EVAL, EVALSHA, FCALL and their read-only
/// forms): it may keep the server busy past `busy-reply-threshold`, when the server answers
/// other connections `-BUSY` but reads nothing more from this one.
pub fn runs_script(name: &[u8]) -> bool {
    let mut buf = [0u8; 24];
    matches!(
        upper(name, &mut buf),
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO"
    )
}

/// For a command that names clients by their ids (CLIENT TRACKING … REDIRECT id, CLIENT
/// UNBLOCK id, CLIENT KILL … ID id, CLIENT LIST ID id…): the arguments holding ids, and
/// whether it is a tracking redirect. The client knows the ids the portal gives (CLIENT ID);
/// the server, its own connections' ids.
pub fn client_id_arg<'a>(
    argc: usize,
    args: impl Fn(usize) -> Option<&'a [u8]>,
) -> Option<(std::ops::Range<usize>, bool)> {
    if !is(args(0), "CLIENT") {
        return None;
    }
    let after = |word: &str, from: usize| {
        (from..argc.saturating_sub(1))
            .find(|&i| is(args(i), word))
            .map(|i| i + 1..i + 2)
    };
    let mut sub = [0u8; 24];
    match upper(args(1).unwrap_or_default(), &mut sub) {
        b"UNBLOCK" if argc >= 3 => Some((2..3, false)),
        b"TRACKING" => after("REDIRECT", 3).map(|i| (i, true)),
        // The filter form (CLIENT KILL ID id …); the old form takes an address.
        b"KILL" if argc >= 4 => after("ID", 2).map(|i| (i, false)),
        b"LIST" if argc >= 4 && is(args(2), "ID") => Some((3..argc, false)),
        _ => None,
    }
}

/// For CLIENT PAUSE `timeout` [WRITE|ALL]: `Some(Some(timeout))` in milliseconds; for CLIENT
/// UNPAUSE: `Some(None)`; `None` for any other command (a timeout that is not a number: the
/// server refuses it).
pub fn pause<'a>(argc: usize, args: impl Fn(usize) -> Option<&'a [u8]>) -> Option<Option<u64>> {
    if !is(args(0), "CLIENT") {
        return None;
    }
    if argc == 2 && is(args(1), "UNPAUSE") {
        return Some(None);
    }
    if !(3..=4).contains(&argc) || !is(args(1), "PAUSE") {
        return None;
    }
    let ms = std::str::from_utf8(args(2)?).ok()?.parse().ok()?;
    Some(Some(ms))
}

/// Whether the reply to a command names a client by its id: CLIENT GETREDIR and CLIENT
/// TRACKINGINFO (the redirect target), whose server-side id the portal turns back into the
/// id it gave that client.
pub fn reply_names_client<'a>(argc: usize, args: impl Fn(usize) -> Option<&'a [u8]>) -> bool {
    argc == 2 && is(args(0), "CLIENT") && (is(args(1), "GETREDIR") || is(args(1), "TRACKINGINFO"))
}

/// The pub/sub kinds whose replies carry a subscription count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubKind {
    /// Channels and patterns (one count for both).
    Channels,
    /// Shard channels (a count of their own).
    Shard,
}

/// For a command sent while pinned: if it is a pub/sub (un)subscribe, its kind and how many
/// replies it announces (`None`: one per current subscription, unknown here).
pub fn subscription_command<'a>(
    argc: usize,
    args: impl Fn(usize) -> Option<&'a [u8]>,
) -> Option<(SubKind, Option<usize>)> {
    let mut buf = [0u8; 24];
    let name = upper(args(0)?, &mut buf);
    let (kind, subscribe) = match name {
        b"SUBSCRIBE" | b"PSUBSCRIBE" => (SubKind::Channels, true),
        b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" => (SubKind::Channels, false),
        b"SSUBSCRIBE" => (SubKind::Shard, true),
        b"SUNSUBSCRIBE" => (SubKind::Shard, false),
        _ => return None,
    };
    let channels = argc.saturating_sub(1);
    if subscribe && channels == 0 {
        // Refused for its arity: one error reply, like any command.
        return None;
    }
    Some((kind, (channels > 0).then_some(channels)))
}

/// The kind of a pub/sub event (the first element of an array a subscribed connection
/// receives), and whether it answers a command (`subscribe` …) or is pushed (`message` …).
pub fn subscription_event(kind: &[u8]) -> Option<(SubKind, bool)> {
    let mut buf = [0u8; 24];
    match upper(kind, &mut buf) {
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" => {
            Some((SubKind::Channels, true))
        }
        b"SSUBSCRIBE" | b"SUNSUBSCRIBE" => Some((SubKind::Shard, true)),
        b"MESSAGE" | b"PMESSAGE" => Some((SubKind::Channels, false)),
        b"SMESSAGE" => Some((SubKind::Shard, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(words: &str) -> Action {
        let args: Vec<&[u8]> = words.split_whitespace().map(str::as_bytes).collect();
        classify(args.len(), |i| args.get(i).copied())
    }

    #[test]
    fn commands_are_classified() {
        use Action::*;
        for (cmd, want) in [
            ("get k", Plain),
            ("EVALSHA x 0", Plain),
            ("xread count 1 streams s 0", Plain),
            (
                "XREAD COUNT 1 block 0 STREAMS s $",
                Pin(PinReason::Blocking),
            ),
            ("blpop q 0", Pin(PinReason::Blocking)),
            ("WAIT 1 0", Pin(PinReason::Blocking)),
            ("multi", Pin(PinReason::Multi)),
            ("WATCH a b", Pin(PinReason::Watch)),
            ("subscribe c", Pin(PinReason::Subscribe)),
            ("SSUBSCRIBE c", Pin(PinReason::Subscribe)),
            ("monitor", Pin(PinReason::Monitor)),
            ("select 0", Local(super::Local::SelectZero)),
            ("select 3", Pin(PinReason::Select)),
            ("hello 3", Pin(PinReason::Resp3)),
            ("hello 2 auth u p", Local(super::Local::Hello)),
            ("auth pw", Local(super::Local::Auth)),
            ("client id", Local(super::Local::ClientId)),
            ("client setname x", Local(super::Local::ClientSetName)),
            ("CLIENT getname", Local(super::Local::ClientGetName)),
            ("client tracking on", Pin(PinReason::Tracking)),
            ("client tracking off", Plain),
            ("client reply off", Pin(PinReason::ClientMode)),
            ("client list", Plain),
            ("script kill", OutOfBand),
            ("FUNCTION KILL", OutOfBand),
            ("shutdown nosave", OutOfBand),
            ("SHUTDOWN", OutOfBand),
            ("client unpause", OutOfBand),
            ("client pause 10", Plain),
            ("script load x", Plain),
            ("function list", Plain),
            ("eval x 0", Plain),
            ("quit", Local(super::Local::Quit)),
            ("unsubscribe a b", Local(super::Local::Unsubscribe)),
            ("PUNSUBSCRIBE", Local(super::Local::Unsubscribe)),
            ("sync", Pin(PinReason::Replica)),
            ("PSYNC ? -1", Pin(PinReason::Replica)),
            ("replconf ack 0", Pin(PinReason::Replica)),
            ("script debug yes", Pin(PinReason::ClientMode)),
            ("script debug no", Plain),
            ("", Local(super::Local::Nothing)),
            ("averyveryverylongcommandnamethatisnotknown", Plain),
        ] {
            assert_eq!(action(cmd), want, "{cmd}");
        }
    }

    #[test]
    fn pauses_are_read() {
        let read = |words: &str| {
            let args: Vec<&[u8]> = words.split_whitespace().map(str::as_bytes).collect();
            pause(args.len(), |i| args.get(i).copied())
        };
        assert_eq!(read("client pause 100"), Some(Some(100)));
        assert_eq!(read("CLIENT PAUSE 60000 WRITE"), Some(Some(60000)));
        assert_eq!(read("client unpause"), Some(None));
        assert_eq!(read("client pause x"), None);
        assert_eq!(read("client pause"), None);
        assert_eq!(read("client list"), None);
    }

    #[test]
    fn scripts_are_told_by_name() {
        for name in [
            "eval",
            "EVALSHA",
            "eval_ro",
            "evalsha_ro",
            "fcall",
            "FCALL_RO",
        ] {
            assert!(runs_script(name.as_bytes()), "{name}");
        }
        for name in ["SCRIPT", "FUNCTION", "GET", "evalx", ""] {
            assert!(!runs_script(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn commands_naming_a_client_are_found() {
        let find = |words: &str| {
            let args: Vec<&[u8]> = words.split_whitespace().map(str::as_bytes).collect();
            client_id_arg(args.len(), |i| args.get(i).copied())
        };
        assert_eq!(find("client unblock 7"), Some((2..3, false)));
        assert_eq!(find("CLIENT UNBLOCK 7 ERROR"), Some((2..3, false)));
        assert_eq!(
            find("client tracking on redirect 7 bcast"),
            Some((4..5, true))
        );
        assert_eq!(find("client tracking on bcast"), None);
        assert_eq!(find("client kill id 7"), Some((3..4, false)));
        assert_eq!(
            find("client kill type normal id 7 skipme no"),
            Some((5..6, false))
        );
        assert_eq!(find("client kill 127.0.0.1:5000"), None);
        assert_eq!(find("client list id 7 8 9"), Some((3..6, false)));
        assert_eq!(find("client list"), None);
        assert_eq!(find("client id"), None);
        assert_eq!(find("get redirect"), None);
    }

    #[test]
    fn subscriptions_are_counted() {
        let sub = |words: &str| {
            let args: Vec<&[u8]> = words.split_whitespace().map(str::as_bytes).collect();
            subscription_command(args.len(), |i| args.get(i).copied())
        };
        assert_eq!(sub("subscribe a b"), Some((SubKind::Channels, Some(2))));
        assert_eq!(sub("UNSUBSCRIBE"), Some((SubKind::Channels, None)));
        assert_eq!(sub("sunsubscribe x"), Some((SubKind::Shard, Some(1))));
        assert_eq!(sub("ping"), None);
        assert_eq!(sub("SUBSCRIBE"), None, "an arity error, one reply");
        assert_eq!(
            subscription_event(b"message"),
            Some((SubKind::Channels, false))
        );
        assert_eq!(
            subscription_event(b"sunsubscribe"),
            Some((SubKind::Shard, true))
        );
        assert_eq!(subscription_event(b"pong"), None);
    }
}
