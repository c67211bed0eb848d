//! Attacks on the portal and the limits that stop them: a configuration file caught mid-write,
//! secrets in credential files, half-open and flooding clients, negotiation deadlines, and the
//! admin endpoint's own limits. Real sockets on loopback; a real redis-server where a database
//! is needed.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_slowly_in_place_is_applied_only_once_complete() {
    let echo = TestServer::echo().await;
    let dir = TempDir::new("slow-writer");
    // allowedCIDRs last: the file without its last line admits everyone.
    let good = yaml(
        "tcp",
        &[("e", echo.addr)],
        "drainTimeout: 1s\nallowedCIDRs: [\"127.0.0.2/32\"]",
    );
    let path = dir.write("portal.yaml", &good);
    let portal = Portal::start(&good).await;
    let watcher = portal.watch_file(path.clone(), good.clone());
    assert!(refused("127.0.0.3", portal.addr).await);

    // Rewritten in place, slowly: everything but the allow-list, a pause, then the rest.
    let next = good.replace("port: 7000", "port: 7001");
    let cut = next.find("allowedCIDRs").unwrap();
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&next.as_bytes()[..cut]).unwrap();
    file.flush().unwrap();
    let accepted = echo.accepted();
    let started = Instant::now();
    let mut tries = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        assert!(
            refused("127.0.0.3", portal.addr).await,
            "a denied client got in {:?} after the cut",
            started.elapsed()
        );
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tries >= 5);
    assert_eq!(echo.accepted(), accepted);
    assert_eq!(
        portal.reload.snapshot().reloads_ok,
        0,
        "nothing applied mid-write"
    );
    file.write_all(&next.as_bytes()[cut..]).unwrap();
    drop(file);
    eventually("the complete file applied", STEP, || {
        portal.reload.snapshot().reloads_ok == 1
    })
    .await;
    assert_eq!(portal.config.borrow().port, 7001);
    assert!(refused("127.0.0.3", portal.addr).await);

    // The supported way: write aside, rename onto the file. Applied at once (no stability
    // wait), seen by inotify.
    let third = next.replace("port: 7001", "port: 7002");
    let aside = dir.write("portal.yaml.new", &third);
    let renamed = Instant::now();
    std::fs::rename(&aside, &path).unwrap();
    eventually("the renamed file applied", STEP, || {
        portal.reload.snapshot().reloads_ok == 2
    })
    .await;
    assert!(
        renamed.elapsed() < portal::reload::POLL_STABLE,
        "applied on the rename, not by polling: {:?}",
        renamed.elapsed()
    );
    assert_eq!(portal.config.borrow().port, 7002);

    // A file over the size cap is refused like an invalid one; the last good one serves.
    let mut big = third.clone();
    big.push_str(&format!("# {}\n", "x".repeat(1 << 20)));
    let aside = dir.write("portal.yaml.new", &big);
    std::fs::rename(&aside, &path).unwrap();
    eventually("the oversized file refused", STEP, || {
        portal.reload.snapshot().reloads_failed == 1
    })
    .await;
    let st = portal.status().await;
    assert!(
        st["config"]["reload"]["lastError"]
            .as_str()
            .unwrap()
            .contains("larger than 1048576 bytes"),
        "{st}"
    );
    assert_eq!(portal.config.borrow().port, 7002);
    watcher.abort();
    portal.stop().await;
}

