//! Unit tests of `records`: a real rustls client against the portal's record layer for every
//! suite and version the portal offers, KeyUpdate both ways, close_notify both ways, bad
//! records refused by name, and what an idle client holds.

use std::sync::Arc;

use rustls::{
    crypto::{
        cipher::{AeadKey, Iv},
        ring::cipher_suite as suites,
    },
    pki_types::ServerName,
    unbuffered::{ConnectionState, UnbufferedStatus},
    ClientConfig, ConnectionTrafficSecrets, SupportedCipherSuite, SupportedProtocolVersion,
};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::keys::Keys;
use super::record::*;
use super::*;
use crate::config::{Engine, TlsVersion};
use crate::tls::{parse_pair, server_config, CertSource, ServerSettings};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tls::tests::testca::TestCa;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;

fn configs(
    suite: &[SupportedCipherSuite],
    version: &'static SupportedProtocolVersion,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca = TestCa::new("records-ca");
    let leaf = ca.server("portal", &["localhost"]);
    let settings = ServerSettings {
        engine: Engine::Postgres,
        min_version: TlsVersion::V1_2,
        cert: CertSource::from_pem(leaf.cert_pem.clone(), leaf.key_pem.clone()),
        client_ca: None,
    };
    let pair = parse_pair(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let server = server_config(&settings, &pair, None).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suite.to_vec();
    let mut client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    (server, Arc::new(client))
}

async fn connect(
    stream: DuplexStream,
    config: Arc<ClientConfig>,
) -> tokio_rustls::client::TlsStream<DuplexStream> {
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .unwrap()
}

/// An echo server on the record layer; it returns the stream once the client closed.
fn echo<S>(stream: S, config: Arc<ServerConfig>) -> tokio::task::JoinHandle<io::Result<Records<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut records = accept(stream, config)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut buf = vec![0u8; 40_000];
        loop {
            let n = records.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            records.write_all(&buf[..n]).await?;
            records.flush().await?;
        }
        records.shutdown().await?;
        Ok(records)
    })
}

fn message(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn round_trip(tls: &mut tokio_rustls::client::TlsStream<DuplexStream>, len: usize) {
    let sent = message(len);
    tls.write_all(&sent).await.unwrap();
    tls.flush().await.unwrap();
    let mut back = vec![0u8; len];
    tls.read_exact(&mut back).await.unwrap();
    assert!(back == sent, "echo of {len} bytes differs");
}

/// Every suite and version: messages from 1 byte to several records each way, a KeyUpdate
/// asked for by the client (TLS 1.3), close_notify each way, and nothing held afterwards.
async fn exchange(suite: &[SupportedCipherSuite], version: &'static SupportedProtocolVersion) {
    let (server_config, client_config) = configs(suite, version);
    let (c, s) = duplex(1 << 16);
    let server = echo(s, server_config);
    let mut tls = connect(c, client_config).await;
    let negotiated = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    assert!(suite.contains(&negotiated), "{negotiated:?}");
    for len in [1, 100, MAX_PLAIN, MAX_PLAIN + 1, 100_000] {
        round_trip(&mut tls, len).await;
    }
    if version == &rustls::version::TLS13 {
        // The client updates its keys and asks for the portal's; both go on working.
        for _ in 0..3 {
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            round_trip(&mut tls, 5_000).await;
        }
    }
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let records = server.await.unwrap().unwrap();
    let st = &records.state;
    assert!(st.read_closed && st.close_sent);
    if version == &rustls::version::TLS13 {
        assert_eq!(
            st.rx.seq, st.tx.seq,
            "both sides' keys were updated as often"
        );
    }
    assert_eq!(
        (st.rbuf.capacity(), st.plain.capacity(), st.wbuf.capacity()),
        (0, 0, 0),
        "an idle client holds no buffer"
    );
}

#[tokio::test]
async fn every_suite_and_version() {
    let tls13 = &rustls::version::TLS13;
    let tls12 = &rustls::version::TLS12;
    let cases: [(&[SupportedCipherSuite], _); 6] = [
        (&[suites::TLS13_AES_128_GCM_SHA256], tls13),
        (&[suites::TLS13_AES_256_GCM_SHA384], tls13),
        (&[suites::TLS13_CHACHA20_POLY1305_SHA256], tls13),
        (
            &[
                suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                suites::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
            tls12,
        ),
        (
            &[
                suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
            tls12,
        ),
        (
            &[
                suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                suites::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
            tls12,
        ),
    ];
    for (suite, version) in cases {
        exchange(suite, version).await;
    }
}

/// The portal replaces its own keys (as it does near the suite's record limit) and the client
/// follows.
#[tokio::test]
async fn portal_initiated_key_update() {
    let (server_config, client_config) =
        configs(&[suites::TLS13_AES_128_GCM_SHA256], &rustls::version::TLS13);
    let (c, s) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut records = accept(s, server_config).await.unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let n = records.read(&mut buf).await.unwrap();
            records.state.key_update_due = true;
            records.write_all(&buf[..n]).await.unwrap();
            records.flush().await.unwrap();
        }
        (records.state.tx.seq, records.state.rx.seq)
    });
    let mut tls = connect(c, client_config).await;
    for _ in 0..3 {
        round_trip(&mut tls, 10).await;
    }
    let (tx_seq, rx_seq) = server.await.unwrap();
    // Each answer was the first record under fresh keys.
    assert_eq!(tx_seq, 1);
    assert_eq!(rx_seq, 3);
}

/// The error the portal's record layer reads when the client, after one message, writes `raw`
/// under its TLS.
async fn server_reads_raw(raw: &[u8]) -> io::Error {
    let (server_config, client_config) =
        configs(&[suites::TLS13_AES_128_GCM_SHA256], &rustls::version::TLS13);
    let (c, s) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut records = accept(s, server_config).await.unwrap();
        let mut buf = [0u8; 64];
        let n = records.read(&mut buf).await.unwrap();
        records.write_all(&buf[..n]).await.unwrap();
        records.flush().await.unwrap();
        records.read(&mut buf).await.unwrap_err()
    });
    let mut tls = connect(c, client_config).await;
    // One message through the record layer first, so the raw bytes reach it (and not the
    // handshake).
    round_trip(&mut tls, 10).await;
    tls.get_mut().0.write_all(raw).await.unwrap();
    let e = server.await.unwrap();
    drop(tls);
    e
}

