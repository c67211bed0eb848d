//! Unit tests of `tls`: certificate loading and rotation, engine negotiation over loopback.

use std::{sync::Arc, time::Duration};

use rustls::{pki_types::ServerName, ClientConfig};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::config::{Engine, TlsMode, TlsVersion};

#[path = "../../tests/common/tls.rs"]
pub(super) mod testca;
use testca::{Leaf, TempDir, TestCa};

fn settings(engine: Engine, leaf: &Leaf) -> ServerSettings {
    ServerSettings {
        engine,
        min_version: TlsVersion::V1_2,
        cert: CertSource::from_pem(leaf.cert_pem.clone(), leaf.key_pem.clone()),
        client_ca: None,
    }
}

fn client_config(ca: &TestCa, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

async fn tls_connect(
    stream: DuplexStream,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<DuplexStream>> {
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
}

fn store_for(engine: Engine, leaf: &Leaf) -> Arc<CertStore> {
    CertStore::new(settings(engine, leaf)).unwrap()
}

fn terminator(engine: Engine, store: &CertStore) -> Terminator {
    Terminator::new(engine, TlsMode::Terminate, Some(store.subscribe()), None)
        .with_handshake_timeout(Duration::from_secs(2))
}

// --- certificates ---

#[test]
fn parses_a_pair_and_reads_its_expiry() {
    let ca = TestCa::new("ca");
    let leaf = ca.server_for_days("portal-a", &["localhost"], 30);
    let pair = parse_pair(
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert!(
        pair.info.subject.contains("portal-a"),
        "{}",
        pair.info.subject
    );
    let left = pair.info.seconds_to_expiry(std::time::SystemTime::now());
    assert!(
        (29.0 * 86400.0..30.0 * 86400.0 + 10.0).contains(&left),
        "{left}"
    );
}

#[test]
fn refuses_a_key_that_does_not_match() {
    let ca = TestCa::new("ca");
    let a = ca.server("a", &["localhost"]);
    let b = ca.server("b", &["localhost"]);
    let err = parse_pair(
        a.cert_pem.as_bytes(),
        b.key_pem.as_bytes(),
        std::time::SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch(_)), "{err}");
    assert_eq!(err.label(), "key_mismatch");
}

#[test]
fn refuses_unparsable_empty_and_expired_pairs() {
    let ca = TestCa::new("ca");
    let leaf = ca.server("a", &["localhost"]);
    let now = std::time::SystemTime::now();
    let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
    for (cert, key) in [
        (&garbage[..], leaf.key_pem.as_bytes()),
        (b"".as_slice(), leaf.key_pem.as_bytes()),
        (leaf.cert_pem.as_bytes(), b"".as_slice()),
        (leaf.cert_pem.as_bytes(), leaf.cert_pem.as_bytes()),
    ] {
        let err = parse_pair(cert, key, now).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate(_)), "{err}");
    }
    let expired = ca.server_for_days("old", &["localhost"], -1);
    let err = parse_pair(expired.cert_pem.as_bytes(), expired.key_pem.as_bytes(), now).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn alpn_follows_the_engine() {
    assert_eq!(alpn_for(Engine::Postgres), vec![b"postgresql".to_vec()]);
    assert_eq!(alpn_for(Engine::Etcd)[0], b"h2".to_vec());
    assert!(alpn_for(Engine::Redis).is_empty());
}

// --- versions ---

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let ca = TestCa::new("ca");
    let leaf = ca.server("a", &["localhost"]);
    let mut s = settings(Engine::Redis, &leaf);
    s.min_version = TlsVersion::V1_3;
    let store = CertStore::new(s).unwrap();
    let term = terminator(Engine::Redis, &store);

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let tls12_only = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(tls_connect(c, tls12_only), term.accept(s));
    assert!(client.is_err());
    assert!(matches!(server, Err(TlsError::Handshake(_))));

    // And 1.3 works.
    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(tls_connect(c, client_config(&ca, &[])), term.accept(s));
    client.unwrap();
    let accepted = server.unwrap();
    assert_eq!(
        accepted.stream().unwrap().tls_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

// --- the store and rotation ---

#[tokio::test]
async fn rotation_swaps_good_pairs_and_refuses_broken_ones() {
    let dir = TempDir::new("tls-unit-rotate");
    let ca = TestCa::new("ca");
    let first = ca.server("first", &["localhost"]);
    let (cert, key) = first.write(dir.path(), "portal");
    let store = CertStore::new(ServerSettings {
        engine: Engine::Redis,
        min_version: TlsVersion::V1_2,
        cert: CertSource::files(&cert, &key),
        client_ca: None,
    })
    .unwrap();
    let mut rx = store.subscribe();
    assert_eq!(store.poll(), Reload::Unchanged);

    let second = ca.server("second", &["localhost"]);
    second.replace(&cert, &key);
    assert_eq!(store.poll(), Reload::Swapped);
    assert!(rx.has_changed().unwrap());
    assert!(rx.borrow_and_update().info.subject.contains("second"));
    assert_eq!(store.poll(), Reload::Unchanged);

    // A key that does not match: the first poll defers (the key may be on its way), the
    // second refuses, and the served pair stays.
    let third = ca.server("third", &["localhost"]);
    std::fs::write(&cert, &third.cert_pem).unwrap();
    assert_eq!(store.poll(), Reload::Deferred);
    assert!(matches!(store.poll(), Reload::Refused(m) if m.contains("does not match")));
    assert!(store.current().info.subject.contains("second"));
    assert!(!rx.has_changed().unwrap());
    let status = store.status();
    assert_eq!(status.reloads_refused, 1);
    assert_eq!(status.last_refusal.as_ref().unwrap().reason, "key_mismatch");
    // Reported once, not at every poll.
    assert_eq!(store.poll(), Reload::Unchanged);
    assert_eq!(store.status().reloads_refused, 1);

    let metrics = encoded(StatusMetrics(status.clone()));
    assert!(
        metrics.contains("dbportal_tls_reload_refused 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dbportal_tls_certificate_expiry_seconds 8"),
        "{metrics}"
    );
    let json = status.to_json();
    assert_eq!(json["lastRefusal"]["reason"], "key_mismatch");

    // The key arrives: served at once, refusal cleared.
    std::fs::write(&key, &third.key_pem).unwrap();
    assert_eq!(store.poll(), Reload::Swapped);
    assert!(store.current().info.subject.contains("third"));
    assert!(store.status().last_refusal.is_none());

    // Garbage, and a file that disappears.
    std::fs::write(&cert, "garbage").unwrap();
    assert_eq!(store.poll(), Reload::Deferred);
    assert!(matches!(store.poll(), Reload::Refused(_)));
    std::fs::remove_file(&cert).unwrap();
    assert!(matches!(store.reload(), Reload::Refused(m) if m.contains("cannot read")));
    assert!(store.current().info.subject.contains("third"));
}

#[tokio::test]
async fn a_cert_written_before_its_key_is_not_a_refusal() {
    let dir = TempDir::new("tls-unit-order");
    let ca = TestCa::new("ca");
    let (cert, key) = ca.server("one", &["localhost"]).write(dir.path(), "p");
    let store = CertStore::new(ServerSettings {
        engine: Engine::Tcp,
        min_version: TlsVersion::V1_2,
        cert: CertSource::files(&cert, &key),
        client_ca: None,
    })
    .unwrap();
    let two = ca.server("two", &["localhost"]);
    std::fs::write(&cert, &two.cert_pem).unwrap();
    assert_eq!(store.poll(), Reload::Deferred);
    std::fs::write(&key, &two.key_pem).unwrap();
    assert_eq!(store.poll(), Reload::Swapped);
    assert_eq!(store.status().reloads_refused, 0);
}

#[tokio::test]
async fn set_settings_with_pem_from_a_secret() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Redis, &ca.server("one", &["localhost"]));
    let two = ca.server("two", &["localhost"]);
    let mut s = store.settings();
    s.cert = CertSource::from_pem(two.cert_pem.clone(), two.key_pem.clone());
    assert_eq!(store.set_settings(s), Reload::Swapped);
    assert!(store.current().info.subject.contains("two"));
    let mut bad = store.settings();
    bad.cert = CertSource::from_pem(two.cert_pem.clone(), ca.server("x", &[]).key_pem);
    assert!(matches!(store.set_settings(bad), Reload::Refused(_)));
    // The refused settings were not adopted.
    assert_eq!(store.poll(), Reload::Unchanged);
    assert!(store.current().info.subject.contains("two"));
}

