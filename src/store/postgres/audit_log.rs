//! The audit log in PostgreSQL: appending entries (chained and MACed) under a lock on the
//! chain's head row, so that entries from every node form one chain; reading them back;
//! the head of the state.

use std::collections::BTreeMap;

use tokio_postgres::{GenericClient, Row};

use super::{col, Tx};
use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::{AuditEntry, AuditOutcome, AuditRecord};
use crate::domain::error::{Error, Result};

/// Adds an entry chained to the last one and MACed, inside the caller's transaction. The
/// head row stays locked until the transaction ends, so another node's append waits and
/// then reads the head this one wrote. Taken last in every change, after the key's or
/// uid's rows, so that two changes never wait on each other in opposite orders. Refused
/// when no seal is installed.
pub(super) async fn append(tx: &Tx<'_>, e: &AuditEntry) -> Result<()> {
    let seal = tx.seal.as_ref().ok_or_else(|| {
        Error::internal("audit entries are sealed by the HSM, which this process has not opened")
    })?;
    let head = tx
        .query_opt("SELECT seq, hash FROM audit_head WHERE one FOR UPDATE", &[])
        .await?
        .ok_or_else(|| Error::integrity("the audit log's head row is missing from the state"))?;
    let (last_seq, prev): (i64, String) = (col(&head, 0)?, col(&head, 1)?);
    let mut record = AuditRecord::chain(last_seq + 1, e.clone(), prev);
    // In the HSM, while the head is locked: other nodes' appends wait this long.
    let mac = seal.mac(&record.hash)?;
    record.mac = Some(mac.clone());
    let entry = &record.entry;
    tx.execute(
        "INSERT INTO audit (seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash, mac)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &record.seq,
            &entry.time,
            &entry.actor,
            &entry.uid.map(i64::from),
            &entry.gid.map(i64::from),
            &entry.pid,
            &entry.action,
            &entry.environment,
            &entry.country,
            &entry.version.map(i64::from),
            &entry.outcome.as_str(),
            &entry.detail,
            &record.prev_hash,
            &record.hash,
            &mac,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE audit_head SET seq = $1, hash = $2 WHERE one",
        &[&record.seq, &record.hash],
    )
    .await?;
    tx.appended.set(true);
    Ok(())
}

pub(super) async fn read(
    c: &impl GenericClient,
    since: i64,
    limit: usize,
) -> Result<Vec<AuditRecord>> {
    let rows = c
        .query(
            "SELECT seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash, mac
             FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&since, &i64::try_from(limit).unwrap_or(i64::MAX)],
        )
        .await?;
    rows.iter().map(record).collect()
}

fn record(r: &Row) -> Result<AuditRecord> {
    let seq: i64 = col(r, 0)?;
    let narrow = |n: Option<i64>| {
        n.map(u32::try_from)
            .transpose()
            .map_err(|_| Error::integrity(format!("audit entry {seq}: a number out of range")))
    };
    let outcome: String = col(r, 10)?;
    Ok(AuditRecord {
        seq,
        entry: AuditEntry {
            time: col(r, 1)?,
            actor: col(r, 2)?,
            uid: narrow(col(r, 3)?)?,
            gid: narrow(col(r, 4)?)?,
            pid: col(r, 5)?,
            action: col(r, 6)?,
            environment: col(r, 7)?,
            country: col(r, 8)?,
            version: narrow(col(r, 9)?)?,
            outcome: AuditOutcome::parse(&outcome).ok_or_else(|| {
                Error::integrity(format!("audit entry {seq}: unknown outcome `{outcome}`"))
            })?,
            detail: col(r, 11)?,
        },
        prev_hash: col(r, 12)?,
        hash: col(r, 13)?,
        mac: col(r, 14)?,
    })
}

/// The newest audit entry and each key's last version. Called in a repeatable-read
/// transaction: both as of one moment.
pub(super) async fn head(c: &impl GenericClient) -> Result<StateHead> {
    let row = c
        .query_opt("SELECT seq, hash FROM audit_head WHERE one", &[])
        .await?
        .ok_or_else(|| Error::integrity("the audit log's head row is missing from the state"))?;
    let (seq, hash) = (col(&row, 0)?, col(&row, 1)?);
    let mut keys = BTreeMap::new();
    for row in c
        .query("SELECT environment, country, last_version FROM keys", &[])
        .await?
    {
        let last: i64 = col(&row, 2)?;
        let last = u32::try_from(last)
            .map_err(|_| Error::integrity(format!("version number {last} in state")))?;
        keys.insert((col(&row, 0)?, col(&row, 1)?), last);
    }
    Ok(StateHead { seq, hash, keys })
}

pub(super) async fn hash_at(c: &impl GenericClient, seq: i64) -> Result<Option<String>> {
    c.query_opt("SELECT hash FROM audit WHERE seq = $1", &[&seq])
        .await?
        .map(|r| col(&r, 0))
        .transpose()
}

/// Every entry here carries a MAC (the column is NOT NULL): whether there is any.
pub(super) async fn has_macs(c: &impl GenericClient) -> Result<bool> {
    Ok(c.query_opt("SELECT 1 FROM audit LIMIT 1", &[])
        .await?
        .is_some())
}
