//! The portal binary's command line: `--check FILE` (validate and exit, like `haproxy -c`) and
//! the log options (`--log-format json`, no ANSI colours when stderr is not a terminal).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, TempDir};

fn portal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal"));
    cmd.env_remove("PORTAL_CONFIG")
        .env_remove("DBPORTAL_LOG_FORMAT")
        .env_remove("DBPORTAL_LOG_LEVEL")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    cmd
}

fn check(path: &Path) -> Output {
    portal().arg("--check").arg(path).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = r#"
engine: redis
backends:
  - {name: a, address: "127.0.0.1:6379"}
  - {name: b, address: "[::1]:6380"}
allowedCIDRs: ["10.0.0.0/8"]
tls: {mode: disabled}
listen: "127.0.0.1:0"
admin: "127.0.0.1:0"
"#;

#[test]
fn check_accepts_a_good_file_with_one_line() {
    let dir = TempDir::new("cli");
    let path = dir.write("good.yaml", GOOD);
    let out = check(&path);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&format!("{}: configuration OK", path.display())));
    assert!(stdout.contains("redis, 2 backends"), "{stdout}");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn check_refuses_a_bad_file_naming_the_field() {
    let dir = TempDir::new("cli");
    let bad = dir.write(
        "bad.yaml",
        &GOOD.replace(r#"["10.0.0.0/8"]"#, r#"["10.0.0.0/8", "10.0.0.0/33"]"#),
    );
    let out = check(&bad);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("allowedCIDRs[1]"), "{stderr}");

    // A typo is refused, not a default.
    let typo = dir.write("typo.yaml", &GOOD.replace("allowedCIDRs", "allowedCIDR"));
    let out = check(&typo);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("allowedCIDR"), "{out:?}");

    // TLS terminated from files that are not there: the certificate is loaded too.
    let tls = dir.write(
        "tls.yaml",
        &GOOD.replace(
            "tls: {mode: disabled}",
            "tls: {mode: terminate, certFile: /nonexistent/tls.crt, keyFile: /nonexistent/tls.key}",
        ),
    );
    let out = check(&tls);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/tls.crt"),
        "{out:?}"
    );
    let out = check(&dir.0.join("missing.yaml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.yaml"), "{out:?}");
}

/// Starts the portal on `config` with `args`, returns its stderr lines up to "portal
/// listening", and stops it by PID.
fn first_lines(config: &Path, args: &[&str]) -> Vec<String> {
    let child = portal()
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc::adopt(child, "KILL");
    let stderr = proc.child().stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains("portal listening");
            let _ = tx.send(line);
            if done {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = line.contains("portal listening");
        lines.push(line);
        if done {
            break;
        }
    }
    proc.kill();
    assert!(
        lines.iter().any(|l| l.contains("portal listening")),
        "{lines:?}"
    );
    lines
}

#[test]
fn logs_are_plain_text_on_a_pipe_or_json_when_asked() {
    let dir = TempDir::new("cli");
    let config = dir.write("portal.yaml", GOOD);
    for line in first_lines(&config, &[]) {
        assert!(!line.contains('\u{1b}'), "ANSI escape on a pipe: {line:?}");
    }
    let json = first_lines(&config, &["--log-format", "json"]);
    for line in &json {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let listening: serde_json::Value = serde_json::from_str(json.last().unwrap()).unwrap();
    assert_eq!(listening["message"], "portal listening");
    assert!(listening["listen"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    // A level that cannot be parsed stops the start, naming it.
    let out = portal()
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "portal=loud"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("portal=loud"), "{out:?}");
}