#[tokio::test]
async fn open_sessions_survive_a_rotation() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Redis, &ca.server("one", &["localhost"]));
    let term = terminator(Engine::Redis, &store);
    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(tls_connect(c, client_config(&ca, &[])), term.accept(s));
    let mut client = client.unwrap();
    let Established {
        client: mut srv, ..
    } = term
        .connect(server.unwrap(), duplex(16).0, "localhost")
        .await
        .unwrap();

    let two = ca.server("two", &["localhost"]);
    let mut s = store.settings();
    s.cert = CertSource::from_pem(two.cert_pem.clone(), two.key_pem.clone());
    assert_eq!(store.set_settings(s), Reload::Swapped);

    client.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 6];
    srv.read_exact(&mut buf).await.unwrap();
    srv.write_all(b"+PONG\r\n").await.unwrap();
    let mut buf = [0u8; 7];
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+PONG\r\n");

    // A new handshake sees the new certificate.
    let (c, s) = duplex(64 * 1024);
    let (client, _) = tokio::join!(tls_connect(c, client_config(&ca, &[])), term.accept(s));
    let client = client.unwrap();
    let peer = client.get_ref().1.peer_certificates().unwrap()[0].clone();
    let pair = parse_pair(
        two.cert_pem.as_bytes(),
        two.key_pem.as_bytes(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(peer.as_ref(), pair.key.cert[0].as_ref());
}

// --- client certificates ---

#[tokio::test]
async fn client_ca_requires_a_trusted_client_certificate() {
    let ca = TestCa::new("ca");
    let clients = TestCa::new("client-ca");
    let leaf = ca.server("a", &["localhost"]);
    let mut s = settings(Engine::Redis, &leaf);
    s.client_ca = Some(CaSource::Pem(clients.cert_pem.clone().into_bytes()));
    let store = CertStore::new(s).unwrap();
    let term = terminator(Engine::Redis, &store);

    let with_cert = |who: &TestCa| {
        let leaf = who.client("app");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![rustls::pki_types::CertificateDer::from_pem_slice(
                        leaf.cert_pem.as_bytes(),
                    )
                    .unwrap()],
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
                        .unwrap(),
                )
                .unwrap(),
        )
    };

    // Trusted client cert: accepted.
    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(tls_connect(c, with_cert(&clients)), term.accept(s));
    let mut client = client.unwrap();
    let accepted = server.unwrap();
    client.write_all(b"x").await.unwrap();
    drop(accepted);

    // No client cert, and a cert from another CA: refused.
    for config in [client_config(&ca, &[]), with_cert(&TestCa::new("other"))] {
        let (c, s) = duplex(64 * 1024);
        let (client, server) = tokio::join!(
            async {
                let mut tls = tls_connect(c, config).await?;
                // TLS 1.3: the client learns of the refusal at its first read.
                tls.write_all(b"PING\r\n").await?;
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await
            },
            term.accept(s)
        );
        assert!(client.is_err());
        assert!(matches!(server, Err(TlsError::Handshake(_))));
    }
}

