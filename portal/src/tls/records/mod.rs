//! TLS records after the handshake, kept by the portal itself: the server side of a client's
//! TLS for data planes whose clients mostly sit idle (PostgreSQL pooling).
//!
//! rustls does the cryptography and the state that needs it:
//! - the handshake (its unbuffered API, fed one record at a time so that it stops at the
//!   client's Finished: [`handshake`]);
//! - the traffic keys and, for TLS 1.3, the [`KernelConnection`] that derives the next ones on
//!   a KeyUpdate (`update_rx_secret` / `update_tx_secret`); it is kept, boxed, while the client
//!   lives, and holds the key schedule's secrets, wiped by rustls on drop;
//! - every record's sealing and opening (`MessageEncrypter::encrypt`,
//!   `MessageDecrypter::decrypt` of the suite's `aead_alg`): nonces, additional data, tags,
//!   TLS 1.3 padding and the 2^14-byte plaintext limit.
//!
//! The portal does what rustls offers no supported API for outside its own buffered
//! connection: the framing (reading whole records off the socket without a buffer while
//! idle, the ciphertext limits of each version), the dispatch on content type (data, alerts,
//! KeyUpdate, anything else refused), the rules of RFC 8446 / 5246 for these records, taken
//! from rustls' own: at most one KeyUpdate reply unsent and at most 32 KeyUpdates between
//! application data; a KeyUpdate may come in fragments but must end its record; fatal alerts
//! end the connection, at most 4 warning alerts (TLS 1.3: user_canceled only); a record the
//! portal refuses is answered with its alert (`bad_record_mac`, `record_overflow`,
//! `unexpected_message`, `decode_error`, `illegal_parameter`) before the connection closes,
//! and an orderly end sends `close_notify`. Renegotiation (a TLS 1.2 handshake record) is
//! refused with `unexpected_message`.
//!
//! Why not rustls' own connection after the handshake: it keeps, per client, a read buffer
//! and some 3 KiB of connection state, where most pooled clients sit idle; rustls' kernel-TLS
//! handover is the supported way to keep only the keys. An idle client holds no buffer: its
//! keys (see [`keys`]: 44 wiped bytes a direction for AES-256-GCM and ChaCha20-Poly1305;
//! rustls' 560-byte AEAD a direction for AES-128-GCM, whose key rustls' public API cannot take
//! back) and, for TLS 1.3, the kernel connection (784 bytes with its key schedule). rustls'
//! AEADs are built on ring, whose expanded keys are not wiped when freed; the keys the portal
//! holds itself are.
//!
//! May import: `wire` (PostgreSQL's ALPN name) and the rest of `tls`.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use rustls::{
    crypto::cipher::{MessageDecrypter, MessageEncrypter},
    kernel::KernelConnection,
    server::ServerConnectionData,
    AlertDescription, ContentType, ProtocolVersion, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::bytes::{drain_into, poll_read_onto};

mod handshake;
mod keys;
mod record;

pub use handshake::accept;
pub use record::{record_error, RecordError};

use keys::Keys;
use record::{
    frame, open, refuse, seal, Content, Handshake, FATAL, KEY_UPDATE, MAX_PLAIN, WARNING,
};

/// KeyUpdates the client may send between records of application data (rustls' and
/// BoringSSL's limit).
const MAX_KEY_UPDATES: u8 = 32;
/// Warning alerts the client may send in all (rustls' limit).
const MAX_WARNINGS: u8 = 4;

/// The server config for connections that keep their own records: secret extraction on.
pub fn configure(config: &mut ServerConfig) {
    config.enable_secret_extraction = true;
}

/// A client's TLS after the handshake: its keys and whatever bytes are in flight.
pub struct Records<S> {
    io: S,
    state: State,
}

