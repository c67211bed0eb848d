//! A multiplexed client's decisions, apart from its I/O (pure, unit-tested with byte scripts):
//! [`step`], what to do with each classified command given whether the client has logged in,
//! is pinned (and whether its replies can be counted) and has replies in flight; and
//! [`PinState`], the per-connection state a pinned client's commands set and end (MULTI,
//! WATCH, SELECT, CLIENT TRACKING, subscriptions, CLIENT REPLY, RESP2 or RESP3, sticky and raw
//! modes) and its replies settle: it counts the replies owed, one per command, none for a
//! command CLIENT REPLY silences, push messages and subscription events apart, so that the
//! portal's own answers go out in their place and the dedicated connection is given back
//! only once nothing is owed. The client's task (`mod.rs`, `pinned.rs`) only reads, writes
//! and follows these answers.
//!
//! May import: `wire` and the rest of `multiplex` below it (`commands`).

use std::collections::VecDeque;

use super::commands::{
    is, reply_names_client, subscription_command, subscription_event, Action, Local, PinReason,
};
use crate::wire::resp::array_head;

/// What the client's task does with one parsed, classified command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// On the dedicated connection the client is pinned to.
    Pinned,
    /// Not now: the replies in flight come first (order), then ask again.
    Wait,
    /// `-NOAUTH`: the client has not logged in.
    NoAuth,
    /// Answered in the portal.
    Local(Local),
    /// HELLO on a dedicated connection (pinned now, or asking for RESP3): its AUTH checked
    /// here, then `HELLO <version>` sent there, so that the server speaks the protocol the
    /// client asked for.
    Hello,
    /// Take a dedicated connection, then send it there.
    Pin(PinReason),
    /// On a connection of its own (SCRIPT KILL, FUNCTION KILL, SHUTDOWN, CLIENT UNPAUSE).
    OutOfBand,
    /// On the shared connection, batched with the client's other plain commands.
    Plain,
}

/// Whether, and how, a client holds a dedicated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Held {
    No,
    /// Its replies are counted: one per command, push messages and subscription events aside.
    Counted,
    /// Its replies cannot be counted (MONITOR, a replication stream, a Lua debugging
    /// session): every command but QUIT and RESET goes to the server, in order.
    Raw,
    /// RESET sent on it and not answered yet: every command waits for its answer.
    Resetting,
}

/// The step for `action` when the client has logged in (`authed`), holds a dedicated
/// connection (`held`) and has nothing in flight (`idle`, asked only where it matters: not
/// for a plain command).
pub(super) fn step(action: Action, authed: bool, held: Held, idle: impl FnOnce() -> bool) -> Step {
    if held == Held::Resetting {
        return Step::Wait;
    }
    let gate = !authed
        && !matches!(
            action,
            Action::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
                | Action::Pin(PinReason::Resp3)
        );
    let hello = matches!(
        action,
        Action::Local(Local::Hello) | Action::Pin(PinReason::Resp3)
    );
    // What the server must see while pinned: its state may differ from what the portal would
    // answer (a subscribed client's UNSUBSCRIBE, a SELECT 0 back from another database).
    // RESET waits for the replies in flight, then ends the dedicated connection (`pinned.rs`):
    // the server must not go on with the connection its RESET logs out of the probe's user.
    let forwarded_while_pinned = !matches!(action, Action::Local(_))
        || matches!(
            action,
            Action::Local(Local::SelectZero | Local::Unsubscribe)
        );
    if !gate {
        match held {
            Held::Raw if !matches!(action, Action::Local(Local::Quit | Local::Reset)) => {
                return Step::Pinned
            }
            Held::Counted if forwarded_while_pinned && !hello => return Step::Pinned,
            _ => {}
        }
    }
    // Answered here, moving to a dedicated connection or sent on one of its own: after every
    // reply in flight, so that replies stay in order.
    let after_replies = gate || !matches!(action, Action::Plain);
    if after_replies && !idle() {
        return Step::Wait;
    }
    if gate {
        return Step::NoAuth;
    }
    if hello && (held != Held::No || action == Action::Pin(PinReason::Resp3)) {
        return Step::Hello;
    }
    match action {
        Action::Local(l) => Step::Local(l),
        Action::Pin(r) => Step::Pin(r),
        Action::OutOfBand => Step::OutOfBand,
        Action::Plain => Step::Plain,
    }
}