// --- timeouts and garbage ---

#[tokio::test]
async fn a_silent_client_hits_the_handshake_deadline() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    for engine in [Engine::Redis, Engine::Postgres] {
        let term = terminator(engine, &store).with_handshake_timeout(Duration::from_millis(100));
        let (_c, s) = duplex(1024);
        let err = term.accept(s).await.err().unwrap();
        assert!(matches!(err, TlsError::HandshakeTimeout(_)), "{err}");
    }
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_refused() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Redis, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Redis, &store);
    let (mut c, s) = duplex(1024);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let err = term.accept(s).await.err().unwrap();
    assert!(matches!(err, TlsError::Handshake(_)), "{err}");
    // A truncated ClientHello then EOF.
    let (mut c, s) = duplex(1024);
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    drop(c);
    assert!(term.accept(s).await.is_err());
}

// --- PostgreSQL ---

/// A StartupMessage (protocol 3.0, user alice) with its true length.
const STARTUP: &[u8] = b"\x00\x00\x00\x14\x00\x03\x00\x00user\x00alice\x00\x00";

fn pg_request(code: u32) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&8u32.to_be_bytes());
    r[4..].copy_from_slice(&code.to_be_bytes());
    r
}

#[tokio::test]
async fn postgres_ssl_request_then_startup_in_tls() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Postgres, &store);
    let (mut c, s) = duplex(64 * 1024);
    let client = async {
        // GSSAPI first (declined), then TLS.
        c.write_all(&pg_request(80_877_104)).await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"N");
        c.write_all(&pg_request(80_877_103)).await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"S");
        let mut tls = tls_connect(c, client_config(&ca, &[])).await.unwrap();
        tls.write_all(STARTUP).await.unwrap();
        tls.flush().await.unwrap();
        tls
    };
    let (_tls, accepted) = tokio::join!(client, term.accept(s));
    let (backend_side, mut backend) = duplex(1024);
    let Established {
        client: mut srv, ..
    } = term
        .connect(accepted.unwrap(), backend_side, "db")
        .await
        .unwrap();
    assert!(srv.is_tls());
    let mut got = vec![0u8; STARTUP.len()];
    srv.read_exact(&mut got).await.unwrap();
    assert_eq!(got, STARTUP);
    // Nothing was sent to the backend by the negotiation itself.
    drop(srv);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(50), backend.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn postgres_direct_tls_needs_alpn() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Postgres, &store);

    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(
        tls_connect(c, client_config(&ca, &[b"postgresql"])),
        term.accept(s)
    );
    let mut client = client.unwrap();
    let accepted = server.unwrap();
    assert_eq!(accepted.stream().unwrap().alpn(), Some(&b"postgresql"[..]));
    client.write_all(STARTUP).await.unwrap();

    let (c, s) = duplex(64 * 1024);
    let (_, server) = tokio::join!(tls_connect(c, client_config(&ca, &[])), term.accept(s));
    assert!(matches!(server, Err(TlsError::Handshake(m)) if m.contains("ALPN")));

    let (c, s) = duplex(64 * 1024);
    let (client, server) =
        tokio::join!(tls_connect(c, client_config(&ca, &[b"h2"])), term.accept(s));
    assert!(client.is_err());
    assert!(server.is_err());
}

