//! The 1:1 forward: dial a backend for an admitted client, finish the negotiation against
//! it, register the session and splice bytes both ways in a task sized to what an idle
//! session holds ([`Established`]).
//!
//! May import: `metrics`, `proxy_protocol`, `splice`, `tls` and the session's own modules
//! (the permits a session holds come in its [`Admitted`](super::Admitted)).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, Arc},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    time::timeout,
};
use tracing::{debug, info, warn, Instrument};

use super::{
    dial::{connect, wait_for_route},
    registry::Registration,
    Admitted, SessionPermits, Shared,
};
use crate::{
    metrics::{Metrics, Place, Rejection},
    proxy_protocol,
    splice::{Outcome, Splice, Tcp},
    tls::Negotiation,
};

/// Connects to a backend, finishes the client's negotiation (TLS, engine) against it, and
/// copies bytes both ways until the session ends.
pub async fn proxy<N>(admitted: Admitted<N>, mut shared: Shared)
where
    N: Negotiation<Tcp>,
    N::Client: 'static,
    N::Server: 'static,
{
    let Admitted {
        stream: client,
        peer,
        early,
        permits,
        mut negotiating,
        config,
        generation,
    } = admitted;
    // Waiting for a route and the backend is not the client's negotiation.
    negotiating.leave_client();
    let state = shared.state.clone();
    let health = match Box::pin(wait_for_route(&config, &mut shared)).await {
        Some(health) => health,
        None => {
            warn!("no backend is routable");
            state.metrics.reject(Rejection::NoBackend);
            return;
        }
    };
    let connected = Box::pin(connect(&config, &health, peer.client.ip(), &shared)).await;
    let Some((server, backend)) = connected else {
        state.metrics.reject(Rejection::NoBackend);
        return;
    };
    let server = Tcp::new(server);
    let (name, place) = backend;
    let mut to_server = Vec::new();
    if config.proxy_protocol.send {
        let local = peer
            .local
            .or_else(|| server.local_addr().ok())
            .unwrap_or(peer.client);
        to_server = proxy_protocol::encode_v2(peer.client, local);
    }
    to_server.extend_from_slice(&early);
    drop(early);
    let (client, server) = if N::NEGOTIATES {
        let mut server = server;
        // The PROXY header precedes the engine's own bytes (a greeting, an SSLRequest).
        if !to_server.is_empty() {
            let write = Box::pin(timeout(
                config.timeouts.connect,
                server.write_all(&to_server),
            ))
            .await;
            if !matches!(write, Ok(Ok(()))) {
                state.metrics.reject(Rejection::NoBackend);
                debug!("closed: the PROXY header could not be sent");
                return;
            }
            to_server = Vec::new();
        }
        let host = config
            .backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.address.host.clone())
            .unwrap_or_default();
        match Box::pin(client.finish(server, host)).await {
            Ok(streams) => streams,
            Err(e) => {
                state.metrics.reject(Rejection::Handshake);
                shared.tls.record_failure(&e);
                debug!(error = %e, reason = e.label(), "closed: negotiation with the backend failed");
                return;
            }
        }
    } else {
        match Box::pin(client.finish(server, String::new())).await {
            Ok(streams) => streams,
            Err(_) => return,
        }
    };

    // A session now: no longer counted as negotiating.
    drop(negotiating);
    let metrics = &state.metrics;
    metrics.sessions.fetch_add(1, Relaxed);
    metrics.active_sessions.fetch_add(1, Relaxed);
    place.stats().sessions.fetch_add(1, Relaxed);
    debug!(generation, "session open");
    let registration = match shared.sessions.register(&shared, peer.client.ip(), name) {
        Ok(r) => r,
        Err(reason) => {
            // A change published while the session was being set up already excludes it.
            metrics.closed(reason);
            metrics.active_sessions.fetch_sub(1, Relaxed);
            debug!(reason = reason.as_str(), "session closed");
            return;
        }
    };
    let access_log = config.access_log;
    drop(shared);

    let splice = Splice::new(
        client,
        server,
        config.timeouts.client,
        config.timeouts.server,
        to_server,
        metrics.clone(),
    );
    drop(config);
    let established = Established {
        splice,
        registration,
        registered_waker: false,
        metrics: state.metrics.clone(),
        place,
        permits: Some(permits),
        opened: std::time::Instant::now(),
        client: peer.client,
        access_log,
    };
    // The open session runs as a task of its own, sized to what it holds while it idles; the
    // setup's states (connect, negotiation) are freed with this one.
    tokio::spawn(established.instrument(tracing::Span::current()));
}

