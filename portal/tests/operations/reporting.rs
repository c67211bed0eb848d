//! The stats page in a real browser, and the access log.

use super::*;

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
