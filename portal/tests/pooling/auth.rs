//! TLS to clients and to the backend, authentication without stored passwords (SCRAM
//! passthrough, auth_query, verifiers, md5 users), a failing auth_query, and cancels between
//! peer portals.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_clients_and_to_the_backend() {
    if !have_postgres() {
        return;
    }
    let dir = TempDir::new("pool-tls");
    let ca = tlsca::TestCa::new("pool test CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    let (db_cert, db_key) = ca
        .server("db", &["localhost", "127.0.0.1"])
        .write(dir.path(), "db");
    let (portal_cert, portal_key) = ca
        .server("portal", &["localhost", "127.0.0.1"])
        .write(dir.path(), "portal");
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    pg.enable_tls(&db_cert, &db_key, true);
    let tls = format!(
        "tls: {{mode: terminate, certFile: \"{}\", keyFile: \"{}\", backend: {{enabled: true, caFile: \"{}\"}}}}\n",
        portal_cert.display(),
        portal_key.display(),
        ca_path.display()
    );
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", &tls).await;
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
        ca_path.display()
    );
    let port = portal.addr.port();
    // The client's TLS is verified against the portal's certificate; the server connection
    // is TLS too (the server refuses anything else).
    let (ok, out, err) = psql(port, "app", "apppw")
        .conninfo(&conninfo)
        .run(&[
            "-XAtq",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "-c",
            "SELECT current_user",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "t\napp");
    // After the handshake the portal keeps the client's TLS records itself: TLS 1.3 and 1.2,
    // queries and results of many records each way.
    let big = "x".repeat(100_000);
    for (version, want) in [
        ("TLSv1.3", "protocol: TLSv1.3"),
        ("TLSv1.2", "protocol: TLSv1.2"),
    ] {
        let (ok, out, err) = psql(port, "app", "apppw")
            .conninfo(&format!("{conninfo} ssl_max_protocol_version={version}"))
            .run(&[
                "-XAtq",
                "-c",
                "\\conninfo",
                "-c",
                &format!("SELECT length('{big}')"),
                "-c",
                &format!("SELECT '{big}'"),
                "-c",
                "SELECT repeat('z', 200000)",
            ])
            .await;
        assert!(ok, "{version}: {err}");
        // \\conninfo's second line names the client's TLS; then one line per query.
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{version}");
        assert!(lines[1].contains(want), "{version}: {}", lines[1]);
        assert_eq!(lines[2], "100000", "{version}");
        assert!(
            lines[3] == big,
            "{version}: the 100,000 bytes came back changed"
        );
        assert!(lines[4] == "z".repeat(200_000), "{version}: 200,000 bytes");
    }
    // A plaintext client is refused: the portal requires TLS.
    let (ok, _, err) = psql(port, "app", "apppw")
        .conninfo("sslmode=disable")
        .run(&["-XAtqc", "SELECT 1"])
        .await;
    assert!(!ok && err.contains("requires TLS"), "{err}");

    // The portal ends a client's TLS with close_notify: after Terminate, and in answer to the
    // client's own (a client that sees none reads an unexpected end of file).
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        for terminate in [true, false] {
            let mut tls = login_tls(portal.addr, &ca.cert_pem, version).await;
            if terminate {
                tls.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
                tls.flush().await.unwrap();
            } else {
                tls.shutdown().await.unwrap();
            }
            let mut rest = Vec::new();
            let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
                .await
                .expect("the portal closes");
            assert!(end.is_ok(), "{version:?} terminate={terminate}: {end:?}");
        }
    }
    // A record that fails its check: the client gets bad_record_mac, the portal counts it
    // apart from ordinary disconnects.
    let mut tls = login_tls(portal.addr, &ca.cert_pem, &rustls::version::TLS13).await;
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend_from_slice(&[0x5a; 40]);
    tls.get_mut().0.write_all(&forged).await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .expect("the portal closes");
    let e = end.expect_err("an alert");
    assert!(e.to_string().contains("BadRecordMac"), "{e}");
    let refused = r#"dbportal_sessions_closed_total{reason="tls_record"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&portal.metrics().await, refused) < 1.0 {
        assert!(Instant::now() < deadline, "{}", portal.metrics().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_is_stored_scram_passthrough_by_auth_query_or_verifier_and_md5_users() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    with_md5_user(&pg);
    assert!(stored_secret(&pg, "app").starts_with("SCRAM-SHA-256$"));
    assert!(stored_secret(&pg, "legacy").starts_with("md5"));
    // Two ways to hold no password: the portal fetches the stored secrets with
    // pooling.auth.query, or the users file holds the stored secrets themselves.
    let dir = TempDir::new("pool-secrets");
    let file = dir.path().join("users.yaml");
    std::fs::write(
        &file,
        format!(
            "app: \"{}\"\nlegacy: \"{}\"\n",
            stored_secret(&pg, "app"),
            stored_secret(&pg, "legacy")
        ),
    )
    .unwrap();
    for auth in [
        "auth: {query: \"\"}".to_string(),
        format!("auth: {{usersFile: {}}}", file.display()),
    ] {
        let portal = Portal::start(
            &[&pg],
            &format!("mode: transaction, poolSize: 2, {auth}"),
            "",
        )
        .await;
        // SCRAM to the client, and to the server with the key the client's proof revealed.
        let (ok, out, err) = portal.psql("app", "apppw", "SELECT current_user").await;
        assert!(ok, "{auth}: {err}");
        assert_eq!(out, "app");
        assert!(backends_of(&pg, "app") >= 1);
        // md5 to the client (its secret is an md5 hash), and md5 to the server.
        let (ok, out, err) = portal.psql("legacy", "oldpw", "SELECT current_user").await;
        assert!(ok, "{auth}: {err}");
        assert_eq!(out, "legacy");
        // Wrong passwords and unknown users: 28P01, nothing opened for them.
        for (user, password) in [("app", "wrong"), ("legacy", "wrong"), ("nobody", "x")] {
            let (ok, _, err) = portal.psql(user, password, "SELECT 1").await;
            assert!(
                !ok && err.contains(&format!(
                    "password authentication failed for user \"{user}\""
                )),
                "{auth}: {user}: {err}"
            );
        }
        let m = portal.metrics().await;
        assert_eq!(
            sample(&m, "dbportal_pool_auth_failures_total"),
            3.0,
            "{auth}"
        );
        assert_eq!(
            sample(
                &m,
                "dbportal_pool_server_connection_events_total{event=\"opened\"}"
            ),
            2.0,
            "{auth}: one server connection for app, one for legacy"
        );
        let _ = portal.dir();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_that_fails_refuses_the_client_and_names_no_secret() {
    let Some((pg, portal)) = app_portal(
        "mode: transaction, auth: {query: \"SELECT passwd FROM no_such_table WHERE usename = $1\"}",
        "",
    )
    .await
    else {
        return;
    };
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(
        !ok && err.contains("the portal cannot check passwords now"),
        "{err}"
    );
    assert_eq!(backends_of(&pg, "app"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_other_portal_is_forwarded_to_the_one_that_gave_the_key() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let (pa, pb) = (free_port(), free_port());
    let peers = format!(
        "peers: [{{name: portal-b, address: \"127.0.0.1:{pb}\"}}, {{name: portal-a, address: \"127.0.0.1:{pa}\"}}]\n"
    );
    let a = Portal::start_at(
        pa,
        &[&pg],
        "mode: transaction, poolSize: 2",
        &format!("{peers}name: portal-a\n"),
    )
    .await;
    let b = Portal::start_at(
        pb,
        &[&pg],
        "mode: transaction, poolSize: 2",
        &format!("{peers}name: portal-b\n"),
    )
    .await;
    let client = std::sync::Arc::new(a.client("app", "apppw").await.unwrap());
    let token = client.cancel_token();
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(20)").await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'") != "1" {
        assert!(Instant::now() < deadline, "the query did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cancel reaches the other portal, as a load balancer may send it.
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let e = running.await.unwrap().unwrap_err();
    assert!(db_text(&e).starts_with("57014"), "{e:?}");
    assert_eq!(
        query_one(&client, "SELECT 'still here'").await,
        "still here"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        let sent = sample(&mb, "dbportal_pool_cancels_total{result=\"peer\"}");
        let served = sample(&ma, "dbportal_pool_cancels_total{result=\"forwarded\"}");
        if (sent, served) == (1.0, 1.0) {
            assert_eq!(
                sample(&ma, "dbportal_pool_cancels_total{result=\"peer\"}"),
                0.0
            );
            assert_eq!(
                sample(&mb, "dbportal_pool_cancels_total{result=\"forwarded\"}"),
                0.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "peer {sent}, forwarded {served}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A key of a portal that is not among the peers is dropped, not bounced around.
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let mut raw = tcp;
    let mut request = vec![0, 0, 0, 16];
    request.extend_from_slice(&80_877_102u32.to_be_bytes());
    request.extend_from_slice(&((9u32 << 23) | 1).to_be_bytes());
    request.extend_from_slice(&7u32.to_be_bytes());
    raw.write_all(&request).await.unwrap();
    let _ = raw.read(&mut [0u8; 1]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &b.metrics().await,
        "dbportal_pool_cancels_total{result=\"dropped\"}",
    ) != 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stray cancel was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
