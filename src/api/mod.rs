//! HTTP/1.1 on a Unix socket. Each connection is tagged with its peer's credentials; each
//! request is routed in `routes` to a handler of its resource (`keys`, `changes`, `records`,
//! `totp`, `audit`, `health`), which takes what it needs from the request through `extract`;
//! errors become statuses in `response`. Bodies and answers are the types of `proto`.

mod app;
mod audit;
mod changes;
mod conn;
mod extract;
mod health;
mod keys;
mod peer;
mod records;
mod refusals;
pub mod response;
mod routes;
#[cfg(feature = "test-clock")]
mod test_clock;
mod totp;

pub use app::App;
pub use peer::{Peer, Role};
pub use refusals::Refusals;

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;

use extract::BodyDeadline;

/// How long in-flight requests may take to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish (up to `DRAIN`). Connections past `server.max_connections` or a uid's
/// `server.max_connections_per_uid` are refused at accept.
pub async fn serve(app: Arc<App>, listener: UnixListener, shutdown: impl std::future::Future) {
    let graceful = GracefulShutdown::new();
    let limiter = Arc::new(conn::Limiter::default());
    let trimmer = tokio::spawn(conn::trim_after_bursts(limiter.clone()));
    let summaries = tokio::spawn(audit_refusal_summaries(app.clone()));
    let mut last_refusal_log: Option<std::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::error!(error = %e, "accept failed");
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
                let server = &app.config.load().server;
                let timeout = server.request_timeout;
                let permit = match limiter.admit(peer.uid, server.max_connections, server.max_connections_per_uid) {
                    Ok(permit) => permit,
                    Err(why) => {
                        conn::refuse(stream, &why);
                        // One line per 10 s at most: a flood must not flood the journal too.
                        if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            last_refusal_log = Some(std::time::Instant::now());
                            tracing::warn!(uid = peer.uid, pid = peer.pid, refused_total = limiter.refused(), "connection refused: {why}");
                        }
                        continue;
                    }
                };
                let activity = Arc::new(conn::Activity::default());
                let io = conn::TimedIo::new(stream, activity.clone(), timeout, permit);
                let app = app.clone();
                let service = service_fn(move |mut req| {
                    let (busy, deadline) = activity.enter(timeout);
                    req.extensions_mut().insert(BodyDeadline(deadline));
                    let (app, peer) = (app.clone(), peer.clone());
                    async move {
                        let _busy = busy;
                        routes::answer(app, peer, req).await
                    }
                });
                // hyper's own header timer is off: `TimedIo` does its job without closing
                // on requests that arrived while the daemon could not run.
                // Bodies are written vectored, straight from their buffers: hyper copies
                // none into its own write buffer (one that holds keys would outlive the
                // response unzeroized).
                let conn = http1::Builder::new()
                    .header_read_timeout(None)
                    .writev(true)
                    .serve_connection(io, service);
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
    trimmer.abort();
    summaries.abort();
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(DRAIN) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

/// Audits, once a minute, the refusal summaries of uids whose refusals stopped.
async fn audit_refusal_summaries(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tick.tick().await;
        let now = app.keyring.now();
        for s in app.refusals.due(now) {
            app.keyring.audit(refusals::refusal_summary(&app, &s)).await;
        }
    }
}
