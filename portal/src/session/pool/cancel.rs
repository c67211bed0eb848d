//! Cancellation in PostgreSQL pooling. A client is given the portal's own BackendKeyData; a
//! CancelRequest with it goes to the server connection running that client's query now
//! (dropped while the client is idle). Clients and load balancers do not keep a cancel on
//! the pod that holds the session, so a key also says which portal gave it out: its process
//! id carries the portal's place among `peers` (sorted by name) in bits 23 to 30, and a
//! portal that receives a key of a peer sends the request on to that peer.
//!
//! May import: `config`, `tls`, `wire` and the rest of `pool`.

use std::{
    io,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tracing::debug;

use super::{
    conn::{lock, random, DialContext},
    pools::{CancelSlot, PgHub},
};
use crate::config::{Address, Backend, Config};

/// Bits of a process id below the portal's place.
const PLACE_SHIFT: u32 = 23;

/// How long a cancel sent to a peer is remembered, so that it is not sent again when it
/// comes back.
const BOUNCE_GUARD: Duration = Duration::from_secs(5);

/// This portal's place among the peers, 1-based (0: no peers, or not among them).
fn own_place(config: &Config) -> u32 {
    config
        .name
        .as_ref()
        .and_then(|name| config.peers.iter().position(|(n, _)| n == name))
        .map_or(0, |i| i as u32 + 1)
}

/// The peer that gave out `pid`, unless that is this portal or no peer.
fn owner(config: &Config, pid: u32) -> Option<&(String, Address)> {
    let place = pid >> PLACE_SHIFT;
    if place == 0 || place == own_place(config) {
        return None;
    }
    config.peers.get(place as usize - 1)
}

impl PgHub {
    /// A new key for a client's BackendKeyData: a process id with this portal's place, and a
    /// random secret.
    pub(super) fn new_key(&self, config: &Config) -> (u32, u32) {
        let serial = (self.next_pid.fetch_add(1, Relaxed) % ((1 << PLACE_SHIFT) - 1)) as u32 + 1;
        let pid = own_place(config) << PLACE_SHIFT | serial;
        (pid, u32::from_be_bytes(random::<4>()))
    }

    pub(super) fn register_cancel(&self, key: (u32, u32), slot: Arc<CancelSlot>) {
        lock(&self.cancels).insert(key, slot);
    }

    pub(super) fn forget_cancel(&self, key: (u32, u32)) {
        lock(&self.cancels).remove(&key);
    }

    /// Serves a CancelRequest: for a key of this portal, a CancelRequest with the server's
    /// own key to the server connection running that client's query (dropped when its client
    /// is idle); for a key of a peer, the same request to that peer.
    pub(super) async fn cancel(&self, key: (u32, u32), ctx: &DialContext) {
        let known = lock(&self.cancels).get(&key).cloned();
        let Some(slot) = known else {
            return self.to_peer(key, ctx).await;
        };
        let target = slot.target();
        let Some((pool, server_key)) = target else {
            self.stats.cancels_dropped.fetch_add(1, Relaxed);
            debug!("CancelRequest for an idle client: dropped");
            return;
        };
        let backend = &pool.backend;
        match send_cancel(ctx, backend, server_key).await {
            Ok(()) => {
                self.stats.cancels.fetch_add(1, Relaxed);
                debug!(backend = %backend.name, "CancelRequest forwarded");
            }
            Err(e) => {
                self.stats.cancels_dropped.fetch_add(1, Relaxed);
                debug!(backend = %backend.name, error = %e, "CancelRequest could not be forwarded");
            }
        }
    }

    /// Sends the CancelRequest on to the peer whose place the key carries.
    async fn to_peer(&self, key: (u32, u32), ctx: &DialContext) {
        let Some((name, address)) = owner(&ctx.config, key.0).cloned() else {
            self.stats.cancels_dropped.fetch_add(1, Relaxed);
            debug!("CancelRequest for an unknown key: dropped");
            return;
        };
        {
            let mut sent = lock(&self.sent_to_peers);
            sent.retain(|_, at| at.elapsed() < BOUNCE_GUARD);
            if sent.insert(key, Instant::now()).is_some() {
                self.stats.cancels_dropped.fetch_add(1, Relaxed);
                debug!(peer = %name, "CancelRequest came back from a peer: dropped");
                return;
            }
        }
        let request = crate::wire::postgres::cancel_request(key.0, key.1);
        let work = async {
            let mut tcp = connect(&address).await?;
            tcp.write_all(&request).await?;
            // The peer closes the connection when it has served the request.
            let _ = tcp.read(&mut [0u8; 1]).await;
            Ok::<_, io::Error>(())
        };
        match timeout(ctx.config.timeouts.connect, work).await {
            Ok(Ok(())) => {
                self.stats.cancels_to_peers.fetch_add(1, Relaxed);
                debug!(peer = %name, "CancelRequest sent to the peer that gave out its key");
            }
            failed => {
                self.stats.cancels_dropped.fetch_add(1, Relaxed);
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in time".into(),
                };
                debug!(peer = %name, error, "CancelRequest could not be sent to its peer");
            }
        }
    }
}

