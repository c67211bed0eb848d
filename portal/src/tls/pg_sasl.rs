//! SCRAM channel binding through a portal that re-encrypts to a PostgreSQL server with TLS.
//!
//! A server on a TLS connection offers `SCRAM-SHA-256-PLUS` (channel binding) first in its
//! AuthenticationSASL message. Through the portal the client does not share that TLS
//! connection:
//!
//! - A plaintext client: libpq refuses a `-PLUS` offer over a connection without TLS. The portal
//!   drops the `-PLUS` mechanisms from the server's first authentication request, so the client
//!   uses `SCRAM-SHA-256` with gs2 flag `n` (no channel binding support), which the server
//!   accepts. Nothing else is changed, and only that one message.
//! - A client whose TLS the portal terminates: its binding would name the portal's certificate,
//!   and the server rejects it. Dropping the offer does not help there: the client then sends gs2
//!   flag `y` ("I could bind, the server can't"), which a TLS server rejects as a downgrade, and
//!   the binding data is covered by the client's proof, so no proxy can mend it. So the offer is
//!   relayed as it is, and when the client picks a `-PLUS` mechanism the portal logs the fix
//!   (`channel_binding=disable`); the server's refusal reaches the client unchanged. (Binding
//!   does work when the portal serves the server's own certificate: `tls-server-end-point` is a
//!   hash of the certificate.)
//!
//! This runs once per connection, before the byte pump, and only for PostgreSQL with backend
//! TLS. What it does not understand (a malformed or oversized message, another message first)
//! it relays byte for byte, and the pump carries on with the rest.
//!
//! May import: `wire` (PostgreSQL framing) and the rest of `tls`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{read_err, TlsError};
use crate::wire::postgres::{
    backend::{Authentication, Backend},
    is_protocol_3, message_len, startup_header, AUTH_SASL, CANCEL_REQUEST, HEADER_LEN, MAX_STARTUP,
};

/// The most bytes read from the server before deciding; a first answer larger than this is
/// relayed untouched. A real AuthenticationSASL message is under 50 bytes.
pub(crate) const MAX_FIRST_ANSWER: usize = 8192;
/// How much of the client's SASLInitialResponse is read to see the mechanism it chose.
const MAX_MECHANISM: usize = 64;
const PLUS: &[u8] = b"-PLUS";

/// What to do with the bytes the server sent first.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Not enough bytes to decide yet.
    More,
    /// No AuthenticationSASL to look at (another authentication, an error, a malformed or
    /// oversized message): relay as is.
    Pass,
    /// An AuthenticationSASL message at `start..end`.
    Sasl { start: usize, end: usize },
}

/// Inspects the start of the server's answer to a StartupMessage: an optional
/// NegotiateProtocolVersion, then the authentication request.
pub(crate) fn inspect(buf: &[u8]) -> Step {
    let mut at = 0;
    loop {
        let Some(head) = buf.get(at..at + HEADER_LEN) else {
            return Step::More;
        };
        let len = message_len(head) as usize;
        let end = at + 1 + len;
        if len < 4 || end > MAX_FIRST_ANSWER {
            return Step::Pass;
        }
        match head[0] {
            // NegotiateProtocolVersion may precede the authentication request, once.
            b'v' if at == 0 => {
                if buf.len() < end {
                    return Step::More;
                }
                at = end;
            }
            b'R' => {
                if len < 8 {
                    return Step::Pass;
                }
                let Some(code) = buf.get(at + 5..at + 9) else {
                    return Step::More;
                };
                if u32::from_be_bytes([code[0], code[1], code[2], code[3]]) != AUTH_SASL {
                    return Step::Pass;
                }
                if buf.len() < end {
                    return Step::More;
                }
                return Step::Sasl { start: at, end };
            }
            _ => return Step::Pass,
        }
    }
}

/// The mechanism names of a complete AuthenticationSASL message (`R`, length, 10, names each
/// ending in NUL, a final NUL); `None` if it is not well formed.
pub(crate) fn mechanisms(message: &[u8]) -> Option<Vec<&[u8]>> {
    let len = message_len(message.get(..HEADER_LEN)?) as usize;
    if len + 1 != message.len() {
        return None;
    }
    // The decoder checks that the list's terminator ends the message.
    let Ok(Backend::Authentication(Authentication::Sasl { mechanisms })) =
        Backend::decode(message[0], &message[HEADER_LEN..])
    else {
        return None;
    };
    Some(
        mechanisms
            .split(|&b| b == 0)
            .take_while(|name| !name.is_empty())
            .collect(),
    )
}

fn is_plus(name: &[u8]) -> bool {
    name.ends_with(PLUS)
}

