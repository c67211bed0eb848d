//! Half-open and flooding clients: the per-address and portal-wide negotiation limits,
//! the handshake deadline and the per-address rate limit.

use super::*;

struct Pki {
    _dir: TempDir,
    ca: tlsca::TestCa,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("hardening-pki");
        let ca = tlsca::TestCa::new("dbportal test CA");
        let (cert, key) = ca
            .server("portal", &["localhost", "127.0.0.1"])
            .write(dir.path(), "portal");
        Pki {
            _dir: dir,
            ca,
            cert,
            key,
        }
    }

    fn yaml(&self, engine: &str, backend: SocketAddr, extra: &str) -> String {
        format!(
            "engine: {engine}\nport: 7000\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\n\
             routing: {{mode: first}}\ndrainTimeout: 1s\n\
             backends:\n  - {{name: n0, address: \"{backend}\"}}\n\
             tls:\n  certFile: \"{}\"\n  keyFile: \"{}\"\n{extra}\n",
            self.cert.display(),
            self.key.display()
        )
    }

    async fn connect(&self, from: &str, addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(portal::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = connect_from(from, addr).await?;
        let mut tls = tokio::time::timeout(
            STEP,
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))??;
        tls.write_all(b"hello").await?;
        let mut back = vec![0u8; 5];
        tokio::time::timeout(STEP, tls.read_exact(&mut back))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo"))??;
        Ok(back)
    }
}

