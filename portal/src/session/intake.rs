//! Intake: a new connection from accept to an open session — the PROXY header, admission of
//! the client address, and the TLS / engine negotiation hook — then hands it to
//! [`proxy`](super::proxy).
//!
//! May import: `admission`, `config`, `exec` (where a pooled session runs), `metrics`,
//! `proxy_protocol`, `splice`, `tls` and the session's own modules.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, time::timeout};
use tracing::{debug, warn, Instrument};

use super::{forward::proxy, multiplex, pool, reads, Admitted, Peer, SessionPermits, Shared};
use crate::{
    admission::{admit, ConnectionPermit, NegotiationPermit},
    config::{Config, DataPlane},
    metrics::Rejection,
    proxy_protocol::{self, Header},
    splice::Tcp,
    tls::{MaybeTls, Pending, Rewind, Untouched},
};

/// A connection already admitted by the accept loop.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permits: SessionPermits,
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let local = if config.proxy_protocol.send {
        stream.local_addr().ok()
    } else {
        None
    };
    let admitted = Admitted {
        stream,
        peer: Peer {
            client: peer,
            local,
        },
        early: Vec::new(),
        permits,
        negotiating,
        generation: shared.state.generation(),
        config,
    };
    negotiate(admitted, shared).await
}

/// A connection whose client address comes from a PROXY header: read it (bounded), then
/// admit.
pub async fn serve_proxied(
    mut stream: TcpStream,
    tcp_peer: SocketAddr,
    permit: ConnectionPermit,
    mut negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let state = &shared.state;
    let deadline = config.timeouts.handshake.min(config.timeouts.client);
    let read = Box::pin(timeout(deadline, proxy_protocol::read_header(&mut stream))).await;
    let (header, early) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            state.metrics.reject(Rejection::ProxyHeader);
            debug!(error = %e, "closed: no valid PROXY header");
            return;
        }
        Err(_) => {
            state.metrics.reject(Rejection::ProxyHeader);
            debug!("closed: no PROXY header within {deadline:?}");
            return;
        }
    };
    let peer = match header {
        Header::Proxy {
            source,
            destination,
        } => Peer {
            client: source,
            local: Some(destination),
        },
        Header::Local => Peer {
            client: tcp_peer,
            local: stream.local_addr().ok(),
        },
    };
    tracing::Span::current().record("client", tracing::field::display(peer.client));
    let client = match admit(state, &config, peer.client.ip(), &mut negotiating) {
        Ok(c) => c,
        Err(why) => {
            state.metrics.reject(why);
            debug!(
                reason = why.as_str(),
                "closed before any backend connection"
            );
            return;
        }
    };
    let admitted = Admitted {
        stream,
        peer,
        early,
        permits: (permit, client),
        negotiating,
        generation: state.generation(),
        config,
    };
    negotiate(admitted, shared).await
}

/// The hook where TLS termination and engine-specific negotiation (PostgreSQL SSLRequest,
/// MySQL) turn the TCP stream into the client stream, and the one place that hands the client
/// to its data plane.
async fn negotiate(admitted: Admitted<TcpStream>, shared: Shared) {
    let Some(terminator) = shared.tls.terminator() else {
        // TLS is required but no certificate could be loaded: failing closed beats serving
        // plaintext.
        shared.state.metrics.reject(Rejection::Handshake);
        warn!("closed: tls.mode is terminate but no certificate is available");
        return;
    };
    if let Some(why) = reads::refusal(&admitted.config, &shared) {
        return Box::pin(refused(admitted, terminator, shared, why)).await;
    }
    match &admitted.config.plane {
        DataPlane::Multiplex(_) => Box::pin(multiplexed(admitted, terminator, shared)).await,
        DataPlane::Pool(_) => Box::pin(pooled(admitted, terminator, shared)).await,
        DataPlane::Forward => Box::pin(forwarded(admitted, terminator, shared)).await,
    }
}

/// No pooling: the 1:1 forward ([`proxy`]), after the client's side of TLS where it comes
/// before any backend is used.
async fn forwarded(
    mut admitted: Admitted<TcpStream>,
    terminator: Arc<crate::tls::Terminator>,
    shared: Shared,
) {
    if terminator.is_transparent() {
        // Each phase is boxed: an async fn's future is as large as its largest state, and a
        // plaintext session must not carry the room of a TLS handshake while it idles.
        let admitted = admitted.map_stream(|s| Untouched(Tcp::new(s)));
        return Box::pin(proxy(admitted, shared)).await;
    }
    // Phase one (TLS handshake, PostgreSQL negotiation) before any backend is used; MySQL's
    // in-protocol upgrade waits for the backend's greeting in `proxy`.
    let early = std::mem::take(&mut admitted.early);
    let (tcp, admitted) = admitted.take_stream();
    match Box::pin(terminator.accept_with(Tcp::new(tcp), early)).await {
        Ok(accepted) => {
            let pending = Pending {
                terminator,
                accepted,
            };
            Box::pin(proxy(admitted.with_stream(pending), shared)).await
        }
        Err(e) => negotiation_failed(&shared, Some(&e)),
    }
}

