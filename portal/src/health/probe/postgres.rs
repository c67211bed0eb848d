//! The PostgreSQL probe: a real login (SCRAM-SHA-256, md5 or trust, with or without TLS) and
//! `SELECT pg_is_in_recovery()`; a node out of recovery is the leader.
//!
//! May import: `config` and the rest of `health`.

use tokio::net::TcpStream;
use tokio_postgres::{config::SslMode, NoTls, SimpleQueryMessage};

use super::{tls::BackendTls, ProbeError};
use crate::{
    config::Address,
    health::{ProbeCredentials, Role},
};

pub(crate) async fn probe(
    stream: TcpStream,
    address: &Address,
    tls: Option<&BackendTls>,
    credentials: Option<&ProbeCredentials>,
) -> Result<Role, ProbeError> {
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
    let value = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_string()),
        _ => None,
    });
    match value.as_deref() {
        Some("f") => Ok(Role::Leader),
        Some("t") => Ok(Role::Replica),
        other => Err(ProbeError::Protocol(format!(
            "pg_is_in_recovery() answered {other:?}"
        ))),
    }
}

/// Runs the probe's query on `client` while driving its `connection`; both end together.
async fn query(
    client: &tokio_postgres::Client,
    connection: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> Result<Vec<SimpleQueryMessage>, ProbeError> {
    let query = client.simple_query("SELECT pg_is_in_recovery()");
    tokio::pin!(connection);
    tokio::pin!(query);
    let result = tokio::select! {
        r = &mut query => r,
        r = &mut connection => {
            return Err(ProbeError::Protocol(match r {
                Ok(()) => "the server closed the connection before answering".into(),
                Err(e) => format!("SELECT pg_is_in_recovery(): {}", describe(&e)),
            }));
        }
    };
    result
        .map_err(|e| ProbeError::Protocol(format!("SELECT pg_is_in_recovery(): {}", describe(&e))))
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
