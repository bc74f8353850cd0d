//! The state in SQLite (WAL, synchronous FULL) under the state directory: the daemon's
//! [`Store`]. Each change is one immediate transaction on the one connection.

mod audit_log;
mod copy;
mod files;
mod keys;
mod schema;
mod totp;

use std::cell::Cell;
use std::fs::{self, File};
use std::ops::Deref;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior};

use super::{
    AuditSeal, AwsRefusal, StateCopy, Store, StoredAwsSeals, StoredKey, StoredTotp, StoredVersion,
    TotpLimits,
};
use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::{AuditEntry, AuditRecord, Reader};
use crate::domain::error::{Error, Result};
use crate::domain::{Code, KeyId};

pub use files::DB_FILE;

use files::{check_state_dir, lock_state, private_files};
use schema::migrate;

pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    // Held for the daemon's life: a second daemon on the same state refuses to start.
    _lock: Option<File>,
    /// Opened for reading only (`audit verify`): writes are refused before SQLite sees them.
    read_only: bool,
    /// Why the last write failed for a reason of the disk; `None` once a write succeeds.
    unavailable: Mutex<Option<String>>,
    /// MACs audit entries and keeps the HSM anchor (installed by the keyring).
    seal: Mutex<Option<Arc<dyn AuditSeal>>>,
}

/// The transaction a change runs in, with the seal for its audit entries; an append marks
/// it, so that the anchor is updated after the commit.
pub(super) struct Tx<'c> {
    tx: rusqlite::Transaction<'c>,
    seal: Option<Arc<dyn AuditSeal>>,
    appended: Cell<bool>,
}