/// What CLIENT REPLY has set: whether the server answers the next commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Replies {
    #[default]
    On,
    /// CLIENT REPLY OFF: no reply until CLIENT REPLY ON.
    Off,
    /// CLIENT REPLY SKIP: no reply to the next command.
    Skip,
}

/// The per-connection state a pinned client holds on its dedicated connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PinState {
    /// Commands sent whose reply has not arrived.
    pub(super) pending: u64,
    /// Kept until the client leaves (MONITOR, CLIENT REPLY/CACHING/NO-EVICT/NO-TOUCH, RESP3,
    /// a replica): the connection is closed afterwards, not reused.
    pub(super) sticky: bool,
    /// Replies cannot be counted (MONITOR, SYNC/PSYNC/REPLCONF, SCRIPT DEBUG): passed on as
    /// they come.
    pub(super) raw: bool,
    /// The server speaks RESP3 to this connection (HELLO 3): only push messages (`>`) are
    /// events; a `*` reply always answers a command.
    resp3: bool,
    replies: Replies,
    /// A CLIENT REPLY SKIP not sent yet: it goes just before the next command sent, or
    /// silences the next one the portal answers (the server must skip what the client's next
    /// command is, and it does not see the ones the portal answers).
    skip_held: bool,
    multi: bool,
    watch: bool,
    other_db: bool,
    tracking: bool,
    /// Subscribed to channels or patterns / to shard channels, per the latest count.
    subscribed: [bool; 2],
    /// Subscription replies announced and not yet in.
    sub_expected: u64,
    /// An unsubscribe-all sent, not yet answered with a count of 0.
    unsub_all: [bool; 2],
    /// Replies owed so far, and replies settled so far: the reply that settles number `n`
    /// answers the command whose reply was owed as number `n`.
    owed: u64,
    settled: u64,
    /// The numbers of the replies that name a client by the server's id (CLIENT GETREDIR,
    /// CLIENT TRACKINGINFO), oldest first.
    renamed: VecDeque<u64>,
    /// RESET sent, with nothing else in flight: replies (messages, pushes) pass until its
    /// `+RESET`, which ends the connection; whether the client gets that `+RESET` (a CLIENT
    /// REPLY SKIP silences it).
    pub(super) resetting: Option<bool>,
    /// The transaction under way queued a command that changes how the connection answers
    /// (a (un)subscribe, CLIENT REPLY, HELLO): they take effect inside EXEC's reply, whose
    /// replies cannot be counted from then on (see `on_command`).
    queued_mode: bool,
}

impl PinState {
    /// Whether the dedicated connection must stay with the client.
    pub(super) fn holds_state(&self) -> bool {
        self.sticky
            || self.raw
            || self.skip_held
            || self.resetting.is_some()
            || self.pending > 0
            || self.multi
            || self.watch
            || self.other_db
            || self.tracking
            || self.replies != Replies::On
            || self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }

    pub(super) fn in_pubsub(&self) -> bool {
        self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }

    /// Whether a command answered by the portal while pinned gets its reply (CLIENT REPLY
    /// OFF or SKIP silence it as they silence the server), moving past a SKIP.
    pub(super) fn local_reply(&mut self) -> bool {
        if std::mem::take(&mut self.skip_held) {
            return false;
        }
        self.takes_reply(None)
    }

    /// Whether the client gets the reply of RESET sent while pinned: as Redis' RESET, which
    /// ends CLIENT REPLY OFF before it answers but is still silenced by a SKIP (the SKIP held
    /// back is then not sent: the portal drops the `+RESET` instead).
    pub(super) fn reset_reply(&mut self) -> bool {
        // A SKIP while OFF does nothing.
        let skip = std::mem::take(&mut self.skip_held) && self.replies != Replies::Off;
        !skip && self.replies != Replies::Skip
    }