#[tokio::test]
async fn a_forged_record_is_refused_by_name() {
    let mut forged = vec![APPLICATION_DATA, 3, 3, 0, 40];
    forged.extend_from_slice(&[0x5a; 40]);
    let e = server_reads_raw(&forged).await;
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("bad_record_mac"), "{e}");
}

#[tokio::test]
async fn an_oversized_record_is_refused_before_it_is_read() {
    let e = server_reads_raw(&[APPLICATION_DATA, 3, 3, 0xff, 0xff]).await;
    assert!(e.to_string().contains("TLS record of 65535 bytes"), "{e}");
}

#[tokio::test]
async fn a_plaintext_handshake_record_after_the_handshake_is_refused() {
    let mut record = vec![HANDSHAKE, 3, 3, 0, 20];
    record.extend_from_slice(&[1; 20]);
    let e = server_reads_raw(&record).await;
    assert!(e.to_string().contains("record of type 22"), "{e}");
}

#[tokio::test]
async fn a_client_gone_mid_record_is_an_unexpected_eof() {
    let (server_config, client_config) = configs(
        &[suites::TLS13_CHACHA20_POLY1305_SHA256],
        &rustls::version::TLS13,
    );
    let (c, s) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut records = accept(s, server_config).await.unwrap();
        let mut buf = [0u8; 64];
        let n = records.read(&mut buf).await.unwrap();
        records.write_all(&buf[..n]).await.unwrap();
        records.flush().await.unwrap();
        records.read(&mut buf).await.unwrap_err()
    });
    let mut tls = connect(c, client_config).await;
    round_trip(&mut tls, 10).await;
    tls.get_mut()
        .0
        .write_all(&[APPLICATION_DATA, 3, 3, 0, 100, 1, 2])
        .await
        .unwrap();
    drop(tls);
    let e = server.await.unwrap();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("middle of a record"), "{e}");
}

/// A real rustls client reads the alert the portal sent for the record it refused.
#[tokio::test]
async fn the_client_receives_the_alert_for_a_flipped_tag() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (server_config, client_config) = configs(
            &[
                suites::TLS13_AES_128_GCM_SHA256,
                suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                suites::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
            version,
        );
        let (c, s) = duplex(1 << 16);
        let server = echo(s, server_config);
        let mut client = crafted(c, client_config).await;
        let mut out = Vec::new();
        client.seal_into(ContentType::ApplicationData, b"hello", &mut out);
        *out.last_mut().unwrap() ^= 1;
        client.io.write_all(&out).await.unwrap();
        assert_eq!(client.next().await, Got::Alert(FATAL, 20), "{version:?}");
        let e = server.await.unwrap().err().unwrap();
        let refused = record_error(&e).expect("a record error");
        assert!(
            refused.sent && refused.alert == AlertDescription::BadRecordMac,
            "{e}"
        );
    }
}

