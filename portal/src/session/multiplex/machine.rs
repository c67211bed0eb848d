//! A multiplexed client's decisions, apart from its I/O (pure, unit-tested with byte scripts):
//! [`step`], what to do with each classified command given whether the client has logged in,
//! is pinned and has replies in flight; and [`PinState`], the per-connection state a pinned
//! client's commands set and end (MULTI, WATCH, SELECT, CLIENT TRACKING, subscriptions,
//! sticky modes) and its replies settle, which says when the dedicated connection can be
//! given back. The client's task (`mod.rs`, `pinned.rs`) only reads, writes and follows
//! these answers.
//!
//! May import: `wire` and the rest of `multiplex` below it (`commands`).

use super::commands::{is, subscription_command, subscription_event, Action, Local, PinReason};
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
    /// Take a dedicated connection, then send it there.
    Pin(PinReason),
    /// On a connection of its own (SCRIPT KILL, FUNCTION KILL, SHUTDOWN).
    OutOfBand,
    /// On the shared connection, batched with the client's other plain commands.
    Plain,
}

/// The step for `action` when the client has logged in (`authed`), is pinned (`pinned`) and
/// has nothing in flight (`idle`, asked only where it matters: not for a plain command).
pub(super) fn step(
    action: Action,
    authed: bool,
    pinned: bool,
    idle: impl FnOnce() -> bool,
) -> Step {
    let gate = !authed
        && !matches!(
            action,
            Action::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
                | Action::Pin(PinReason::Resp3)
        );
    let forwarded_while_pinned = !matches!(action, Action::Local(_))
        || matches!(action, Action::Local(Local::Reset | Local::SelectZero));
    if pinned && !gate && forwarded_while_pinned {
        return Step::Pinned;
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
    match action {
        Action::Local(l) => Step::Local(l),
        Action::Pin(r) => Step::Pin(r),
        Action::OutOfBand => Step::OutOfBand,
        Action::Plain => Step::Plain,
    }
}

/// The per-connection state a pinned client holds on its dedicated connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PinState {
    /// Commands sent whose reply has not arrived.
    pub(super) pending: u64,
    /// Replies cannot be counted (MONITOR, CLIENT REPLY OFF, RESP3): kept until the client
    /// leaves.
    pub(super) sticky: bool,
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
}

impl PinState {
    /// Whether the dedicated connection must stay with the client.
    pub(super) fn holds_state(&self) -> bool {
        self.sticky
            || self.pending > 0
            || self.multi
            || self.watch
            || self.other_db
            || self.tracking
            || self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }

    pub(super) fn in_pubsub(&self) -> bool {
        self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }

    /// Follows the state the command (`argc` arguments, `arg(i)`; classified as `action`)
    /// sets or ends, as it is sent on the dedicated connection.
    pub(super) fn on_command<'a>(
        &mut self,
        action: Action,
        argc: usize,
        arg: impl Fn(usize) -> Option<&'a [u8]> + Copy,
    ) {
        if let Some((kind, replies)) = subscription_command(argc, arg) {
            match replies {
                Some(n) => self.sub_expected += n as u64,
                None => self.unsub_all[kind as usize] = true,
            }
            return;
        }
        match action {
            Action::Pin(PinReason::Multi) => self.multi = true,
            Action::Pin(PinReason::Watch) => self.watch = true,
            Action::Pin(PinReason::Select) => self.other_db = true,
            Action::Pin(PinReason::Tracking) => self.tracking = true,
            Action::Pin(PinReason::Monitor | PinReason::ClientMode | PinReason::Resp3) => {
                self.sticky = true
            }
            _ => {}
        }
        let name = arg(0).unwrap_or_default();
        let word = |w: &str| name.eq_ignore_ascii_case(w.as_bytes());
        if word("EXEC") || word("DISCARD") {
            self.multi = false;
            self.watch = false;
        } else if word("UNWATCH") {
            self.watch = false;
        } else if word("SELECT") && arg(1) == Some(b"0") {
            self.other_db = false;
        } else if word("CLIENT") && is(arg(1), "TRACKING") && is(arg(2), "off") {
            self.tracking = false;
        } else if word("RESET") {
            let sticky = self.sticky;
            *self = PinState {
                pending: self.pending,
                sticky,
                ..PinState::default()
            };
        }
        // A sticky client's replies are not counted: CLIENT REPLY OFF/SKIP and MONITOR break
        // the one-reply-per-command rule, and its connection is never given back anyway.
        if !self.sticky {
            self.pending += 1;
        }
    }

    /// Settles one whole reply (`kind` its type byte) from the dedicated connection: a
    /// subscription event updates the subscriptions, a push message nothing, any other reply
    /// answers one command.
    pub(super) fn on_reply(&mut self, kind: u8, reply: &[u8]) {
        if kind == b'>' {
            return;
        }
        if self.in_pubsub() {
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
                return;
            }
        }
        self.pending = self.pending.saturating_sub(1);
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

    /// Feeds the commands of `sent` to `state`.
    fn send(state: &mut PinState, sent: &[u8]) {
        for (action, args) in commands(sent) {
            state.on_command(action, args.len(), |i| args.get(i).map(|a| a.as_slice()));
        }
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
        // (action, authed, pinned, idle) → step
        let table = [
            (get, true, false, true, Step::Plain),
            // Plain commands pipeline behind replies in flight.
            (get, true, false, false, Step::Plain),
            (get, false, false, true, Step::NoAuth),
            // Even a refusal waits for the replies before it.
            (get, false, false, false, Step::Wait),
            (auth, false, false, true, Step::Local(Local::Auth)),
            (hello3, false, false, true, Step::Pin(PinReason::Resp3)),
            (multi, true, false, true, Step::Pin(PinReason::Multi)),
            (multi, true, false, false, Step::Wait),
            (client_id, true, false, false, Step::Wait),
            (client_id, true, false, true, Step::Local(Local::ClientId)),
            (kill, true, false, true, Step::OutOfBand),
            (kill, true, false, false, Step::Wait),
            // Pinned: everything but the portal's own answers goes to the dedicated
            // connection, in order, with no wait.
            (get, true, true, false, Step::Pinned),
            (multi, true, true, false, Step::Pinned),
            (reset, true, true, false, Step::Pinned),
            (client_id, true, true, true, Step::Local(Local::ClientId)),
            (get, false, true, true, Step::NoAuth),
        ];
        for (action, authed, pinned, idle, want) in table {
            assert_eq!(
                step(action, authed, pinned, || idle),
                want,
                "{action:?} authed={authed} pinned={pinned} idle={idle}"
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
    fn reset_ends_everything_but_a_sticky_mode() {
        let mut s = PinState::default();
        send(
            &mut s,
            &script(&[&["MULTI"], &["WATCH", "k"], &["SELECT", "3"], &["RESET"]]),
        );
        receive(&mut s, b"+OK\r\n+OK\r\n+OK\r\n+RESET\r\n");
        assert!(!s.holds_state(), "{s:?}");
        let mut m = PinState::default();
        send(&mut m, &script(&[&["MONITOR"], &["RESET"]]));
        assert!(m.sticky && m.holds_state());
        assert_eq!(m.pending, 0, "a sticky client's replies are not counted");
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
}
