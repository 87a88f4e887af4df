//! Opaque TCP forwarding: bytes both ways, half-close passed on.

use crate::route::matcher::Source;
use crate::route::VirtualHost;
use tokio::io::{AsyncRead, AsyncWrite};

/// Pipes `client`, which connected to `port`, to an endpoint of the host's service (or of
/// the cluster its TCP routes choose) until both directions have closed. When one side
/// finishes sending, the other side's write half is shut down (half-close), so
/// request/response protocols that signal "done" with a FIN keep working.
pub async fn forward<I>(mut client: I, host: &VirtualHost, port: Option<u16>, source: &Source<'_>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Some((service, route)) = host.tcp_cluster(port, source) else {
        tracing::info!(service = %host.key, "TCP connection closed: its route has no reachable destination");
        return;
    };
    if let Some(r) = route {
        tracing::debug!(route = %r.name, cluster = %service.key, subset = ?service.subset, "TCP route matched");
    }
    let _permit = match service.admit_connection() {
        Ok(p) => p,
        Err(o) => {
            tracing::info!(service = %service.key, reason = %o, "TCP connection closed: over the connection pool limit");
            return;
        }
    };
    // No request to hash: consistent-hash policies pick at random here.
    let Some(endpoint) = service.pick(None) else {
        tracing::info!(service = %service.key, "TCP connection closed: service has no endpoints");
        return;
    };
    // The connection counts as in flight on the endpoint while it lasts (so P2C and least
    // request see it as load), but its lifetime is no latency sample.
    let _in_flight = endpoint.stats().start_untimed();
    let mut upstream = match endpoint.connect(crate::tls::UpstreamUse::Opaque).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(service = %service.key, error = %e, "TCP connection closed: upstream unreachable");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(service = %service.key, error = %e, "TCP forward ended with an error");
    }
}
