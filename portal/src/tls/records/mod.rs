//! TLS records after the handshake, kept by the portal itself: the server side of a client's
//! TLS for data planes whose clients mostly sit idle (PostgreSQL pooling).
//!
//! rustls runs the handshake (its unbuffered API, so that every byte past the handshake stays
//! here), then hands over the traffic keys and sequence numbers, as it would for kernel TLS.
//! From then on a client holds only its keys: no read buffer, no connection state, no key
//! schedule while idle. Records are opened and sealed with ring's AEADs (the suites rustls
//! offers: AES-128/256-GCM and ChaCha20-Poly1305, TLS 1.3 and 1.2); a key is set up for each
//! batch of records and dropped after it. TLS 1.3 KeyUpdate works both ways: the traffic
//! secrets are caught from rustls' key log while the handshake runs on this thread
//! ([`Catch`]), and the next ones derived with HKDF-Expand-Label (RFC 8446 7.2). What a client
//! sends that the protocol does not allow after the handshake (renegotiation, a ticket, an
//! unknown record type, a record that fails to decrypt) ends the connection with an error that
//! names it.
//!
//! May import: `wire` (PostgreSQL's ALPN name) and the rest of `tls`.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use rustls::{
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
    ProtocolVersion, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::bytes::{drain_into, poll_read_onto};
use super::TlsError;

mod keys;
mod record;

use keys::Keys;
use record::{
    complete_record, invalid, open, seal, Opened, ALERT, APPLICATION_DATA, CLOSE_NOTIFY, HANDSHAKE,
    KEY_UPDATE, MAX_PLAIN,
};

/// Most bytes of handshake the client may have in flight before the portal answers.
const MAX_HANDSHAKE: usize = 64 << 10;
/// Records under one AES-GCM key before it is replaced (TLS 1.3) or the connection closed
/// (TLS 1.2): rustls' limit for these suites.
const GCM_RECORD_LIMIT: u64 = 1 << 24;

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

