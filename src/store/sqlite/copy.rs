//! The whole state in and out of SQLite, as stored (`state migrate`): `export` reads it as
//! of one moment, `import` writes it into an empty state in one transaction.

use rusqlite::{params, Connection};

use super::{audit_log, keys, Tx};
use crate::domain::audit::Reader;
use crate::domain::error::{Error, Result};
use crate::domain::{Code, KeyId};
use crate::store::{CopiedAttempts, CopiedTotp, StateCopy, StoredKey, StoredTotp};

/// Audit records read and written per page.
const PAGE: usize = 1000;

pub(super) fn export(conn: &Connection) -> Result<StateCopy> {
    let tx = conn.unchecked_transaction()?;
    let keys = keys::load_all(&tx)?;
    let encryptions = tx
        .prepare(
            "SELECT k.environment, k.country, v.version, v.encryptions FROM versions v
             JOIN keys k ON k.id = v.key_id ORDER BY k.environment, k.country, v.version",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .map(|(env, country, v, n)| Ok((key_id(&env, &country)?, v, n.max(0) as u64)))
        .collect::<Result<Vec<_>>>()?;
    let totp = tx
        .prepare("SELECT uid, iv, sealed, created, last_step FROM totp ORDER BY uid")?
        .query_map([], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .map(|(uid, iv, sealed, created, last_step)| {
            Ok(CopiedTotp {
                uid,
                secret: StoredTotp {
                    iv: iv.as_slice().try_into().map_err(|_| {
                        Error::integrity(format!("TOTP row of uid {uid}: bad IV length"))
                    })?,
                    sealed,
                    last_step: last_step.max(0) as u64,
                },
                created,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let attempts = tx
        .prepare(
            "SELECT uid, failures, window_start, locked_until FROM totp_attempts ORDER BY uid",
        )?
        .query_map([], |r| {
            Ok(CopiedAttempts {
                uid: r.get(0)?,
                failures: r.get(1)?,
                window_start: r.get(2)?,
                locked_until: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.finish()?;
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

pub(super) fn import(tx: &Tx<'_>, copy: &StateCopy, audit: Reader<'_>) -> Result<()> {
    let held: i64 = tx.query_row(
        "SELECT (SELECT COUNT(*) FROM keys) + (SELECT COUNT(*) FROM totp)
              + (SELECT COUNT(*) FROM totp_attempts) + (SELECT COUNT(*) FROM audit)",
        [],
        |r| r.get(0),
    )?;
    if held > 0 {
        return Err(Error::conflict(
            Code::VersionConflict,
            "the target state is not empty: nothing was copied",
        ));
    }
    for key in &copy.keys {
        insert_key(tx, key)?;
    }
    for (id, version, n) in &copy.encryptions {
        tx.execute(
            "UPDATE versions SET encryptions = ?4
             WHERE version = ?3 AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
            params![id.env, id.country, version, i64::try_from(*n).unwrap_or(i64::MAX)],
        )?;
    }
    for t in &copy.totp {
        tx.execute(
            "INSERT INTO totp (uid, iv, sealed, created, last_step) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                t.uid,
                &t.secret.iv[..],
                t.secret.sealed,
                t.created,
                i64::try_from(t.secret.last_step).unwrap_or(i64::MAX)
            ],
        )?;
    }
    for a in &copy.attempts {
        tx.execute(
            "INSERT INTO totp_attempts (uid, failures, window_start, locked_until) VALUES (?1, ?2, ?3, ?4)",
            params![a.uid, a.failures, a.window_start, a.locked_until],
        )?;
    }
    let mut since = 0;
    loop {
        let page = audit(since, PAGE)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        since = last.seq;
        for record in &page {
            audit_log::insert(tx, record)?;
        }
    }
}

/// A key row and every version, as they were stored.
fn insert_key(tx: &Tx<'_>, key: &StoredKey) -> Result<()> {
    let last = key.versions.last().map_or(0, |v| v.version);
    tx.execute(
        "INSERT INTO keys (environment, country, rotation_period_days, created, last_version) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key.id.env, key.id.country, key.rotation_period_days, key.created, last],
    )?;
    let rowid = tx.last_insert_rowid();
    for v in &key.versions {
        keys::insert_version(tx, rowid, v)?;
    }
    Ok(())
}