/// OpenSSL's s_client on a real socket: TLS 1.3 with a KeyUpdate it asks an answer for
/// (its `K` command), close_notify from it at the end; TLS 1.2 with a renegotiation (`R`),
/// refused with unexpected_message.
#[tokio::test]
async fn openssl_s_client() {
    use std::process::{Command, Stdio};
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl not installed: skipped");
        return;
    }
    for (flag, lines) in [
        ("-tls1_3", "hello\nK\nworld\n"),
        ("-tls1_2", "hello\nR\nworld\n"),
    ] {
        let config = if flag == "-tls1_3" {
            tls13_configs().0
        } else {
            tls12_configs().0
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            echo(tcp, config).await.unwrap()
        });
        // s_client in a thread: one line at a time, each written once the previous one came
        // back (the command letters K and R alone), then stdin closed; 20 s at most.
        let client = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut child = Command::new("openssl")
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), flag])
                .args(["-servername", "localhost", "-alpn", "postgresql"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut stdout = child.stdout.take().unwrap();
            let reader = {
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut chunk = [0u8; 4096];
                    while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                        seen.lock().unwrap().extend_from_slice(&chunk[..n]);
                    }
                })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut stdin = child.stdin.take().unwrap();
            for line in lines.split_inclusive('\n') {
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
                let want = line.trim_end();
                if want.len() == 1 {
                    // s_client takes a command letter from a read of stdin of its own.
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                while want.len() > 1
                    && !String::from_utf8_lossy(&seen.lock().unwrap()).contains(want)
                    && std::time::Instant::now() < deadline
                    && child.try_wait().unwrap().is_none()
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            drop(stdin);
            while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let status = child.wait().unwrap();
            reader.join().unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let out = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
            (status, out, err)
        });
        let (status, out, err) = client.await.unwrap();
        let ended = server.await.unwrap();
        let seen = ended
            .as_ref()
            .map(|r| (r.state.rx.seq, r.state.tx.seq, r.state.read_closed));
        let err = format!("{err}\nserver: {seen:?}");
        if flag == "-tls1_3" {
            assert!(
                (out.contains("KEYUPDATE") || err.contains("KEYUPDATE"))
                    && out.contains("hello")
                    && out.contains("world"),
                "{out}\n{err}"
            );
            let records = ended.unwrap();
            assert!(records.state.read_closed, "s_client sent close_notify");
            assert_eq!(
                records.state.tx.seq, 2,
                "the KeyUpdate answered, then `world`, then close_notify: {out}"
            );
            assert!(status.success(), "{err}");
        } else {
            let e = ended.err().expect("the renegotiation is refused");
            assert!(e.to_string().contains("renegotiation"), "{e}");
            assert!(
                err.contains("unexpected message") || out.contains("unexpected message"),
                "{out}\n{err}"
            );
        }
    }
}

/// What the crafted client read from the portal.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Data(Vec<u8>),
    Alert(u8, u8),
    Eof,
}

/// A TLS client that seals whatever records a test asks for with rustls' own encrypter,
/// on the keys and kernel connection rustls gives after its handshake.
struct Crafted {
    io: DuplexStream,
    rx: Keys<dyn MessageDecrypter>,
    tx: Keys<dyn MessageEncrypter>,
    kernel: KernelConnection<rustls::client::ClientConnectionData>,
    inbuf: Vec<u8>,
    /// The client's last handshake flight (its Finished), when the test holds it back.
    held: Vec<u8>,
}

async fn crafted(io: DuplexStream, config: Arc<ClientConfig>) -> Crafted {
    crafted_holding(io, config, false).await
}

/// The handshake of a [`Crafted`] client; `hold`: its Finished is not written but kept in
/// `held`, for the test to send with whatever it adds.
async fn crafted_holding(mut io: DuplexStream, config: Arc<ClientConfig>, hold: bool) -> Crafted {
    use rustls::client::UnbufferedClientConnection;
    let mut config = (*config).clone();
    config.enable_secret_extraction = true;
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = UnbufferedClientConnection::new(Arc::new(config), name).unwrap();
    let mut incoming = vec![0u8; 64 << 10];
    let mut used = 0;
    let mut outgoing = Vec::new();
    // rustls sees whole records, one more each time it is blocked, and so stops at the end
    // of the handshake.
    let mut fed = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..fed]);
        let mut done = false;
        match state.unwrap() {
            ConnectionState::EncodeTlsData(mut data) => {
                let at = outgoing.len();
                outgoing.resize(at + 20_000, 0);
                let n = data.encode(&mut outgoing[at..]).unwrap();
                outgoing.truncate(at + n);
            }
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                if !hold || conn.is_handshaking() {
                    io.write_all(&outgoing).await.unwrap();
                    outgoing.clear();
                }
            }
            ConnectionState::BlockedHandshake => match frame(&incoming[fed..used], false) {
                Ok(Some(n)) => fed += n,
                _ => {
                    let n = io.read(&mut incoming[used..]).await.unwrap();
                    assert!(n > 0, "the portal closed during the handshake");
                    used += n;
                }
            },
            ConnectionState::WriteTraffic(_) => done = true,
            other => panic!("client state {other:?}"),
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        fed -= discard;
        if done {
            break;
        }
    }
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().unwrap();
    let suite = kernel.negotiated_cipher_suite();
    incoming.truncate(used);
    Crafted {
        io,
        rx: Keys::new(suite, secrets.rx).unwrap(),
        tx: Keys::new(suite, secrets.tx).unwrap(),
        kernel,
        inbuf: incoming,
        held: outgoing,
    }
}

