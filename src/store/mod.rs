//! Durable state in SQLite (WAL, synchronous FULL): keys, their versions in wrapped form only,
//! settings, and the schema version. Each change is one transaction.

mod audit_log;
mod files;
mod keys;
mod schema;
#[cfg(test)]
mod tests;
mod totp;

use crate::domain::Code;
use std::fs::{self, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior};

use crate::domain::error::{Error, Result};

#[cfg(test)]
pub use audit_log::TestSeal;
pub use audit_log::{audit_has_macs, audit_hash_at, read_audit, read_head, reader, AuditSeal};
pub use files::{open_read_only, DB_FILE};
pub use keys::{SealedCheck, StoredAws, StoredAwsSeals, StoredKey, StoredVersion};
pub use totp::{StoredTotp, TotpLimits};

use files::{check_state_dir, lock_state, private_files};
use schema::migrate;

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    // Held for the daemon's life: a second daemon on the same state refuses to start.
    _lock: Option<File>,
    /// Why the last write failed for a reason of the disk; `None` once a write succeeds.
    unavailable: Mutex<Option<String>>,
    /// MACs audit entries and keeps the HSM anchor (installed by the keyring).
    seal: Mutex<Option<Arc<dyn AuditSeal>>>,
    /// Set by an append inside the transaction under way (read and reset under the
    /// connection's lock).
    appended: AtomicBool,
}

impl Store {
    /// Opens (creating if needed) the state under `dir` for the daemon: takes the state lock.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
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
        Ok(Store {
            conn: Mutex::new(conn),
            path,
            _lock: Some(lock),
            unavailable: Mutex::new(None),
            seal: Mutex::new(None),
            appended: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Some(reason)` while writes fail for a reason of the disk (full, I/O error,
    /// read-only); clears at the next write that succeeds.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `f` in one immediate transaction and commits it; a failure rolls everything
    /// back (the transaction is dropped), so nothing is half-written. Tracks whether the
    /// disk takes writes. After a commit that appended audit entries, and with the lock
    /// released, the seal updates the HSM anchor.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let (result, appended) = {
            let mut conn = self.conn();
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })();
            // Read and reset under the lock: the flag is this transaction's alone.
            let appended = self.appended.swap(false, Ordering::SeqCst);
            (result, appended)
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
        if appended && result.is_ok() {
            if let Some(seal) = self.audit_seal() {
                seal.appended(self);
            }
        }
        result
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction (rusqlite
        // rolls back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
pub fn state_unavailable(e: &rusqlite::Error) -> bool {
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
