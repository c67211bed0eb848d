//! The stats page (`GET /`) and its CSV form (`GET /;csv`), both written from the `/status`
//! document so that the three never disagree. One HTML page with its style inline, no
//! script and no external asset: it works offline and refreshes itself every few seconds.
//! Every value taken from the document is escaped.
//!
//! May import: nothing of the crate (it reads the `/status` JSON only).

use std::fmt::Write;

use serde_json::Value;

/// Seconds between the page's own refreshes.
pub const REFRESH_SECONDS: u32 = 2;

/// The columns of the CSV form, in order (the first line, after `# `).
pub const CSV_COLUMNS: [&str; 18] = [
    "backend",
    "address",
    "health",
    "role",
    "state",
    "runtime_override",
    "weight",
    "backup",
    "sessions_now",
    "sessions_max",
    "sessions_limit",
    "sessions_total",
    "bytes_in",
    "bytes_out",
    "check",
    "check_ms",
    "last_change",
    "replication",
];

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A value as text: strings bare, null empty.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One backend's row, column by column (as in [`CSV_COLUMNS`]).
fn row(b: &Value, now: f64) -> Vec<String> {
    let check = match b["lastError"].as_str() {
        Some(e) => format!("failed: {e}"),
        None if b["checks"].as_u64().unwrap_or(0) == 0 => "not yet".into(),
        None => "ok".into(),
    };
    let last_change = match b["lastChange"].as_f64() {
        Some(at) => format!("{}s ago", (now - at).max(0.0).round()),
        None => "never".into(),
    };
    let limit = match b["maxConnections"].as_u64() {
        Some(0) | None => "-".into(),
        Some(n) => n.to_string(),
    };
    vec![
        text(&b["name"]),
        text(&b["address"]),
        text(&b["state"]),
        text(&b["role"]),
        text(&b["adminState"]),
        text(&b["adminOverride"]),
        text(&b["weight"]),
        text(&b["backup"]),
        text(&b["activeSessions"]),
        text(&b["sessionsMax"]),
        limit,
        text(&b["sessionsTotal"]),
        text(&b["bytesIn"]),
        text(&b["bytesOut"]),
        check,
        b["checkLatencyMs"]
            .as_f64()
            .map(|ms| format!("{ms:.1}"))
            .unwrap_or_default(),
        last_change,
        replication(&b["replication"]),
    ]
}