struct State {
    rx: Keys<dyn MessageDecrypter>,
    tx: Keys<dyn MessageEncrypter>,
    /// TLS 1.3: what derives the next traffic keys.
    kernel: Option<Box<KernelConnection<ServerConnectionData>>>,
    /// Ciphertext read but not yet opened (a partial record); empty while idle.
    rbuf: Vec<u8>,
    /// Plaintext opened but not yet read, from `ppos`.
    plain: Vec<u8>,
    ppos: usize,
    /// A TLS 1.3 handshake message (a KeyUpdate) whose first fragments came.
    hs: Vec<u8>,
    /// Records sealed but not yet written, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Where the last KeyUpdate sealed ends in `wbuf`: unsent while `wpos` is short of it.
    update_end: usize,
    /// KeyUpdates since the last application data, and warning alerts in all.
    key_updates: u8,
    warnings: u8,
    read_closed: bool,
    /// Nothing more may be sealed: close_notify or a fatal alert was sealed or received.
    close_sent: bool,
    /// The portal's keys are to change before its next record (TLS 1.3 KeyUpdate).
    key_update_due: bool,
    /// `rbuf` holds records read with the handshake, not yet opened.
    unopened: bool,
    /// Why the connection ended, for every later read and write.
    failed: Option<Box<RecordError>>,
    postgresql_alpn: bool,
}

impl<S> Records<S> {
    pub fn protocol_version(&self) -> ProtocolVersion {
        if self.state.rx.tls13() {
            ProtocolVersion::TLSv1_3
        } else {
            ProtocolVersion::TLSv1_2
        }
    }

    /// The ALPN protocol the client chose: only PostgreSQL's is told apart here.
    pub fn alpn(&self) -> Option<&'static [u8]> {
        self.state
            .postgresql_alpn
            .then_some(crate::wire::postgres::ALPN)
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

/// What a record asked for once its bytes are no longer borrowed.
enum Event {
    None,
    Alert(u8, u8),
    Handshake,
}

impl State {
    /// A connection's state after the handshake: its keys, the ciphertext and plaintext read
    /// with the handshake.
    fn new(
        rx: Keys<dyn MessageDecrypter>,
        tx: Keys<dyn MessageEncrypter>,
        kernel: Option<Box<KernelConnection<ServerConnectionData>>>,
        rbuf: Vec<u8>,
        plain: Vec<u8>,
        postgresql_alpn: bool,
    ) -> Self {
        let unopened = !rbuf.is_empty();
        State {
            rx,
            tx,
            kernel,
            rbuf,
            plain,
            ppos: 0,
            hs: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            update_end: 0,
            key_updates: 0,
            warnings: 0,
            read_closed: false,
            close_sent: false,
            key_update_due: false,
            unopened,
            failed: None,
            postgresql_alpn,
        }
    }

    /// Opens every complete record in `rbuf` into `plain`; handles alerts and KeyUpdate. The
    /// decrypter of a suite held as its key is built once for the batch.
    fn open_all(&mut self) -> Result<(), RecordError> {
        let tls13 = self.rx.tls13();
        let mut at = 0;
        let mut batch = None;
        let result = loop {
            let n = match frame(&self.rbuf[at..], tls13) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            if self.read_closed {
                break Err(refuse(
                    AlertDescription::UnexpectedMessage,
                    "TLS record after close_notify",
                ));
            }
            let seq = self.rx.seq;
            let record = &mut self.rbuf[at..at + n];
            let content = match open(self.rx.aead(&mut batch), seq, tls13, record) {
                Ok(content) => content,
                Err(e) => break Err(e),
            };
            self.rx.seq += 1;
            at += n;
            let interleaved = !self.hs.is_empty() && !matches!(content, Content::Handshake(_));
            if interleaved {
                break Err(refuse(
                    AlertDescription::UnexpectedMessage,
                    "TLS record between the fragments of a handshake message",
                ));
            }
            let event = match content {
                Content::Data([]) => Event::None,
                Content::Data(data) => {
                    if self.ppos == self.plain.len() {
                        self.plain.clear();
                        self.ppos = 0;
                    }
                    self.plain.extend_from_slice(data);
                    self.key_updates = 0;
                    Event::None
                }
                Content::Alert(level, description) => Event::Alert(level, description),
                Content::Handshake(bytes) => {
                    self.hs.extend_from_slice(bytes);
                    Event::Handshake
                }
            };
            let handled = match event {
                Event::None => Ok(()),
                Event::Alert(level, description) => self.alert(level, description),
                Event::Handshake => self.handshake(&mut batch),
            };
            if let Err(e) = handled {
                break Err(e);
            }
        };
        if at == self.rbuf.len() {
            self.rbuf = Vec::new();
        } else if at > 0 {
            self.rbuf.drain(..at);
        }
        result
    }