#[tokio::test]
async fn postgres_plaintext_startup_gets_a_fatal_error() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Postgres, &store);
    let (mut c, s) = duplex(64 * 1024);
    c.write_all(STARTUP).await.unwrap();
    let err = term.accept(s).await.err().unwrap();
    assert!(matches!(err, TlsError::TlsRequired(_)), "{err}");
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'E');
    let len = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]) as usize;
    assert_eq!(len + 1, reply.len());
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("SFATAL\0"), "{text}");
    assert!(text.contains("C28000\0"), "{text}");
    assert!(text.contains("requires TLS"), "{text}");
}

#[tokio::test]
async fn postgres_plaintext_cancel_request_goes_through() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Postgres, &store);
    let (mut c, s) = duplex(1024);
    let mut cancel = vec![0, 0, 0, 16];
    cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
    cancel.extend_from_slice(&[0, 0, 0x30, 0x39, 1, 2, 3, 4]);
    c.write_all(&cancel).await.unwrap();
    let accepted = term.accept(s).await.unwrap();
    let mut srv = term
        .connect(accepted, duplex(16).0, "db")
        .await
        .unwrap()
        .client;
    assert!(!srv.is_tls());
    let mut got = vec![0u8; 16];
    srv.read_exact(&mut got).await.unwrap();
    assert_eq!(got, cancel);
}

#[tokio::test]
async fn postgres_truncated_and_malformed_requests_are_refused() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Postgres, &store);
    let cases: [&[u8]; 4] = [
        &[0, 0, 0, 8, 0x04, 0xd2],             // truncated SSLRequest
        &[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f], // wrong length
        &[0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0], // absurd startup length
        &[0, 0, 0, 8, 0, 0, 0, 0],             // unknown code
    ];
    for bytes in cases {
        let (mut c, s) = duplex(1024);
        c.write_all(bytes).await.unwrap();
        drop(c);
        let err = term.accept(s).await.err().unwrap();
        assert!(matches!(err, TlsError::Malformed(_)), "{bytes:?}: {err}");
    }
    // Endless GSSENCRequests.
    let (mut c, s) = duplex(1024);
    for _ in 0..4 {
        c.write_all(&pg_request(80_877_104)).await.unwrap();
    }
    assert!(matches!(term.accept(s).await, Err(TlsError::Malformed(_))));
}