/// `pooling.mode: multiplex`: the client's TLS (if any) is terminated here and its commands
/// go to shared server connections instead of a backend connection of its own. The session
/// runs as a task of its own, on this thread: the intake's task ends, and with it what the
/// admission and the negotiation kept (as for a pooled one, see `pooled`).
async fn multiplexed(
    mut admitted: Admitted<TcpStream>,
    terminator: Arc<crate::tls::Terminator>,
    shared: Shared,
) {
    let span = tracing::Span::current();
    if terminator.mode() != crate::config::TlsMode::Terminate {
        let session = multiplex::serve(admitted.map_stream(Tcp::new), shared);
        tokio::spawn(session.instrument(span));
        return;
    }
    // Boxed, so that the handshake's state does not stay allocated with the client.
    let early = std::mem::take(&mut admitted.early);
    let (tcp, admitted) = admitted.take_stream();
    match Box::pin(terminator.accept_with(Tcp::new(tcp), early)).await {
        Ok(accepted) => match accepted.into_stream() {
            Ok(client) => {
                let session = multiplex::serve(admitted.with_stream(client), shared);
                tokio::spawn(session.instrument(span));
            }
            Err(_) => shared.state.metrics.reject(Rejection::Handshake),
        },
        Err(e) => negotiation_failed(&shared, Some(&e)),
    }
}

/// `pooling.mode: session | transaction`: the negotiation's future is freed before the
/// session's starts, so nothing of it stays allocated with the (mostly idle) client.
async fn pooled(
    mut admitted: Admitted<TcpStream>,
    terminator: Arc<crate::tls::Terminator>,
    shared: Shared,
) {
    let early = std::mem::take(&mut admitted.early);
    let (tcp, mut admitted) = admitted.take_stream();
    let negotiated = Box::pin(pooled_negotiation(
        tcp,
        &terminator,
        early,
        &admitted.config,
    ))
    .await;
    match negotiated {
        Ok(client) => {
            // The login waits for a server connection: not the client's negotiation.
            admitted.negotiating.leave_client();
            // The session runs as a future of this thread's executor (`exec`): the intake's
            // task ends here, and with it everything the negotiation and the admission kept,
            // so that an idle pooled client (most are) holds one allocation, its session's.
            let session = pool::serve(admitted.with_stream(client), shared);
            crate::exec::spawn(session.instrument(tracing::Span::current()));
        }
        Err(e) => negotiation_failed(&shared, e.as_ref()),
    }
}

/// `pooling.mode: session | transaction` (PostgreSQL): the portal negotiates TLS (or declines
/// it) as the server; the client then speaks to the portal, whose transactions go to pooled
/// server connections ([`pool::serve`]).
async fn pooled_negotiation(
    stream: TcpStream,
    terminator: &crate::tls::Terminator,
    early: Vec<u8>,
    config: &Config,
) -> Result<MaybeTls<Rewind<Tcp>>, Option<crate::tls::TlsError>> {
    // On this thread's executor, where the session will run (`exec`).
    let stream = Tcp::here(stream).map_err(|_| None)?;
    if terminator.mode() == crate::config::TlsMode::Terminate {
        return match terminator.accept_with(stream, early).await {
            Ok(accepted) => accepted.into_stream().map_err(|_| None),
            Err(e) => Err(Some(e)),
        };
    }
    // No TLS to clients: decline SSLRequest and GSSENCRequest, then start up in plaintext.
    let client = Rewind::with_prefix(stream, early);
    match timeout(
        config.timeouts.handshake,
        crate::tls::postgres_accept(client, None, false, false),
    )
    .await
    {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

/// A client of the read-only listener that nothing may serve now: told so in its engine's
/// words, after the TLS that comes first in its engine (PostgreSQL's SSLRequest, TLS for Redis
/// and etcd; MySQL's error comes before any TLS). Behind `tls.mode: passthrough` the client's
/// TLS is the backend's, so a Redis or etcd client is closed without a word.
async fn refused(
    mut admitted: Admitted<TcpStream>,
    terminator: Arc<crate::tls::Terminator>,
    shared: Shared,
    why: &'static str,
) {
    let config = admitted.config.clone();
    let deadline = config.timeouts.handshake;
    debug!(reason = why, "read-only client refused");
    shared.state.metrics.reject(Rejection::NoBackend);
    let early = std::mem::take(&mut admitted.early);
    let (tcp, _admitted) = admitted.take_stream();
    let engine = config.engine;
    match engine {
        crate::config::Engine::Mysql => reads::answer(engine, tcp, why, deadline).await,
        crate::config::Engine::Postgres => {
            let negotiated = timeout(
                deadline,
                Box::pin(pooled_negotiation(tcp, &terminator, early, &config)),
            )
            .await;
            if let Ok(Ok(client)) = negotiated {
                reads::answer(engine, client, why, deadline).await
            }
        }
        _ => match terminator.mode() {
            crate::config::TlsMode::Terminate => {
                let accepted =
                    timeout(deadline, terminator.accept_with(Tcp::new(tcp), early)).await;
                if let Ok(Ok(accepted)) = accepted {
                    if let Ok(client) = accepted.into_stream() {
                        reads::answer(engine, client, why, deadline).await
                    }
                }
            }
            crate::config::TlsMode::Disabled => {
                let client = Rewind::with_prefix(Tcp::new(tcp), early);
                reads::answer(engine, client, why, deadline).await
            }
            crate::config::TlsMode::Passthrough => {}
        },
    }
}

/// A client's negotiation failed: counted as a handshake rejection, and a TLS error (when
/// there is one) recorded by reason and logged.
fn negotiation_failed(shared: &Shared, error: Option<&crate::tls::TlsError>) {
    shared.state.metrics.reject(Rejection::Handshake);
    if let Some(e) = error {
        shared.tls.record_failure(e);
        debug!(error = %e, reason = e.label(), "closed: TLS negotiation failed");
    }
}
