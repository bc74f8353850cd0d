//! The state in PostgreSQL (`state.backend = "postgres"`): several nodes share one key set.
//! Same invariants as SQLite, enforced by PostgreSQL: each change is one transaction with
//! its audit entry; row locks order what nodes do at once (a key's row for its versions,
//! the chain's head row for audit entries, a uid's attempts row for TOTP).
//!
//! The `Store` trait is synchronous: the store runs its own small tokio runtime (one
//! worker thread, which drives the connections) and its callers' threads wait on each
//! operation (`block::block_on`), bounded by `pool::OP_TIMEOUT`.

mod audit_log;
mod block;
mod copy;
mod keys;
mod lease;
mod listen;
mod pool;
mod schema;
mod store_impl;
mod tls;
mod totp;

use std::cell::Cell;
use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::runtime::{Handle, Runtime};
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, IsolationLevel, Row, Transaction};
use zeroize::Zeroizing;

use super::AuditSeal;
use crate::config::{Config, PostgresTarget};
use crate::domain::error::{Error, Result};
use crate::domain::Code;
use block::block_on;
use pool::{Lease, Pool, OP_TIMEOUT};

/// The channel every committed change to a key is notified on, with `ENV/COUNTRY` and the
/// time it was sent (Unix ms, by the database's clock), space-separated.
pub const CHANGES_CHANNEL: &str = "keyd_changes";
/// `pg_advisory_lock` key of `Store::exclusive` ("keyd", then 2).
const EXCLUSIVE_LOCK: i64 = 0x6b65_7964_0000_0002;

/// What a store connects with: the target from `[postgres]`, the password (read when the
/// config is, so that offline tools read it before they drop root) and the node's name.
pub struct PgConnect {
    target: PostgresTarget,
    password: Option<Zeroizing<String>>,
    node: String,
}

impl PgConnect {
    pub fn from_config(config: &Config) -> anyhow::Result<PgConnect> {
        let target = config.postgres.target()?;
        let password = match config.postgres.password_path()? {
            Some(path) => Some(read_password(&path)?),
            None => None,
        };
        Ok(PgConnect {
            target,
            password,
            node: config.cluster.node_name()?,
        })
    }
}

/// Reads the PostgreSQL password from its file; refuses a file others can read. The
/// password itself is never in an error.
fn read_password(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    crate::config::check_not_writable_by_others(path, "PostgreSQL password file")?;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read PostgreSQL password file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        anyhow::bail!(
            "PostgreSQL password file {} is accessible to others (mode {mode:04o}); chmod 0600 it",
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read PostgreSQL password file {}", path.display()))?,
    );
    let password = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if password.is_empty() {
        anyhow::bail!("PostgreSQL password file {} is empty", path.display());
    }
    Ok(password)
}

pub struct PgStore {
    pool: Pool,
    handle: Handle,
    /// Opened for reading only (`audit verify`): writes are refused before PostgreSQL
    /// sees them (and its sessions are read-only too).
    read_only: bool,
    /// Why the last operation failed for a reason of the database or the way to it (lost
    /// connection, shutdown, timeout); `None` once one succeeds.
    unavailable: Mutex<Option<String>>,
    /// Why the change listener (`Store::follow`) is not following, while it is not.
    following: listen::Down,
    seal: Mutex<Option<Arc<dyn AuditSeal>>>,
    /// This node's name (`cluster.node_name`): sessions and the rotator's lease carry it.
    node: String,
    /// Last: shut down after the pool's connections are dropped.
    runtime: Option<Runtime>,
}

/// The transaction a change runs in, with the seal for its audit entries.
pub(super) struct Tx<'c> {
    tx: Transaction<'c>,
    seal: Option<Arc<dyn AuditSeal>>,
    appended: Cell<bool>,
}

impl<'c> Deref for Tx<'c> {
    type Target = Transaction<'c>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

/// A column of a row, or an error (never a panic) when its type is not the expected one.
fn col<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    Ok(row.try_get(i)?)
}