impl Crafted {
    fn seal_into(&mut self, typ: ContentType, body: &[u8], out: &mut Vec<u8>) {
        let seq = self.tx.seq;
        let mut batch = None;
        seal(self.tx.aead(&mut batch), seq, typ, &[body], out).unwrap();
        self.tx.seq += 1;
    }

    /// A KeyUpdate sealed under the current keys; the next records go under the next ones.
    fn key_update_into(&mut self, requested: bool, out: &mut Vec<u8>) {
        self.seal_into(
            ContentType::Handshake,
            &[KEY_UPDATE, 0, 0, 1, u8::from(requested)],
            out,
        );
        let next = self.kernel.update_tx_secret().unwrap();
        self.tx = Keys::new(self.tx.suite, next).unwrap();
    }

    async fn send(&mut self, typ: ContentType, body: &[u8]) {
        let mut out = Vec::new();
        self.seal_into(typ, body, &mut out);
        self.io.write_all(&out).await.unwrap();
    }

    /// The portal's next data or alert; its KeyUpdates are followed, tickets skipped.
    async fn next(&mut self) -> Got {
        let tls13 = self.rx.tls13();
        loop {
            let Some(n) = frame(&self.inbuf, tls13).unwrap() else {
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return Got::Eof;
                }
                self.inbuf.extend_from_slice(&chunk[..n]);
                continue;
            };
            let mut record: Vec<u8> = self.inbuf.drain(..n).collect();
            let seq = self.rx.seq;
            let mut batch = None;
            let content = open(self.rx.aead(&mut batch), seq, tls13, &mut record).unwrap();
            self.rx.seq += 1;
            match content {
                Content::Data([]) => {}
                Content::Data(data) => return Got::Data(data.to_vec()),
                Content::Alert(level, description) => return Got::Alert(level, description),
                Content::Handshake([KEY_UPDATE, 0, 0, 1, 0]) => {
                    let next = self.kernel.update_rx_secret().unwrap();
                    self.rx = Keys::new(self.rx.suite, next).unwrap();
                }
                Content::Handshake(other) => assert_eq!(other[0], 4, "a ticket: {other:?}"),
            }
        }
    }
}

fn tls13_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs(&[suites::TLS13_AES_256_GCM_SHA384], &rustls::version::TLS13)
}

fn tls12_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    configs(
        &[
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        &rustls::version::TLS12,
    )
}

/// What [`sink`] returns: the most bytes held unsent, what it read, how reading ended, the
/// stream.
type Sunk = (usize, Vec<u8>, io::Result<()>, Records<DuplexStream>);

