//! HTTP/1.1 on a Unix socket. Each connection is tagged with its peer's credentials; each
//! request is routed in `routes`, and errors become statuses in `response`.

mod admin;
mod peer;
mod records;
pub mod response;
mod routes;

pub use peer::{Peer, Role};
pub use routes::VERIFICATION_HEADER;

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;

use crate::daemon::App;

/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish (up to `DRAIN`).
pub async fn serve(app: Arc<App>, listener: UnixListener, shutdown: impl std::future::Future) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // Out of descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let peer = match Peer::of(&stream, &app.access.load()) {
                    Ok(peer) => Arc::new(peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
                        continue;
                    }
                };
                let app = app.clone();
                let service = service_fn(move |req| routes::handle(app.clone(), peer.clone(), req));
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(DRAIN) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}