    /// Keeps a CLIENT REPLY SKIP (`argc` arguments, `arg(i)`) back instead of sending it
    /// (see `skip_held`); true when it was.
    pub(super) fn hold_skip<'a>(
        &mut self,
        argc: usize,
        arg: impl Fn(usize) -> Option<&'a [u8]>,
    ) -> bool {
        let skip = argc == 3
            && is(arg(0), "CLIENT")
            && is(arg(1), "REPLY")
            && is(arg(2), "SKIP")
            && !self.multi
            && !self.raw;
        if skip {
            self.skip_held = true;
        }
        skip
    }

    /// Whether a CLIENT REPLY SKIP held back goes out now, before the command about to be
    /// sent (followed as sent, when it does).
    pub(super) fn send_held_skip(&mut self) -> bool {
        if !std::mem::take(&mut self.skip_held) {
            return false;
        }
        let words: [&[u8]; 3] = [b"CLIENT", b"REPLY", b"SKIP"];
        self.on_command(Action::Plain, 3, |i| words.get(i).copied());
        true
    }

    /// Whether the server answers the next command (`mode`: the CLIENT REPLY it sets, if it
    /// is one), as Redis' CLIENT REPLY and `resetClient` decide.
    fn takes_reply(&mut self, mode: Option<Replies>) -> bool {
        match mode {
            Some(Replies::On) => {
                self.replies = Replies::On;
                return true;
            }
            Some(Replies::Off) => {
                self.replies = Replies::Off;
                return false;
            }
            Some(Replies::Skip) => {
                if self.replies != Replies::Off {
                    self.replies = Replies::Skip;
                }
                return false;
            }
            None => {}
        }
        match self.replies {
            Replies::On => true,
            Replies::Off => false,
            Replies::Skip => {
                self.replies = Replies::On;
                false
            }
        }
    }

    /// Follows the state the command (`argc` arguments, `arg(i)`; classified as `action`)
    /// sets or ends, as it is sent on the dedicated connection.
    pub(super) fn on_command<'a>(
        &mut self,
        action: Action,
        argc: usize,
        arg: impl Fn(usize) -> Option<&'a [u8]> + Copy,
    ) {
        let name = arg(0).unwrap_or_default();
        let word = |w: &str| name.eq_ignore_ascii_case(w.as_bytes());
        if let Some((kind, replies)) = subscription_command(argc, arg) {
            if self.multi {
                // Queued: it subscribes (or not) inside EXEC.
                self.queued_mode = true;
            } else {
                match replies {
                    Some(n) => self.sub_expected += n as u64,
                    None => self.unsub_all[kind as usize] = true,
                }
                return;
            }
        }
        if self.multi && (word("HELLO") || (word("CLIENT") && is(arg(1), "REPLY"))) {
            self.queued_mode = true;
        }
        match action {
            Action::Pin(PinReason::Multi) => self.multi = true,
            Action::Pin(PinReason::Watch) => self.watch = true,
            Action::Pin(PinReason::Select) => self.other_db = true,
            Action::Pin(PinReason::Tracking) => self.tracking = true,
            Action::Pin(PinReason::Monitor | PinReason::Replica) => {
                self.sticky = true;
                self.raw = true;
            }
            Action::Pin(r @ (PinReason::ClientMode | PinReason::Resp3)) => {
                self.sticky = true;
                // A Lua debugging session answers in its own way.
                if r == PinReason::ClientMode && word("SCRIPT") {
                    self.raw = true;
                }
            }
            _ => {}
        }
        let mut mode = None;
        if word("EXEC") || word("DISCARD") {
            if word("EXEC") && std::mem::take(&mut self.queued_mode) {
                // Subscriptions, CLIENT REPLY or a protocol change made inside EXEC: its reply
                // and what follows are passed on as they come, and the connection stays with
                // the client (closed afterwards, never given to another).
                self.sticky = true;
                self.raw = true;
            }
            self.queued_mode = false;
            self.multi = false;
            self.watch = false;
        } else if word("UNWATCH") {
            self.watch = false;
        } else if word("SELECT") && arg(1) == Some(b"0") {
            self.other_db = false;
        } else if word("HELLO") {
            if let Some(v) = arg(1) {
                if v == b"2" || v == b"3" {
                    self.resp3 = v == b"3";
                }
            }
        } else if word("CLIENT") && is(arg(1), "TRACKING") && is(arg(2), "off") {
            self.tracking = false;
        } else if word("CLIENT") && is(arg(1), "REPLY") && argc == 3 && !self.multi {
            mode = [
                ("ON", Replies::On),
                ("OFF", Replies::Off),
                ("SKIP", Replies::Skip),
            ]
            .into_iter()
            .find(|(w, _)| is(arg(2), w))
            .map(|(_, m)| m);
        }
        if self.raw {
            // From here on replies are passed on uncounted: none is owed any more.
            self.pending = 0;
            self.renamed.clear();
        } else if self.takes_reply(mode) {
            self.pending += 1;
            if reply_names_client(argc, arg) {
                self.renamed.push_back(self.owed);
            }
            self.owed += 1;
        }
    }

    /// Settles one whole reply (`kind` its type byte) from the dedicated connection: a
    /// subscription event updates the subscriptions, a push message nothing, any other reply
    /// answers one command. True when that reply names a client by the server's id (see
    /// `renamed`).
    pub(super) fn on_reply(&mut self, kind: u8, reply: &[u8]) -> bool {
        let event = kind == b'>' || (kind == b'*' && !self.resp3 && self.in_pubsub());
        if event {
            let event = array_head(reply).and_then(|(head, count)| {
                subscription_event(head).map(|(kind, answers)| (kind, answers.then_some(count)))
            });
            if let Some((kind, answers)) = event {
                if let Some(count) = answers {
                    let k = kind as usize;
                    self.sub_expected = self.sub_expected.saturating_sub(1);
                    let count = count.unwrap_or(0);
                    self.subscribed[k] = count > 0;
                    if count == 0 {
                        self.unsub_all[k] = false;
                    }
                }
                return false;
            }
        }
        if kind == b'>' || self.pending == 0 {
            return false;
        }
        self.pending -= 1;
        let n = self.settled;
        self.settled += 1;
        if self.renamed.front() == Some(&n) {
            self.renamed.pop_front();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::multiplex::commands::classify;
    use crate::wire::resp::{parse_command, scan_reply, Command};

    /// The classified commands of a byte script of RESP commands.
    fn commands(script: &[u8]) -> Vec<(Action, Vec<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut cmd = Command::default();
        while parse_command(&script[pos..], &mut cmd).unwrap() {
            let buf = &script[pos..];
            let args: Vec<Vec<u8>> = (0..cmd.args.len())
                .map(|i| cmd.arg(buf, i).unwrap().to_vec())
                .collect();
            let action = classify(args.len(), |i| args.get(i).map(|a| a.as_slice()));
            out.push((action, args));
            pos += cmd.len;
        }
        assert_eq!(pos, script.len(), "the script ends with a whole command");
        out
    }

    /// Feeds the commands of `sent` to `state` as the client's task sends them (a CLIENT REPLY
    /// SKIP held back until the next command); returns the commands the server gets.
    fn send(state: &mut PinState, sent: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for (action, args) in commands(sent) {
            let arg = |i: usize| args.get(i).map(|a| a.as_slice());
            if state.hold_skip(args.len(), arg) {
                continue;
            }
            if state.send_held_skip() {
                out.push(vec![
                    b"CLIENT".to_vec(),
                    b"REPLY".to_vec(),
                    b"SKIP".to_vec(),
                ]);
            }
            state.on_command(action, args.len(), arg);
            out.push(args);
        }
        out
    }

    /// Feeds the replies of `replies` to `state`.
    fn receive(state: &mut PinState, replies: &[u8]) {
        let mut pos = 0;
        while let Some(s) = scan_reply(&replies[pos..]).unwrap() {
            state.on_reply(s.kind, &replies[pos..pos + s.len]);
            pos += s.len;
        }
        assert_eq!(pos, replies.len(), "the replies end with a whole reply");
    }

    fn inline(words: &[&str]) -> Vec<u8> {
        let mut b = format!("*{}\r\n", words.len()).into_bytes();
        for w in words {
            b.extend_from_slice(format!("${}\r\n{w}\r\n", w.len()).as_bytes());
        }
        b
    }

    fn script(commands: &[&[&str]]) -> Vec<u8> {
        commands.iter().flat_map(|c| inline(c)).collect()
    }

    #[test]
    fn steps_follow_login_pinning_and_replies_in_flight() {
        let get = commands(&inline(&["GET", "k"]))[0].0;
        let multi = commands(&inline(&["MULTI"]))[0].0;
        let auth = commands(&inline(&["AUTH", "pw"]))[0].0;
        let client_id = commands(&inline(&["CLIENT", "ID"]))[0].0;
        let reset = commands(&inline(&["RESET"]))[0].0;
        let kill = commands(&inline(&["SCRIPT", "KILL"]))[0].0;
        let hello3 = commands(&inline(&["HELLO", "3"]))[0].0;
        let hello2 = commands(&inline(&["HELLO", "2"]))[0].0;
        let unsubscribe = commands(&inline(&["UNSUBSCRIBE", "a"]))[0].0;
        let quit = commands(&inline(&["QUIT"]))[0].0;
        let monitor = commands(&inline(&["MONITOR"]))[0].0;
        use Held::{Counted, Raw};
        const NO: Held = Held::No;
        // (action, authed, held, idle) → step
        let table = [
            (get, true, NO, true, Step::Plain),
            // Plain commands pipeline behind replies in flight.
            (get, true, NO, false, Step::Plain),
            (get, false, NO, true, Step::NoAuth),
            // Even a refusal waits for the replies before it.
            (get, false, NO, false, Step::Wait),
            (auth, false, NO, true, Step::Local(Local::Auth)),
            (hello3, false, NO, true, Step::Hello),
            (hello3, true, NO, false, Step::Wait),
            (hello2, true, NO, true, Step::Local(Local::Hello)),
            (multi, true, NO, true, Step::Pin(PinReason::Multi)),
            (multi, true, NO, false, Step::Wait),
            (monitor, true, NO, true, Step::Pin(PinReason::Monitor)),
            (client_id, true, NO, false, Step::Wait),
            (client_id, true, NO, true, Step::Local(Local::ClientId)),
            (unsubscribe, true, NO, true, Step::Local(Local::Unsubscribe)),
            (kill, true, NO, true, Step::OutOfBand),
            (kill, true, NO, false, Step::Wait),
            // Pinned: everything but the portal's own answers goes to the dedicated
            // connection, in order, with no wait.
            (get, true, Counted, false, Step::Pinned),
            (multi, true, Counted, false, Step::Pinned),
            // RESET waits for the replies before it; the dedicated connection ends with it
            // (raw or not, the client's task handles it as a local command).
            (reset, true, Counted, false, Step::Wait),
            (reset, true, Counted, true, Step::Local(Local::Reset)),
            (reset, true, Raw, true, Step::Local(Local::Reset)),
            (get, true, Held::Resetting, true, Step::Wait),
            (client_id, true, Held::Resetting, true, Step::Wait),
            (quit, true, Held::Resetting, true, Step::Wait),
            (unsubscribe, true, Counted, false, Step::Pinned),
            (client_id, true, Counted, true, Step::Local(Local::ClientId)),
            (client_id, true, Counted, false, Step::Wait),
            (get, false, Counted, true, Step::NoAuth),
            // HELLO while pinned reaches the server, which must speak what the client asked
            // for, after the replies in flight.
            (hello2, true, Counted, true, Step::Hello),
            (hello2, true, Counted, false, Step::Wait),
            (hello3, true, Counted, true, Step::Hello),
            // Replies that cannot be counted: everything to the server but QUIT.
            (client_id, true, Raw, true, Step::Pinned),
            (hello2, true, Raw, true, Step::Pinned),
            (quit, true, Raw, true, Step::Local(Local::Quit)),
        ];
        for (action, authed, held, idle, want) in table {
            assert_eq!(
                step(action, authed, held, || idle),
                want,
                "{action:?} authed={authed} held={held:?} idle={idle}"
            );
        }
    }

    #[test]
    fn a_transaction_holds_the_connection_until_exec_or_discard() {
        for end in ["EXEC", "DISCARD"] {
            let mut s = PinState::default();
            send(&mut s, &script(&[&["MULTI"], &["SET", "a", "1"], &[end]]));
            assert_eq!(s.pending, 3);
            receive(&mut s, b"+OK\r\n+QUEUED\r\n");
            assert!(s.holds_state(), "{end}: a reply still in flight");
            receive(&mut s, b"*1\r\n+OK\r\n");
            assert!(!s.holds_state(), "{end}: {s:?}");
        }
        let mut s = PinState::default();
        send(&mut s, &script(&[&["MULTI"], &["SET", "a", "1"]]));
        receive(&mut s, b"+OK\r\n+QUEUED\r\n");
        assert!(s.holds_state(), "inside MULTI with nothing in flight");
    }

    #[test]
    fn watch_select_and_tracking_last_until_ended() {
        type Script<'a> = &'a [&'a [&'a str]];
        let cases: [(Script, Script, &[u8]); 3] = [
            (&[&["WATCH", "k"]], &[&["UNWATCH"]], b"+OK\r\n"),
            (&[&["SELECT", "2"]], &[&["SELECT", "0"]], b"+OK\r\n"),
            (
                &[&["CLIENT", "TRACKING", "on"]],
                &[&["CLIENT", "TRACKING", "off"]],
                b"+OK\r\n",
            ),
        ];
        for (start, end, ok) in cases {
            let mut s = PinState::default();
            send(&mut s, &script(start));
            receive(&mut s, ok);
            assert!(s.holds_state(), "{start:?}");
            send(&mut s, &script(end));
            receive(&mut s, ok);
            assert!(!s.holds_state(), "{start:?} then {end:?}: {s:?}");
        }
    }

    #[test]
    fn subscriptions_end_with_a_count_of_zero() {
        let mut s = PinState::default();
        send(&mut s, &script(&[&["SUBSCRIBE", "a", "b"]]));
        receive(
            &mut s,
            b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
        );
        assert!(s.in_pubsub() && s.holds_state());
        // A message is not an answer to any command.
        receive(&mut s, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n");
        assert_eq!(s.pending, 0);
        send(&mut s, &script(&[&["UNSUBSCRIBE"]]));
        assert!(s.holds_state(), "an unsubscribe-all in flight");
        receive(&mut s, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n");
        assert!(s.holds_state(), "one channel left");
        receive(&mut s, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n");
        assert!(!s.holds_state(), "{s:?}");
    }

    #[test]
    fn a_transaction_that_changes_how_replies_come_turns_raw_at_exec() {
        for queued in [
            &["SUBSCRIBE", "c"][..],
            &["UNSUBSCRIBE"],
            &["PSUBSCRIBE", "p*"],
            &["CLIENT", "REPLY", "OFF"],
            &["HELLO", "3"],
        ] {
            let mut s = PinState::default();
            send(&mut s, &script(&[&["MULTI"], queued]));
            assert_eq!(s.pending, 2, "{queued:?}: queued like any command");
            assert!(!s.in_pubsub() && !s.raw, "{queued:?}: {s:?}");
            receive(&mut s, b"+OK\r\n+QUEUED\r\n");
            send(&mut s, &script(&[&["EXEC"]]));
            assert!(s.raw && s.sticky, "{queued:?}: {s:?}");
            assert_eq!(s.pending, 0, "{queued:?}: raw replies are not owed");
        }
        // DISCARD, or a transaction of plain commands, changes nothing.
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[&["MULTI"], &["SUBSCRIBE", "c"], &["DISCARD"]]),
        );
        send(&mut s, &script(&[&["MULTI"], &["GET", "k"], &["EXEC"]]));
        assert!(!s.raw && !s.sticky, "{s:?}");
        assert_eq!(s.pending, 6);
    }

    #[test]
    fn the_replies_naming_a_client_are_told_apart() {
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[
                &["GET", "k"],
                &["CLIENT", "GETREDIR"],
                &["CLIENT", "REPLY", "SKIP"],
                &["CLIENT", "TRACKINGINFO"],
                &["CLIENT", "TRACKINGINFO"],
            ]),
        );
        assert_eq!(s.pending, 3, "the skipped one owes nothing");
        // A push in between settles nothing.
        let replies: [(&[u8], bool); 4] = [
            (b"$-1\r\n", false),
            (b">2\r\n$10\r\ninvalidate\r\n*0\r\n", false),
            (b":7\r\n", true),
            (b"*2\r\n$5\r\nflags\r\n*0\r\n", true),
        ];
        for (reply, named) in replies {
            let kind = reply[0];
            assert_eq!(s.on_reply(kind, reply), named, "{:?}", reply);
        }
        assert_eq!(s.pending, 0);
        assert!(!s.on_reply(b':', b":1\r\n"), "a reply nothing asked for");
    }

    #[test]
    fn monitor_after_commands_in_flight_owes_nothing() {
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[&["SELECT", "9"], &["GET", "k"], &["MONITOR"]]),
        );
        assert!(s.raw);
        assert_eq!(s.pending, 0);
    }

    #[test]
    fn a_blocking_command_holds_until_its_reply() {
        let mut s = PinState::default();
        send(&mut s, &script(&[&["BLPOP", "q", "0"]]));
        assert!(s.holds_state());
        // RESP3 push data in between answers nothing.
        receive(&mut s, b">2\r\n$10\r\ninvalidate\r\n*0\r\n");
        assert!(s.holds_state());
        receive(&mut s, b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n");
        assert!(!s.holds_state());
    }

    #[test]
    fn resp3_replies_are_counted_and_push_messages_are_not() {
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[&["HELLO", "3"], &["CLIENT", "TRACKING", "on"]]),
        );
        assert_eq!(s.pending, 2);
        receive(&mut s, b"%1\r\n$5\r\nproto\r\n:3\r\n+OK\r\n");
        assert_eq!(s.pending, 0);
        send(&mut s, &script(&[&["GET", "k"]]));
        // An invalidation pushed before the reply answers nothing.
        receive(&mut s, b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n");
        assert_eq!(s.pending, 1);
        receive(&mut s, b"$1\r\nv\r\n");
        assert_eq!(s.pending, 0);
        // Subscribed in RESP3: subscription answers are pushes; a `*` reply that starts with
        // "message" still answers a command.
        send(
            &mut s,
            &script(&[&["SUBSCRIBE", "c"], &["LRANGE", "l", "0", "-1"]]),
        );
        receive(&mut s, b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
        assert!(s.in_pubsub());
        receive(&mut s, b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n");
        assert_eq!(s.pending, 0, "{s:?}");
        // HELLO 2 ends RESP3: a `*` event counts as one again.
        send(&mut s, &script(&[&["HELLO", "2"]]));
        receive(&mut s, b"*2\r\n$5\r\nproto\r\n:2\r\n");
        assert_eq!(s.pending, 0);
        receive(&mut s, b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n");
        assert_eq!(s.pending, 0);
    }

    #[test]
    fn client_reply_off_and_skip_silence_replies() {
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[
                &["CLIENT", "REPLY", "OFF"],
                &["SET", "a", "1"],
                &["GET", "a"],
            ]),
        );
        assert_eq!(s.pending, 0, "nothing is answered while OFF");
        assert!(!s.local_reply(), "nor by the portal");
        send(&mut s, &script(&[&["CLIENT", "REPLY", "SKIP"]]));
        assert_eq!(s.pending, 0, "SKIP while OFF changes nothing");
        send(
            &mut s,
            &script(&[&["CLIENT", "REPLY", "ON"], &["GET", "a"]]),
        );
        assert_eq!(s.pending, 2, "ON answers +OK, then every command");
        receive(&mut s, b"+OK\r\n$1\r\n1\r\n");
        send(
            &mut s,
            &script(&[&["CLIENT", "REPLY", "SKIP"], &["GET", "a"], &["GET", "b"]]),
        );
        assert_eq!(
            s.pending, 1,
            "SKIP and the command after it are not answered"
        );
        let sent = send(&mut s, &script(&[&["CLIENT", "REPLY", "SKIP"]]));
        assert!(sent.is_empty(), "a SKIP waits for the command it silences");
        let mut fresh = PinState::default();
        send(&mut fresh, &script(&[&["CLIENT", "REPLY", "SKIP"]]));
        assert!(fresh.holds_state(), "on this connection: {fresh:?}");
        assert!(
            !s.local_reply(),
            "a SKIP silences a command the portal answers"
        );
        assert!(s.local_reply());
        send(&mut s, &script(&[&["CLIENT", "REPLY", "OFF"]]));
        assert!(s.reset_reply(), "RESET ends OFF and answers");
        send(&mut s, &script(&[&["CLIENT", "REPLY", "SKIP"]]));
        assert!(s.reset_reply(), "a SKIP while OFF does nothing");
        send(
            &mut s,
            &script(&[&["CLIENT", "REPLY", "ON"], &["CLIENT", "REPLY", "SKIP"]]),
        );
        assert!(!s.reset_reply(), "a SKIP silences RESET");
    }

    #[test]
    fn monitor_and_replication_are_raw() {
        for start in [
            &["MONITOR"][..],
            &["SYNC"],
            &["PSYNC", "?", "-1"],
            &["SCRIPT", "DEBUG", "SYNC"],
        ] {
            let mut s = PinState::default();
            send(&mut s, &script(&[start, &["GET", "k"]]));
            assert!(s.raw && s.sticky && s.holds_state(), "{start:?}");
            assert_eq!(s.pending, 0, "{start:?}");
        }
        let mut s = PinState::default();
        send(&mut s, &script(&[&["CLIENT", "NO-EVICT", "on"]]));
        assert!(s.sticky && !s.raw);
        assert_eq!(s.pending, 1);
    }
}
