//! The commands a multiplexed client's own session answers, in the portal: AUTH and HELLO
//! (checked against `pooling.auth`), CLIENT ID / SETNAME / GETNAME / SETINFO, SELECT 0, RESET
//! (of a client that is not pinned, or whose dedicated connection is raw) and QUIT; and a
//! command naming a client by the id the portal gave it, rewritten to name the server
//! connection that client holds.
//!
//! May import: `health`, `wire` and the rest of `multiplex`.

use tracing::debug;

use super::commands::{client_id_arg, Local};
use super::Session;
use crate::{health::Users, wire::resp::parse_command_as};

const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";

impl Session {
    /// Checks HELLO's AUTH option, answering the error itself. True when the client may go on.
    pub(super) fn hello_auth(&mut self) -> bool {
        let mut i = 2;
        let mut auth = None;
        while let Some(a) = self.arg(i) {
            if a.eq_ignore_ascii_case(b"AUTH") {
                auth = Some((self.arg(i + 1), self.arg(i + 2)));
                i += 3;
            } else {
                i += 2;
            }
        }
        match auth {
            Some((Some(user), Some(pass))) => {
                let (user, pass) = (user.to_vec(), pass.to_vec());
                let reply = self.check(&user, &pass);
                if reply != b"+OK\r\n" {
                    self.reply(reply);
                    return false;
                }
                true
            }
            Some(_) => {
                self.reply(b"-ERR Syntax error in HELLO option 'auth'\r\n");
                false
            }
            None if !self.authed => {
                self.reply(b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n");
                false
            }
            None => true,
        }
    }

    /// Keeps HELLO's SETNAME option as the client's name (the portal's, as CLIENT SETNAME).
    pub(super) fn hello_setname(&mut self) {
        let mut i = 2;
        while let Some(a) = self.arg(i) {
            if a.eq_ignore_ascii_case(b"SETNAME") {
                self.name = self.arg(i + 1).map(<[u8]>::to_vec);
                i += 2;
            } else {
                i += if a.eq_ignore_ascii_case(b"AUTH") {
                    3
                } else {
                    2
                };
            }
        }
    }

    /// Checks a user's password against `pooling.auth`.
    pub(super) fn check(&mut self, user: &[u8], pass: &[u8]) -> &'static [u8] {
        let users: Option<Users> = match self.ctx.credentials.users(&self.settings) {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "the users of pooling.auth cannot be read");
                return b"-ERR the portal cannot check passwords now\r\n";
            }
        };
        let Some(users) = users else {
            return b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
        };
        let ok = std::str::from_utf8(user)
            .ok()
            .and_then(|u| users.get(u))
            .is_some_and(|p| constant_time_eq(p.as_bytes(), pass));
        if ok {
            self.authed = true;
            b"+OK\r\n"
        } else {
            WRONGPASS
        }
    }

    /// What RESET ends in the portal's part of the session: the client's name and login.
    pub(super) fn reset_session(&mut self) {
        self.name = None;
        self.authed = self
            .ctx
            .credentials
            .users(&self.settings)
            .is_ok_and(|u| u.is_none());
    }

    /// Answers a command that concerns only this client's session.
    pub(super) fn local(&mut self, local: Local) {
        let argc = self.cmd.args.len();
        match local {
            Local::Nothing => {}
            Local::Auth => {
                let (user, pass) = match argc {
                    2 => (
                        b"default".to_vec(),
                        self.arg(1).unwrap_or_default().to_vec(),
                    ),
                    3 => (
                        self.arg(1).unwrap_or_default().to_vec(),
                        self.arg(2).unwrap_or_default().to_vec(),
                    ),
                    _ => {
                        self.reply(b"-ERR wrong number of arguments for 'auth' command\r\n");
                        return;
                    }
                };
                let reply = self.check(&user, &pass);
                self.reply(reply);
            }
            Local::Hello => {
                if let Some(v) = self.arg(1) {
                    if v != b"2" && !v.eq_ignore_ascii_case(b"AUTH") {
                        self.reply(b"-NOPROTO unsupported protocol version\r\n");
                        return;
                    }
                }
                if !self.hello_auth() {
                    return;
                }
                self.hello_setname();
                let version = env!("CARGO_PKG_VERSION");
                let id = self.id.to_string();
                let mut r = Vec::new();
                r.extend_from_slice(b"*14\r\n$6\r\nserver\r\n$8\r\ndbportal\r\n$7\r\nversion\r\n");
                r.extend_from_slice(format!("${}\r\n{version}\r\n", version.len()).as_bytes());
                r.extend_from_slice(b"$5\r\nproto\r\n:2\r\n$2\r\nid\r\n");
                r.extend_from_slice(format!(":{id}\r\n").as_bytes());
                r.extend_from_slice(b"$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n");
                self.reply(&r);
            }
            Local::ClientId => {
                let r = format!(":{}\r\n", self.id);
                self.reply(r.as_bytes());
            }
            Local::ClientSetName => match self.arg(2).map(<[u8]>::to_vec) {
                Some(name) if argc == 3 && !name.iter().any(|b| *b <= b' ' || *b > b'~') => {
                    self.name = (!name.is_empty()).then_some(name);
                    self.reply(b"+OK\r\n");
                }
                Some(_) if argc == 3 => self.reply(
                    b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
                ),
                _ => self.reply(b"-ERR wrong number of arguments for 'client|setname' command\r\n"),
            },
            Local::ClientGetName => match self.name.clone() {
                Some(name) => {
                    let mut r = format!("${}\r\n", name.len()).into_bytes();
                    r.extend_from_slice(&name);
                    r.extend_from_slice(b"\r\n");
                    self.reply(&r);
                }
                None => self.reply(b"$-1\r\n"),
            },
            Local::ClientSetInfo | Local::SelectZero => self.reply(b"+OK\r\n"),
            Local::Unsubscribe => {
                // Not pinned, so subscribed to nothing: Redis answers each channel named (or
                // once, with a nil channel) with a count of 0.
                let kind = self.arg(0).unwrap_or_default().to_ascii_lowercase();
                let mut r = Vec::new();
                for i in 1..argc.max(2) {
                    r.extend_from_slice(format!("*3\r\n${}\r\n", kind.len()).as_bytes());
                    r.extend_from_slice(&kind);
                    match self.arg(i) {
                        Some(channel) => {
                            r.extend_from_slice(format!("\r\n${}\r\n", channel.len()).as_bytes());
                            r.extend_from_slice(channel);
                            r.extend_from_slice(b"\r\n:0\r\n");
                        }
                        None => r.extend_from_slice(b"\r\n$-1\r\n:0\r\n"),
                    }
                }
                self.reply(&r);
            }
            Local::Reset => {
                // Not pinned, or on a connection whose replies cannot be counted (closed).
                self.unpin();
                self.reset_session();
                self.reply(b"+RESET\r\n");
            }
            Local::Quit => {
                self.reply(b"+OK\r\n");
                self.quitting = true;
            }
        }
    }

    /// Rewrites, in the input, a command that names a client by the id the portal gave it so
    /// that it names the server connection that client holds (see `Hub::server_id_of`).
    pub(super) fn translate_client_id(&mut self) {
        let buf = &self.inbuf[self.in_start..self.in_end];
        let cmd = &self.cmd;
        let Some((at, redirect)) = client_id_arg(cmd.args.len(), |i| cmd.arg(buf, i)) else {
            return;
        };
        let args: Vec<Vec<u8>> = (0..cmd.args.len())
            .map(|i| {
                let arg = cmd.arg(buf, i).unwrap_or_default();
                let id = std::str::from_utf8(arg)
                    .ok()
                    .and_then(|a| a.parse::<u64>().ok());
                match id {
                    // Not a number, or 0 (an id the portal never gives): left for the
                    // server's own answer.
                    Some(id) if id > 0 && at.contains(&i) => {
                        self.hub.server_id_of(id, redirect).to_string().into_bytes()
                    }
                    _ => arg.to_vec(),
                }
            })
            .collect();
        let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
        for a in &args {
            bytes.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            bytes.extend_from_slice(a);
            bytes.extend_from_slice(b"\r\n");
        }
        let (start, len) = (self.in_start, cmd.len);
        let grown = bytes.len() as isize - len as isize;
        self.inbuf.splice(start..start + len, bytes);
        self.in_end = (self.in_end as isize + grown) as usize;
        let ok = parse_command_as(&self.inbuf[start..self.in_end], &mut self.cmd, true);
        debug_assert_eq!(ok, Ok(true), "a command the portal wrote parses");
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