/// A change no inotify event reports (here the file behind a symlink, in a directory that is
/// not watched; likewise a filesystem without inotify) is applied by polling, once the file
/// has kept its content for `POLL_STABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_only_polling_sees_is_applied_once_stable() {
    let echo = TestServer::echo().await;
    let watched = TempDir::new("poll-watched");
    let elsewhere = TempDir::new("poll-elsewhere");
    let good = yaml("tcp", &[("e", echo.addr)], "");
    let real = elsewhere.write("real.yaml", &good);
    let path = watched.path().join("portal.yaml");
    std::os::unix::fs::symlink(&real, &path).unwrap();
    let portal = Portal::start(&good).await;
    let watcher = portal.watch_file(path, good.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let aside = elsewhere.write("real.yaml.new", &good.replace("port: 7000", "port: 7003"));
    let changed = Instant::now();
    std::fs::rename(&aside, &real).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        portal.reload.snapshot().reloads_ok,
        0,
        "applied before it was stable"
    );
    eventually("the change applied by polling", STEP, || {
        portal.reload.snapshot().reloads_ok == 1
    })
    .await;
    let took = changed.elapsed();
    assert!(took >= portal::reload::POLL_STABLE, "{took:?}");
    assert_eq!(portal.config.borrow().port, 7003);
    eprintln!("a change seen only by polling applied after {took:?}");
    watcher.abort();
    portal.stop().await;
}

