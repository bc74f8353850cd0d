//! The audit log in the state: appending entries (chained and MACed) and reading them back,
//! and the head of the state that the HSM anchor records.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::Store;
use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{self, AuditEntry, AuditRecord};
use crate::domain::error::{Error, Result};

/// How audit entries are sealed: installed by the keyring, which holds the HSM (the store
/// does not know it).
pub trait AuditSeal: Send + Sync {
    /// The MAC (hex) of an entry's chain hash. Runs inside the appending transaction, so
    /// it must never wait on the state.
    fn mac(&self, hash: &str) -> Result<String>;
    /// After a transaction that appended entries committed, with the state's lock released.
    fn appended(&self, store: &Store);
}

impl Store {
    /// Seals every audit entry appended from now on.
    pub fn set_audit_seal(&self, seal: Arc<dyn AuditSeal>) {
        *self.seal.lock().unwrap_or_else(|p| p.into_inner()) = Some(seal);
    }

    pub(super) fn audit_seal(&self) -> Option<Arc<dyn AuditSeal>> {
        self.seal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Appends one audit entry in its own transaction (refusals, failures).
    pub fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.write(|tx| self.append_audit(tx, entry))
    }

    /// Audit entries with `seq > since`, oldest first, at most `limit`.
    pub fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        read_audit(&self.conn(), since, limit)
    }

    /// The newest audit entry and each key's last version, as the anchor records them.
    pub fn head(&self) -> Result<StateHead> {
        read_head(&self.conn())
    }

    /// The hash of the audit entry at `seq`, if there is one.
    pub fn audit_hash_at(&self, seq: i64) -> Result<Option<String>> {
        audit_hash_at(&self.conn(), seq)
    }

    /// Whether any audit entry carries a MAC.
    pub fn audit_has_macs(&self) -> Result<bool> {
        audit_has_macs(&self.conn())
    }

    /// Adds an entry chained to the last one and MACed; runs inside the caller's
    /// transaction. Refused when no seal is installed: an entry without a MAC after MACed
    /// ones would break the log.
    pub(super) fn append_audit(
        &self,
        tx: &rusqlite::Transaction<'_>,
        e: &AuditEntry,
    ) -> Result<()> {
        let seal = self.audit_seal().ok_or_else(|| {
            Error::internal(
                "audit entries are sealed by the HSM, which this process has not opened",
            )
        })?;
        let (last_seq, prev): (i64, String) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, audit::GENESIS.to_string()));
        let mut record = AuditRecord::chain(last_seq + 1, e.clone(), prev);
        record.mac = Some(seal.mac(&record.hash)?);
        tx.execute(
            "INSERT INTO audit (seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash, mac)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                record.seq,
                record.entry.time,
                record.entry.actor,
                record.entry.uid,
                record.entry.gid,
                record.entry.pid,
                record.entry.action,
                record.entry.environment,
                record.entry.country,
                record.entry.version,
                record.entry.outcome.as_str(),
                record.entry.detail,
                record.prev_hash,
                record.hash,
                record.mac,
            ],
        )?;
        self.appended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

pub fn read_audit(conn: &Connection, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
    let mut stmt = conn.prepare(
        "SELECT seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash, mac
         FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![since, limit as i64], |r| {
            Ok(AuditRecord {
                seq: r.get(0)?,
                entry: AuditEntry {
                    time: r.get(1)?,
                    actor: r.get(2)?,
                    uid: r.get(3)?,
                    gid: r.get(4)?,
                    pid: r.get(5)?,
                    action: r.get(6)?,
                    environment: r.get(7)?,
                    country: r.get(8)?,
                    version: r.get(9)?,
                    outcome: {
                        let text: String = r.get(10)?;
                        AuditOutcome::parse(&text).ok_or_else(|| {
                            rusqlite::Error::FromSqlConversionFailure(
                                10,
                                rusqlite::types::Type::Text,
                                format!("unknown audit outcome `{text}`").into(),
                            )
                        })?
                    },
                    detail: r.get(11)?,
                },
                prev_hash: r.get(12)?,
                hash: r.get(13)?,
                mac: r.get(14)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// The newest audit entry and each key's last version, read in one transaction.
pub fn read_head(conn: &Connection) -> Result<StateHead> {
    let tx = conn.unchecked_transaction()?;
    let (seq, hash) = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, audit::GENESIS.to_string()));
    let mut keys = BTreeMap::new();
    {
        let mut stmt = tx.prepare("SELECT environment, country, last_version FROM keys")?;
        let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        for row in rows {
            let (id, v): ((String, String), u32) = row?;
            keys.insert(id, v);
        }
    }
    tx.finish()?;
    Ok(StateHead { seq, hash, keys })
}

pub fn audit_hash_at(conn: &Connection, seq: i64) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
        .optional()?)
}

pub fn audit_has_macs(conn: &Connection) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM audit WHERE mac IS NOT NULL LIMIT 1",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// A seal for unit tests of the state: a fixed MAC, no anchor.
#[cfg(test)]
pub struct TestSeal;

#[cfg(test)]
impl AuditSeal for TestSeal {
    fn mac(&self, _: &str) -> Result<String> {
        Ok("00".repeat(crate::domain::audit::MAC_LEN))
    }
    fn appended(&self, _: &Store) {}
}

/// Entries of a read-only connection, for `audit::walk`.
pub fn reader(conn: &Connection) -> impl FnMut(i64, usize) -> Result<Vec<AuditRecord>> + '_ {
    move |since, limit| read_audit(conn, since, limit)
}