/// The AuthenticationSASL message without its `-PLUS` mechanisms, length fixed; `None` when
/// it is to be relayed as it is: nothing to drop, nothing left after dropping (the client's own
/// refusal then says what the server offered), or not well formed.
pub(crate) fn without_plus(message: &[u8]) -> Option<Vec<u8>> {
    let names = mechanisms(message)?;
    let kept: Vec<&[u8]> = names.iter().copied().filter(|n| !is_plus(n)).collect();
    if kept.len() == names.len() || kept.is_empty() {
        return None;
    }
    let mut list = Vec::with_capacity(kept.iter().map(|n| n.len() + 1).sum::<usize>() + 1);
    for name in kept {
        list.extend_from_slice(name);
        list.push(0);
    }
    list.push(0);
    Some(Backend::Authentication(Authentication::Sasl { mechanisms: &list }).to_bytes())
}

/// Relays the client's StartupMessage and the server's first answer, adjusting the SASL offer
/// as the module documentation says; `client_tls` is whether the client's side is TLS (the
/// portal terminated it). Returns with the streams positioned for the byte pump.
pub async fn relay_startup<C, B>(
    client: &mut C,
    backend: &mut B,
    client_tls: bool,
) -> Result<(), TlsError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if !forward_startup(client, backend).await? {
        return Ok(());
    }
    let mut buf = vec![0u8; MAX_FIRST_ANSWER];
    let mut filled = 0;
    let step = loop {
        match inspect(&buf[..filled]) {
            Step::More => {}
            step => break step,
        }
        // `inspect` waits only for a message that fits, so there is room.
        let n = backend.read(&mut buf[filled..]).await?;
        if n == 0 {
            break Step::Pass;
        }
        filled += n;
    };
    let mut plus_offered = false;
    match step {
        Step::Sasl { start, end } if !client_tls => match without_plus(&buf[start..end]) {
            Some(stripped) => {
                client.write_all(&buf[..start]).await?;
                client.write_all(&stripped).await?;
                client.write_all(&buf[end..filled]).await?;
            }
            None => client.write_all(&buf[..filled]).await?,
        },
        Step::Sasl { start, end } => {
            plus_offered =
                mechanisms(&buf[start..end]).is_some_and(|names| names.iter().any(|n| is_plus(n)));
            client.write_all(&buf[..filled]).await?;
        }
        _ => client.write_all(&buf[..filled]).await?,
    }
    client.flush().await?;
    if plus_offered {
        if let Some(mechanism) = chosen_mechanism(client, backend).await? {
            if is_plus(&mechanism) {
                tracing::warn!(
                    mechanism = %String::from_utf8_lossy(&mechanism),
                    "a PostgreSQL client whose TLS the portal terminates asked for SCRAM channel \
                     binding, which the server refuses when the portal re-encrypts to it (the \
                     binding names the portal's certificate, not the server's) unless both serve \
                     the same certificate: the client must connect with channel_binding=disable"
                );
            }
        }
    }
    Ok(())
}

/// Reads the client's StartupMessage and writes it to the backend; `false` if no answer is due
/// (a CancelRequest) or the message is not one the rewrite understands, in which case what was
/// read is forwarded and the byte pump relays the rest.
async fn forward_startup<C, B>(client: &mut C, backend: &mut B) -> Result<bool, TlsError>
where
    C: AsyncRead + Unpin,
    B: AsyncWrite + Unpin,
{
    let mut header = [0u8; 8];
    client
        .read_exact(&mut header)
        .await
        .map_err(read_err("PostgreSQL startup packet"))?;
    let (len, code) = startup_header(&header);
    let startup = is_protocol_3(code) && code != CANCEL_REQUEST && (8..=MAX_STARTUP).contains(&len);
    let mut message = header.to_vec();
    if startup {
        message.resize(len as usize, 0);
        client
            .read_exact(&mut message[8..])
            .await
            .map_err(read_err("PostgreSQL startup packet"))?;
    }
    backend.write_all(&message).await?;
    backend.flush().await?;
    Ok(startup)
}