impl<'c> Deref for Tx<'c> {
    type Target = rusqlite::Transaction<'c>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the state under `dir` for the daemon: takes the state lock.
    pub fn open(dir: &Path) -> anyhow::Result<SqliteStore> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("cannot create state directory {}: {e}", dir.display()))?;
        check_state_dir(dir)?;
        let lock = lock_state(dir)?;
        let path = dir.join(DB_FILE);
        private_files(&path)?;
        let conn = Connection::open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(SqliteStore::with(conn, path, Some(lock), false))
    }

    /// Opens the state under `dir` read-only (offline tools such as `audit verify`), beside a
    /// running daemon: no lock, no migrations; writes are refused.
    pub fn open_read_only(dir: &Path) -> anyhow::Result<SqliteStore> {
        let (conn, path) = files::open_read_only(dir)?;
        Ok(SqliteStore::with(conn, path, None, true))
    }

    fn with(conn: Connection, path: PathBuf, lock: Option<File>, read_only: bool) -> Self {
        SqliteStore {
            conn: Mutex::new(conn),
            path,
            _lock: lock,
            read_only,
            unavailable: Mutex::new(None),
            seal: Mutex::new(None),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one immediate transaction and commits it; a failure rolls everything
    /// back (the transaction is dropped), so nothing is half-written. Tracks whether the
    /// disk takes writes. After a commit that appended audit entries, and with the lock
    /// released, the seal updates the HSM anchor.
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        if self.read_only {
            // Not a fault of the disk: the state's health is left alone.
            return Err(Error::internal(
                "the state is open read-only here: this tool does not change it",
            ));
        }
        let seal = self.audit_seal();
        let (result, sealed_by) = {
            let mut conn = self.conn();
            let done = (|| {
                let tx = Tx {
                    tx: conn.transaction_with_behavior(TransactionBehavior::Immediate)?,
                    seal,
                    appended: Cell::new(false),
                };
                let out = f(&tx)?;
                let sealed_by = tx.seal.clone().filter(|_| tx.appended.get());
                tx.tx.commit()?;
                Ok((out, sealed_by))
            })();
            match done {
                Ok((out, sealed_by)) => (Ok(out), sealed_by),
                Err(e) => (Err(e), None),
            }
        };
        let mut health = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => {
                if health.take().is_some() {
                    tracing::info!("state database takes writes again");
                }
            }
            // Only the disk's faults: an HSM that cannot MAC an entry says so itself.
            Err(
                e @ Error::Unavailable {
                    code: Code::StateUnavailable,
                    ..
                },
            ) => *health = Some(e.to_string()),
            Err(_) => {}
        }
        drop(health);
        if let Some(seal) = sealed_by {
            seal.appended(self);
        }
        result
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction (rusqlite
        // rolls back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn audit_seal(&self) -> Option<Arc<dyn AuditSeal>> {
        self.seal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Store for SqliteStore {
    fn load_all(&self) -> Result<Vec<StoredKey>> {
        keys::load_all(&self.conn())
    }

    fn load_key(&self, id: &KeyId) -> Result<Option<StoredKey>> {
        keys::load_key(&self.conn(), id)
    }

    fn add_version(
        &self,
        id: &KeyId,
        rotation_period_days: Option<u32>,
        v: &StoredVersion,
        audit: &AuditEntry,
    ) -> Result<()> {
        self.write(|tx| {
            keys::add_version(tx, id, rotation_period_days, v)?;
            audit_log::append(tx, audit)
        })
    }

    fn set_rotation_period(&self, id: &KeyId, days: Option<u32>, audit: &AuditEntry) -> Result<()> {
        self.write(|tx| {
            keys::set_rotation_period(tx, id, days)?;
            audit_log::append(tx, audit)
        })
    }

    fn aws_seals(&self, id: &KeyId, version: u32) -> Result<Option<StoredAwsSeals>> {
        keys::aws_seals(&self.conn(), id, version)
    }

    fn set_aws_refusal(
        &self,
        id: &KeyId,
        version: u32,
        refusal: Option<&AwsRefusal>,
    ) -> Result<bool> {
        self.write(|tx| keys::set_aws_refusal(tx, id, version, refusal))
    }

    fn aws_refusals(&self) -> Result<Vec<(KeyId, u32, AwsRefusal)>> {
        keys::aws_refusals(&self.conn())
    }

    fn encryptions(&self, id: &KeyId, version: u32) -> Result<u64> {
        keys::encryptions(&self.conn(), id, version)
    }

    fn reserve_encryptions(&self, id: &KeyId, version: u32, n: u64) -> Result<u64> {
        self.write(|tx| keys::reserve_encryptions(tx, id, version, n))
    }

    fn settle_encryptions(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
        self.write(|tx| keys::settle_encryptions(tx, deltas))
    }

    fn totp_get(&self, uid: u32) -> Result<Option<StoredTotp>> {
        totp::get(&self.conn(), uid)
    }

    fn totp_count(&self) -> Result<u64> {
        totp::count(&self.conn())
    }

    fn totp_put(&self, uid: u32, t: &StoredTotp, created: i64, audit: &AuditEntry) -> Result<()> {
        self.write(|tx| {
            totp::put(tx, uid, t, created)?;
            audit_log::append(tx, audit)
        })
    }

    fn totp_delete(&self, uid: u32, audit: &AuditEntry) -> Result<bool> {
        self.write(|tx| {
            let had = totp::delete(tx, uid)?;
            audit_log::append(tx, audit)?;
            Ok(had)
        })
    }

    fn totp_locked_until(&self, uid: u32, now: i64) -> Result<Option<i64>> {
        totp::locked_until(&self.conn(), uid, now)
    }

    fn totp_attempt_begin(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<std::result::Result<(), i64>> {
        self.write(|tx| totp::attempt_begin(tx, uid, now, limits))
    }

    fn totp_attempt_failed(&self, uid: u32, now: i64, limits: TotpLimits) -> Result<Option<i64>> {
        self.write(|tx| totp::attempt_failed(tx, uid, now, limits))
    }

    fn totp_attempt_passed(&self, uid: u32, step: u64) -> Result<bool> {
        self.write(|tx| totp::attempt_passed(tx, uid, step))
    }

    fn totp_attempt_withdraw(&self, uid: u32) -> Result<()> {
        self.write(|tx| totp::withdraw_attempt(tx, uid))
    }

    fn set_audit_seal(&self, seal: Arc<dyn AuditSeal>) {
        *self.seal.lock().unwrap_or_else(|p| p.into_inner()) = Some(seal);
    }

    fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.write(|tx| audit_log::append(tx, entry))
    }

    fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        audit_log::read(&self.conn(), since, limit)
    }

    fn head(&self) -> Result<StateHead> {
        audit_log::head(&self.conn())
    }

    fn audit_hash_at(&self, seq: i64) -> Result<Option<String>> {
        audit_log::hash_at(&self.conn(), seq)
    }

    fn audit_has_macs(&self) -> Result<bool> {
        audit_log::has_macs(&self.conn())
    }

    fn export(&self) -> Result<StateCopy> {
        copy::export(&self.conn())
    }

    fn import(&self, state: &StateCopy, audit: Reader<'_>) -> Result<()> {
        self.write(|tx| copy::import(tx, state, audit))
    }

    /// This process holds the state lock: the anchor follows every change.
    fn anchored(&self) -> bool {
        true
    }

    fn exclusive(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        f()
    }

    /// The only node of this state (its lock excludes every other process).
    fn leadership(&self, _: std::time::Duration) -> super::Leadership {
        super::Leadership::single()
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite messages name tables and constraints, never values: safe to pass on.
        if state_unavailable(&e) {
            Error::unavailable(Code::StateUnavailable, format!("state database: {e}"))
        } else {
            Error::internal(format!("state database: {e}"))
        }
    }
}

/// Failures of the disk or of the database's access to it (full, I/O error, read-only,
/// locked): they pass when the disk does, so the caller should retry, not report a bug.
fn state_unavailable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | SystemIoFailure
                | ReadOnly
                | DatabaseBusy
                | DatabaseLocked
                | CannotOpen
                | OutOfMemory
                | FileLockingProtocolFailed
        )
    )
}