    /// An alert from the client (RFC 8446 6, RFC 5246 7.2, as rustls takes them).
    fn alert(&mut self, level: u8, description: u8) -> Result<(), RecordError> {
        let alert = AlertDescription::from(description);
        if alert == AlertDescription::CloseNotify {
            self.read_closed = true;
            return Ok(());
        }
        match level {
            FATAL => Err(RecordError {
                alert,
                sent: false,
                why: format!("the client ended its TLS connection with the fatal alert {alert:?}"),
            }),
            WARNING if self.warnings >= MAX_WARNINGS => Err(refuse(
                AlertDescription::UnexpectedMessage,
                format!("more than {MAX_WARNINGS} TLS warning alerts from the client"),
            )),
            WARNING if self.rx.tls13() && alert != AlertDescription::UserCanceled => Err(refuse(
                AlertDescription::DecodeError,
                format!("TLS 1.3 warning alert {alert:?} (only close_notify and user_canceled)"),
            )),
            WARNING => {
                self.warnings += 1;
                Ok(())
            }
            _ => Err(refuse(
                AlertDescription::IllegalParameter,
                format!("TLS alert of unknown level {level}"),
            )),
        }
    }

    /// TLS 1.3 handshake bytes after the handshake: a KeyUpdate, whole or in fragments.
    fn handshake(
        &mut self,
        batch: &mut Option<Box<dyn MessageDecrypter>>,
    ) -> Result<(), RecordError> {
        let Handshake::KeyUpdate(requested) = record::handshake(&self.hs)? else {
            return Ok(());
        };
        self.hs = Vec::new();
        if self.key_updates >= MAX_KEY_UPDATES {
            return Err(refuse(
                AlertDescription::UnexpectedMessage,
                format!("more than {MAX_KEY_UPDATES} TLS KeyUpdates without application data"),
            ));
        }
        self.key_updates += 1;
        let kernel = self.kernel.as_mut().ok_or_else(|| {
            refuse(
                AlertDescription::UnexpectedMessage,
                "KeyUpdate outside TLS 1.3",
            )
        })?;
        let next = kernel
            .update_rx_secret()
            .map_err(|e| refuse(AlertDescription::InternalError, format!("KeyUpdate: {e}")))?;
        self.rx = Keys::new(self.rx.suite, next)
            .map_err(|e| refuse(AlertDescription::InternalError, e.to_string()))?;
        *batch = None;
        // One reply answers every request that comes while it is unsent (RFC 8446 4.6.3).
        if requested && self.wpos >= self.update_end {
            self.key_update_due = true;
        }
        Ok(())
    }

    /// Ends the connection for `e`: its alert is sealed if the portal refused a record, and
    /// nothing is sealed after it.
    fn refuse(&mut self, e: &RecordError) {
        if e.sent && !self.close_sent {
            let _ = self.seal_one(ContentType::Alert, &[&[FATAL, u8::from(e.alert)]]);
        }
        self.close_sent = true;
        self.key_update_due = false;
        self.failed = Some(Box::new(e.clone()));
    }

    /// Seals `bufs` (at most 2^14 bytes in all) as one record of `typ` into `wbuf`, replacing
    /// the keys first if they are due (KeyUpdate asked for, or the suite's record limit).
    fn seal(&mut self, typ: ContentType, bufs: &[&[u8]]) -> io::Result<()> {
        if self.tx.seq.saturating_add(1) >= self.tx.record_limit() {
            if self.kernel.is_none() {
                // TLS 1.2 cannot change keys: rustls closes the connection here.
                if !self.close_sent {
                    self.seal_one(ContentType::Alert, &[&[WARNING, 0]])?;
                    self.close_sent = true;
                }
                return Err(io::Error::other(
                    "TLS 1.2 record limit of the cipher suite reached: the connection ends",
                ));
            }
            self.key_update_due = true;
        }
        self.rekey_if_due()?;
        self.seal_one(typ, bufs)
    }

