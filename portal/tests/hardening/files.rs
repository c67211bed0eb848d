//! Configuration and credential files: a file caught mid-write, a change only polling sees,
//! and secrets kept out of the admin endpoint and the log.

use super::*;

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