async fn connect(address: &Address) -> io::Result<TcpStream> {
    match address.ip() {
        Some(ip) => TcpStream::connect((ip, address.port)).await,
        None => TcpStream::connect((address.host.as_str(), address.port)).await,
    }
}

/// Sends a CancelRequest with a server's own key to `backend` (over TLS when `tls.backend`
/// is on), within `timeouts.connect`.
async fn send_cancel(ctx: &DialContext, backend: &Backend, key: (u32, u32)) -> io::Result<()> {
    let work = async {
        let mut tcp = connect(&backend.address).await?;
        let request = crate::wire::postgres::cancel_request(key.0, key.1);
        match &ctx.connector {
            None => {
                tcp.write_all(&request).await?;
                // The server closes the connection when it has read the request.
                let _ = tcp.read(&mut [0u8; 1]).await;
            }
            Some(connector) => {
                crate::tls::postgres_ssl_request(&mut tcp)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let name = connector
                    .server_name_for(&backend.address.host)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let mut tls = connector
                    .handshake(tcp, name, None)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?;
                tls.write_all(&request).await?;
                tls.flush().await?;
                let _ = tls.read(&mut [0u8; 1]).await;
            }
        }
        Ok(())
    };
    timeout(ctx.config.timeouts.connect, work)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: Option<&str>) -> Config {
        let mut text = "engine: postgres\nbackends: [{name: a, address: \"127.0.0.1:1\"}]\npeers: [{name: p-1, address: \"127.0.0.1:2\"}, {name: p-0, address: \"127.0.0.1:3\"}]\n".to_string();
        if let Some(n) = name {
            text.push_str(&format!("name: {n}\n"));
        }
        crate::config::parse_yaml(&text)
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_key_carries_its_portals_place_among_the_sorted_peers() {
        let hub = PgHub::default();
        let (p1, p0, lone) = (config(Some("p-1")), config(Some("p-0")), config(None));
        assert_eq!(
            (own_place(&p0), own_place(&p1), own_place(&lone)),
            (1, 2, 0)
        );
        let (pid, _) = hub.new_key(&p1);
        assert_eq!(pid >> PLACE_SHIFT, 2);
        assert!(pid < 1 << 31, "a process id stays positive as an int32");
        // p-0 sends p-1's keys to p-1, keeps its own, and drops places no peer has.
        assert_eq!(owner(&p0, pid).map(|(n, _)| n.as_str()), Some("p-1"));
        assert_eq!(owner(&p1, pid), None);
        assert_eq!(owner(&p0, 3 << PLACE_SHIFT | 5), None);
        assert_eq!(owner(&p0, 5), None);
        // A portal outside the list gives keys of place 0, which nobody forwards.
        let (pid, _) = hub.new_key(&lone);
        assert_eq!(pid >> PLACE_SHIFT, 0);
        assert_eq!(owner(&p0, pid), None);
    }
}