    fn seal_one(&mut self, typ: ContentType, bufs: &[&[u8]]) -> io::Result<()> {
        let seq = self.tx.seq;
        let mut batch = None;
        seal(self.tx.aead(&mut batch), seq, typ, bufs, &mut self.wbuf)?;
        self.tx.seq += 1;
        Ok(())
    }

    /// Seals a KeyUpdate (update_not_requested) under the old keys and takes the next ones,
    /// if the client asked for it or the suite's record limit is near (TLS 1.3).
    fn rekey_if_due(&mut self) -> io::Result<()> {
        if !self.key_update_due {
            return Ok(());
        }
        if self.close_sent {
            // Nothing is sealed after close_notify, a KeyUpdate reply neither.
            self.key_update_due = false;
            return Ok(());
        }
        let Some(kernel) = self.kernel.as_mut() else {
            self.key_update_due = false;
            return Ok(());
        };
        let next = kernel.update_tx_secret().map_err(io::Error::other)?;
        self.seal_one(ContentType::Handshake, &[&[KEY_UPDATE, 0, 0, 1, 0]])?;
        self.tx = Keys::new(self.tx.suite, next).map_err(io::Error::other)?;
        self.update_end = self.wbuf.len();
        self.key_update_due = false;
        Ok(())
    }
}

impl<S: AsyncWrite + Unpin> Records<S> {
    /// Writes out what is sealed; the buffer is freed once empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let st = &mut self.state;
        while st.wpos < st.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &st.wbuf[st.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            st.wpos += n;
        }
        st.wbuf = Vec::new();
        st.wpos = 0;
        st.update_end = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Records<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let st = &mut this.state;
            if st.ppos < st.plain.len() {
                drain_into(&mut st.plain, &mut st.ppos, buf);
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &st.failed {
                return Poll::Ready(Err(e.io()));
            }
            if st.key_update_due {
                // The client asked for new keys: the KeyUpdate goes out behind whatever is
                // sealed already (the records under the old keys), now if the socket takes it,
                // else with the next write or flush.
                st.rekey_if_due()?;
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
                continue;
            }
            if st.read_closed {
                return Poll::Ready(Ok(()));
            }
            let n = if st.unopened {
                st.unopened = false;
                usize::MAX
            } else {
                ready!(poll_read_onto(&mut this.io, cx, &mut st.rbuf))?
            };
            let st = &mut this.state;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if st.rbuf.is_empty() {
                        "the client closed its TLS connection without close_notify"
                    } else {
                        "the client closed its TLS connection in the middle of a record"
                    },
                )));
            }
            if let Err(e) = st.open_all() {
                st.refuse(&e);
                // The alert goes out now if the socket takes it, else on shutdown.
                let _ = this.poll_drain(cx);
                if this.state.ppos == this.state.plain.len() {
                    return Poll::Ready(Err(e.io()));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Records<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if let Some(e) = &this.state.failed {
            return Poll::Ready(Err(e.io()));
        }
        if this.state.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // As much as one record takes, from up to 8 of the slices.
        let mut taken: [&[u8]; 8] = [&[]; 8];
        let mut count = 0;
        let mut total = 0;
        for b in bufs.iter().filter(|b| !b.is_empty()).take(taken.len()) {
            if total == MAX_PLAIN {
                break;
            }
            let n = b.len().min(MAX_PLAIN - total);
            taken[count] = &b[..n];
            count += 1;
            total += n;
        }
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if let Err(e) = this
            .state
            .seal(ContentType::ApplicationData, &taken[..count])
        {
            // What was sealed before the failure (a close_notify at the record limit) goes
            // out if the socket takes it.
            let _ = this.poll_drain(cx);
            return Poll::Ready(Err(e));
        }
        // Sealed: the bytes are the stream's now, whether or not the socket takes them yet.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// close_notify (unless the connection ended with an alert, which goes out instead), then
    /// the socket's shutdown.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.state.close_sent {
            this.state.seal(
                ContentType::Alert,
                &[&[WARNING, u8::from(AlertDescription::CloseNotify)]],
            )?;
            this.state.close_sent = true;
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