pin_project_lite::pin_project! {
    /// An open session: the splice until it ends or the control side asks it to close.
    struct Established<C, S> {
        #[pin]
        splice: Splice<C, S>,
        registration: Registration,
        registered_waker: bool,
        metrics: Arc<Metrics>,
        place: Place,
        permits: Option<SessionPermits>,
        opened: std::time::Instant,
        client: SocketAddr,
        access_log: bool,
    }
}

impl<C, S> Future for Established<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let reason = match this.splice.as_mut().poll(cx) {
            Poll::Ready(outcome) => {
                if let Outcome::Error(e) = &outcome {
                    debug!(error = %e, "session failed");
                }
                outcome.reason()
            }
            Poll::Pending => {
                // The task's waker does not change while it lives: register it once.
                let register = !*this.registered_waker;
                *this.registered_waker = true;
                match this.registration.poll_reason(cx, register) {
                    Some(why) => why,
                    None => return Poll::Pending,
                }
            }
        };
        this.metrics.closed(reason);
        this.metrics.active_sessions.fetch_sub(1, Relaxed);
        let (to_backend, to_client) = this.splice.as_ref().get_ref().bytes();
        let stats = this.place.stats();
        stats.bytes_in.fetch_add(to_backend, Relaxed);
        stats.bytes_out.fetch_add(to_client, Relaxed);
        this.permits.take();
        if *this.access_log {
            info!(
                target: "access",
                client = %this.client,
                backend = %stats.name,
                duration_ms = this.opened.elapsed().as_millis() as u64,
                bytes_to_backend = to_backend,
                bytes_to_client = to_client,
                reason = reason.as_str(),
                "session closed"
            );
        } else {
            debug!(reason = reason.as_str(), "session closed");
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    use super::*;
    use crate::session::testing::shared;

    /// What an open, idle session holds in its task besides its sockets' kernel state.
    #[tokio::test]
    async fn an_open_session_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let yaml = format!("engine: tcp\nport: 1\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"{addr}\"}}]\n");
        let config = Arc::new(
            crate::config::parse_yaml(&yaml)
                .unwrap()
                .validate()
                .unwrap(),
        );
        let (shared, _drivers) = shared(config);
        let state = shared.state.clone();
        let permits = (
            state.try_connection(10).unwrap(),
            state.try_client(peer.ip(), 0).unwrap(),
        );
        let splice = Splice::new(
            Tcp::new(client),
            Tcp::new(server),
            Duration::from_secs(1),
            Duration::from_secs(1),
            Vec::new(),
            state.metrics.clone(),
        );
        let registration = shared
            .sessions
            .register(&shared, peer.ip(), "a".into())
            .unwrap();
        assert_eq!(shared.sessions.len(), 1);
        let established = Established {
            splice,
            registration,
            registered_waker: false,
            metrics: state.metrics.clone(),
            place: state.metrics.backend("a").try_place(0).unwrap(),
            permits: Some(permits),
            opened: std::time::Instant::now(),
            client: peer,
            access_log: true,
        }
        .instrument(tracing::Span::none());
        let size = std::mem::size_of_val(&established);
        println!("open session task future: {size} bytes");
        assert!(size <= 640, "an open session's future grew to {size} bytes");
    }
}
