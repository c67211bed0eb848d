//! The MySQL / MariaDB probe: a login and the `read_only` variables; a node with `read_only`
//! and `super_read_only` (MySQL only; MariaDB has no such variable) off is the leader. On a
//! read-only node, `SHOW REPLICA STATUS` (`SHOW SLAVE STATUS` where the server is older): both
//! threads running (`Replica_IO_Running`/`Slave_IO_Running`, `..._SQL_Running`) and
//! `Seconds_Behind_Source` (`Seconds_Behind_Master`) as the lag; threads stopped, no
//! replication configured, or a status the probe's user may not read, make it broken.
//!
//! May import: `config` and the rest of `health`.

use std::time::Duration;

use mysql_async::{prelude::Queryable, OptsBuilder, SslOpts};
use tokio::time::Instant;

use super::{tls::BackendTls, ProbeError, Probed};
use crate::{
    config::Address,
    health::{ProbeCredentials, Replication, Role},
};

/// Time kept back from the probe's deadline to close a connection whose server stopped
/// answering (see below).
const CLOSE_MARGIN: Duration = Duration::from_millis(50);

pub(crate) async fn probe(
    address: &Address,
    tls: Option<&BackendTls>,
    credentials: Option<&ProbeCredentials>,
    deadline: Instant,
) -> Result<Probed, ProbeError> {
    let mut opts = OptsBuilder::default()
        .ip_or_hostname(address.host.clone())
        .tcp_port(address.port)
        .prefer_socket(false)
        .stmt_cache_size(0)
        // Given, these are not read from the server after login: the probe's query is its
        // only one, so a server that hangs after login hangs the query below, which ends
        // cleanly at the deadline (a hang inside `Conn::new` would leave a query pending in
        // a dropped connection; see below).
        .max_allowed_packet(Some(16 << 20))
        .wait_timeout(Some(28_800))
        .user(Some(
            credentials
                .and_then(|c| c.username.clone())
                .unwrap_or_else(|| "root".into()),
        ))
        .pass(credentials.map(|c| c.password.clone()));
    if let Some(tls) = tls {
        let mut ssl = SslOpts::default()
            .with_danger_accept_invalid_certs(tls.spec.insecure_skip_verify)
            .with_danger_skip_domain_validation(tls.spec.insecure_skip_verify);
        if let Some(ca) = tls.spec.ca_file.as_deref().filter(|c| !c.is_empty()) {
            // The configured CA alone, as for the data plane.
            ssl = ssl
                .with_root_certs(vec![std::path::PathBuf::from(ca).into()])
                .with_disable_built_in_roots(true);
        }
        if let Some(name) = &tls.spec.server_name {
            ssl = ssl.with_danger_tls_hostname_override(Some(name.clone()));
        }
        opts = opts.ssl_opts(ssl);
    }
    let mut conn = mysql_async::Conn::new(opts).await.map_err(login_error)?;
    // A `Conn` dropped with a query in flight spawns a task that drains the result before
    // closing: against a server that logged the probe in and then hangs, that task (and its
    // socket) would live forever. So the query ends a little before the probe's deadline, and
    // the connection is always closed by `disconnect`, which marks it closed before it writes
    // anything; bounded, its future is dropped without spawning anything.
    let query_deadline = deadline
        .checked_sub(CLOSE_MARGIN)
        .unwrap_or(deadline)
        .max(Instant::now());
    let answers = tokio::time::timeout_at(query_deadline, queries(&mut conn)).await;
    let _ = tokio::time::timeout(CLOSE_MARGIN / 2, conn.disconnect()).await;
    match answers {
        Ok(answers) => answers,
        Err(_) => Err(ProbeError::Protocol(
            "logged in, but the probe's queries were not answered in time".into(),
        )),
    }
}

/// The role, and on a replica its replication status.
async fn queries(conn: &mut mysql_async::Conn) -> Result<Probed, ProbeError> {
    let rows = conn
        .query::<(String, String), _>(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'super_read_only')",
        )
        .await
        .map_err(|e| ProbeError::Protocol(format!("read_only: {e}")))?;
    let role = judge(&rows)?;
    if role != Role::Replica {
        return Ok(role.into());
    }
    let status = match conn
        .query::<mysql_async::Row, _>("SHOW REPLICA STATUS")
        .await
    {
        Ok(rows) => Ok(rows),
        // Servers before MySQL 8.0.22 / MariaDB 10.5.1.
        Err(mysql_async::Error::Server(_)) => conn.query("SHOW SLAVE STATUS").await,
        Err(e) => Err(e),
    };
    let replication = match status {
        Ok(rows) => replication(&rows.iter().map(columns).collect::<Vec<_>>()),
        Err(mysql_async::Error::Server(_)) => Replication {
            broken: Some(UNREADABLE),
            ..Replication::default()
        },
        Err(e) => return Err(ProbeError::Protocol(format!("SHOW REPLICA STATUS: {e}"))),
    };
    Ok(Probed {
        replication,
        ..role.into()
    })
}

