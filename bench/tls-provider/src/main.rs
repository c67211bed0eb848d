//! rustls with one crypto provider, measured in memory (no sockets, one core): full TLS 1.3
//! and TLS 1.2 handshakes per second with an ECDSA P-256 certificate, and bulk throughput of
//! application data one way. Build with `--features ring` or `--features aws-lc-rs`.

use std::{
    io::{Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};

#[cfg(feature = "ring")]
fn provider() -> (&'static str, CryptoProvider) {
    ("ring", rustls::crypto::ring::default_provider())
}
#[cfg(all(feature = "aws-lc-rs", not(feature = "ring")))]
fn provider() -> (&'static str, CryptoProvider) {
    ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider())
}

fn transfer(from: &mut Connection, to: &mut Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut slice = &buf[..];
    while !slice.is_empty() {
        to.read_tls(&mut slice).unwrap();
        to.process_new_packets().unwrap();
    }
}

fn handshake(client: &mut Connection, server: &mut Connection) {
    while client.is_handshaking() || server.is_handshaking() {
        transfer(client, server);
        transfer(server, client);
    }
    transfer(client, server);
    transfer(server, client);
}

fn pair(cc: &Arc<ClientConfig>, sc: &Arc<ServerConfig>) -> (Connection, Connection) {
    let c = ClientConnection::new(cc.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let s = ServerConnection::new(sc.clone()).unwrap();
    (Connection::Client(c), Connection::Server(s))
}

fn main() {
    let (name, provider) = provider();
    let provider = Arc::new(provider);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);

    for (label, versions) in [
        ("TLS1.3", &[&rustls::version::TLS13][..]),
        ("TLS1.2", &[&rustls::version::TLS12][..]),
    ] {
        let mut sc = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der.clone_key())
            .unwrap();
        // Full handshakes only: no resumption.
        sc.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        sc.send_tls13_tickets = 0;
        let sc = Arc::new(sc);
        let mut roots = RootCertStore::empty();
        roots.add(cert_der.clone()).unwrap();
        let mut cc = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.resumption = rustls::client::Resumption::disabled();
        let cc = Arc::new(cc);

        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            let (mut c, mut s) = pair(&cc, &sc);
            handshake(&mut c, &mut s);
            n += 1;
        }
        let hs = n as f64 / start.elapsed().as_secs_f64();

        // Bulk: 16 KiB writes client -> server, read out on the server.
        let (mut c, mut s) = pair(&cc, &sc);
        handshake(&mut c, &mut s);
        let chunk = vec![0x5au8; 16 * 1024];
        let mut sink = vec![0u8; 64 * 1024];
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            for _ in 0..64 {
                c.writer().write_all(&chunk).unwrap();
                transfer(&mut c, &mut s);
                loop {
                    match s.reader().read(&mut sink) {
                        Ok(0) => break,
                        Ok(k) => bytes += k as u64,
                        Err(_) => break,
                    }
                }
            }
        }
        let mbps = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
        let suite = c
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        println!(
            "{name:9} {label}  full handshakes/s (client+server, one core): {hs:8.0}   bulk {suite}: {mbps:7.0} MB/s"
        );
    }
}