/// Each way of giving the probe its credentials, and two broken ones: the password never
/// appears in any admin response or log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_admin_endpoint_or_the_log() {
    if !common::installed("redis-server") {
        return;
    }
    let secret = format!("S3cret-{}-pw", std::process::id());
    let other = format!("0ther-{}-pw", std::process::id());
    let redis = common::Redis::start_with(&["--requirepass", &secret]);
    let dir = TempDir::new("secrets");
    let secret_dir = dir.path().join("mounted");
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("password"), &secret).unwrap();
    let forms: Vec<(&str, String, bool)> = vec![
        ("inline", format!("{{password: \"{secret}\"}}"), true),
        (
            "YAML file",
            format!(
                "\"{}\"",
                dir.write(
                    "creds.yaml",
                    &format!("username: default\npassword: {secret}\n")
                )
                .display()
            ),
            true,
        ),
        (
            "password-only file",
            format!(
                "\"{}\"",
                dir.write("password", &format!("{secret}\n")).display()
            ),
            true,
        ),
        (
            "mounted Secret directory",
            format!("\"{}\"", secret_dir.display()),
            true,
        ),
        (
            "malformed YAML file",
            format!(
                "\"{}\"",
                dir.write("bad.yaml", &format!("password: [{secret}]\n"))
                    .display()
            ),
            false,
        ),
        (
            "wrong password",
            format!("\"{}\"", dir.write("wrong", &other).display()),
            false,
        ),
    ];
    for (form, credentials, healthy) in forms {
        let config = format!(
            "engine: redis\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\ntls: {{mode: disabled}}\n\
             drainTimeout: 1s\nbackends:\n  - {{name: r0, address: \"{}\"}}\n\
             healthCheck: {{interval: 100ms, rise: 1, fall: 1, credentials: {credentials}}}\n",
            redis.address()
        );
        let mut p = PortalBuilder::new(&config)
            .file(&dir.path().join("portal.yaml"))
            .spawn();
        let deadline = Instant::now() + STEP;
        loop {
            let st: serde_json::Value =
                serde_json::from_str(&http_get(p.admin, "/status").await.1).unwrap();
            let b = &st["backends"][0];
            let settled = if healthy {
                b["role"] == "leader"
            } else {
                b["up"] == false && b["lastError"].is_string()
            };
            if settled {
                break;
            }
            assert!(Instant::now() < deadline, "{form}: not settled: {st:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut seen = String::new();
        // The stats page and its CSV form show each backend's last error too.
        for path in ["/status", "/readyz", "/metrics", "/healthz", "/", "/nope"] {
            seen.push_str(&http_get(p.admin, path).await.1);
        }
        let csv = http_get(p.admin, "/;csv").await.1;
        seen.push_str(&csv);
        if !healthy {
            assert!(
                seen.contains("credentials") || seen.contains("login refused"),
                "{form}: the error says what is wrong: {seen}"
            );
            assert!(
                csv.contains("failed: "),
                "{form}: the page shows the error: {csv}"
            );
        }
        p.proc.signal("TERM");
        p.proc.wait_exit(STEP);
        let log = p.log.lock().unwrap().join("\n");
        for s in [&secret, &other] {
            assert!(
                !seen.contains(s.as_str()),
                "{form}: an admin response holds the secret: {seen}"
            );
            assert!(
                !log.contains(s.as_str()),
                "{form}: the log holds the secret:\n{log}"
            );
        }
    }
}

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

/// Opens `n` admin connections and waits until the portal has closed those past its cap;
/// returns how many it closed, and the ones left open.
async fn flood_admin(admin: SocketAddr, n: usize, expect_closed: usize) -> (usize, Vec<TcpStream>) {
    let mut idle = Vec::new();
    for _ in 0..n {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The accept loop closes the ones past the cap as it reaches them.
    let deadline = Instant::now() + STEP;
    let closed = loop {
        let closed = closed_count(&mut idle).await;
        if closed >= expect_closed || Instant::now() > deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (closed, idle)
}

/// Sends `request` on a new admin connection and reads until the portal closes it.
async fn admin_raw(admin: SocketAddr, request: Vec<u8>) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    let _ = s.write_all(&request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn with_header(bytes: usize) -> Vec<u8> {
    format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(bytes)
    )
    .into_bytes()
}

fn with_body(bytes: usize) -> Vec<u8> {
    let mut r = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    r.resize(r.len() + bytes, b'b');
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_caps_connections_heads_and_bodies() {
    let echo = TestServer::echo().await;
    let base = yaml("tcp", &[("e", echo.addr)], "");
    let portal = Portal::start(&base).await;
    let refused = |m: &str, reason: &str| {
        metric(
            m,
            &format!("dbportal_admin_requests_refused_total{{reason=\"{reason}\"}}"),
        )
    };

    // The defaults: 64 connections, 16 KiB heads, 64 KiB bodies.
    let cap = portal.config.borrow().admin_limits.max_connections;
    assert_eq!(cap, 64);
    let (closed, idle) = flood_admin(portal.admin, cap + 36, 36).await;
    assert_eq!(closed, 36, "connections past the cap are closed at once");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_admin_connections_refused_total"),
        Some(36.0)
    );
    assert_eq!(refused(&m, "header_too_large"), Some(0.0));
    assert_eq!(refused(&m, "body_too_large"), Some(0.0));

    let r = admin_raw(portal.admin, with_header(64 << 10)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = admin_raw(
        portal.admin,
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    for request in [with_header(12 << 10), with_body(3000)] {
        let r = admin_raw(portal.admin, request).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let m = portal.metrics().await;
    assert_eq!(refused(&m, "header_too_large"), Some(1.0));
    assert_eq!(refused(&m, "body_too_large"), Some(1.0));

    // Configured smaller, applied by a reload to the next connections.
    let limits = "adminLimits: {maxConnections: 4, maxHeaderBytes: 8Ki, maxBodyBytes: 2Ki, \
                  connectionLifetime: 1s}";
    assert!(portal.reload(&yaml("tcp", &[("e", echo.addr)], limits)));
    let (closed, idle) = flood_admin(portal.admin, 4 + 3, 3).await;
    assert_eq!(
        closed, 3,
        "connections past the configured cap are closed at once"
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (request, status) in [
        (with_header(12 << 10), "431"),
        (with_header(6 << 10), "200"),
        (with_body(3000), "413"),
        (with_body(1000), "200"),
    ] {
        let r = admin_raw(portal.admin, request).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{r}");
    }
    // A kept-alive connection ends at connectionLifetime, well before the head deadline.
    let mut kept = TcpStream::connect(portal.admin).await.unwrap();
    let opened = Instant::now();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, kept.read_to_end(&mut out)).await;
    let lasted = opened.elapsed();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(3),
        "closed after {lasted:?}"
    );
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_admin_connections_refused_total"),
        Some(39.0)
    );
    assert_eq!(refused(&m, "header_too_large"), Some(2.0));
    assert_eq!(refused(&m, "body_too_large"), Some(2.0));

    // Back to the defaults: 12 KiB heads pass again.
    assert!(portal.reload(&base));
    let r = admin_raw(portal.admin, with_header(12 << 10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    portal.stop().await;
}
