//! The whole state in and out of PostgreSQL, as stored (`state migrate`): `export` reads it
//! in one repeatable-read transaction, `import` writes it into an empty state in one
//! transaction (audit records a page per statement), then notifies every key.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::keys::{self, notify, number};
use super::{col, Tx};
use crate::domain::audit::{AuditRecord, Reader};
use crate::domain::error::{Error, Result};
use crate::domain::{Code, KeyId};
use crate::store::{CopiedAttempts, CopiedTotp, StateCopy, StoredKey, StoredTotp};

/// Audit records read and written per page (one statement each).
const PAGE: usize = 1000;

pub(super) async fn export(c: &impl GenericClient) -> Result<StateCopy> {
    let keys = keys::load_all(c).await?;
    let mut encryptions = Vec::new();
    for row in c
        .query(
            "SELECT k.environment, k.country, v.version, v.encryptions FROM versions v
             JOIN keys k ON k.id = v.key_id ORDER BY k.environment, k.country, v.version",
            &[],
        )
        .await?
    {
        let id = key_id(&col::<String>(&row, 0)?, &col::<String>(&row, 1)?)?;
        let version = number(&id, col(&row, 2)?)?;
        encryptions.push((id, version, col::<i64>(&row, 3)?.max(0) as u64));
    }
    let mut totp = Vec::new();
    for row in c
        .query(
            "SELECT uid, iv, sealed, created, last_step FROM totp ORDER BY uid",
            &[],
        )
        .await?
    {
        let uid = uid(col(&row, 0)?)?;
        let iv: Vec<u8> = col(&row, 1)?;
        totp.push(CopiedTotp {
            uid,
            secret: StoredTotp {
                iv: iv.as_slice().try_into().map_err(|_| {
                    Error::integrity(format!("TOTP row of uid {uid}: bad IV length"))
                })?,
                sealed: col(&row, 2)?,
                last_step: col::<i64>(&row, 4)?.max(0) as u64,
            },
            created: col(&row, 3)?,
        });
    }
    let mut attempts = Vec::new();
    for row in c
        .query(
            "SELECT uid, failures, window_start, locked_until FROM totp_attempts ORDER BY uid",
            &[],
        )
        .await?
    {
        attempts.push(CopiedAttempts {
            uid: uid(col(&row, 0)?)?,
            failures: col(&row, 1)?,
            window_start: col(&row, 2)?,
            locked_until: col(&row, 3)?,
        });
    }
    Ok(StateCopy {
        keys,
        encryptions,
        totp,
        attempts,
    })
}

fn key_id(env: &str, country: &str) -> Result<KeyId> {
    KeyId::parse(env, country)
        .map_err(|_| Error::integrity(format!("invalid key name {env}/{country} in state")))
}

fn uid(n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::integrity(format!("uid {n} in state")))
}