/// A replica's standing and lag (`within 0.4s 1024B`, `broken: why`); empty for the others.
fn replication(r: &Value) -> String {
    if r.is_null() {
        return String::new();
    }
    if let Some(why) = r["broken"].as_str() {
        return format!("broken: {why}");
    }
    let mut out = text(&r["state"]);
    match r["lagSeconds"].as_f64() {
        Some(s) => out.push_str(&format!(" {s:.1}s")),
        None => out.push_str(" lag unknown"),
    }
    if let Some(b) = r["lagBytes"].as_u64() {
        out.push_str(&format!(" {b}B"));
    }
    if let Some(n) = r["lagEntries"].as_u64() {
        out.push_str(&format!(" {n} entries"));
    }
    out
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The CSV form: a `# `-prefixed header line, then a line per backend.
pub fn csv(status: &Value) -> String {
    let now = now_unix();
    let mut out = format!("# {}\n", CSV_COLUMNS.join(","));
    for b in status["backends"].as_array().into_iter().flatten() {
        let fields: Vec<String> = row(b, now)
            .into_iter()
            .map(|f| {
                if f.contains([',', '"', '\n']) {
                    format!("\"{}\"", f.replace('"', "\"\""))
                } else {
                    f
                }
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// The HTML page.
pub fn html(status: &Value) -> String {
    let now = now_unix();
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dbportal: {engine} portal</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .3em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; white-space: nowrap; }}
th {{ background: #eee; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.up td.health {{ background: #cfc; }}
tr.down td.health {{ background: #f99; }}
tr.busy td.health, tr.misconf td.health {{ background: #fd8; }}
td.state-drain {{ background: #9cf; }}
td.state-maint {{ background: #c9f; }}
tr.leader td.role {{ font-weight: bold; }}
.muted {{ color: #666; }}
</style></head>
<body>
<h1>dbportal — {engine} portal</h1>
<p id="summary">{ready} · routing <b>{routing}</b> · leader <b id="leader">{leader}</b> · configuration generation {generation} · certificate {cert}</p>
<table id="backends"><thead><tr>
<th>backend</th><th>address</th><th>health</th><th>role</th><th>state</th><th>weight</th>
<th>sessions now</th><th>max</th><th>limit</th><th>total</th><th>bytes in</th><th>bytes out</th>
<th>check</th><th>check ms</th><th>last change</th><th>replication</th></tr></thead>
<tbody>
"#,
        engine = escape(&text(&status["engine"])),
        ready = escape(&text(&status["readiness"])),
        routing = escape(&text(&status["routing"])),
        leader = escape(status["leader"].as_str().unwrap_or("none")),
        generation = escape(&text(&status["config"]["generation"])),
        cert = match status["tls"]["certificate"]["notAfter"].as_f64() {
            Some(at) => format!("expires in {:.1} days", (at - now) / 86_400.0),
            None => "none".into(),
        },
    );
    let leader = status["leader"].as_str();
    for b in status["backends"].as_array().into_iter().flatten() {
        let r = row(b, now);
        let health = escape(&r[2]);
        let state = escape(&r[4]);
        let is_leader = leader.is_some() && b["name"].as_str() == leader;
        let overridden = if b["adminOverride"].as_bool() == Some(true) {
            " <span class=\"muted\">(runtime)</span>"
        } else {
            ""
        };
        let backup = if b["backup"].as_bool() == Some(true) {
            " <span class=\"muted\">(backup)</span>"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<tr class=\"{health}{lead}\" data-backend=\"{name}\"><td>{name}{backup}</td><td>{addr}</td>\
<td class=\"health\">{health}</td><td class=\"role\">{role}</td><td class=\"state state-{state}\">{state}{overridden}</td>\
<td class=\"num\">{weight}</td><td class=\"num\">{now_}</td><td class=\"num\">{max}</td><td class=\"num\">{limit}</td>\
<td class=\"num\">{total}</td><td class=\"num\">{bin}</td><td class=\"num\">{bout}</td><td>{check}</td>\
<td class=\"num\">{ms}</td><td>{changed}</td><td class=\"replication\">{replication}</td></tr>",
            lead = if is_leader { " leader" } else { "" },
            name = escape(&r[0]),
            addr = escape(&r[1]),
            role = escape(&r[3]),
            weight = escape(&r[6]),
            now_ = escape(&r[8]),
            max = escape(&r[9]),
            limit = escape(&r[10]),
            total = escape(&r[11]),
            bin = escape(&r[12]),
            bout = escape(&r[13]),
            check = escape(&r[14]),
            ms = escape(&r[15]),
            changed = escape(&r[16]),
            replication = escape(&r[17]),
        );
    }
    let c = &status["connections"];
    let q = &status["queue"];
    let _ = write!(
        out,
        "</tbody></table>\n<table id=\"totals\"><tbody>\
<tr><th>sessions now</th><td class=\"num\">{}</td><th>sessions total</th><td class=\"num\">{}</td></tr>\
<tr><th>connections accepted</th><td class=\"num\">{}</td><th>limit</th><td class=\"num\">{}</td></tr>\
<tr><th>queued now</th><td class=\"num\">{}</td><th>queue timeouts</th><td class=\"num\">{}</td></tr>\
<tr><th>leader changes</th><td class=\"num\">{}</td><th>failovers</th><td class=\"num\">{}</td></tr>\
</tbody></table>\n<p class=\"muted\">dbportal {} · refreshes every {REFRESH_SECONDS} s · <a href=\"/;csv\">CSV</a> · <a href=\"/status\">JSON</a> · <a href=\"/metrics\">metrics</a></p>\n</body></html>\n",
        escape(&text(&c["sessions"])),
        escape(&text(&c["sessionsTotal"])),
        escape(&text(&c["accepted"])),
        escape(&text(&c["max"])),
        escape(&text(&q["waiting"])),
        escape(&text(&q["timeouts"])),
        escape(&text(&status["leaderChanges"])),
        escape(&text(&status["failovers"])),
        escape(&text(&status["version"])),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "engine": "redis", "routing": "leader", "leader": "b0", "readiness": "ready",
            "version": "1.2.3", "config": {"generation": 4},
            "backends": [
                {"name": "b0", "address": "127.0.0.1:1", "state": "up", "role": "leader",
                 "adminState": "ready", "adminOverride": false, "weight": 1, "backup": false,
                 "activeSessions": 2, "sessionsMax": 3, "maxConnections": 0, "sessionsTotal": 9,
                 "bytesIn": 10, "bytesOut": 20, "checks": 5, "checkLatencyMs": 0.4,
                 "lastChange": null, "lastError": null},
                {"name": "b1", "address": "127.0.0.1:2", "state": "down", "role": "unknown",
                 "adminState": "drain", "adminOverride": true, "weight": 3, "backup": true,
                 "activeSessions": 0, "sessionsMax": 0, "maxConnections": 5, "sessionsTotal": 0,
                 "bytesIn": 0, "bytesOut": 0, "checks": 5, "checkLatencyMs": 1.0,
                 "lastChange": 0.0, "lastError": "connection refused <&>",
                 "replication": {"state": "lagging", "lagSeconds": 12.25, "lagBytes": 4096,
                                 "broken": null}}
            ],
            "connections": {"sessions": 2, "sessionsTotal": 9, "accepted": 11, "max": 2000},
            "queue": {"waiting": 0, "timeouts": 0},
        })
    }

    #[test]
    fn the_page_shows_each_backend_and_escapes() {
        let page = html(&doc());
        assert!(
            page.contains("<tr class=\"up leader\" data-backend=\"b0\">"),
            "{page}"
        );
        assert!(
            page.contains("<tr class=\"down\" data-backend=\"b1\">"),
            "{page}"
        );
        assert!(page.contains("state-drain\">drain <span class=\"muted\">(runtime)"));
        assert!(page.contains("failed: connection refused &lt;&amp;&gt;"));
        assert!(!page.contains("<&>"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(
            page.contains("<td class=\"replication\">lagging 12.2s 4096B</td>"),
            "{page}"
        );
        assert!(!page.contains("<script"), "no script needed");
    }

    #[test]
    fn csv_has_a_header_and_a_line_per_backend() {
        let text = csv(&doc());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], format!("# {}", CSV_COLUMNS.join(",")));
        assert!(
            lines[1].starts_with(
                "b0,127.0.0.1:1,up,leader,ready,false,1,false,2,3,-,9,10,20,ok,0.4,never"
            ),
            "{}",
            lines[1]
        );
        assert!(lines[2].starts_with("b1,127.0.0.1:2,down,unknown,drain,true,3,true,0,0,5,0,0,0,failed: connection refused <&>,1.0,"), "{}", lines[2]);
        assert!(lines[2].ends_with(",lagging 12.2s 4096B"), "{}", lines[2]);
        assert!(
            lines[1].ends_with(",never,"),
            "a leader has no replication: {}",
            lines[1]
        );
    }
}