/// A server that reads until the client stops, recording the most sealed bytes it ever held
/// unsent; it returns that, what it read and how reading ended.
fn sink(s: DuplexStream, config: Arc<ServerConfig>) -> tokio::task::JoinHandle<Sunk> {
    tokio::spawn(async move {
        let mut records = accept(s, config).await.unwrap();
        let mut most_unsent = 0;
        let mut read = Vec::new();
        let mut buf = vec![0u8; 40_000];
        let end = loop {
            let r = records.read(&mut buf).await;
            let st = &records.state;
            most_unsent = most_unsent.max(st.wbuf.len() - st.wpos);
            match r {
                Ok(0) => break Ok(()),
                Ok(n) => read.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        (most_unsent, read, end, records)
    })
}

/// The error a read ended with, as the record layer names it.
fn refused(end: &io::Result<()>) -> &RecordError {
    let e = end.as_ref().expect_err("the read fails");
    record_error(e).unwrap_or_else(|| panic!("not a record error: {e}"))
}

/// A client that asks for KeyUpdates thousands of times and never reads: the portal keeps at
/// most one reply unsent, however many requests come (the flood bounded by count and time).
#[tokio::test]
async fn a_key_update_flood_that_never_reads_holds_one_reply_at_most() {
    let (server_config, client_config) = tls13_configs();
    // A small socket (the tickets rustls sends after the handshake fit): the client's
    // records come in hundreds of reads, the portal's replies soon fill it.
    let (c, s) = duplex(1024);
    let server = sink(s, server_config);
    let mut client = crafted(c, client_config).await;
    let flood = async {
        for i in 0..5_000u32 {
            let mut out = Vec::new();
            client.key_update_into(true, &mut out);
            client.seal_into(ContentType::ApplicationData, &i.to_be_bytes(), &mut out);
            client.io.write_all(&out).await.unwrap();
        }
        client.io.shutdown().await.unwrap();
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), flood)
        .await
        .expect("the flood is read within a minute");
    let (most_unsent, read, end, records) = server.await.unwrap();
    // The client closed without close_notify once done.
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(read.len(), 5_000 * 4, "every record of data came through");
    // One KeyUpdate record: 5 header, 5 message, 1 type, 16 tag.
    assert!(most_unsent <= 27, "{most_unsent} bytes held unsent");
    assert!(
        records.state.wbuf.capacity() <= 64,
        "{}",
        records.state.wbuf.capacity()
    );
}

/// More than 32 KeyUpdates without application data end the connection with
/// unexpected_message; 32 are fine, and data resets the count.
#[tokio::test]
async fn more_than_32_key_updates_without_data_are_refused() {
    let (server_config, client_config) = tls13_configs();
    let (c, s) = duplex(1 << 16);
    let server = sink(s, server_config);
    let mut client = crafted(c, client_config).await;
    let mut out = Vec::new();
    for _ in 0..32 {
        client.key_update_into(false, &mut out);
    }
    client.seal_into(ContentType::ApplicationData, b"x", &mut out);
    for _ in 0..33 {
        client.key_update_into(true, &mut out);
    }
    client.io.write_all(&out).await.unwrap();
    let (most_unsent, read, end, records) = server.await.unwrap();
    assert_eq!(read, b"x");
    let e = refused(&end);
    assert!(
        e.sent && e.alert == AlertDescription::UnexpectedMessage,
        "{e}"
    );
    assert!(e.why.contains("more than 32"), "{e}");
    // The 33 requests got one reply, behind which the alert went (under the new keys).
    assert!(most_unsent <= 27 + 24, "{most_unsent}");
    assert!(
        records.state.tx.seq <= 3,
        "{}: one KeyUpdate at most, then the alert",
        records.state.tx.seq
    );
    drop(records);
    assert_eq!(client.next().await, Got::Alert(FATAL, 10));
    assert_eq!(client.next().await, Got::Eof);
}

/// A KeyUpdate in two records (RFC 8446 5.1 allows a handshake message in fragments); one
/// followed by more bytes in its record, or interleaved with data, is refused.
#[tokio::test]
async fn a_key_update_split_over_two_records() {
    let (server_config, client_config) = tls13_configs();
    let (c, s) = duplex(1 << 16);
    let server = echo(s, server_config);
    let mut client = crafted(c, client_config).await;
    client
        .send(ContentType::Handshake, &[KEY_UPDATE, 0, 0])
        .await;
    let mut out = Vec::new();
    client.seal_into(ContentType::Handshake, &[1, 1], &mut out);
    let next = client.kernel.update_tx_secret().unwrap();
    client.tx = Keys::new(client.tx.suite, next).unwrap();
    client.seal_into(ContentType::ApplicationData, b"after", &mut out);
    client.io.write_all(&out).await.unwrap();
    // The portal's reply KeyUpdate comes first (followed by `next`), then the echo.
    assert_eq!(client.next().await, Got::Data(b"after".to_vec()));
    assert_eq!(
        client.rx.seq, 1,
        "the echo came under the portal's next keys"
    );
    client.send(ContentType::Alert, &[WARNING, 0]).await;
    assert_eq!(client.next().await, Got::Alert(WARNING, 0));
    assert!(server.await.unwrap().is_ok());

    for (records, want) in [
        (
            vec![vec![KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE]],
            "not at the end of its record",
        ),
        (
            vec![vec![KEY_UPDATE, 0, 0], b"data".to_vec()],
            "between the fragments",
        ),
        (vec![vec![KEY_UPDATE, 0, 0, 1, 7]], "invalid request_update"),
        (vec![vec![KEY_UPDATE, 0, 0, 2, 0, 0]], "malformed"),
        (vec![vec![4, 0, 0, 1, 0]], "message 4 after the handshake"),
    ] {
        let (server_config, client_config) = tls13_configs();
        let (c, s) = duplex(1 << 16);
        let server = sink(s, server_config);
        let mut client = crafted(c, client_config).await;
        for (i, body) in records.iter().enumerate() {
            let typ = if i == 1 {
                ContentType::ApplicationData
            } else {
                ContentType::Handshake
            };
            client.send(typ, body).await;
        }
        let (_, _, end, _) = server.await.unwrap();
        let e = refused(&end);
        assert!(e.sent && e.why.contains(want), "{want}: {e}");
        assert!(
            matches!(client.next().await, Got::Alert(FATAL, _)),
            "{want}"
        );
    }
}

/// A KeyUpdate sent in the same flight as the client's Finished: rustls' handshake stops at
/// the Finished and the record layer takes the KeyUpdate.
#[tokio::test]
async fn a_key_update_in_the_finished_flight() {
    let (server_config, client_config) = tls13_configs();
    let (c, s) = duplex(1 << 16);
    let server = echo(s, server_config);
    let mut client = crafted_holding(c, client_config, true).await;
    let mut flight = std::mem::take(&mut client.held);
    assert!(!flight.is_empty(), "the Finished was held back");
    client.key_update_into(true, &mut flight);
    client.seal_into(ContentType::ApplicationData, b"first", &mut flight);
    client.io.write_all(&flight).await.unwrap();
    assert_eq!(client.next().await, Got::Data(b"first".to_vec()));
    client.send(ContentType::Alert, &[WARNING, 0]).await;
    assert_eq!(client.next().await, Got::Alert(WARNING, 0));
    let records = server.await.unwrap().unwrap();
    assert_eq!((records.state.rx.seq, records.state.tx.seq), (2, 2));
}

/// Records too large: ciphertext past the version's limit is refused from its header, and
/// plaintext past 2^14 once opened (rustls' check), both with record_overflow.
#[tokio::test]
async fn oversized_records_get_record_overflow() {
    for (configs, tls13) in [(tls13_configs as fn() -> _, true), (tls12_configs, false)] {
        // Ciphertext: 2^14 + 257 is past TLS 1.3's limit; TLS 1.2 allows up to 2^14 + 2048.
        for len in [MAX_PLAIN + 257, MAX_PLAIN + 2049] {
            let (server_config, client_config) = configs();
            let (c, s) = duplex(1 << 16);
            let server = sink(s, server_config);
            let mut client = crafted(c, client_config).await;
            let header = [23, 3, 3, (len >> 8) as u8, len as u8];
            client.io.write_all(&header).await.unwrap();
            let allowed = !tls13 && len == MAX_PLAIN + 257;
            if allowed {
                client.io.shutdown().await.unwrap();
            }
            let (_, _, end, _) = server.await.unwrap();
            if allowed {
                // Allowed length: the portal waits for the rest, which never comes.
                assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
                continue;
            }
            let e = refused(&end);
            assert_eq!(
                e.alert,
                AlertDescription::RecordOverflow,
                "tls13={tls13} {len}: {e}"
            );
            assert_eq!(client.next().await, Got::Alert(FATAL, 22));
        }
        // Plaintext of 2^14 + 1, sealed whole (rustls' encrypter does not split it).
        let (server_config, client_config) = configs();
        let (c, s) = duplex(1 << 16);
        let server = sink(s, server_config);
        let mut client = crafted(c, client_config).await;
        client
            .send(ContentType::ApplicationData, &message(MAX_PLAIN))
            .await;
        client
            .send(ContentType::ApplicationData, &message(MAX_PLAIN + 1))
            .await;
        let (_, read, end, _) = server.await.unwrap();
        assert_eq!(read.len(), MAX_PLAIN, "2^14 bytes are fine");
        let e = refused(&end);
        assert_eq!(
            e.alert,
            AlertDescription::RecordOverflow,
            "tls13={tls13}: {e}"
        );
        assert_eq!(client.next().await, Got::Alert(FATAL, 22));
    }
}

/// Alerts from the client: a fatal one ends the connection in both versions (nothing sent
/// back); TLS 1.2 warnings are ignored up to 4; TLS 1.3 allows user_canceled only.
#[tokio::test]
async fn alerts_from_the_client() {
    // TLS 1.2: fatal user_canceled.
    let (server_config, client_config) = tls12_configs();
    let (c, s) = duplex(1 << 16);
    let server = sink(s, server_config);
    let mut client = crafted(c, client_config).await;
    client.send(ContentType::ApplicationData, b"a").await;
    client.send(ContentType::Alert, &[FATAL, 90]).await;
    client.send(ContentType::ApplicationData, b"b").await;
    let (_, read, end, mut records) = server.await.unwrap();
    assert_eq!(read, b"a", "nothing is read after a fatal alert");
    let e = refused(&end);
    assert!(!e.sent && e.alert == AlertDescription::UserCanceled, "{e}");
    assert!(records.write_all(b"late").await.is_err());
    records.shutdown().await.unwrap();
    assert_eq!(
        client.next().await,
        Got::Eof,
        "no alert or close_notify after a fatal alert"
    );

    // TLS 1.2: four warnings are ignored, the fifth refused.
    let (server_config, client_config) = tls12_configs();
    let (c, s) = duplex(1 << 16);
    let server = sink(s, server_config);
    let mut client = crafted(c, client_config).await;
    for _ in 0..5 {
        client.send(ContentType::Alert, &[WARNING, 90]).await;
        client.send(ContentType::ApplicationData, b"w").await;
    }
    let (_, read, end, _) = server.await.unwrap();
    assert_eq!(read, b"wwww");
    assert!(refused(&end).why.contains("more than 4"), "{:?}", end);
    assert_eq!(client.next().await, Got::Alert(FATAL, 10));

    // TLS 1.3: a warning user_canceled is ignored; any other warning is a decode_error; a
    // fatal alert ends the connection.
    for (alert, sent) in [([WARNING, 42], true), ([FATAL, 40], false)] {
        let (server_config, client_config) = tls13_configs();
        let (c, s) = duplex(1 << 16);
        let server = sink(s, server_config);
        let mut client = crafted(c, client_config).await;
        client.send(ContentType::Alert, &[WARNING, 90]).await;
        client.send(ContentType::ApplicationData, b"u").await;
        client.send(ContentType::Alert, &alert).await;
        let (_, read, end, _) = server.await.unwrap();
        assert_eq!(read, b"u");
        let e = refused(&end);
        assert_eq!(e.sent, sent, "{e}");
        if sent {
            assert_eq!(e.alert, AlertDescription::DecodeError);
            assert_eq!(client.next().await, Got::Alert(FATAL, 50));
        }
    }
}

/// close_notify from the client: the portal reads the end of the stream and answers with its
/// own on shutdown.
#[tokio::test]
async fn close_notify_answers_the_clients() {
    for configs in [tls13_configs as fn() -> _, tls12_configs] {
        let (server_config, client_config) = configs();
        let (c, s) = duplex(1 << 16);
        let server = echo(s, server_config);
        let mut client = crafted(c, client_config).await;
        client.send(ContentType::ApplicationData, b"ping").await;
        assert_eq!(client.next().await, Got::Data(b"ping".to_vec()));
        client.send(ContentType::Alert, &[WARNING, 0]).await;
        assert_eq!(client.next().await, Got::Alert(WARNING, 0));
        assert_eq!(client.next().await, Got::Eof);
        server.await.unwrap().unwrap();
    }
}

/// After the portal's close_notify the client may still send (a half-close): a KeyUpdate it
/// asks an answer for gets none, and its data and close_notify are read.
#[tokio::test]
async fn a_key_update_after_the_portals_close_notify() {
    let (server_config, client_config) = tls13_configs();
    let (c, s) = duplex(1 << 16);
    // The portal's side runs on a thread of its own, so that a read that never ends (or
    // never yields) fails the test instead of stalling it.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ended = rt.block_on(async move {
            let mut records = accept(s, server_config).await.unwrap();
            records.shutdown().await.unwrap();
            let closed_at = records.state.tx.seq;
            let mut read = Vec::new();
            records.read_to_end(&mut read).await.unwrap();
            (read, closed_at, records.state.tx.seq)
        });
        let _ = done.send(ended);
    });
    let server = tokio::task::spawn_blocking(move || {
        result.recv_timeout(std::time::Duration::from_secs(10))
    });
    let mut client = crafted(c, client_config).await;
    assert_eq!(client.next().await, Got::Alert(WARNING, 0));
    let mut out = Vec::new();
    client.key_update_into(true, &mut out);
    client.seal_into(ContentType::ApplicationData, b"late", &mut out);
    client.seal_into(ContentType::Alert, &[WARNING, 0], &mut out);
    client.io.write_all(&out).await.unwrap();
    let (read, closed_at, seq) = server.await.unwrap().expect("the read ends within 10 s");
    assert_eq!(read, b"late");
    assert_eq!(seq, closed_at, "nothing sealed after close_notify");
    assert_eq!(client.next().await, Got::Eof);
}

