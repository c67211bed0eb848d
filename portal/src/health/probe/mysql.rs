//! The MySQL / MariaDB probe: a login and the `read_only` variables; a node with `read_only`
//! and `super_read_only` (MySQL only; MariaDB has no such variable) off is the leader.
//!
//! May import: `config` and the rest of `health`.

use std::time::Duration;

use mysql_async::{prelude::Queryable, OptsBuilder, SslOpts};
use tokio::time::Instant;

use super::{tls::BackendTls, ProbeError};
use crate::{
    config::Address,
    health::{ProbeCredentials, Role},
};

/// Time kept back from the probe's deadline to close a connection whose server stopped
/// answering (see below).
const CLOSE_MARGIN: Duration = Duration::from_millis(50);

pub(crate) async fn probe(
    address: &Address,
    tls: Option<&BackendTls>,
    credentials: Option<&ProbeCredentials>,
    deadline: Instant,
) -> Result<Role, ProbeError> {
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
    let rows = tokio::time::timeout_at(
        query_deadline,
        conn.query::<(String, String), _>(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'super_read_only')",
        ),
    )
    .await;
    let _ = tokio::time::timeout(CLOSE_MARGIN / 2, conn.disconnect()).await;
    let rows = match rows {
        Ok(rows) => rows.map_err(|e| ProbeError::Protocol(format!("read_only: {e}")))?,
        Err(_) => {
            return Err(ProbeError::Protocol(
                "logged in, but the read_only query was not answered in time".into(),
            ))
        }
    };
    judge(&rows)
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
}