#[tokio::test]
async fn postgres_backend_tls_by_ssl_request() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Postgres, &ca.server("portal", &["localhost"]));
    let db_store = store_for(Engine::Postgres, &ca.server("db", &["db.internal"]));
    let connector = BackendConnector::from_ca_pem(ca.cert_pem.as_bytes(), None).unwrap();
    let term = Terminator::new(
        Engine::Postgres,
        TlsMode::Disabled,
        Some(store.subscribe()),
        Some(connector),
    );
    // A plaintext client: the portal declines its SSLRequest and encrypts to the backend.
    let (mut c, s) = duplex(64 * 1024);
    c.write_all(&pg_request(80_877_103)).await.unwrap();
    let (accepted, _) = tokio::join!(term.accept(s), async {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"N");
        c.write_all(STARTUP).await.unwrap();
    });

    let (portal_side, mut db) = duplex(64 * 1024);
    let db_task = async {
        let mut req = [0u8; 8];
        db.read_exact(&mut req).await.unwrap();
        assert_eq!(req, pg_request(80_877_103));
        db.write_all(b"S").await.unwrap();
        let config = db_store.current().config.clone();
        let mut tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(db)
            .await
            .unwrap();
        let mut got = vec![0u8; STARTUP.len()];
        tls.read_exact(&mut got).await.unwrap();
        // SCRAM, channel binding first, as a server does over TLS.
        tls.write_all(b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        (got, tls)
    };
    // The portal relays the startup and the server's first answer itself (see `pg_sasl`).
    let connect = async {
        let est = term
            .connect(accepted.unwrap(), portal_side, "db.internal")
            .await
            .unwrap();
        assert!(est.backend.is_tls());
        est
    };
    let ((got, _tls), _est) = tokio::join!(db_task, connect);
    assert_eq!(got, STARTUP);
    // The plaintext client gets the offer without the mechanism it could not use.
    let mut offer = [0u8; 24];
    c.read_exact(&mut offer).await.unwrap();
    assert_eq!(&offer, b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");

    // A backend that declines TLS is an error, not a silent plaintext connection.
    let (mut c, s) = duplex(1024);
    c.write_all(STARTUP).await.unwrap();
    let accepted = term.accept(s).await.unwrap();
    let (portal_side, mut db) = duplex(1024);
    let db_task = async {
        let mut req = [0u8; 8];
        db.read_exact(&mut req).await.unwrap();
        db.write_all(b"N").await.unwrap();
        db
    };
    let (res, _db) = tokio::join!(term.connect(accepted, portal_side, "db.internal"), db_task);
    assert!(matches!(res, Err(TlsError::Backend(m)) if m.contains("does not accept TLS")));
}

// --- MySQL ---

/// A HandshakeV10 greeting like MariaDB's, with CLIENT_SSL (and PROTOCOL_41) offered.
fn greeting() -> Vec<u8> {
    let mut p = vec![10];
    p.extend_from_slice(b"5.5.5-10.11.6-MariaDB\0");
    p.extend_from_slice(&7u32.to_le_bytes());
    p.extend_from_slice(b"abcdefgh");
    p.push(0);
    p.extend_from_slice(&(0xf7ffu16 | 0x0800).to_le_bytes());
    p.push(8);
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&0x81bfu16.to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(b"ijklmnopqrst\0");
    p.extend_from_slice(b"mysql_native_password\0");
    p
}

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

async fn read_pkt<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).await.unwrap();
    let mut p = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    s.read_exact(&mut p).await.unwrap();
    (h[3], p)
}

fn handshake_response(caps: u32) -> Vec<u8> {
    let mut p = caps.to_le_bytes().to_vec();
    p.extend_from_slice(&(16u32 << 20).to_le_bytes());
    p.push(33);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"alice\0");
    p.push(0);
    p.extend_from_slice(b"mysql_native_password\0");
    p
}

const CLIENT_CAPS: u32 = 0x000f_a685 | 0x0200;