/// At the suite's record limit (2^24 records for AES-GCM) the portal changes its keys in TLS
/// 1.3 and the client follows; in TLS 1.2, which cannot, it closes with close_notify.
#[tokio::test]
async fn the_aes_gcm_record_limit() {
    for configs in [tls13_configs as fn() -> _, tls12_configs] {
        let (server_config, client_config) = configs();
        let (c, s) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut records = accept(s, server_config).await.unwrap();
            // One message each way first, so that the tickets rustls sent are behind.
            records.write_all(b"ready").await.unwrap();
            let mut go = [0u8; 2];
            records.read_exact(&mut go).await.unwrap();
            let limit = records.state.tx.record_limit();
            assert_eq!(limit, 1 << 24);
            records.state.tx.seq = limit - 3;
            let mut written = 0;
            for i in 0..4u8 {
                if records.write_all(&[i]).await.is_err() {
                    break;
                }
                written += 1;
            }
            (written, records.state.tx.seq)
        });
        let mut client = crafted(c, client_config).await;
        assert_eq!(client.next().await, Got::Data(b"ready".to_vec()));
        client.rx.seq = (1 << 24) - 3;
        client.send(ContentType::ApplicationData, b"go").await;
        let (written, seq) = server.await.unwrap();
        if client.rx.tls13() {
            assert_eq!(written, 4);
            for i in 0..4u8 {
                assert_eq!(client.next().await, Got::Data(vec![i]));
            }
            // Two records under the old keys, the KeyUpdate, then two under the new ones.
            assert_eq!(seq, 2);
            assert_eq!(client.rx.seq, 2);
        } else {
            assert_eq!(written, 2);
            for i in 0..2u8 {
                assert_eq!(client.next().await, Got::Data(vec![i]));
            }
            assert_eq!(client.next().await, Got::Alert(WARNING, 0));
            assert_eq!(seq, 1 << 24);
        }
    }
}

