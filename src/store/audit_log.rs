//! The hash-chained audit log in the state: appending entries and reading them back.

use rusqlite::{params, Connection, OptionalExtension};

use super::Store;
use crate::audit::{self, AuditEntry, AuditRecord};
use crate::error::Result;

impl Store {
    /// Appends one audit entry in its own transaction (refusals, failures).
    pub fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.write(|tx| append_audit(tx, entry))
    }

    /// Audit entries with `seq > since`, oldest first, at most `limit`.
    pub fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        read_audit(&self.conn(), since, limit)
    }
}

/// Adds an entry chained to the last one; runs inside the caller's transaction.
pub(super) fn append_audit(tx: &rusqlite::Transaction<'_>, e: &AuditEntry) -> Result<()> {
    let (last_seq, prev): (i64, String) = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, audit::GENESIS.to_string()));
    let record = AuditRecord::chain(last_seq + 1, e.clone(), prev);
    tx.execute(
        "INSERT INTO audit (seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
            record.entry.outcome,
            record.entry.detail,
            record.prev_hash,
            record.hash
        ],
    )?;
    Ok(())
}

pub fn read_audit(conn: &Connection, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
    let mut stmt = conn.prepare(
        "SELECT seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash
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
                    outcome: r.get(10)?,
                    detail: r.get(11)?,
                },
                prev_hash: r.get(12)?,
                hash: r.get(13)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
