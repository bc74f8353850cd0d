//! The rotator's lease on PostgreSQL: the node whose session holds a session advisory lock
//! ([`LEADER_LOCK`]) runs timer rotations. Every node keeps one session of its own for it
//! (not one of the pool's: the lock lives exactly as long as that session). Every tick
//! (`lease` / 5) a follower tries `pg_try_advisory_lock` and the leader proves its session
//! with a heartbeat; a session lost, or a query not answered within two ticks, makes the
//! node a follower at once (the session is dropped, which frees the lock).
//!
//! How long a vanished leader's lock lingers: a killed process's socket is closed by its
//! kernel, the backend reads the end of it and exits, freeing the lock at once (Unix socket
//! and TCP alike); a frozen or cut-off node sends nothing, and the server ends its session
//! after `idle_session_timeout` (3/5 of the lease; PostgreSQL 14+; older servers: TCP
//! keepalives and `tcp_user_timeout`, over TCP only). A follower retries every tick, so it
//! takes over within 4/5 of the lease. The leader's own claim lapses at its last heartbeat
//! plus that timeout (`Lease::Leader(until)`): a node frozen past it does not rotate when it
//! wakes. What still slips through (a claim in flight) meets the store's guard: a timer
//! rotation names the version it replaces, checked under the key's row lock.

use std::convert::Infallible;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::Client;

use super::tls::MakeRustls;
use crate::domain::error::{Error, Result};
use crate::domain::Code;
use crate::store::{Leadership, Lease};

/// `pg_try_advisory_lock` key of the rotator's lease ("keyd", then 3).
const LEADER_LOCK: i64 = 0x6b65_7964_0000_0003;

/// The lease's times, from `cluster.lease`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    /// How often a follower tries the lock and the leader proves its session.
    tick: Duration,
    /// How long a query (or connecting) may take before the session is given up.
    answer: Duration,
    /// The server ends a session silent this long (its lock freed).
    idle: Duration,
}

impl Timing {
    fn of(lease: Duration) -> Timing {
        let tick = lease / 5;
        Timing {
            tick,
            answer: tick * 2,
            idle: tick * 3,
        }
    }
}

/// Starts the lease of node `node` on the store's runtime; it runs until every clone of the
/// returned `Leadership` is gone.
pub(super) fn start(
    handle: &Handle,
    config: tokio_postgres::Config,
    tls: MakeRustls,
    node: &str,
    lease: Duration,
) -> Leadership {
    let (tx, leadership) = Leadership::cluster(node);
    let mut config = config;
    config.application_name(format!("incountry-keyd {node} lease"));
    handle.spawn(async move {
        tokio::select! {
            () = hold(&config, &tls, Timing::of(lease), &tx) => {}
            () = tx.closed() => {}
        }
    });
    leadership
}

async fn hold(
    config: &tokio_postgres::Config,
    tls: &MakeRustls,
    t: Timing,
    tx: &watch::Sender<Lease>,
) {
    loop {
        let ended = session(config, tls, t, tx).await;
        let was = matches!(*tx.borrow(), Lease::Leader(_));
        tx.send_replace(Lease::Follower);
        match was {
            true => {
                tracing::warn!(error = %ended, "lost the rotator's lease: timer rotations stop here")
            }
            false => tracing::debug!(error = %ended, "rotator's lease session ended"),
        }
        sleep(t.tick).await;
    }
}

/// One session: tries the lock, then keeps it, until the session fails; returns why.
async fn session(
    config: &tokio_postgres::Config,
    tls: &MakeRustls,
    t: Timing,
    tx: &watch::Sender<Lease>,
) -> Error {
    let (client, connection) = match answered(t, config.connect(tls.clone())).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    // The connection is driven here: its end (the server gone, the session terminated) is
    // seen at once, not at the next tick.
    tokio::select! {
        r = keep(&client, t, tx) => match r {
            Ok(never) => match never {},
            Err(e) => e,
        },
        r = connection => match r {
            Ok(()) => Error::unavailable(Code::StateUnavailable, "PostgreSQL closed the lease's session"),
            Err(e) => e.into(),
        },
    }
}

/// Tries the lock every tick until it is had, then proves the session every tick. Ends only
/// by an error.
async fn keep(client: &Client, t: Timing, tx: &watch::Sender<Lease>) -> Result<Infallible> {
    bound_session(client, t).await?;
    let mut leader = false;
    loop {
        let sent = Instant::now();
        if leader {
            answered(t, client.simple_query("SELECT 1")).await?;
        } else {
            let row = answered(
                t,
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]),
            )
            .await?;
            leader = row.try_get(0)?;
            if leader {
                tracing::info!("this node holds the rotator's lease: it runs timer rotations");
            }
        }
        if leader {
            // The server cannot have ended this session before then: it was busy with this
            // query until `sent` at least.
            tx.send_replace(Lease::Leader(Some(sent + t.idle)));
        }
        sleep(t.tick).await;
    }
}

/// A dead peer's session ends on the server within the idle timeout (PostgreSQL 14+), and
/// over TCP within about as long by keepalives (older servers).
async fn bound_session(client: &Client, t: Timing) -> Result<()> {
    let version: i32 = answered(
        t,
        client.query_one("SELECT current_setting('server_version_num')::int", &[]),
    )
    .await?
    .try_get(0)?;
    let secs = t.tick.as_secs().max(1);
    let ms = t.idle.as_millis().max(1);
    let mut set = format!(
        "SET tcp_keepalives_idle = {secs}; SET tcp_keepalives_interval = {secs}; SET tcp_keepalives_count = 2;"
    );
    if version >= 120_000 {
        set.push_str(&format!(" SET tcp_user_timeout = {ms};"));
    }
    if version >= 140_000 {
        set.push_str(&format!(" SET idle_session_timeout = {ms};"));
    }
    answered(t, client.batch_execute(&set)).await
}

/// `f`'s answer within `t.answer`, else an unavailable error.
async fn answered<T>(
    t: Timing,
    f: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    match timeout(t.answer, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::unavailable(
            Code::StateUnavailable,
            format!(
                "PostgreSQL did not answer the lease's session within {} ms",
                t.answer.as_millis()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanished_leader_is_replaced_within_the_lease() {
        let lease = Duration::from_secs(15);
        let t = Timing::of(lease);
        assert_eq!(
            t,
            Timing {
                tick: Duration::from_secs(3),
                answer: Duration::from_secs(6),
                idle: Duration::from_secs(9),
            }
        );
        // Ended by the server at the idle timeout after its last heartbeat, then found
        // free at a follower's next try.
        assert!(t.idle + t.tick < lease);
        // A leader's heartbeat that does not come back gives the lease up no later than
        // its claim lapses.
        assert!(t.tick + t.answer <= t.idle);
    }
}
