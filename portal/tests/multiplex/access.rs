//! AUTH and HELLO answered by the portal for ACL users, and allow-list changes and admin
//! closes reaching multiplexed clients.

use super::*;

/// A redis-server with a password, and a portal multiplexing it whose
/// `pooling.auth.usersFile` holds `users` (returned: the file, to change, and its directory,
/// kept while the test runs).
async fn portal_with_users(users: &str) -> (Redis, TempDir, std::path::PathBuf, Standalone) {
    let redis = Redis::start_with(&["--requirepass", "server-secret"]);
    let dir = TempDir::new("mux-users");
    let file = dir.path().join("users.yaml");
    std::fs::write(&file, users).unwrap();
    let extra = format!(
        "healthCheck: {{interval: 200ms, rise: 1, fall: 1, credentials: {{password: server-secret}}}}\npooling: {{mode: multiplex, auth: {{usersFile: {}}}}}\n",
        file.display()
    );
    let p = start_portal(&[&redis], &extra).await;
    p.wait_leader("r0").await;
    (redis, dir, file, p)
}

/// A change to `pooling.auth.usersFile` applies to the next AUTH at once: an edit in place,
/// then a new file renamed over it (as a Secret volume is updated), each within the same
/// second as the AUTH before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_users_file_applies_to_the_next_auth() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let (_redis, users, file, p) = portal_with_users("alice: pw-one\n").await;
    let auth = |password: &'static str| {
        let addr = p.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            command(&mut s, &["AUTH", "alice", password]).await.unwrap()
        }
    };
    assert_eq!(auth("pw-one").await, "+OK");
    std::fs::write(&file, "alice: pw-two\n").unwrap();
    assert!(auth("pw-one").await.starts_with("-WRONGPASS"));
    assert_eq!(auth("pw-two").await, "+OK");
    let next = users.path().join("users.yaml.new");
    std::fs::write(&next, "alice: pw-333\n").unwrap();
    std::fs::rename(&next, &file).unwrap();
    assert!(auth("pw-two").await.starts_with("-WRONGPASS"));
    assert_eq!(auth("pw-333").await, "+OK");
}

/// AUTH and HELLO are answered by the portal against `pooling.auth.usersFile` (the default
/// user and ACL users); the server connections log in with the probe credentials, and no
/// client password ever reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_with_acl_users_is_answered_by_the_portal() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let (redis, _users, _file, p) =
        portal_with_users("default: pw-default\nalice: pw-alice\n").await;

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut s, &["GET", "a"]).await.unwrap(),
        "-NOAUTH Authentication required."
    );
    assert!(command(&mut s, &["AUTH", "server-secret"])
        .await
        .unwrap()
        .starts_with("-WRONGPASS"));
    assert!(command(&mut s, &["AUTH", "alice", "pw-default"])
        .await
        .unwrap()
        .starts_with("-WRONGPASS"));
    assert_eq!(
        command(&mut s, &["AUTH", "alice", "pw-alice"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(command(&mut s, &["SET", "a", "1"]).await.unwrap(), "+OK");

    let mut d = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut d, &["AUTH", "pw-default"]).await.unwrap(),
        "+OK"
    );
    assert_eq!(command(&mut d, &["GET", "a"]).await.unwrap(), "$1\r\n1");
    let mut h = TcpStream::connect(p.addr).await.unwrap();
    let hello = command(
        &mut h,
        &["HELLO", "2", "AUTH", "alice", "pw-alice", "SETNAME", "h"],
    )
    .await
    .unwrap();
    assert!(hello.contains("proto\r\n:2"), "{hello}");
    assert_eq!(
        command(&mut h, &["CLIENT", "GETNAME"]).await.unwrap(),
        "$1\r\nh"
    );
    assert_eq!(command(&mut h, &["PING"]).await.unwrap(), "+PONG");

    // redis-cli with a user and a password, and a pipeline through redis-py.
    let (_, out, _) = redis_cli(
        p.addr.port(),
        &[
            "--user",
            "alice",
            "--pass",
            "pw-alice",
            "--no-auth-warning",
            "GET",
            "a",
        ],
    )
    .await;
    assert_eq!(out, "1");
    if let Some(python) = python() {
        let (ok, out, err) = run(
            python.to_str().unwrap(),
            &[
                script(),
                p.addr.to_string(),
                "alice".into(),
                "pw-alice".into(),
            ],
            &[],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains("\"watch_conflict\": \"WatchError\""), "{out}");
    }

    // The server never saw a client's password: every connection it has is the portal's
    // (logged in with the probe's credentials, as user default).
    let (_, list, _) = redis_cli(
        redis.port,
        &["-a", "server-secret", "--no-auth-warning", "CLIENT", "LIST"],
    )
    .await;
    assert!(list.lines().all(|l| l.contains("user=default")), "{list}");
    assert!(!list.contains("alice"), "{list}");
}