thread_local! {
    /// The traffic secrets of the handshake being processed on this thread, if one is caught.
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

/// A TLS 1.3 connection's first traffic secrets, as rustls logs them.
#[derive(Default)]
struct Caught {
    client: Option<Vec<u8>>,
    server: Option<Vec<u8>>,
}

/// The key log of the server configs whose connections may keep their own records: it keeps
/// the traffic secrets of the handshake that [`accept`] is processing on this thread, and
/// nothing of any other.
#[derive(Debug)]
pub struct Catch;

impl rustls::KeyLog for Catch {
    fn will_log(&self, label: &str) -> bool {
        (label == CLIENT_SECRET || label == SERVER_SECRET) && CAUGHT.with(|c| c.borrow().is_some())
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAUGHT.with(|c| {
            if let Some(caught) = c.borrow_mut().as_mut() {
                match label {
                    CLIENT_SECRET => caught.client = Some(secret.to_vec()),
                    SERVER_SECRET => caught.server = Some(secret.to_vec()),
                    _ => {}
                }
            }
        })
    }
}

/// Runs `f` with `caught` as this thread's catch.
fn catching<R>(caught: &mut Caught, f: impl FnOnce() -> R) -> R {
    CAUGHT.with(|c| *c.borrow_mut() = Some(std::mem::take(caught)));
    let r = f();
    *caught = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_default();
    r
}

/// The server config for connections that keep their own records: secret extraction on, the
/// traffic secrets caught.
pub fn configure(config: &mut ServerConfig) {
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(Catch);
}

/// Runs the TLS handshake on `io` with rustls and returns the stream that keeps its records.
/// `config` must have been through [`configure`].
pub async fn accept<S>(mut io: S, config: Arc<ServerConfig>) -> Result<Records<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = |e: rustls::Error| TlsError::Handshake(e.to_string());
    let mut conn = UnbufferedServerConnection::new(config).map_err(handshake)?;
    let mut incoming = vec![0u8; 4096];
    let mut used = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut plain = Vec::new();
    let mut caught = Caught::default();
    let mut failed: Option<rustls::Error> = None;
    loop {
        // After an error rustls is asked only for the alert it queued: nothing is read again.
        let input = if failed.is_some() { 0 } else { used };
        let UnbufferedStatus { mut discard, state } = catching(&mut caught, || {
            conn.process_tls_records(&mut incoming[..input])
        });
        let mut read = false;
        match state {
            Err(e) => {
                // Send the alert rustls queued for the client (best effort), then fail.
                if failed.is_some() {
                    return Err(handshake(e));
                }
                failed = Some(e);
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let at = outgoing.len();
                outgoing.resize(at + 512, 0);
                let n = match data.encode(&mut outgoing[at..]) {
                    Ok(n) => n,
                    Err(EncodeError::InsufficientSize(size)) => {
                        outgoing.resize(at + size.required_size, 0);
                        data.encode(&mut outgoing[at..])
                            .map_err(|e| TlsError::Handshake(e.to_string()))?
                    }
                    Err(e) => return Err(TlsError::Handshake(e.to_string())),
                };
                outgoing.truncate(at + n);
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                io.write_all(&outgoing).await?;
                io.flush().await?;
                outgoing.clear();
                data.done();
                if let Some(e) = failed {
                    return Err(handshake(e));
                }
            }
            Ok(ConnectionState::BlockedHandshake) => {
                if let Some(e) = failed {
                    return Err(handshake(e));
                }
                read = true;
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                // Application data right behind the client's Finished.
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(handshake)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => {
                incoming.copy_within(discard..used, 0);
                used -= discard;
                break;
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(TlsError::Handshake(
                    "the client closed during the handshake".into(),
                ))
            }
            Ok(other) => {
                return Err(TlsError::Handshake(format!(
                    "unexpected TLS state {other:?} during the handshake"
                )))
            }
        }
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
        }
        if read {
            if used == incoming.len() {
                if incoming.len() >= MAX_HANDSHAKE {
                    return Err(TlsError::Handshake(format!(
                        "more than {MAX_HANDSHAKE} bytes of handshake from the client"
                    )));
                }
                incoming.resize(incoming.len() * 2, 0);
            }
            let n = io.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(TlsError::Handshake(
                    "the client closed during the handshake".into(),
                ));
            }
            used += n;
        }
    }
    if conn.is_handshaking() {
        return Err(TlsError::Handshake(
            "the handshake did not finish before application data".into(),
        ));
    }
    let version = conn
        .protocol_version()
        .ok_or_else(|| TlsError::Handshake("no protocol version negotiated".into()))?;
    let tls13 = version == ProtocolVersion::TLSv1_3;
    let postgresql_alpn = conn.alpn_protocol() == Some(crate::wire::postgres::ALPN);
    // The kernel connection rustls gives with the keys is not kept: KeyUpdate is derived here
    // from the caught secrets, which is all an idle client then holds.
    let (secrets, _) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| TlsError::Handshake(format!("traffic keys: {e}")))?;
    let rx = Keys::new(secrets.rx, tls13, caught.client.as_deref())?;
    let tx = Keys::new(secrets.tx, tls13, caught.server.as_deref())?;
    incoming.truncate(used);
    if used == 0 {
        incoming = Vec::new();
    }
    let mut state = State::new(rx, tx, incoming, plain, postgresql_alpn);
    // Records that came whole with the client's Finished are opened now, not when more comes.
    state.open_all()?;
    Ok(Records { io, state })
}

/// A client's TLS after the handshake: its keys and whatever bytes are in flight.
pub struct Records<S> {
    io: S,
    state: State,
}

struct State {
    rx: Keys,
    tx: Keys,
    /// Ciphertext read but not yet opened (a partial record); empty while idle.
    rbuf: Vec<u8>,
    /// Plaintext opened but not yet read, from `ppos`.
    plain: Vec<u8>,
    ppos: usize,
    /// Records sealed but not yet written, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    read_closed: bool,
    close_sent: bool,
    /// The client asked for the portal's keys to change (TLS 1.3 KeyUpdate, update_requested).
    key_update_due: bool,
    postgresql_alpn: bool,
}

