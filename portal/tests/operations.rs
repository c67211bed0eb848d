//! Operating a portal the way HAProxy users do: per-backend weights, backups, connection caps
//! with a queue, runtime drain/maint/weight through the admin endpoint (behind its token), the
//! stats page in a real browser, and the access log. Real redis-server backends on loopback.

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const TOKEN: &str = "s3cret-token-0123456789";

/// Opens a session and checks that a real Redis answers through it.
async fn session(portal: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(portal).await.unwrap();
    assert_eq!(redis_cmd(&mut s, &["PING"]).await.unwrap(), "+PONG");
    s
}

/// Sessions each backend has taken so far (from `/status`).
async fn totals(portal: &Portal) -> HashMap<String, u64> {
    let status = portal.status().await;
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["sessionsTotal"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn backend<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()
}

/// Each backend `b<i>` took its weight's share of `total` sessions, within `tolerance`.
fn assert_shares(got: &HashMap<String, u64>, weights: &[u64], total: u64, tolerance: u64) {
    let sum: u64 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let expect = total * w / sum;
        let n = got[&format!("b{i}")];
        assert!(
            n.abs_diff(expect) <= tolerance,
            "b{i}: {n} sessions, expected {expect} ± {tolerance}"
        );
    }
}

async fn redis_backends(n: usize) -> Vec<RedisServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(RedisServer::start().await);
    }
    v
}