/// Why a read-only node counts as not replicating.
const NOT_CONFIGURED: &str = "read-only, but replicates from no source";
const STOPPED: &str = "a replication thread (IO or SQL) is not running";
const UNREADABLE: &str =
    "SHOW REPLICA STATUS refused: the probe's user needs REPLICATION CLIENT (MariaDB: REPLICA MONITOR)";

/// A status row's columns, by name, as text (`None` for NULL).
fn columns(row: &mysql_async::Row) -> Vec<(String, Option<String>)> {
    row.columns_ref()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let value = match row.as_ref(i) {
                Some(mysql_async::Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(mysql_async::Value::Int(n)) => Some(n.to_string()),
                Some(mysql_async::Value::UInt(n)) => Some(n.to_string()),
                _ => None,
            };
            (c.name_str().into_owned(), value)
        })
        .collect()
}

/// The replication of a node from its status rows (one per source).
fn replication(rows: &[Vec<(String, Option<String>)>]) -> Replication {
    if rows.is_empty() {
        return Replication {
            broken: Some(NOT_CONFIGURED),
            ..Replication::default()
        };
    }
    let mut lag = std::time::Duration::ZERO;
    for row in rows {
        let get = |names: &[&str]| {
            row.iter()
                .find(|(n, _)| names.iter().any(|x| n.eq_ignore_ascii_case(x)))
                .and_then(|(_, v)| v.clone())
        };
        let running = |names: &[&str]| get(names).is_some_and(|v| v.eq_ignore_ascii_case("Yes"));
        if !running(&["Replica_IO_Running", "Slave_IO_Running"])
            || !running(&["Replica_SQL_Running", "Slave_SQL_Running"])
        {
            return Replication {
                broken: Some(STOPPED),
                ..Replication::default()
            };
        }
        let seconds = get(&["Seconds_Behind_Source", "Seconds_Behind_Master"])
            .and_then(|v| v.parse::<u64>().ok());
        match seconds {
            Some(s) => lag = lag.max(std::time::Duration::from_secs(s)),
            None => {
                return Replication {
                    broken: Some(STOPPED),
                    ..Replication::default()
                }
            }
        }
    }
    Replication {
        lag: Some(lag),
        ..Replication::default()
    }
}

fn judge(rows: &[(String, String)]) -> Result<Role, ProbeError> {
    if !rows
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("read_only"))
    {
        return Err(ProbeError::Protocol(
            "the server has no read_only variable".into(),
        ));
    }
    let on = |v: &str| matches!(v.to_ascii_uppercase().as_str(), "ON" | "1" | "TRUE");
    if rows.iter().any(|(_, value)| on(value)) {
        Ok(Role::Replica)
    } else {
        Ok(Role::Leader)
    }
}

fn login_error(e: mysql_async::Error) -> ProbeError {
    match &e {
        // ER_ACCESS_DENIED_ERROR, ER_DBACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR
        mysql_async::Error::Server(s) if matches!(s.code, 1044 | 1045 | 1698) => {
            ProbeError::Auth(s.message.clone())
        }
        mysql_async::Error::Io(mysql_async::IoError::Tls(tls)) => ProbeError::Tls(tls.to_string()),
        mysql_async::Error::Io(mysql_async::IoError::Io(io))
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>()) =>
        {
            ProbeError::Tls(io.to_string())
        }
        mysql_async::Error::Io(io) => ProbeError::Connect(io.to_string()),
        _ => ProbeError::Protocol(format!("login: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn judges_read_only() {
        assert_eq!(judge(&rows(&[("read_only", "OFF")])), Ok(Role::Leader));
        assert_eq!(
            judge(&rows(&[("read_only", "OFF"), ("super_read_only", "OFF")])),
            Ok(Role::Leader)
        );
        assert_eq!(
            judge(&rows(&[("read_only", "OFF"), ("super_read_only", "ON")])),
            Ok(Role::Replica)
        );
        assert_eq!(judge(&rows(&[("read_only", "ON")])), Ok(Role::Replica));
        assert!(judge(&[]).is_err());
    }

    fn status(v: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.map(str::to_string)))
            .collect()
    }

    #[test]
    fn judges_replica_status() {
        let mariadb = status(&[
            ("Slave_IO_Running", Some("Yes")),
            ("Slave_SQL_Running", Some("Yes")),
            ("Seconds_Behind_Master", Some("3")),
        ]);
        assert_eq!(
            replication(&[mariadb]).lag,
            Some(std::time::Duration::from_secs(3))
        );
        let mysql = status(&[
            ("Replica_IO_Running", Some("Yes")),
            ("Replica_SQL_Running", Some("No")),
            ("Seconds_Behind_Source", None),
        ]);
        assert_eq!(replication(&[mysql]).broken, Some(STOPPED));
        assert_eq!(replication(&[]).broken, Some(NOT_CONFIGURED));
        let connecting = status(&[
            ("Slave_IO_Running", Some("Connecting")),
            ("Slave_SQL_Running", Some("Yes")),
            ("Seconds_Behind_Master", None),
        ]);
        assert_eq!(replication(&[connecting]).broken, Some(STOPPED));
    }
}