/// Waits until the portal's metric `name` satisfies `ok`; returns its value.
async fn wait_metric(portal: &Portal, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + STEP;
    loop {
        let m = portal.metrics().await;
        let v = metric(&m, name).unwrap_or(f64::NAN);
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} = {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` TCP connections from each of `sources` and sends nothing (half-open TLS clients).
async fn half_open(sources: &[&str], n: usize, to: SocketAddr) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for from in sources {
        for _ in 0..n {
            if let Ok(c) = connect_from(from, to).await {
                open.push(c);
            }
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tls_clients_from_a_few_addresses_do_not_lock_others_out() {
    let echo = TestServer::echo().await;
    let pki = Pki::new();
    let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];

    // Without the negotiation limits, 2,000 silent clients fill maxConnections: a legitimate
    // client is refused until their handshakes time out. (This is what the limits are for.)
    let unlimited = Portal::start(&pki.yaml(
        "redis",
        echo.addr,
        "limits: {maxConnections: 2000, maxNegotiating: 1000000, maxNegotiatingPerClient: 0}\ntimeouts: {handshake: 1m}",
    ))
    .await;
    let flood = half_open(&sources, 500, unlimited.addr).await;
    assert_eq!(flood.len(), 2000);
    wait_metric(&unlimited, "dbportal_connections_negotiating", |v| {
        v == 2000.0
    })
    .await;
    assert!(
        pki.connect("127.0.0.9", unlimited.addr).await.is_err(),
        "without limits the flood locks a legitimate client out"
    );
    drop(flood);
    unlimited.stop().await;

    // With 64 negotiating per client address: the flood keeps 4 × 64 slots, the rest is
    // closed at once, and legitimate clients get through.
    // (A long handshake deadline: the flood must still be negotiating when it is counted.)
    let portal = Portal::start(&pki.yaml(
        "redis",
        echo.addr,
        "limits: {maxConnections: 2000, maxNegotiatingPerClient: 64}\ntimeouts: {handshake: 1m}",
    ))
    .await;
    let mut flood = half_open(&sources, 500, portal.addr).await;
    assert_eq!(flood.len(), 2000);
    wait_metric(
        &portal,
        "dbportal_rejections_total{reason=\"negotiating_per_client_limit\"}",
        |v| v == 1744.0,
    )
    .await;
    for i in 0..5 {
        let from = format!("127.0.1.{}", 10 + i);
        let echoed = pki.connect(&from, portal.addr).await.unwrap();
        assert_eq!(echoed, b"hello");
    }
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_connections_negotiating"), Some(256.0));
    assert_eq!(
        metric(
            &m,
            "dbportal_rejections_total{reason=\"negotiating_per_client_limit\"}"
        ),
        Some(1744.0)
    );
    assert_eq!(closed_count(&mut flood).await, 1744);
    let st = portal.status().await;
    assert_eq!(st["connections"]["negotiating"], 256);
    drop(flood);
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_portal_wide_negotiating_limit_new_connections_wait_their_turn() {
    let echo = TestServer::echo().await;
    let pki = Arc::new(Pki::new());
    let portal = Portal::start(&pki.yaml(
        "redis",
        echo.addr,
        "limits: {maxNegotiating: 3}\ntimeouts: {handshake: 1m}",
    ))
    .await;
    let mut silent = half_open(&["127.0.0.2", "127.0.0.3"], 4, portal.addr).await;
    assert_eq!(silent.len(), 8);
    wait_metric(&portal, "dbportal_connections_negotiating", |v| v == 3.0).await;
    // The other five wait in the listen backlog: accepted by the kernel, not by the portal,
    // and not closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(closed_count(&mut silent).await, 0);
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_connections_negotiating"), Some(3.0));
    assert_eq!(
        metric(
            &m,
            "dbportal_rejections_total{reason=\"negotiating_limit\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    assert_eq!(metric(&m, "dbportal_connections_accepted_total"), Some(3.0));
    // A legitimate client waits behind them, and is served once they go.
    let waiting = {
        let pki = pki.clone();
        let addr = portal.addr;
        tokio::spawn(async move { pki.connect("127.0.0.9", addr).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served past maxNegotiating");
    silent.clear();
    let echoed = within("the waiting client", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, b"hello");
    wait_metric(&portal, "dbportal_connections_negotiating", |v| v == 0.0).await;
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiations_end_at_the_handshake_deadline() {
    let echo = TestServer::echo().await;
    let pki = Pki::new();
    for engine in ["redis", "postgres", "mysql"] {
        let portal =
            Portal::start(&pki.yaml(engine, echo.addr, "timeouts: {handshake: 300ms}")).await;
        let mut silent = TcpStream::connect(portal.addr).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 256];
        // MySQL's server speaks first: the portal relays the backend's greeting (here the echo
        // server says nothing), so the deadline covers the whole handshake.
        let closed = loop {
            match tokio::time::timeout(STEP, silent.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) => break false,
            }
        };
        assert!(closed, "{engine}: not closed");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "{engine}: closed before the deadline ({took:?})"
        );
        wait_metric(
            &portal,
            "dbportal_rejections_total{reason=\"handshake\"}",
            |v| v == 1.0,
        )
        .await;
        eprintln!("{engine}: a silent client closed after {took:?} (timeouts.handshake 300ms)");
        portal.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_rate_limited_per_client_address() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("e", echo.addr)],
        "limits: {connectionRatePerClient: 5}",
    ))
    .await;
    // 20 connections at once (the portal decides at accept), then see which got through.
    let started = Instant::now();
    let mut all = Vec::new();
    for _ in 0..20 {
        all.push(connect_from("127.0.0.7", portal.addr).await.unwrap());
    }
    let took = started.elapsed();
    let mut open = Vec::new();
    let mut refused_count = 0;
    for mut c in all {
        match echo_roundtrip(&mut c, b"x").await {
            Ok(b) if b == b"x" => open.push(c),
            _ => refused_count += 1,
        }
    }
    // Within a second at most 5 get through (each further second, 5 more at the most).
    let allowed = 5 * (1 + took.as_secs() as usize);
    assert!(
        open.len() <= allowed && !open.is_empty(),
        "{} admitted in {took:?}",
        open.len()
    );
    assert_eq!(refused_count, 20 - open.len());
    // Another address is not affected.
    let mut other = connect_from("127.0.0.8", portal.addr).await.unwrap();
    assert_eq!(echo_roundtrip(&mut other, b"y").await.unwrap(), b"y");
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"rate_limit\"}"),
        Some(refused_count as f64)
    );
    drop(open);
    portal.stop().await;
}
