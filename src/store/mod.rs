//! Durable state in SQLite (WAL, synchronous FULL): keys, their versions in wrapped form only,
//! settings, and the schema version. Each change is one transaction.

mod audit_log;
mod files;
mod keys;
mod schema;
#[cfg(test)]
mod tests;
mod totp;

use std::fs::{self, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{Error, Result};

pub use audit_log::read_audit;
pub use files::{open_read_only, DB_FILE};
pub use keys::{
    Origin, SealedCheck, StoredAws, StoredAwsSeals, StoredKey, StoredVersion, VersionType,
};
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
    /// disk takes writes.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let result = (|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        let mut health = self.unavailable.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(_) => {
                if health.take().is_some() {
                    tracing::info!("state database takes writes again");
                }
            }
            Err(e @ Error::Unavailable { .. }) => *health = Some(e.to_string()),
            Err(_) => {}
        }
        result
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction (rusqlite
        // rolls back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}
