//! The admin endpoint's state-changing verbs and its bearer token:
//!
//! | verb | body |
//! |---|---|
//! | `POST /backends/<name>/state` | `{"state": "ready"\|"drain"\|"maint", "cutSessions": false}` |
//! | `DELETE /backends/<name>/state` | none: the configuration's state applies again |
//! | `POST /backends/<name>/weight` | `{"weight": 1..256}` |
//! | `DELETE /backends/<name>/weight` | none: the configuration's weight applies again |
//! | `POST /sessions/close` | `{"backend": "<name>"}` or `{"client": "<ip>"}` |
//!
//! Every verb needs `Authorization: Bearer <token>`, the token being the content of
//! `adminTokenFile` (read at each request, so a rotated file applies at once). Without a
//! valid token: 401, nothing changes; without `adminTokenFile`: 403. Overrides are kept by
//! [`crate::control::Control`] and survive reloads; each change is logged.
//!
//! May import: `allow`, `config`, `metrics`, `session` (its `Shared`, through which it
//! reaches the overrides).

use std::net::IpAddr;

use hyper::{header, HeaderMap, Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use crate::{allow, config::BackendState, metrics::CloseReason, session::Shared};

/// Longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;

/// What a verb answers: a status and a JSON body.
pub type Answer = (StatusCode, serde_json::Value);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, json!({ "error": message.into() }))
}

/// Whether `headers` carry the token of `adminTokenFile`. `Err` when no token is configured
/// or the file cannot be read (then nothing may change).
pub fn authorized(shared: &Shared, headers: &HeaderMap) -> Result<bool, String> {
    let Some(path) = shared.config.borrow().admin_token_file.clone() else {
        return Err("state-changing requests are disabled: no adminTokenFile is configured".into());
    };
    let token = crate::config::read_limited(&path, MAX_TOKEN_BYTES).map_err(|e| {
        format!(
            "the admin token file {} cannot be read: {e}",
            path.display()
        )
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the admin token file {} is empty", path.display()));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    Ok(same(given.as_bytes(), token.as_bytes()))
}

/// Compares in time that depends on the lengths only, not on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `method path` is one of the verbs (so it needs the token).
pub fn is_verb(method: &Method, path: &str) -> bool {
    (method == Method::POST || method == Method::DELETE)
        && (path.starts_with("/backends/") || path == "/sessions/close")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StateBody {
    state: BackendState,
    #[serde(default)]
    cut_sessions: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    client: Option<String>,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Answer> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

/// Closes the sessions `decide` picks on both listeners, the main one and the read-only one.
fn close_where(
    shared: &Shared,
    decide: impl Fn(crate::session::Seen<'_>) -> Option<CloseReason>,
) -> usize {
    let reads = shared
        .reads
        .as_ref()
        .map_or(0, |r| r.sessions.close_where(&decide));
    shared.sessions.close_where(&decide) + reads
}

/// Runs one verb (the token already checked).
pub fn run(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Answer {
    match run_inner(shared, method, path, body) {
        Ok(a) | Err(a) => a,
    }
}

fn run_inner(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Result<Answer, Answer> {
    let control = &shared.state.control;
    if path == "/sessions/close" && method == Method::POST {
        let b: CloseBody = parse(body)?;
        let closed = match (b.backend, b.client) {
            (Some(backend), None) => {
                known(shared, &backend)?;
                let n = close_where(shared, |seen| {
                    (seen.backend == Some(backend.as_str())).then_some(CloseReason::Admin)
                });
                info!(backend = %backend, closed = n, "admin: sessions of the backend closed");
                n
            }
            (None, Some(client)) => {
                let ip: IpAddr = client.trim().parse().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("client: {client:?} is not an IP address"),
                    )
                })?;
                let ip = allow::canonical(ip);
                let n = close_where(shared, |seen| {
                    (allow::canonical(seen.client) == ip).then_some(CloseReason::Admin)
                });
                info!(client = %ip, closed = n, "admin: sessions of the client closed");
                n
            }
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of backend or client",
                ))
            }
        };
        return Ok((StatusCode::OK, json!({ "closed": closed })));
    }
    let rest = path.strip_prefix("/backends/").unwrap_or("");
    let Some((name, what)) = rest.split_once('/') else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no such verb: {path}"),
        ));
    };
    known(shared, name)?;
    match (method, what) {
        (&Method::POST, "state") => {
            let b: StateBody = parse(body)?;
            if b.cut_sessions && b.state != BackendState::Maint {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "cutSessions: only with state maint (drain keeps open sessions)",
                ));
            }
            control.set_state(name, Some(b.state));
            let cut = if b.cut_sessions {
                close_where(shared, |seen| {
                    (seen.backend == Some(name)).then_some(CloseReason::Admin)
                })
            } else {
                0
            };
            warn!(backend = %name, state = b.state.as_str(), cut, "admin: backend state set at runtime (kept over reloads until cleared)");
            Ok((
                StatusCode::OK,
                json!({ "backend": name, "state": b.state.as_str(), "cut": cut }),
            ))
        }
        (&Method::DELETE, "state") => {
            control.set_state(name, None);
            info!(backend = %name, "admin: runtime state cleared; the configuration's applies");
            Ok((StatusCode::OK, json!({ "backend": name, "state": null })))
        }
        (&Method::POST, "weight") => {
            let b: WeightBody = parse(body)?;
            if !(1..=256).contains(&b.weight) {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("weight: {} is out of range; a weight is 1 to 256", b.weight),
                ));
            }
            control.set_weight(name, Some(b.weight));
            info!(backend = %name, weight = b.weight, "admin: backend weight set at runtime (kept over reloads until cleared)");
            Ok((
                StatusCode::OK,
                json!({ "backend": name, "weight": b.weight }),
            ))
        }
        (&Method::DELETE, "weight") => {
            control.set_weight(name, None);
            info!(backend = %name, "admin: runtime weight cleared; the configuration's applies");
            Ok((StatusCode::OK, json!({ "backend": name, "weight": null })))
        }
        _ => Err(error(
            StatusCode::NOT_FOUND,
            format!("no such verb: {method} {path}"),
        )),
    }
}

/// 404 unless the configuration in force has backend `name`.
fn known(shared: &Shared, name: &str) -> Result<(), Answer> {
    let config = shared.config.borrow();
    if config.backends.iter().any(|b| b.name == name) {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("no backend named {name:?} in the configuration in force"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn verbs_are_recognised() {
        assert!(is_verb(&Method::POST, "/backends/b0/state"));
        assert!(is_verb(&Method::DELETE, "/backends/b0/weight"));
        assert!(is_verb(&Method::POST, "/sessions/close"));
        assert!(!is_verb(&Method::GET, "/backends/b0/state"));
        assert!(!is_verb(&Method::POST, "/status"));
    }
}