#[tokio::test]
async fn mysql_upgrade_relays_with_sequence_ids_shifted() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Mysql, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Mysql, &store);
    let (c, s) = duplex(64 * 1024);
    let (portal_side, mut db) = duplex(64 * 1024);

    let db_task = tokio::spawn(async move {
        db.write_all(&packet(0, &greeting())).await.unwrap();
        let (seq, resp) = read_pkt(&mut db).await;
        assert_eq!(seq, 1, "the backend sees the response as packet 1");
        let caps = u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
        assert_eq!(
            caps & CLIENT_SSL,
            0,
            "CLIENT_SSL cleared towards a plaintext backend"
        );
        assert!(resp.ends_with(b"mysql_native_password\0"));
        // An auth switch round, then OK.
        db.write_all(&packet(
            2,
            b"\xfemysql_native_password\0salt1234567890123456\0",
        ))
        .await
        .unwrap();
        let (seq, data) = read_pkt(&mut db).await;
        assert_eq!((seq, data.as_slice()), (3, &b"scrambled"[..]));
        db.write_all(&packet(4, &[0, 0, 0, 2, 0, 0, 0]))
            .await
            .unwrap();
        // Command phase: untouched.
        let (seq, cmd) = read_pkt(&mut db).await;
        assert_eq!((seq, cmd.as_slice()), (0, &b"\x03SELECT 1"[..]));
    });
    let client_task = async {
        let mut c = c;
        let (seq, g) = read_pkt(&mut c).await;
        assert_eq!(seq, 0);
        let off = 1 + g[1..].iter().position(|&b| b == 0).unwrap() + 1 + 13;
        assert_ne!(u16::from_le_bytes([g[off], g[off + 1]]) & 0x0800, 0);
        c.write_all(&packet(
            1,
            &handshake_response(CLIENT_CAPS | CLIENT_SSL)[..32],
        ))
        .await
        .unwrap();
        let mut tls = tls_connect(c, client_config(&ca, &[])).await.unwrap();
        tls.write_all(&packet(2, &handshake_response(CLIENT_CAPS | CLIENT_SSL)))
            .await
            .unwrap();
        let (seq, switch) = read_pkt(&mut tls).await;
        assert_eq!((seq, switch[0]), (3, 0xfe));
        tls.write_all(&packet(4, b"scrambled")).await.unwrap();
        let (seq, ok) = read_pkt(&mut tls).await;
        assert_eq!((seq, ok[0]), (5, 0));
        tls
    };
    let portal = async {
        let accepted = term.accept(s).await.unwrap();
        let est = term.connect(accepted, portal_side, "db").await.unwrap();
        assert!(est.client.is_tls());
        est
    };
    let (mut tls, mut est) = tokio::join!(client_task, portal);
    // Pump one command through by hand, then let the fake backend check it.
    tls.write_all(&packet(0, b"\x03SELECT 1")).await.unwrap();
    tls.flush().await.unwrap();
    let mut cmd = vec![0u8; 13];
    est.client.read_exact(&mut cmd).await.unwrap();
    est.backend.write_all(&cmd).await.unwrap();
    est.backend.flush().await.unwrap();
    db_task.await.unwrap();
}

#[tokio::test]
async fn mysql_client_without_ssl_gets_an_err_packet() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Mysql, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Mysql, &store);
    let (mut c, s) = duplex(64 * 1024);
    let (portal_side, mut db) = duplex(64 * 1024);
    db.write_all(&packet(0, &greeting())).await.unwrap();
    let client = async {
        let _ = read_pkt(&mut c).await;
        c.write_all(&packet(1, &handshake_response(CLIENT_CAPS)))
            .await
            .unwrap();
        let (seq, err) = read_pkt(&mut c).await;
        (seq, err)
    };
    let portal = async {
        let accepted = term.accept(s).await.unwrap();
        term.connect(accepted, portal_side, "db")
            .await
            .err()
            .unwrap()
    };
    let ((seq, err), portal_err) = tokio::join!(client, portal);
    assert!(matches!(portal_err, TlsError::TlsRequired(_)));
    assert_eq!(seq, 2);
    assert_eq!(err[0], 0xff);
    assert_eq!(u16::from_le_bytes([err[1], err[2]]), 3159);
    assert!(String::from_utf8_lossy(&err).contains("requires TLS"));
}

