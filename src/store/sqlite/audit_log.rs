//! The audit log in SQLite: appending entries (chained and MACed) and reading them back,
//! and the head of the state that the HSM anchor records.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::Tx;
use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{self, AuditEntry, AuditRecord};
use crate::domain::error::{Error, Result};

/// Adds an entry chained to the last one and MACed, inside the caller's transaction (whose
/// write lock keeps the chain's head where it was read). Refused when no seal is
/// installed: an entry without a MAC after MACed ones would break the log.
pub(super) fn append(tx: &Tx<'_>, e: &AuditEntry) -> Result<()> {
    let seal = tx.seal.as_ref().ok_or_else(|| {
        Error::internal("audit entries are sealed by the HSM, which this process has not opened")
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
    insert(tx, &record)?;
    tx.appended.set(true);
    Ok(())
}

/// Writes a record as it is (appends, and copies of another state's log).
pub(super) fn insert(tx: &Tx<'_>, record: &AuditRecord) -> Result<()> {
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
    Ok(())
}

pub(super) fn read(conn: &Connection, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
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
pub(super) fn head(conn: &Connection) -> Result<StateHead> {
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

pub(super) fn hash_at(conn: &Connection, seq: i64) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
        .optional()?)
}

pub(super) fn has_macs(conn: &Connection) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM audit WHERE mac IS NOT NULL LIMIT 1",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