pub(super) async fn import(tx: &Tx<'_>, copy: &StateCopy, audit: Reader<'_>) -> Result<()> {
    // Two copies at once: the second waits here, then finds the state not empty.
    tx.execute("SELECT 1 FROM audit_head WHERE one FOR UPDATE", &[])
        .await?;
    let row = tx
        .query_one(
            "SELECT (SELECT COUNT(*) FROM keys) + (SELECT COUNT(*) FROM totp)
                  + (SELECT COUNT(*) FROM totp_attempts) + (SELECT COUNT(*) FROM audit)
                  + (SELECT COUNT(*) FROM audit_head WHERE seq <> 0)",
            &[],
        )
        .await?;
    if col::<i64>(&row, 0)? > 0 {
        return Err(Error::conflict(
            Code::VersionConflict,
            "the target state is not empty: nothing was copied",
        ));
    }
    let mut rowids = HashMap::new();
    for key in &copy.keys {
        rowids.insert(key.id.clone(), insert_key(tx, key).await?);
    }
    for (id, version, n) in &copy.encryptions {
        let Some(rowid) = rowids.get(id) else {
            continue;
        };
        tx.execute(
            "UPDATE versions SET encryptions = $3 WHERE key_id = $1 AND version = $2",
            &[
                rowid,
                &i64::from(*version),
                &i64::try_from(*n).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    }
    for t in &copy.totp {
        tx.execute(
            "INSERT INTO totp (uid, iv, sealed, created, last_step) VALUES ($1, $2, $3, $4, $5)",
            &[
                &i64::from(t.uid),
                &&t.secret.iv[..],
                &t.secret.sealed,
                &t.created,
                &i64::try_from(t.secret.last_step).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    }
    for a in &copy.attempts {
        tx.execute(
            "INSERT INTO totp_attempts (uid, failures, window_start, locked_until) VALUES ($1, $2, $3, $4)",
            &[&i64::from(a.uid), &a.failures, &a.window_start, &a.locked_until],
        )
        .await?;
    }
    let mut since = 0;
    let mut head = None;
    loop {
        let page = audit(since, PAGE)?;
        let Some(last) = page.last() else {
            break;
        };
        since = last.seq;
        head = Some((last.seq, last.hash.clone()));
        insert_audit(tx, &page).await?;
    }
    if let Some((seq, hash)) = head {
        tx.execute(
            "UPDATE audit_head SET seq = $1, hash = $2 WHERE one",
            &[&seq, &hash],
        )
        .await?;
    }
    // Nodes already running on this database load the keys.
    for key in &copy.keys {
        notify(tx, &key.id).await?;
    }
    Ok(())
}

/// A key row and every version, as they were stored; the key's row id.
async fn insert_key(tx: &Tx<'_>, key: &StoredKey) -> Result<i64> {
    let last = key.versions.last().map_or(0, |v| v.version);
    let row = tx
        .query_one(
            "INSERT INTO keys (environment, country, rotation_period_days, created, last_version)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &key.id.env,
                &key.id.country,
                &key.rotation_period_days.map(i64::from),
                &key.created,
                &i64::from(last),
            ],
        )
        .await?;
    let rowid: i64 = col(&row, 0)?;
    for v in &key.versions {
        keys::insert_version(tx, rowid, v).await?;
    }
    Ok(rowid)
}

/// One page of audit records in one statement, as they are. Every entry here carries a
/// MAC (the column is NOT NULL): a record without one is refused.
async fn insert_audit(tx: &Tx<'_>, page: &[AuditRecord]) -> Result<()> {
    let mut macs = Vec::with_capacity(page.len());
    for r in page {
        let mac = r.mac.clone().ok_or_else(|| {
            Error::integrity(format!(
                "audit entry {} has no MAC: a PostgreSQL state holds MACed entries only",
                r.seq
            ))
        })?;
        macs.push(mac);
    }
    let column = |f: &dyn Fn(&AuditRecord) -> Option<i64>| page.iter().map(f).collect::<Vec<_>>();
    let text = |f: &dyn Fn(&AuditRecord) -> String| page.iter().map(f).collect::<Vec<_>>();
    let maybe = |f: &dyn Fn(&AuditRecord) -> Option<String>| page.iter().map(f).collect::<Vec<_>>();
    let seq = column(&|r| Some(r.seq));
    let time = column(&|r| Some(r.entry.time));
    let uid = column(&|r| r.entry.uid.map(i64::from));
    let gid = column(&|r| r.entry.gid.map(i64::from));
    let pid: Vec<Option<i32>> = page.iter().map(|r| r.entry.pid).collect();
    let version = column(&|r| r.entry.version.map(i64::from));
    let actor = text(&|r| r.entry.actor.clone());
    let action = text(&|r| r.entry.action.clone());
    let environment = maybe(&|r| r.entry.environment.clone());
    let country = maybe(&|r| r.entry.country.clone());
    let outcome = text(&|r| r.entry.outcome.as_str().to_string());
    let detail = text(&|r| r.entry.detail.clone());
    let prev_hash = text(&|r| r.prev_hash.clone());
    let hash = text(&|r| r.hash.clone());
    tx.execute(
        "INSERT INTO audit (seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail, prev_hash, hash, mac)
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::integer[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[])",
        &[
            &seq, &time, &actor, &uid, &gid, &pid, &action, &environment, &country, &version,
            &outcome, &detail, &prev_hash, &hash, &macs,
        ],
    )
    .await?;
    Ok(())
}