#[tokio::test]
async fn mysql_truncated_packets_are_refused() {
    let ca = TestCa::new("ca");
    let store = store_for(Engine::Mysql, &ca.server("a", &["localhost"]));
    let term = terminator(Engine::Mysql, &store);
    let cases: [&[u8]; 3] = [
        &[32, 0, 0, 1, 0x85, 0xae],            // SSLRequest cut short
        &[4, 0, 0, 1, 0x85, 0xae, 0x0f, 0x00], // too short to be one
        &[0xff, 0xff, 0xff, 1],                // absurd length
    ];
    for bytes in cases {
        let (mut c, s) = duplex(64 * 1024);
        let (portal_side, mut db) = duplex(64 * 1024);
        db.write_all(&packet(0, &greeting())).await.unwrap();
        c.write_all(bytes).await.unwrap();
        // EOF after the bytes; the greeting waits unread in the pipe.
        c.shutdown().await.unwrap();
        let accepted = term.accept(s).await.unwrap();
        let err = term
            .connect(accepted, portal_side, "db")
            .await
            .err()
            .unwrap();
        assert!(matches!(err, TlsError::Malformed(_)), "{bytes:?}: {err}");
    }
    // A backend that sends garbage instead of a greeting.
    let (_c, s) = duplex(1024);
    let (portal_side, mut db) = duplex(1024);
    db.write_all(&packet(0, b"\x09old")).await.unwrap();
    let accepted = term.accept(s).await.unwrap();
    let err = term
        .connect(accepted, portal_side, "db")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, TlsError::Backend(_)), "{err}");
}

#[tokio::test]
async fn transparent_modes_touch_nothing() {
    for mode in [TlsMode::Passthrough, TlsMode::Disabled] {
        let term = Terminator::new(Engine::Postgres, mode, None, None);
        assert!(term.is_transparent());
        let (mut c, s) = duplex(1024);
        c.write_all(&pg_request(80_877_103)).await.unwrap();
        let accepted = term.accept(s).await.unwrap();
        let mut srv = term
            .connect(accepted, duplex(8).0, "db")
            .await
            .unwrap()
            .client;
        let mut got = [0u8; 8];
        srv.read_exact(&mut got).await.unwrap();
        assert_eq!(got, pg_request(80_877_103));
    }
}

// --- the runtime ---

#[tokio::test]
async fn runtime_follows_configuration_and_keeps_the_last_good_tls() {
    let dir = TempDir::new("tls-unit-runtime");
    let ca = TestCa::new("ca");
    let (cert, key) = ca.server("one", &["localhost"]).write(dir.path(), "p");
    let yaml = |key: &std::path::Path, min: &str| {
        format!(
            "engine: postgres\nbackends: [{{name: a, address: \"127.0.0.1:5432\"}}]\n\
             tls: {{certFile: \"{}\", keyFile: \"{}\", minVersion: \"{min}\"}}\n",
            cert.display(),
            key.display()
        )
    };
    let config = |text: String| {
        crate::config::parse_yaml(&text)
            .unwrap()
            .validate_standalone()
            .unwrap()
    };
    let good = config(yaml(&key, "1.2"));
    TlsRuntime::check(&good).unwrap();
    let runtime = TlsRuntime::new(&good).unwrap();
    let first = runtime.terminator().unwrap();
    assert_eq!(first.engine(), Engine::Postgres);

    // A new minimum version is applied to the same store.
    runtime.apply(&config(yaml(&key, "1.3"))).unwrap();
    assert!(!Arc::ptr_eq(&first, &runtime.terminator().unwrap()));

    // A key file that does not exist: refused, the terminator in force stays.
    let before = runtime.terminator().unwrap();
    let missing = dir.path().join("missing.key");
    assert!(TlsRuntime::check(&config(yaml(&missing, "1.2"))).is_err());
    assert!(runtime.apply(&config(yaml(&missing, "1.2"))).is_err());
    assert!(Arc::ptr_eq(&before, &runtime.terminator().unwrap()));
    let status = runtime.status_json();
    assert!(
        status["error"].as_str().unwrap().contains("missing.key"),
        "{status}"
    );
    let metrics = encoded(runtime.clone());
    assert!(
        metrics.contains("dbportal_tls_settings_refused 1"),
        "{metrics}"
    );

    // A portal that could not load its certificate refuses TLS clients instead of serving
    // plaintext.
    let closed = TlsRuntime::new_or_closed(&config(yaml(&missing, "1.2")));
    assert!(closed.terminator().is_none());
}

/// The OpenMetrics text of one collector.
fn encoded(collector: impl prometheus_client::collector::Collector) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

/// A certificate store's status as a collector.
#[derive(Debug)]
struct StatusMetrics(super::store::TlsStatus);

impl prometheus_client::collector::Collector for StatusMetrics {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        self.0.encode_metrics(&mut e, std::time::SystemTime::now())
    }
}