/// `backends:` lines for `servers` named b0, b1, ... with `extra[i]` appended to each.
fn backends_yaml(mode: &str, servers: &[RedisServer], extra: &[&str], more: &str) -> String {
    let mut y = format!("engine: redis\nport: 7000\ntls: {{mode: disabled}}\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\ndrainTimeout: 1s\nrouting: {{mode: {mode}}}\nbackends:\n");
    for (i, s) in servers.iter().enumerate() {
        y.push_str(&format!(
            "  - {{name: b{i}, address: \"{}\"{}}}\n",
            s.addr,
            extra.get(i).copied().unwrap_or("")
        ));
    }
    y.push_str(more);
    y.push('\n');
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured_by_roundrobin_source_and_leastconn() {
    let servers = redis_backends(3).await;
    let weights = [1u64, 2, 5];
    let extra = [", weight: 1", ", weight: 2", ", weight: 5"];

    // Round robin: 1,000 sessions, one after the other.
    let portal = Portal::start(&backends_yaml("roundrobin", &servers, &extra, "")).await;
    for _ in 0..1000 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    println!("roundrobin 1:2:5 over 1000 sessions: {got:?}");
    assert_shares(&got, &weights, 1000, 25);
    portal.stop().await;

    // Source: 1,000 client addresses (127.0.x.y), each sticking to its backend.
    let portal = Portal::start(&backends_yaml("source", &servers, &extra, "")).await;
    for k in 0..1000u32 {
        let from = format!("127.0.{}.{}", 1 + k / 250, 1 + k % 250);
        let mut s = connect_from(&from, portal.addr).await.unwrap();
        assert_eq!(redis_cmd(&mut s, &["PING"]).await.unwrap(), "+PONG");
    }
    let got = totals(&portal).await;
    println!("source 1:2:5 over 1000 clients: {got:?}");
    assert_shares(&got, &weights, 1000, 60);
    portal.stop().await;

    // Leastconn: 80 sessions held open spread as sessions per unit of weight.
    let portal = Portal::start(&backends_yaml("leastconn", &servers, &extra, "")).await;
    let mut open = Vec::new();
    for _ in 0..80 {
        open.push(session(portal.addr).await);
    }
    let status = portal.status().await;
    for (i, w) in weights.iter().enumerate() {
        let n = backend(&status, &format!("b{i}"))["activeSessions"]
            .as_u64()
            .unwrap();
        assert!(n.abs_diff(80 * w / 8) <= 1, "b{i}: {n} open");
    }

    // A runtime weight replaces the configured one for the next sessions.
    let dir = TempDir::new("weights-token");
    let token = dir.write("token", TOKEN);
    drop(open);
    portal.stop().await;
    let yaml = backends_yaml(
        "roundrobin",
        &servers,
        &extra,
        &format!("adminTokenFile: {}", token.display()),
    );
    let portal = Portal::start(&yaml).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/weight",
        Some(TOKEN),
        r#"{"weight": 5}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..600 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    println!("roundrobin 5:2:5 over 600 sessions: {got:?}");
    assert!(got["b0"].abs_diff(250) <= 20, "{got:?}");
    assert!(got["b1"].abs_diff(100) <= 20, "{got:?}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_sessions_only_when_no_other_backend_is_up() {
    let servers = redis_backends(3).await;
    let yaml = backends_yaml("roundrobin", &servers, &["", "", ", backup: true"], "");
    let portal = Portal::start(&yaml).await;
    let names = |p: &Portal| {
        let p = p.health.borrow().clone();
        p
    };
    for _ in 0..20 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 0, "the backup took sessions");
    // b0 down: b1 alone, still not the backup.
    let mut view = names(&portal);
    view.backends[0].up = false;
    portal.health.send_replace(view.clone());
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 0);
    // Both down: the backup serves.
    view.backends[1].up = false;
    portal.health.send_replace(view.clone());
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 10);
    // One back: the backup takes no new sessions.
    view.backends[1].up = true;
    portal.health.send_replace(view);
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    assert_eq!(got["b2"], 10, "{got:?}");
    assert_eq!(got["b1"], 30, "{got:?}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_spills_to_the_next_backend_then_queues_then_times_out() {
    let servers = redis_backends(2).await;
    let yaml = backends_yaml(
        "first",
        &servers,
        &[", maxConnections: 2", ", maxConnections: 1"],
        "timeouts: {connect: 1500ms}",
    );
    let portal = Portal::start(&yaml).await;
    let a = session(portal.addr).await;
    let b = session(portal.addr).await;
    // b0 is full: the next session goes to b1.
    let c = session(portal.addr).await;
    let status = portal.status().await;
    assert_eq!(backend(&status, "b0")["activeSessions"], 2);
    assert_eq!(backend(&status, "b1")["activeSessions"], 1);
    assert_eq!(backend(&status, "b0")["sessionsMax"], 2);

    // Both full: the next one waits in the queue, and gets through when a place frees.
    let admin = portal.admin;
    let waiting = tokio::spawn(async move {
        let mut s = TcpStream::connect(portal.addr).await.unwrap();
        let r = redis_cmd(&mut s, &["PING"]).await;
        (s, r)
    });
    let mut queued = 0;
    for _ in 0..100 {
        let st: serde_json::Value =
            serde_json::from_str(&http_get(admin, "/status").await.1).unwrap();
        queued = st["queue"]["waiting"].as_u64().unwrap();
        if queued == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(queued, 1, "the fourth session waits");
    assert_eq!(
        metric(&portal.metrics().await, "dbportal_queue_length"),
        Some(1.0)
    );
    drop(a);
    let (d, reply) = within("the queued session", waiting).await.unwrap();
    assert_eq!(reply.unwrap(), "+PONG");

    // Full again: a queued session gives up after timeouts.connect.
    let mut late = TcpStream::connect(portal.addr).await.unwrap();
    let _ = late.write_all(b"*1\r\n$4\r\nPING\r\n").await;
    let mut buf = [0u8; 16];
    let n = within("queue timeout", late.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_queue_timeouts_total"), Some(1.0));
    assert_eq!(
        metric(&m, "dbportal_backend_sessions_limit{backend=\"b0\"}"),
        Some(2.0)
    );
    drop((b, c, d));
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_sessions_maint_cuts_them_and_both_survive_reloads() {
    let servers = redis_backends(2).await;
    let dir = TempDir::new("drain");
    let token = dir.write("token", TOKEN);
    let more = format!("adminTokenFile: {}", token.display());
    let yaml = backends_yaml("roundrobin", &servers, &[], &more);
    let portal = Portal::start(&yaml).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(session(portal.addr).await);
    }
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "drain"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Open sessions go on, on both backends; new ones go to b1 only.
    for s in &mut open {
        assert_eq!(redis_cmd(s, &["PING"]).await.unwrap(), "+PONG");
    }
    let before = totals(&portal).await;
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    let after = totals(&portal).await;
    assert_eq!(
        after["b0"], before["b0"],
        "a drained backend took a session"
    );
    let status = portal.status().await;
    assert_eq!(backend(&status, "b0")["adminState"], "drain");
    assert_eq!(backend(&status, "b0")["adminOverride"], true);
    assert_eq!(backend(&status, "b0")["activeSessions"], 2);

    // A reload (another timeout) keeps the runtime state.
    assert!(portal.reload(&yaml.replace("drainTimeout: 1s", "drainTimeout: 2s")));
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b0"], before["b0"]);
    assert_eq!(
        metric(
            &portal.metrics().await,
            "dbportal_backend_admin_state{backend=\"b0\",state=\"drain\"}"
        ),
        Some(1.0)
    );

    // maint with cutSessions closes b0's open sessions, not b1's.
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "maint", "cutSessions": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"cut\":2"), "{body}");
    let mut alive = 0;
    for s in &mut open {
        if redis_cmd(s, &["PING"]).await.is_ok_and(|r| r == "+PONG") {
            alive += 1;
        }
    }
    assert_eq!(alive, 2, "b1's two sessions go on");
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_sessions_closed_total{reason=\"admin\"}"),
        Some(2.0)
    );

    // Cleared: the configuration's state (ready) applies again.
    let (code, _) = http(
        portal.admin,
        "DELETE",
        "/backends/b0/state",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(code, 200);
    let before = totals(&portal).await["b0"];
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b0"], before + 2);

    // The configuration can drain too (the operator's spec.backends[].state).
    assert!(portal.reload(&yaml.replace(
        &format!("address: \"{}\"}}", servers[1].addr),
        &format!("address: \"{}\", state: drain}}", servers[1].addr)
    )));
    let before = totals(&portal).await["b1"];
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b1"], before);

    // Sessions of one client address, or of a backend, closed on request.
    let mut s = session(portal.addr).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/sessions/close",
        Some(TOKEN),
        r#"{"client": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(closed_within(&mut s, STEP).await);
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_requests_need_the_token_and_change_nothing_without_it() {
    let servers = redis_backends(1).await;
    let dir = TempDir::new("token");
    let token = dir.write("token", &format!("{TOKEN}\n"));
    let yaml = backends_yaml(
        "roundrobin",
        &servers,
        &[],
        &format!("adminTokenFile: {}", token.display()),
    );
    let portal = Portal::start(&yaml).await;
    let drain = r#"{"state": "drain"}"#;
    for token in [None, Some("wrong"), Some("s3cret-token-012345678")] {
        let (code, _) = http(portal.admin, "POST", "/backends/b0/state", token, drain).await;
        assert_eq!(code, 401, "{token:?}");
        let (code, _) = http(
            portal.admin,
            "POST",
            "/sessions/close",
            token,
            r#"{"backend": "b0"}"#,
        )
        .await;
        assert_eq!(code, 401);
    }
    assert_eq!(backend(&portal.status().await, "b0")["adminState"], "ready");
    // Errors name what is wrong.
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/nope/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/weight",
        Some(TOKEN),
        r#"{"weight": 300}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("weight"), "{body}");
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "paused"}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("paused"), "{body}");
    // Rotated: the new token works at once, the old one no longer.
    std::fs::write(&token, "rotated-token-abcdef").unwrap();
    let (code, _) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some("rotated-token-abcdef"),
        drain,
    )
    .await;
    assert_eq!(code, 200);
    // Reads are open unless adminTokenForReads; probes always are.
    assert_eq!(http_get(portal.admin, "/status").await.0, 200);
    assert!(portal.reload(&format!("{yaml}adminTokenForReads: true\n")));
    for path in ["/status", "/metrics", "/", "/;csv"] {
        assert_eq!(http_get(portal.admin, path).await.0, 401, "{path}");
        let (code, _) = http(portal.admin, "GET", path, Some("rotated-token-abcdef"), "").await;
        assert_eq!(code, 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let code = http_get(portal.admin, path).await.0;
        assert!(code == 200 || code == 503, "{path}: {code}");
        assert_ne!(code, 401);
    }
    portal.stop().await;

    // Without adminTokenFile nothing may change.
    let portal = Portal::start(&backends_yaml("roundrobin", &servers, &[], "")).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("adminTokenFile"), "{body}");
    portal.stop().await;
}

