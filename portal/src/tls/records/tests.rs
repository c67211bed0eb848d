//! Unit tests of `records`: a real rustls client against the portal's record layer for every
//! suite and version the portal offers, KeyUpdate both ways, close_notify both ways, bad
//! records refused by name, and what an idle client holds.

use std::sync::Arc;

use rustls::{
    crypto::ring::cipher_suite as suites, pki_types::ServerName, ClientConfig,
    SupportedCipherSuite, SupportedProtocolVersion,
};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::keys::{Aead, Keys};
use super::record::*;
use super::*;
use crate::config::{Engine, TlsVersion};
use crate::tls::{parse_pair, server_config, CertSource, ServerSettings};

use crate::tls::tests::testca::TestCa;

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
fn echo(
    stream: DuplexStream,
    config: Arc<ServerConfig>,
) -> tokio::task::JoinHandle<io::Result<Records<DuplexStream>>> {
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

/// RFC 8448 section 3 (simple 1-RTT handshake): the server's application traffic keys.
#[test]
fn key_derivation_matches_rfc_8448() {
    let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
    let mut keys = keys(Aead::Aes128Gcm, true);
    keys.secret[..32].copy_from_slice(&secret);
    keys.derive();
    assert_eq!(keys.key[..16], hex("9f02283b6c9c07efc26bb9f2ac92e356")[..]);
    assert_eq!(keys.iv[..], hex("cf782b88dd83549aadf1e984")[..]);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn keys(aead: Aead, tls13: bool) -> Keys {
    let mut keys = Keys {
        aead,
        tls13,
        key: [7; 32],
        iv: [9; 12],
        secret: [3; 48],
        seq: 0,
    };
    if tls13 {
        keys.derive();
    }
    keys
}

/// Sealed records open to what was sealed, in every suite and version; any change to a
/// record (thousands of mutations from a fixed seed) is refused, never a panic, never data.
#[test]
fn seal_open_and_mutations() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::Chacha20] {
        for tls13 in [true, false] {
            for (typ, body) in [
                (APPLICATION_DATA, message(300)),
                (ALERT, vec![1, CLOSE_NOTIFY]),
                (HANDSHAKE, vec![KEY_UPDATE, 0, 0, 1, 1]),
            ] {
                let mut sealer = keys(aead, tls13);
                let mut record = Vec::new();
                let key = sealer.sealing();
                seal(&mut sealer, &key, typ, &[&body], &mut record);
                assert_eq!(complete_record(&record).unwrap(), Some(record.len()));
                let mut opener = keys(aead, tls13);
                let key = opener.sealing();
                let opened = open(&mut opener, &key, &mut record.clone());
                let want = match (typ, tls13) {
                    (APPLICATION_DATA, _) => {
                        let at = HEADER + aead.explicit_nonce(tls13);
                        Opened::Data(at..at + body.len())
                    }
                    (ALERT, _) => Opened::Closed,
                    (_, true) => Opened::KeyUpdate(true),
                    (_, false) => {
                        assert!(opened.unwrap_err().to_string().contains("renegotiation"));
                        continue;
                    }
                };
                assert_eq!(opened.unwrap(), want, "{aead:?} tls13={tls13} type {typ}");
                for _ in 0..300 {
                    let mut bad = record.clone();
                    let i = (next() as usize) % bad.len();
                    bad[i] ^= 1 << (next() % 8);
                    let Ok(Some(n)) = complete_record(&bad) else {
                        continue;
                    };
                    if n > bad.len() || n != bad.len() {
                        continue;
                    }
                    let mut opener = keys(aead, tls13);
                    let key = opener.sealing();
                    assert!(
                        open(&mut opener, &key, &mut bad).is_err(),
                        "{aead:?} tls13={tls13}: a record changed at byte {i} opened"
                    );
                }
            }
        }
    }
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

fn state(aead: Aead, tls13: bool, rbuf: Vec<u8>) -> State {
    State::new(
        keys(aead, tls13),
        keys(aead, tls13),
        rbuf,
        Vec::new(),
        false,
    )
}

/// The reader of a client's record stream, fed mutations of a valid stream (data, a
/// KeyUpdate, more data under the new keys, close_notify): flips, cuts, insertions and length
/// fields set to edges, from a fixed seed. It never panics, and whatever it accepts as data is
/// a prefix of what was sealed.
#[test]
fn the_record_reader_survives_mutated_streams() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1) as u64) as usize
    };
    for aead in [Aead::Aes128Gcm, Aead::Aes256Gcm, Aead::Chacha20] {
        for tls13 in [true, false] {
            let mut sealer = keys(aead, tls13);
            let mut stream = Vec::new();
            let first = message(700);
            let second = message(300);
            let key = sealer.sealing();
            seal(&mut sealer, &key, APPLICATION_DATA, &[&first], &mut stream);
            if tls13 {
                seal(
                    &mut sealer,
                    &key,
                    HANDSHAKE,
                    &[&[KEY_UPDATE, 0, 0, 1, 0]],
                    &mut stream,
                );
                sealer.update();
            }
            let key = sealer.sealing();
            seal(&mut sealer, &key, APPLICATION_DATA, &[&second], &mut stream);
            seal(&mut sealer, &key, ALERT, &[&[1, CLOSE_NOTIFY]], &mut stream);
            let sent = [first.clone(), second.clone()].concat();
            let mut clean = state(aead, tls13, stream.clone());
            clean.open_all().unwrap();
            assert!(
                clean.plain == sent && clean.read_closed,
                "{aead:?} tls13={tls13}"
            );
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
                            let edge = [0u16, 1, 16, 17, 0x4000, 0x4100, 0xffff][next(7)];
                            bad[i..i + 2].copy_from_slice(&edge.to_be_bytes());
                        }
                        _ => {}
                    }
                }
                let mut st = state(aead, tls13, bad);
                let _ = st.open_all();
                assert!(
                    sent.starts_with(&st.plain),
                    "{aead:?} tls13={tls13}: data accepted that was not sealed"
                );
            }
        }
    }
}
