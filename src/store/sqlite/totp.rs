//! Admins' TOTP secrets and their attempts in SQLite: failures, lockout and replay
//! protection.

use rusqlite::{params, Connection, OptionalExtension};

use super::Tx;
use crate::domain::error::{Error, Result};
use crate::store::{StoredTotp, TotpLimits};

pub(super) fn get(conn: &Connection, uid: u32) -> Result<Option<StoredTotp>> {
    let row: Option<(Vec<u8>, Vec<u8>, i64)> = conn
        .query_row(
            "SELECT iv, sealed, last_step FROM totp WHERE uid = ?1",
            [uid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    row.map(|(iv, sealed, last_step)| {
        Ok(StoredTotp {
            iv: iv
                .as_slice()
                .try_into()
                .map_err(|_| Error::integrity(format!("TOTP row of uid {uid}: bad IV length")))?,
            sealed,
            last_step: last_step.max(0) as u64,
        })
    })
    .transpose()
}

pub(super) fn count(conn: &Connection) -> Result<u64> {
    Ok(conn
        .query_row("SELECT COUNT(*) FROM totp", [], |r| r.get::<_, i64>(0))?
        .max(0) as u64)
}

pub(super) fn put(tx: &Tx<'_>, uid: u32, t: &StoredTotp, created: i64) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO totp (uid, iv, sealed, created, last_step) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![uid, &t.iv[..], t.sealed, created, t.last_step as i64],
    )?;
    Ok(())
}

/// Removes a secret and its attempts; whether there was a secret.
pub(super) fn delete(tx: &Tx<'_>, uid: u32) -> Result<bool> {
    let n = tx.execute("DELETE FROM totp WHERE uid = ?1", [uid])?;
    tx.execute("DELETE FROM totp_attempts WHERE uid = ?1", [uid])?;
    Ok(n == 1)
}

pub(super) fn locked_until(conn: &Connection, uid: u32, now: i64) -> Result<Option<i64>> {
    let until: Option<i64> = conn
        .query_row(
            "SELECT locked_until FROM totp_attempts WHERE uid = ?1",
            [uid],
            |r| r.get(0),
        )
        .optional()?;
    Ok(until.filter(|u| *u > now))
}

pub(super) fn attempt_begin(
    tx: &Tx<'_>,
    uid: u32,
    now: i64,
    limits: TotpLimits,
) -> Result<std::result::Result<(), i64>> {
    let (mut failures, mut window_start, locked_until) = attempts_row(tx, uid)?;
    if locked_until > now {
        return Ok(Err(locked_until));
    }
    if now - window_start >= limits.window {
        failures = 0;
        window_start = now;
    }
    if failures >= limits.max_failures {
        let until = now + limits.lockout;
        put_attempts(tx, uid, 0, now, until)?;
        return Ok(Err(until));
    }
    put_attempts(tx, uid, failures + 1, window_start, locked_until)?;
    Ok(Ok(()))
}

pub(super) fn attempt_failed(
    tx: &Tx<'_>,
    uid: u32,
    now: i64,
    limits: TotpLimits,
) -> Result<Option<i64>> {
    let (failures, _, locked_until) = attempts_row(tx, uid)?;
    if failures >= limits.max_failures && locked_until <= now {
        let until = now + limits.lockout;
        put_attempts(tx, uid, 0, now, until)?;
        return Ok(Some(until));
    }
    Ok(None)
}

pub(super) fn attempt_passed(tx: &Tx<'_>, uid: u32, step: u64) -> Result<bool> {
    let n = tx.execute(
        "UPDATE totp SET last_step = ?2 WHERE uid = ?1 AND last_step < ?2",
        params![uid, step as i64],
    )?;
    if n == 1 {
        withdraw_attempt(tx, uid)?;
    }
    Ok(n == 1)
}

/// `(failures, window_start, locked_until)` of a uid; zeros when it has no row.
fn attempts_row(tx: &Tx<'_>, uid: u32) -> Result<(i64, i64, i64)> {
    Ok(tx
        .query_row(
            "SELECT failures, window_start, locked_until FROM totp_attempts WHERE uid = ?1",
            [uid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .unwrap_or((0, 0, 0)))
}

fn put_attempts(
    tx: &Tx<'_>,
    uid: u32,
    failures: i64,
    window_start: i64,
    locked_until: i64,
) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO totp_attempts (uid, failures, window_start, locked_until) VALUES (?1, ?2, ?3, ?4)",
        params![uid, failures, window_start, locked_until],
    )?;
    Ok(())
}

pub(super) fn withdraw_attempt(tx: &Tx<'_>, uid: u32) -> Result<()> {
    tx.execute(
        "UPDATE totp_attempts SET failures = failures - 1 WHERE uid = ?1 AND failures > 0",
        [uid],
    )?;
    Ok(())
}
