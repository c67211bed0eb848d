//! The start of a pooled PostgreSQL client: its startup packet (user, database, the reported
//! parameters it asks for; a CancelRequest instead), its authentication (in [`auth`](super::auth))
//! and its login: a first server connection, whose parameters and the portal's own
//! BackendKeyData the client is told.
//!
//! May import: `metrics`, `wire` and the rest of `pool`.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    time::timeout,
};
use tracing::debug;

use super::pinning::REPLAYED;
use super::{CancelSlot, Client, Startup};
use crate::{
    metrics::CloseReason,
    wire::postgres::{
        backend::Backend, backend_key_data, is_protocol_3, parameter_status, parse_key,
        ready_for_query, startup_header, startup_params, ReadyStatus, CANCEL_REQUEST,
        CANCEL_REQUEST_LEN, MAX_STARTUP, PROTOCOL_3_0,
    },
};

/// The client's startup parameters besides user and database, split into the reported ones
/// the portal replays ([`REPLAYED`], under their reported names; set with `SET` at login, and
/// set again after the client's `RESET` of them, see the machine) and the others (`options`,
/// `extra_float_digits`, any setting), which its server connections are opened with: they
/// are its pool's key, so clients of different drivers share one pool, and a client with
/// options of its own gets connections that have them from the start, as a direct one.
/// libpq's fallback_application_name counts when no application_name is given.
pub(super) fn split_startup(
    params: BTreeMap<String, String>,
    fallback_application_name: Option<String>,
) -> (Startup, BTreeMap<String, String>) {
    let mut wanted = BTreeMap::new();
    let mut others = Vec::new();
    for (name, value) in params {
        match REPLAYED.iter().find(|r| r.eq_ignore_ascii_case(&name)) {
            Some(reported) => {
                wanted.insert(reported.to_string(), value);
            }
            None => others.push((name, value)),
        }
    }
    if let Some(name) = fallback_application_name {
        wanted.entry("application_name".into()).or_insert(name);
    }
    (others.into(), wanted)
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// The client's start: its part (startup packet, authentication) within
    /// `timeouts.handshake`, then its login, whose wait for a server connection is bounded by
    /// `pooling.queueTimeout` instead (a burst of logins on a small pool queues, and the
    /// client that waits too long gets an error that says so). `Ok(true)`: logged in;
    /// `Ok(false)`: a CancelRequest was served.
    pub(super) async fn startup(&mut self) -> Result<bool, CloseReason> {
        let deadline = self.config.timeouts.handshake;
        let wanted = match timeout(deadline, self.handshake()).await {
            Ok(Ok(Some(wanted))) => wanted,
            Ok(Ok(None)) => return Ok(false),
            Ok(Err(reason)) => return Err(reason),
            Err(_) => {
                debug!("closed: no startup and authentication within timeouts.handshake");
                return Err(CloseReason::ClientTimeout);
            }
        };
        self.login(wanted).await?;
        Ok(true)
    }

    /// The startup packet and authentication: the startup parameters the client wants, or
    /// `None` when it sent a CancelRequest (served).
    async fn handshake(&mut self) -> Result<Option<BTreeMap<String, String>>, CloseReason> {
        let mut header = [0u8; 8];
        self.io
            .read_exact(&mut header)
            .await
            .map_err(|_| CloseReason::Error)?;
        let (len, code) = startup_header(&header);
        if (len, code) == (CANCEL_REQUEST_LEN, CANCEL_REQUEST) {
            let mut key = [0u8; 8];
            self.io
                .read_exact(&mut key)
                .await
                .map_err(|_| CloseReason::Error)?;
            if let Some(key) = parse_key(&key) {
                self.hub.cancel(key, &self.ctx).await;
            }
            return Ok(None);
        }
        if !is_protocol_3(code) || !(8..=MAX_STARTUP).contains(&len) {
            self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
            return Err(self
                .fatal(
                    "08P01",
                    &format!("unsupported startup packet (length {len}, code {code})"),
                )
                .await);
        }
        let mut body = vec![0u8; len as usize - 8];
        self.io
            .read_exact(&mut body)
            .await
            .map_err(|_| CloseReason::Error)?;
        let params = match startup_params(&body) {
            Ok(p) => p,
            Err(e) => {
                self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
                return Err(self.fatal("08P01", &e.to_string()).await);
            }
        };
        let mut startup = BTreeMap::new();
        let mut fallback_application_name = None;
        let mut unknown_options = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "user" => self.user = value,
                "database" => self.database = value,
                "replication" if value != "false" && value != "0" && value != "off" => return Err(
                    self.fatal(
                        "08P01",
                        "replication connections are not pooled: connect to the database directly",
                    )
                    .await,
                ),
                "replication" => {}
                "options" if value.trim().is_empty() => {}
                "fallback_application_name" => fallback_application_name = Some(value),
                n if n.starts_with("_pq_.") => unknown_options.push(name),
                _ => {
                    startup.insert(name, value);
                }
            }
        }
        let (startup, wanted) = split_startup(startup, fallback_application_name);
        self.startup = startup;
        self.machine.set_startup_values(&wanted);
        if self.user.is_empty() {
            return Err(self
                .fatal(
                    "28000",
                    "no PostgreSQL user name specified in startup packet",
                )
                .await);
        }
        if self.database.is_empty() {
            self.database = self.user.clone();
        }
        tracing::Span::current().record("user", tracing::field::display(&self.user));
        if code != PROTOCOL_3_0 || !unknown_options.is_empty() {
            // NegotiateProtocolVersion: the portal speaks 3.0 and no protocol options.
            let mut options = (unknown_options.len() as u32).to_be_bytes().to_vec();
            for o in &unknown_options {
                options.extend_from_slice(o.as_bytes());
                options.push(0);
            }
            let m = Backend::NegotiateProtocolVersion {
                minor: 0,
                options: &options,
            }
            .to_bytes();
            self.send(&m).await?;
        }
        self.authenticate().await?;
        Ok(Some(wanted))
    }

    /// After authentication: a first server connection, to learn the server's parameters
    /// and apply the client's startup ones (a value the server refuses fails the login), then
    /// ParameterStatus, BackendKeyData and ReadyForQuery.
    pub(super) async fn login(
        &mut self,
        wanted: BTreeMap<String, String>,
    ) -> Result<(), CloseReason> {
        let mut conn = match self.acquire_conn().await {
            Ok(c) => c,
            Err((sqlstate, text)) => return Err(self.fatal(sqlstate, &text).await),
        };
        // The client starts from the values of a new connection (its server's defaults and
        // the pool's startup parameters) with its own startup values on top, not from what
        // an earlier client of this connection left set.
        let mut start = conn.initial.clone();
        for (name, value) in wanted {
            super::conn::set_param(&mut start, name, value);
        }
        let sql = super::pinning::replay_sql(&start, &conn.params);
        if !sql.is_empty() {
            if let Err(e) = conn.run(&sql, self.config.timeouts.server).await {
                self.give_back(conn);
                return Err(self
                    .fatal("22023", &format!("invalid startup parameter: {e}"))
                    .await);
            }
        }
        self.params = conn.params.clone();
        let pool = self.pool.clone().expect("acquired");
        let mut out = Vec::with_capacity(512);
        for (k, v) in self.params.iter() {
            out.extend_from_slice(&parameter_status(k, v));
        }
        let (pid, secret) = self.hub.new_key(&self.config);
        let slot = Arc::new(CancelSlot::default());
        self.hub.register_cancel((pid, secret), slot.clone());
        self.cancel = Some(((pid, secret), slot));
        out.extend_from_slice(&backend_key_data(pid, secret));
        out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
        if self.settings.transaction {
            self.give_back(conn);
        } else {
            self.hold(conn, pool);
        }
        self.send(&out).await?;
        Ok(())
    }
}