/// The `portal` binary with the real health checker, two real Redis servers, one stopped and
/// the other drained, as headless Chromium renders the stats page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_page_shows_a_backend_down_and_a_drain_in_a_real_browser() {
    if common::skip_without(&["chromium"]) {
        return;
    }
    let mut servers = redis_backends(2).await;
    let dir = TempDir::new("stats-page");
    let token = dir.write("token", TOKEN);
    let yaml = backends_yaml(
        "roundrobin",
        &servers,
        &[", weight: 3", ""],
        &format!(
            "adminTokenFile: {}\nhealthCheck: {{interval: 200ms, rise: 1, fall: 1}}",
            token.display()
        ),
    );
    let path = dir.write("portal.yaml", &yaml);
    let portal = PortalProcess::spawn(&path);
    let mut s = TcpStream::connect(portal.addr).await.unwrap();
    assert_eq!(redis_cmd(&mut s, &["PING"]).await.unwrap(), "+PONG");
    drop(s);

    // b1 stops; b0 is drained.
    drop(servers.pop());
    let status = |admin| async move {
        serde_json::from_str::<serde_json::Value>(&http_get(admin, "/status").await.1).unwrap()
    };
    let mut down = false;
    for _ in 0..100 {
        if backend(&status(portal.admin).await, "b1")["state"] == "down" {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "b1 not seen down");
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "drain"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");

    let url = format!("http://{}/", portal.admin);
    let shot = dir.path().join("stats.png");
    let profile = dir.path().join("chromium-profile");
    let browser = |extra: Vec<String>| {
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", profile.display()),
            "--window-size=1400,500".into(),
        ];
        args.extend(extra);
        args.push(url.clone());
        args
    };
    let (ok, dom, err) = common::run("chromium", &browser(vec!["--dump-dom".into()]), &[]).await;
    assert!(ok, "chromium --dump-dom failed: {err}");
    let (ok, _, err) = common::run(
        "chromium",
        &browser(vec![format!("--screenshot={}", shot.display())]),
        &[],
    )
    .await;
    assert!(ok, "chromium --screenshot failed: {err}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "screenshot of {} bytes",
        png.len()
    );
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());
    if let Ok(keep) = std::env::var("DBPORTAL_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }

    // The rendered table: b1 down, b0 up and drained (set at runtime), both with their weight.
    let row = |name: &str| -> String {
        let start = dom
            .find(&format!("data-backend=\"{name}\""))
            .unwrap_or_else(|| panic!("no row for {name} in the rendered page:\n{dom}"));
        let open = dom[..start].rfind("<tr").unwrap();
        let end = start + dom[start..].find("</tr>").unwrap();
        dom[open..end].to_string()
    };
    let b0 = row("b0");
    let b1 = row("b1");
    assert!(b1.contains("class=\"down\""), "{b1}");
    assert!(b1.contains("<td class=\"health\">down</td>"), "{b1}");
    assert!(b0.contains("<td class=\"health\">up</td>"), "{b0}");
    assert!(b0.contains("state-drain\">drain"), "{b0}");
    assert!(b0.contains("(runtime)"), "{b0}");
    assert!(b0.contains("<td class=\"num\">3</td>"), "weight 3: {b0}");

    // The CSV form says the same.
    let (code, csv) = http_get(portal.admin, "/;csv").await;
    assert_eq!(code, 200);
    assert!(
        csv.lines()
            .any(|l| l.starts_with("b1,") && l.contains(",down,")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("b0,") && l.contains(",drain,true,3,")),
        "{csv}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_session_is_logged_once_unless_the_access_log_is_off() {
    let servers = redis_backends(1).await;
    for (on, json) in [(true, false), (true, true), (false, false)] {
        let yaml = backends_yaml(
            "roundrobin",
            &servers,
            &[],
            if on { "" } else { "portal: {accessLog: false}" },
        );
        let args: &[&str] = if json { &["--log-format", "json"] } else { &[] };
        let portal = PortalBuilder::new(&yaml).args(args).spawn();
        let mut s = TcpStream::connect(portal.addr).await.unwrap();
        assert_eq!(redis_cmd(&mut s, &["SET", "k", "v"]).await.unwrap(), "+OK");
        let client = s.local_addr().unwrap().to_string();
        drop(s);
        let access = |p: &PortalProcess| -> Vec<String> {
            p.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("access") && l.contains(&client))
                .cloned()
                .collect()
        };
        let mut lines = Vec::new();
        for _ in 0..40 {
            lines = access(&portal);
            if !lines.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !on {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(access(&portal).is_empty(), "{:?}", access(&portal));
            continue;
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        println!("{line}");
        if json {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["target"], "access");
            assert_eq!(v["client"], client);
            assert_eq!(v["backend"], "b0");
            assert_eq!(v["reason"], "done");
            assert_eq!(v["bytes_to_backend"], 27);
            assert_eq!(v["bytes_to_client"], 5);
            assert!(v["duration_ms"].is_u64());
        } else {
            for part in [
                "backend=b0",
                "bytes_to_backend=27",
                "bytes_to_client=5",
                "reason=\"done\"",
            ] {
                assert!(line.contains(part), "{part} in {line}");
            }
        }
    }
}