/// The keys a client holds are wiped on drop (the 32-byte-key suites keep their key and IV;
/// AES-128-GCM keeps rustls' AEAD).
#[tokio::test]
async fn keys_are_wiped() {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<keys::Secret>();
    let (server_config, client_config) = tls13_configs();
    let (c, s) = duplex(1 << 16);
    let server = tokio::spawn(async move { accept(s, server_config).await.unwrap() });
    let _client = crafted(c, client_config).await;
    let mut records = server.await.unwrap();
    let secret = records
        .state
        .rx
        .secret()
        .expect("AES-256-GCM holds its key");
    assert!(secret.key != [0; 32] && secret.iv != [0; 12]);
    zeroize::Zeroize::zeroize(secret);
    assert!(secret.key == [0; 32] && secret.iv == [0; 12]);
}

#[test]
fn an_idle_client_holds_its_keys_only() {
    assert!(
        std::mem::size_of::<State>() <= 320,
        "{}",
        std::mem::size_of::<State>()
    );
}

/// A handshake rustls refuses (no protocol in common) ends with rustls' alert sent to the
/// client and an error, as with the buffered handshake.
#[tokio::test]
async fn a_refused_handshake_sends_the_alert() {
    let (server_config, client_config) =
        configs(&[suites::TLS13_AES_128_GCM_SHA256], &rustls::version::TLS13);
    let mut client_config = (*client_config).clone();
    client_config.alpn_protocols = vec![b"h2".to_vec()];
    let (c, s) = duplex(1 << 16);
    let server = tokio::spawn(accept(s, server_config));
    let client = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from("localhost").unwrap(), c)
        .await;
    let client_error = client.expect_err("the handshake fails").to_string();
    assert!(
        client_error.contains("NoApplicationProtocol"),
        "{client_error}"
    );
    let server_error = server.await.unwrap().err().unwrap().to_string();
    assert!(server_error.contains("handshake"), "{server_error}");
}