/// Waits until the portal has closed `s` (EOF or reset, after any replies still on the way).
async fn closed_within(s: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await {
        Ok(_) => {}
        Err(_) => panic!("{what}: still open after 10 s"),
    }
}

/// Multiplexed clients are in the session registry: narrowing `allowedCIDRs` closes the
/// clients it excludes and keeps the others; `POST /sessions/close` by client closes that
/// address's clients and says how many; by backend, the clients pinned to one of its
/// connections (MULTI), not those on the shared connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_changes_and_admin_closes_reach_multiplexed_clients() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    const TOKEN: &str = "mux-admin-token-0123456789";
    let redis = Redis::start();
    let extra = format!("{MUX}adminTokenFile: $DIR/token\nallowedCIDRs: [\"127.0.0.0/8\"]\n");
    let p = start_portal(&[&redis], &extra).await;
    std::fs::write(p.dir().join("token"), TOKEN).unwrap();
    p.wait_leader("r0").await;
    let mut kept = Vec::new();
    let mut cut = Vec::new();
    for _ in 0..2 {
        kept.push(connect_from("127.0.0.2", p.addr).await.unwrap());
        cut.push(connect_from("127.0.0.3", p.addr).await.unwrap());
    }
    for s in kept.iter_mut().chain(cut.iter_mut()) {
        assert_eq!(command(s, &["PING"]).await.unwrap(), "+PONG");
    }
    rewrite_config(&p.dir().join("portal.yaml"), |yaml| {
        yaml.replace(
            "allowedCIDRs: [\"127.0.0.0/8\"]",
            "allowedCIDRs: [\"127.0.0.2/32\", \"127.0.0.4/32\"]",
        )
    });
    for s in &mut cut {
        closed_within(s, "a client of an excluded address").await;
    }
    for s in &mut kept {
        assert_eq!(command(s, &["PING"]).await.unwrap(), "+PONG");
    }
    let close = |body: &'static str| {
        let admin = p.admin;
        async move {
            let (code, body) = http(admin, "POST", "/sessions/close", Some(TOKEN), body).await;
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["closed"].as_u64().unwrap()
        }
    };
    assert_eq!(close(r#"{"client": "127.0.0.2"}"#).await, 2);
    for s in &mut kept {
        closed_within(s, "a client closed by address").await;
    }
    // By backend: only the client pinned to r0's dedicated connection (inside MULTI).
    let mut pinned = connect_from("127.0.0.4", p.addr).await.unwrap();
    let mut shared = connect_from("127.0.0.4", p.addr).await.unwrap();
    assert_eq!(command(&mut pinned, &["MULTI"]).await.unwrap(), "+OK");
    assert_eq!(command(&mut shared, &["PING"]).await.unwrap(), "+PONG");
    assert_eq!(close(r#"{"backend": "r0"}"#).await, 1);
    closed_within(&mut pinned, "a client pinned to the backend").await;
    assert_eq!(command(&mut shared, &["PING"]).await.unwrap(), "+PONG");
    // The queued transaction was not left on a connection another client gets.
    let mut next = connect_from("127.0.0.4", p.addr).await.unwrap();
    assert_eq!(command(&mut next, &["MULTI"]).await.unwrap(), "+OK");
    assert_eq!(command(&mut next, &["EXEC"]).await.unwrap(), "*0");
}