/// Relays the start of the client's SASLInitialResponse and returns the mechanism it names;
/// `None` if the client sent something else or went away (the pump relays the rest).
async fn chosen_mechanism<C, B>(
    client: &mut C,
    backend: &mut B,
) -> Result<Option<Vec<u8>>, TlsError>
where
    C: AsyncRead + Unpin,
    B: AsyncWrite + Unpin,
{
    let mut buf = [0u8; 5 + MAX_MECHANISM];
    let mut filled = 0;
    let mut want = 5;
    let mut mechanism = None;
    while filled < want {
        let n = client.read(&mut buf[filled..want]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if filled == 5 && want == 5 {
            let len = message_len(&buf) as usize;
            if buf[0] != b'p' || len < 4 {
                break;
            }
            want = 5 + (len - 4).min(MAX_MECHANISM);
        }
        if filled > 5 {
            if let Some(nul) = buf[5..filled].iter().position(|&b| b == 0) {
                mechanism = Some(buf[5..5 + nul].to_vec());
                break;
            }
        }
    }
    backend.write_all(&buf[..filled]).await?;
    backend.flush().await?;
    Ok(mechanism)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AuthenticationSASL message offering `names`.
    fn sasl(names: &[&str]) -> Vec<u8> {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        for n in names {
            body.extend_from_slice(n.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = vec![b'R'];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup(user: &str) -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for s in ["user", user, "database", "postgres", ""] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn plus_mechanisms_are_dropped_and_the_length_fixed() {
        let offer = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let stripped = without_plus(&offer).unwrap();
        assert_eq!(stripped, sasl(&["SCRAM-SHA-256"]));
        assert_eq!(mechanisms(&stripped).unwrap(), vec![&b"SCRAM-SHA-256"[..]]);
        // Any -PLUS, wherever it is.
        let offer = sasl(&["SCRAM-SHA-256", "X-PLUS", "SCRAM-SHA-512-PLUS", "Y"]);
        assert_eq!(without_plus(&offer).unwrap(), sasl(&["SCRAM-SHA-256", "Y"]));
    }

    #[test]
    fn offers_without_plus_or_only_plus_are_left_alone() {
        assert_eq!(without_plus(&sasl(&["SCRAM-SHA-256"])), None);
        assert_eq!(without_plus(&sasl(&["SCRAM-SHA-256-PLUS"])), None);
        assert_eq!(without_plus(&sasl(&[])), None);
    }

    #[test]
    fn malformed_offers_are_left_alone() {
        let good = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        // No final NUL.
        let mut m = good[..good.len() - 1].to_vec();
        let len = m.len() as u32 - 1;
        m[1..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(mechanisms(&m), None);
        assert_eq!(without_plus(&m), None);
        // Bytes after the terminator.
        let mut m = good.clone();
        m.push(b'x');
        let len = m.len() as u32 - 1;
        m[1..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(without_plus(&m), None);
        // A length that disagrees with the bytes.
        let mut m = good.clone();
        m[4] += 1;
        assert_eq!(without_plus(&m), None);
        // Not an authentication request.
        assert_eq!(without_plus(&message(b'E', b"x\0\0")), None);
    }

    #[test]
    fn inspect_finds_the_offer_in_split_and_joined_reads() {
        let offer = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        for cut in 0..offer.len() {
            assert_eq!(inspect(&offer[..cut]), Step::More, "cut at {cut}");
        }
        assert_eq!(
            inspect(&offer),
            Step::Sasl {
                start: 0,
                end: offer.len()
            }
        );
        // Behind a NegotiateProtocolVersion, with more bytes after.
        let mut joined = message(b'v', &[0, 0, 0, 0, 0, 0, 0, 0]);
        let start = joined.len();
        joined.extend_from_slice(&offer);
        joined.extend_from_slice(b"more");
        for cut in 0..start + offer.len() {
            assert_eq!(inspect(&joined[..cut]), Step::More, "cut at {cut}");
        }
        assert_eq!(
            inspect(&joined),
            Step::Sasl {
                start,
                end: start + offer.len()
            }
        );
    }

    #[test]
    fn inspect_passes_everything_else() {
        let code = |c: u32| message(b'R', &c.to_be_bytes());
        // AuthenticationOk, CleartextPassword; MD5Password with its salt.
        assert_eq!(inspect(&code(0)), Step::Pass);
        assert_eq!(inspect(&code(3)), Step::Pass);
        assert_eq!(
            inspect(&message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])),
            Step::Pass
        );
        // ErrorResponse, decided on its first byte and length alone.
        assert_eq!(inspect(b"E\0\0\0\x40"), Step::Pass);
        // Malformed lengths; a huge offer that could not be buffered.
        assert_eq!(inspect(b"R\0\0\0\x03"), Step::Pass);
        assert_eq!(inspect(b"R\0\0\0\x06\0\0"), Step::Pass);
        let mut huge = b"R".to_vec();
        huge.extend_from_slice(&(MAX_FIRST_ANSWER as u32).to_be_bytes());
        huge.extend_from_slice(&AUTH_SASL.to_be_bytes());
        assert_eq!(inspect(&huge), Step::Pass);
        // Two NegotiateProtocolVersion messages are not expected.
        let v = message(b'v', &[0; 8]);
        assert_eq!(inspect(&[v.clone(), v].concat()), Step::Pass);
    }

    /// Runs [`relay_startup`] between in-memory pipes: the client sends `from_client`, the
    /// server answers `from_server` in pieces of `piece` bytes. Returns what each side got.
    async fn relay(
        from_client: &[u8],
        from_server: &[u8],
        piece: usize,
        client_tls: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (mut backend, mut server) = tokio::io::duplex(1 << 16);
        client_far.write_all(from_client).await.unwrap();
        let startup_len = from_client.len();
        let server_side = async {
            // The server answers once it has the startup, in small pieces.
            let mut got = vec![0u8; startup_len.min(8)];
            server.read_exact(&mut got).await.unwrap();
            for chunk in from_server.chunks(piece.max(1)) {
                server.write_all(chunk).await.unwrap();
                server.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            got
        };
        let (result, _) = tokio::join!(
            relay_startup(&mut client, &mut backend, client_tls),
            server_side
        );
        result.unwrap();
        drop(client);
        drop(backend);
        let mut to_client = Vec::new();
        client_far.read_to_end(&mut to_client).await.unwrap();
        let mut to_server = Vec::new();
        server.read_to_end(&mut to_server).await.unwrap();
        (to_client, to_server)
    }

    #[tokio::test]
    async fn a_plaintext_client_gets_the_offer_without_plus_whatever_the_reads() {
        let offer = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let after = b"S\0\0\0\x05x"; // not a real follow-up: relayed as is
        let answer = [offer.clone(), after.to_vec()].concat();
        let hello = startup("app");
        for piece in [1, 3, 7, answer.len()] {
            let (to_client, to_server) = relay(&hello, &answer, piece, false).await;
            // The server got the startup (the rest of it is read by the pipe's drain).
            assert_eq!(&to_server[..], &hello[8..], "piece {piece}");
            let mut want = sasl(&["SCRAM-SHA-256"]);
            // Bytes after the offer that came in the same read are relayed, in order.
            let relayed_after = &to_client[want.len().min(to_client.len())..];
            assert!(after.starts_with(relayed_after), "piece {piece}");
            want.extend_from_slice(relayed_after);
            assert_eq!(to_client, want, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn other_answers_reach_the_client_untouched() {
        let hello = startup("app");
        let answers = [
            message(b'R', &0u32.to_be_bytes()),        // trust
            message(b'R', &[0, 0, 0, 5, 9, 8, 7, 6]),  // md5
            message(b'R', &3u32.to_be_bytes()),        // cleartext
            message(b'E', b"SFATAL\0C28000\0Mno\0\0"), // refused
            sasl(&["SCRAM-SHA-256"]),                  // no -PLUS offered
            b"R\0\0\0\x02garbage".to_vec(),            // malformed length
        ];
        for answer in answers {
            for piece in [1, answer.len()] {
                let (to_client, _) = relay(&hello, &answer, piece, false).await;
                assert!(answer.starts_with(&to_client), "{answer:?} piece {piece}");
                // Everything the relay read was passed on; nothing was made up.
                assert!(!to_client.is_empty(), "{answer:?} piece {piece}");
            }
        }
    }

    #[tokio::test]
    async fn a_huge_first_answer_is_relayed_without_buffering_it_all() {
        let hello = startup("app");
        let mut answer = b"R".to_vec();
        answer.extend_from_slice(&(1u32 << 30).to_be_bytes());
        answer.extend_from_slice(&AUTH_SASL.to_be_bytes());
        answer.extend_from_slice(&[b'A'; 100]);
        let (to_client, _) = relay(&hello, &answer, answer.len(), false).await;
        assert!(answer.starts_with(&to_client) && to_client.len() >= 5);
    }

    #[tokio::test]
    async fn a_tls_client_gets_the_offer_untouched() {
        let offer = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let mut from_client = startup("app");
        // The client's SASLInitialResponse naming -PLUS: relayed to the server as it is.
        let initial = message(b'p', b"SCRAM-SHA-256-PLUS\0\0\0\0\x04p=tl");
        from_client.extend_from_slice(&initial);
        let (to_client, to_server) = relay(&from_client, &offer, offer.len(), true).await;
        assert_eq!(to_client, offer);
        assert_eq!(&to_server[..], &from_client[8..]);
    }

    #[tokio::test]
    async fn a_cancel_request_is_forwarded_and_nothing_awaited() {
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut backend, mut server) = tokio::io::duplex(1024);
        client_far.write_all(&cancel).await.unwrap();
        // The server never answers: the relay must return anyway.
        relay_startup(&mut client, &mut backend, false)
            .await
            .unwrap();
        let mut got = [0u8; 8];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, &cancel[..8]);
        // The rest is left to the pump.
        let mut rest = [0u8; 8];
        client.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, &cancel[8..]);
    }

    #[tokio::test]
    async fn a_client_gone_mid_startup_is_a_malformed_negotiation() {
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut backend, _server) = tokio::io::duplex(1024);
        client_far.write_all(&startup("app")[..12]).await.unwrap();
        drop(client_far);
        let err = relay_startup(&mut client, &mut backend, false)
            .await
            .unwrap_err();
        assert_eq!(err.label(), "malformed", "{err}");
    }
}