/// Keys from fixed material, the same for sealing and opening.
fn fixed<T: ?Sized + keys::Build>(suite: SupportedCipherSuite, chacha: bool) -> Keys<T> {
    let (key, iv) = (AeadKey::from([7; 32]), Iv::from([9; 12]));
    let secrets = if chacha {
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
    } else {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv }
    };
    Keys::new(suite, (0, secrets)).unwrap()
}

/// The reader of a client's record stream, fed mutations of a valid stream (data, more data,
/// close_notify): flips, cuts, insertions and length fields set to edges, from a fixed seed,
/// in the 32-byte-key suites of both versions. It never panics, and whatever it accepts as
/// data is a prefix of what was sealed.
#[test]
fn the_record_reader_survives_mutated_streams() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
    };
    for (suite, chacha) in [
        (suites::TLS13_AES_256_GCM_SHA384, false),
        (suites::TLS13_CHACHA20_POLY1305_SHA256, true),
        (suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, false),
        (suites::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, true),
    ] {
        let mut sealer = fixed::<dyn MessageEncrypter>(suite, chacha);
        let mut stream = Vec::new();
        let first = message(700);
        let second = message(300);
        for (typ, body) in [
            (ContentType::ApplicationData, &first[..]),
            (ContentType::ApplicationData, &second[..]),
            (ContentType::Alert, &[WARNING, 0][..]),
        ] {
            let seq = sealer.seq;
            seal(sealer.aead(&mut None), seq, typ, &[body], &mut stream).unwrap();
            sealer.seq += 1;
        }
        let sent = [first.clone(), second.clone()].concat();
        let state = |rbuf| {
            let rx = fixed(suite, chacha);
            State::new(rx, fixed(suite, chacha), None, rbuf, Vec::new(), false)
        };
        let mut clean = state(stream.clone());
        clean.open_all().unwrap();
        assert!(clean.plain == sent && clean.read_closed, "{suite:?}");
        for _ in 0..2_000 {
            let mut bad = stream.clone();
            for _ in 0..1 + next(3) {
                match next(4) {
                    0 => {
                        let i = next(bad.len());
                        bad[i] ^= 1 << next(8);
                    }
                    1 => bad.truncate(next(bad.len() + 1)),
                    2 => {
                        let i = next(bad.len() + 1);
                        bad.splice(i..i, (0..next(8)).map(|_| next(256) as u8));
                    }
                    _ if bad.len() >= 5 => {
                        let i = next(bad.len() - 1);
                        let edge = [0u16, 1, 16, 17, 0x4000, 0x4100, 0x4101, 0xffff][next(8)];
                        bad[i..i + 2].copy_from_slice(&edge.to_be_bytes());
                    }
                    _ => {}
                }
            }
            let mut st = state(bad);
            let refused = st.open_all().err();
            assert!(
                sent.starts_with(&st.plain),
                "{suite:?}: data accepted that was not sealed"
            );
            if let Some(e) = refused {
                assert!(e.sent, "{suite:?}: {e}");
                st.refuse(&e);
                assert!(st.close_sent && st.failed.is_some());
            }
        }
    }
}
