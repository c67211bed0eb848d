//! The PostgreSQL probe: a real login (SCRAM-SHA-256, md5 or trust, with or without TLS) and
//! one query: `pg_is_in_recovery()` (a node out of recovery is the leader) and the node's
//! replication — its WAL position (the leader's `pg_current_wal_lsn()`, a standby's
//! `pg_last_wal_replay_lsn()`), the age of the last replayed commit while received WAL waits
//! to be replayed (`now() - pg_last_xact_replay_timestamp()`; zero once all is replayed), and
//! whether a WAL receiver runs (a standby without one streams from no primary: broken).
//!
//! May import: `config` and the rest of `health`.

use tokio::net::TcpStream;
use tokio_postgres::{config::SslMode, NoTls, SimpleQueryMessage};

use super::{tls::BackendTls, ProbeError, Probed};
use crate::{
    config::Address,
    health::{ProbeCredentials, Replication, Role},
};

/// The probe's query: role, position, stated lag (seconds), WAL receivers. Every function it
/// calls may be run by any user (`pg_stat_wal_receiver` shows its row to all, details only to
/// `pg_read_all_stats`).
const QUERY: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END) \
       - '0/0'::pg_lsn, \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
          WHEN pg_last_wal_receive_lsn() IS NULL \
            OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0 \
          ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END, \
     (SELECT count(*) FROM pg_stat_wal_receiver)";

/// Why a standby counts as not replicating.
const NO_RECEIVER: &str = "no WAL receiver: the standby streams from no primary";

pub(crate) async fn probe(
    stream: TcpStream,
    address: &Address,
    tls: Option<&BackendTls>,
    credentials: Option<&ProbeCredentials>,
) -> Result<Probed, ProbeError> {
    let mut config = tokio_postgres::Config::new();
    let user = credentials
        .and_then(|c| c.username.as_deref())
        .unwrap_or("postgres");
    config
        .user(user)
        .dbname("postgres")
        .application_name("dbportal-probe");
    if let Some(c) = credentials {
        config.password(c.password.as_bytes());
    }
    // The connection is driven here, beside the query, not spawned: when the probe's deadline
    // drops this future (a server that logs in and then never answers), the connection and
    // its socket go with it. A spawned connection task would wait on the hung server forever.
    let messages = match tls {
        Some(tls) => {
            config.ssl_mode(SslMode::Require);
            let (client, connection) = config
                .connect_raw(stream, tls.postgres(address)?)
                .await
                .map_err(login_error)?;
            query(&client, connection).await?
        }
        None => {
            config.ssl_mode(SslMode::Disable);
            let (client, connection) = config
                .connect_raw(stream, NoTls)
                .await
                .map_err(login_error)?;
            query(&client, connection).await?
        }
    };
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(
            (0..4)
                .map(|i| row.get(i).map(str::to_string))
                .collect::<Vec<_>>(),
        ),
        _ => None,
    });
    judge(&row.unwrap_or_default())
}

/// The node's role and replication from the query's row (text values, `None` for NULL).
fn judge(row: &[Option<String>]) -> Result<Probed, ProbeError> {
    let field = |i: usize| row.get(i).cloned().flatten();
    let role = match field(0).as_deref() {
        Some("f") => Role::Leader,
        Some("t") => Role::Replica,
        other => {
            return Err(ProbeError::Protocol(format!(
                "pg_is_in_recovery() answered {other:?}"
            )))
        }
    };
    let position = field(1)
        .and_then(|p| p.parse::<f64>().ok())
        .map(|p| p as u64);
    let lag = field(2)
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| std::time::Duration::from_secs_f64(s.max(0.0)));
    let receivers = field(3).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let broken = (role == Role::Replica && receivers == 0).then_some(NO_RECEIVER);
    Ok(Probed {
        replication: Replication {
            position,
            lag,
            broken,
        },
        ..role.into()
    })
}

/// Runs the probe's query on `client` while driving its `connection`; both end together.
async fn query(
    client: &tokio_postgres::Client,
    connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> Result<Vec<SimpleQueryMessage>, ProbeError> {
    let query = client.simple_query(QUERY);
    tokio::pin!(connection);
    tokio::pin!(query);
    let result = tokio::select! {
        r = &mut query => r,
        r = &mut connection => {
            return Err(ProbeError::Protocol(match r {
                Ok(()) => "the server closed the connection before answering".into(),
                Err(e) => format!("the probe's query: {}", describe(&e)),
            }));
        }
    };
    result.map_err(|e| ProbeError::Protocol(format!("the probe's query: {}", describe(&e))))
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

fn login_error(e: tokio_postgres::Error) -> ProbeError {
    let text = describe(&e);
    match e.as_db_error().map(|d| d.code().code()) {
        // invalid_authorization_specification, invalid_password
        Some("28000") | Some("28P01") => ProbeError::Auth(text),
        // The SSLRequest refused, or the handshake failed (an untrusted certificate, say).
        None if is_tls_failure(&e) => ProbeError::Tls(text),
        _ => ProbeError::Protocol(format!("login: {text}")),
    }
}

/// Whether the error is tokio-postgres' "error performing TLS handshake" (its error kinds are
/// not public) or carries a rustls error.
fn is_tls_failure(e: &tokio_postgres::Error) -> bool {
    if e.to_string().contains("TLS handshake") {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<rustls::Error>()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|x| x.map(str::to_string)).collect()
    }

    #[test]
    fn reads_role_position_and_lag() {
        let leader = judge(&row(&[Some("f"), Some("50331800"), None, Some("0")])).unwrap();
        assert_eq!(leader.role, Role::Leader);
        assert_eq!(leader.replication.position, Some(50_331_800));
        assert_eq!(leader.replication.broken, None, "a primary has no receiver");
        let standby = judge(&row(&[Some("t"), Some("50331000"), Some("2.5"), Some("1")])).unwrap();
        assert_eq!(standby.role, Role::Replica);
        assert_eq!(
            standby.replication.lag,
            Some(std::time::Duration::from_millis(2500))
        );
        let orphan = judge(&row(&[Some("t"), Some("1"), Some("0"), Some("0")])).unwrap();
        assert_eq!(orphan.replication.broken, Some(NO_RECEIVER));
        assert!(judge(&row(&[Some("x")])).is_err());
        assert!(judge(&[]).is_err());
    }
}
