//! Attacks on the portal and the limits that stop them: a configuration file caught mid-write,
//! secrets in credential files, half-open and flooding clients, negotiation deadlines, and the
//! admin endpoint's own limits. Real sockets on loopback; a real redis-server where a database
//! is needed.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod files;
mod negotiation;

use common::tls as tlsca;

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A client from `from` is refused: closed before any byte reaches the backend.
async fn refused(from: &str, portal: SocketAddr) -> bool {
    match connect_from(from, portal).await {
        Ok(mut c) => {
            let _ = c.write_all(b"ping").await;
            closed_within(&mut c, STEP).await
        }
        Err(_) => true,
    }
}

/// How many of `streams` the portal has closed (read gives EOF or an error at once).
async fn closed_count(streams: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for s in streams.iter_mut() {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    closed
}