impl<S> Records<S> {
    pub fn protocol_version(&self) -> ProtocolVersion {
        if self.state.rx.tls13 {
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

impl State {
    /// A connection's state after the handshake: its keys, the ciphertext and plaintext read
    /// with the handshake.
    fn new(rx: Keys, tx: Keys, rbuf: Vec<u8>, plain: Vec<u8>, postgresql_alpn: bool) -> Self {
        State {
            rx,
            tx,
            rbuf,
            plain,
            ppos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            read_closed: false,
            close_sent: false,
            key_update_due: false,
            postgresql_alpn,
        }
    }

    /// Opens every complete record in `rbuf` into `plain`; handles alerts and KeyUpdate.
    fn open_all(&mut self) -> io::Result<()> {
        let mut at = 0;
        let mut key = None;
        while let Some(n) = complete_record(&self.rbuf[at..])? {
            if self.read_closed {
                return Err(invalid("TLS record after close_notify"));
            }
            let key = key.get_or_insert_with(|| self.rx.sealing());
            let record = &mut self.rbuf[at..at + n];
            match open(&mut self.rx, key, record)? {
                Opened::Data(range) => {
                    if self.ppos == self.plain.len() {
                        self.plain.clear();
                        self.ppos = 0;
                    }
                    self.plain
                        .extend_from_slice(&self.rbuf[at + range.start..at + range.end]);
                }
                Opened::Closed => self.read_closed = true,
                Opened::KeyUpdate(requested) => {
                    self.rx.update();
                    *key = self.rx.sealing();
                    self.key_update_due |= requested;
                }
                Opened::Nothing => {}
            }
            at += n;
        }
        if at == self.rbuf.len() {
            self.rbuf = Vec::new();
        } else if at > 0 {
            self.rbuf.drain(..at);
        }
        Ok(())
    }

    /// Seals `bufs` (at most 2^14 bytes in all) as one record of `typ` into `wbuf`, replacing
    /// the keys first if they are due (KeyUpdate asked for, or the suite's record limit).
    fn seal(&mut self, typ: u8, bufs: &[&[u8]]) -> io::Result<()> {
        if self.tx.seq >= self.tx.aead.record_limit().saturating_sub(1) {
            if !self.tx.tls13 {
                return Err(invalid(
                    "TLS 1.2 record limit of the cipher suite reached: the connection ends",
                ));
            }
            self.key_update_due = true;
        }
        self.rekey_if_due();
        let key = self.tx.sealing();
        seal(&mut self.tx, &key, typ, bufs, &mut self.wbuf);
        Ok(())
    }

    /// Seals a KeyUpdate (update_not_requested) under the old keys and takes the next ones,
    /// if the client asked for it or the suite's record limit is near (TLS 1.3).
    fn rekey_if_due(&mut self) {
        if !self.key_update_due {
            return;
        }
        let key = self.tx.sealing();
        seal(
            &mut self.tx,
            &key,
            HANDSHAKE,
            &[&[KEY_UPDATE, 0, 0, 1, 0]],
            &mut self.wbuf,
        );
        self.tx.update();
        self.key_update_due = false;
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
            if st.key_update_due {
                // The client asked for new keys: the KeyUpdate goes out behind whatever is
                // sealed already (the records under the old keys), now if the socket takes it,
                // else with the next write or flush.
                st.rekey_if_due();
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
                continue;
            }
            if st.read_closed {
                return Poll::Ready(Ok(()));
            }
            let n = ready!(poll_read_onto(&mut this.io, cx, &mut this.state.rbuf))?;
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
            st.open_all()?;
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
        this.state.seal(APPLICATION_DATA, &taken[..count])?;
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

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.state.close_sent {
            this.state.seal(ALERT, &[&[1, CLOSE_NOTIFY]])?;
            this.state.close_sent = true;
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