fn timed_out() -> Error {
    timed_out_after(OP_TIMEOUT)
}

fn timed_out_after(limit: Duration) -> Error {
    Error::unavailable(
        Code::StateUnavailable,
        format!("PostgreSQL did not answer within {} s", limit.as_secs()),
    )
}

fn is_unavailable<T>(r: &Result<T>) -> bool {
    matches!(
        r,
        Err(Error::Unavailable {
            code: Code::StateUnavailable,
            ..
        })
    )
}

impl PgStore {
    /// Connects for the daemon or an offline admin tool and brings the schema up to date.
    pub fn open(connect: PgConnect) -> anyhow::Result<PgStore> {
        Self::start(connect, false)
    }

    /// Connects read-only (`audit verify`): no migrations, every write refused.
    pub fn open_read_only(connect: PgConnect) -> anyhow::Result<PgStore> {
        Self::start(connect, true)
    }

    fn start(c: PgConnect, read_only: bool) -> anyhow::Result<PgStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("keyd-postgres")
            .enable_all()
            .build()
            .context("cannot start the PostgreSQL client's runtime")?;
        let mut config = c.target.config;
        if let Some(password) = &c.password {
            config.password(password.as_bytes());
        }
        config.application_name(format!("incountry-keyd {}", c.node));
        // Server-side bounds: a lock waited on (another node's change) and a transaction
        // left open by a node that vanished end, rather than hold the others up.
        let mut ours = "-c lock_timeout=10s -c idle_in_transaction_session_timeout=30s".to_string();
        if read_only {
            ours.push_str(" -c default_transaction_read_only=on");
        }
        let options = match config.get_options() {
            Some(given) => format!("{given} {ours}"),
            None => ours,
        };
        config.options(options);
        let tls = tls::MakeRustls::new(c.target.ca_file.as_deref())?;
        let handle = runtime.handle().clone();
        let store = PgStore {
            pool: Pool::new(config, tls, handle.clone()),
            handle,
            read_only,
            unavailable: Mutex::new(None),
            following: Arc::default(),
            seal: Mutex::new(None),
            node: c.node.clone(),
            runtime: Some(runtime),
        };
        let mut lease = store.pool.take()?;
        let ready: anyhow::Result<()> = block_on(&store.handle, async {
            let done = tokio::time::timeout(OP_TIMEOUT, async {
                let client = lease.client().await?;
                match read_only {
                    true => schema::check(client).await,
                    false => schema::migrate(client).await,
                }
            })
            .await;
            done.unwrap_or_else(|_| Err(timed_out().into()))
        });
        drop(lease);
        // Without the state there are no keys to serve (a node keeps no copy of its own):
        // the daemon does not start, and systemd starts it again.
        ready.context("cannot open the PostgreSQL state (postgres.url): is PostgreSQL up and reachable from this host?")?;
        Ok(store)
    }

    /// Runs `f` on a leased connection within `OP_TIMEOUT`; a connection an operation
    /// failed on for a reason of the database is closed. Tracks whether the database
    /// answers.
    fn run<T>(&self, f: impl AsyncFnOnce(&mut Client) -> Result<T>) -> Result<T> {
        self.run_within(OP_TIMEOUT, f)
    }

    /// `run`, bounded by `limit` instead (a whole state copied in one transaction).
    fn run_within<T>(
        &self,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Client) -> Result<T>,
    ) -> Result<T> {
        let result = self.pool.take().and_then(|mut lease| {
            let out = self.on_within(&mut lease, limit, f);
            if is_unavailable(&out) {
                lease.discard();
            }
            out
        });
        self.note(&result);
        result
    }

    fn on<T>(
        &self,
        lease: &mut Lease<'_>,
        f: impl AsyncFnOnce(&mut Client) -> Result<T>,
    ) -> Result<T> {
        self.on_within(lease, OP_TIMEOUT, f)
    }

    /// `on`, bounded by `limit`.
    fn on_within<T>(
        &self,
        lease: &mut Lease<'_>,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Client) -> Result<T>,
    ) -> Result<T> {
        block_on(&self.handle, async {
            tokio::time::timeout(limit, async {
                let client = lease.client().await?;
                f(client).await
            })
            .await
            .unwrap_or_else(|_| Err(timed_out_after(limit)))
        })
    }

    fn note<T>(&self, result: &Result<T>) {
        let mut health = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => {
                if health.take().is_some() {
                    tracing::info!("PostgreSQL answers again");
                }
            }
            Err(e) if is_unavailable(result) => {
                if health.is_none() {
                    tracing::warn!(error = %e, "PostgreSQL unavailable: changes are refused until it answers again");
                }
                *health = Some(e.to_string());
            }
            Err(_) => {}
        }
    }

    /// Reads as of one moment (a repeatable-read, read-only transaction).
    fn snapshot<T>(&self, f: impl AsyncFnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.run(async move |client| {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let out = f(&tx).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Runs `f` in one transaction and commits it; a failure rolls everything back. After
    /// a commit that appended audit entries, the seal is told (with the connection back in
    /// the pool).
    fn write<T>(&self, f: impl AsyncFnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.write_within(OP_TIMEOUT, f)
    }

    /// `write`, bounded by `limit`.
    fn write_within<T>(
        &self,
        limit: Duration,
        f: impl AsyncFnOnce(&Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        if self.read_only {
            return Err(Error::internal(
                "the state is open read-only here: this tool does not change it",
            ));
        }
        let seal = self.audit_seal();
        let (out, sealed_by) = self.run_within(limit, async move |client| {
            let tx = Tx {
                tx: client.transaction().await?,
                seal,
                appended: Cell::new(false),
            };
            let out = f(&tx).await?;
            let sealed_by = tx.seal.clone().filter(|_| tx.appended.get());
            tx.tx.commit().await?;
            Ok((out, sealed_by))
        })?;
        if let Some(seal) = sealed_by {
            seal.appended(self);
        }
        Ok(out)
    }

    fn audit_seal(&self) -> Option<Arc<dyn AuditSeal>> {
        self.seal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Without waiting: the last handle may be dropped on an async runtime's thread,
        // where a blocking shutdown panics. The connections are closed by then.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            // The message and code only: a DETAIL can quote a row's values.
            let text = format!("PostgreSQL: {} ({})", db.message(), db.code().code());
            return match transient(db.code().code()) {
                true => Error::unavailable(Code::StateUnavailable, text),
                false => Error::internal(text),
            };
        }
        let source = std::error::Error::source(&e);
        let text = match source {
            Some(s) => format!("PostgreSQL: {e}: {s}"),
            None => format!("PostgreSQL: {e}"),
        };
        // The connection (closed, I/O, TLS, connect timeout), not the request: retry.
        let io = source.is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string() == "timeout waiting for server" {
            Error::unavailable(Code::StateUnavailable, text)
        } else {
            Error::internal(text)
        }
    }
}

/// SQLSTATEs that pass with time: connection exceptions (08), insufficient resources (53),
/// operator intervention such as a shutdown or a cancelled statement (57), system errors
/// (58), serialization failures and deadlocks (40001, 40P01), a lock not had in time
/// (55P03), a read-only server (25006: a standby after a failover).
fn transient(code: &str) -> bool {
    ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
        || matches!(code, "40001" | "40P01" | "55P03" | "25006")
}

#[cfg(test)]
mod tests {
    #[test]
    fn transient_codes() {
        for c in [
            "08006", "57P01", "57014", "40001", "55P03", "25006", "53300",
        ] {
            assert!(super::transient(c), "{c}");
        }
        for c in ["23505", "42P01", "28P01", "22P02"] {
            assert!(!super::transient(c), "{c}");
        }
    }
}
