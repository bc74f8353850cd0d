//! A few connections to PostgreSQL, made when first needed and replaced when lost; each
//! caller takes one for a whole operation (a change is one transaction on one connection).
//! Small on purpose: Border's reads never reach the database, only changes, TOTP checks and
//! encryption-count reservations do.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_postgres::{Client, Connection, Socket};

use super::tls::{MakeRustls, RustlsStream};
use crate::domain::error::{Error, Result};
use crate::domain::Code;

/// Connections at most per store.
const MAX_CONNECTIONS: usize = 4;
/// How long one operation (waiting for a connection, connecting, its transaction) may take
/// before it fails as unavailable: past the server's lock timeout, within a client's
/// patience.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) struct Pool {
    config: tokio_postgres::Config,
    tls: MakeRustls,
    handle: Handle,
    slots: Mutex<Slots>,
    freed: Condvar,
}

struct Slots {
    idle: Vec<Client>,
    /// Leases handed out and not yet back.
    out: usize,
}

/// One connection for one operation; back to the pool on drop, unless discarded.
pub(super) struct Lease<'p> {
    pool: &'p Pool,
    client: Option<Client>,
    keep: bool,
}

impl Pool {
    pub(super) fn new(config: tokio_postgres::Config, tls: MakeRustls, handle: Handle) -> Pool {
        Pool {
            config,
            tls,
            handle,
            slots: Mutex::new(Slots {
                idle: Vec::new(),
                out: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // The guarded data is a list and a count, consistent at every unlock.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the pool connects with (a session of another use connects alike).
    pub(super) fn target(&self) -> (&tokio_postgres::Config, &MakeRustls) {
        (&self.config, &self.tls)
    }

    /// A connection (possibly not made yet), waiting while all are in use. Blocking.
    pub(super) fn take(&self) -> Result<Lease<'_>> {
        let deadline = Instant::now() + OP_TIMEOUT;
        let mut slots = self.slots();
        while slots.idle.is_empty() && slots.out >= MAX_CONNECTIONS {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::unavailable(
                    Code::StateUnavailable,
                    format!(
                        "PostgreSQL: all {MAX_CONNECTIONS} connections stayed busy for {} s",
                        OP_TIMEOUT.as_secs()
                    ),
                ));
            }
            slots = self
                .freed
                .wait_timeout(slots, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        slots.out += 1;
        let client = slots.idle.pop();
        Ok(Lease {
            pool: self,
            client,
            keep: true,
        })
    }

    async fn connect(&self) -> Result<Client> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        // The connection's socket is driven on the store's runtime, whatever thread waits.
        self.handle.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

/// Makes connections outside the pool (the change listener's own).
#[derive(Clone)]
pub(super) struct Dialer {
    config: tokio_postgres::Config,
    tls: MakeRustls,
}

impl Dialer {
    /// A new connection; the caller drives it.
    pub(super) async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, RustlsStream<Socket>>)> {
        Ok(self.config.connect(self.tls.clone()).await?)
    }
}

impl Pool {
    /// The change listener's: its sessions show as `… listener` in `pg_stat_activity`.
    pub(super) fn dialer(&self) -> Dialer {
        let mut config = self.config.clone();
        let name = format!(
            "{} listener",
            config.get_application_name().unwrap_or("incountry-keyd")
        );
        config.application_name(name);
        Dialer {
            config,
            tls: self.tls.clone(),
        }
    }
}

impl Lease<'_> {
    /// The connection, made (or made again, when the last one was lost) if needed.
    pub(super) async fn client(&mut self) -> Result<&mut Client> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.pool.connect().await?,
        };
        Ok(self.client.insert(client))
    }

    /// The connection is in doubt (an operation on it failed or timed out): close it rather
    /// than hand it to the next caller.
    pub(super) fn discard(&mut self) {
        self.keep = false;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let client = self.client.take().filter(|c| self.keep && !c.is_closed());
        let mut slots = self.pool.slots();
        slots.out -= 1;
        slots.idle.extend(client);
        drop(slots);
        self.pool.freed.notify_one();
    }
}
