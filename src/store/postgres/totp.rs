//! Admins' TOTP secrets and their attempts in PostgreSQL, shared by every node: a uid's
//! attempts row is locked while it is read and changed, so failures counted on several
//! nodes add up and a lock set on one holds on all; a used time step is refused everywhere.

use tokio_postgres::GenericClient;

use super::{col, Tx};
use crate::domain::error::{Error, Result};
use crate::store::{StoredTotp, TotpLimits};

pub(super) async fn get(c: &impl GenericClient, uid: u32) -> Result<Option<StoredTotp>> {
    let Some(row) = c
        .query_opt(
            "SELECT iv, sealed, last_step FROM totp WHERE uid = $1",
            &[&i64::from(uid)],
        )
        .await?
    else {
        return Ok(None);
    };
    let iv: Vec<u8> = col(&row, 0)?;
    let last_step: i64 = col(&row, 2)?;
    Ok(Some(StoredTotp {
        iv: iv
            .as_slice()
            .try_into()
            .map_err(|_| Error::integrity(format!("TOTP row of uid {uid}: bad IV length")))?,
        sealed: col(&row, 1)?,
        last_step: last_step.max(0) as u64,
    }))
}

pub(super) async fn count(c: &impl GenericClient) -> Result<u64> {
    let row = c.query_one("SELECT COUNT(*) FROM totp", &[]).await?;
    Ok(col::<i64>(&row, 0)?.max(0) as u64)
}

pub(super) async fn put(tx: &Tx<'_>, uid: u32, t: &StoredTotp, created: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO totp (uid, iv, sealed, created, last_step) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (uid) DO UPDATE SET iv = EXCLUDED.iv, sealed = EXCLUDED.sealed,
             created = EXCLUDED.created, last_step = EXCLUDED.last_step",
        &[
            &i64::from(uid),
            &&t.iv[..],
            &t.sealed,
            &created,
            &step(t.last_step),
        ],
    )
    .await?;
    Ok(())
}

/// Removes a secret and its attempts; whether there was a secret.
pub(super) async fn delete(tx: &Tx<'_>, uid: u32) -> Result<bool> {
    let uid = i64::from(uid);
    let n = tx
        .execute("DELETE FROM totp WHERE uid = $1", &[&uid])
        .await?;
    tx.execute("DELETE FROM totp_attempts WHERE uid = $1", &[&uid])
        .await?;
    Ok(n == 1)
}

pub(super) async fn locked_until(
    c: &impl GenericClient,
    uid: u32,
    now: i64,
) -> Result<Option<i64>> {
    let until = c
        .query_opt(
            "SELECT locked_until FROM totp_attempts WHERE uid = $1",
            &[&i64::from(uid)],
        )
        .await?
        .map(|r| col::<i64>(&r, 0))
        .transpose()?;
    Ok(until.filter(|u| *u > now))
}

pub(super) async fn attempt_begin(
    tx: &Tx<'_>,
    uid: u32,
    now: i64,
    limits: TotpLimits,
) -> Result<std::result::Result<(), i64>> {
    let (mut failures, mut window_start, locked_until) = lock_attempts(tx, uid).await?;
    if locked_until > now {
        return Ok(Err(locked_until));
    }
    if now - window_start >= limits.window {
        failures = 0;
        window_start = now;
    }
    if failures >= limits.max_failures {
        let until = now + limits.lockout;
        put_attempts(tx, uid, 0, now, until).await?;
        return Ok(Err(until));
    }
    put_attempts(tx, uid, failures + 1, window_start, locked_until).await?;
    Ok(Ok(()))
}

pub(super) async fn attempt_failed(
    tx: &Tx<'_>,
    uid: u32,
    now: i64,
    limits: TotpLimits,
) -> Result<Option<i64>> {
    let (failures, _, locked_until) = lock_attempts(tx, uid).await?;
    if failures >= limits.max_failures && locked_until <= now {
        let until = now + limits.lockout;
        put_attempts(tx, uid, 0, now, until).await?;
        return Ok(Some(until));
    }
    Ok(None)
}

/// Marks `step` used unless it (or a later one) was: the row's update is atomic, so of
/// two nodes accepting the same code at once one passes.
pub(super) async fn attempt_passed(tx: &Tx<'_>, uid: u32, step_used: u64) -> Result<bool> {
    let n = tx
        .execute(
            "UPDATE totp SET last_step = $2 WHERE uid = $1 AND last_step < $2",
            &[&i64::from(uid), &step(step_used)],
        )
        .await?;
    if n == 1 {
        withdraw_attempt(tx, uid).await?;
    }
    Ok(n == 1)
}

/// `(failures, window_start, locked_until)` of a uid, its row made if needed and locked
/// until the transaction ends.
async fn lock_attempts(tx: &Tx<'_>, uid: u32) -> Result<(i64, i64, i64)> {
    let uid = i64::from(uid);
    tx.execute(
        "INSERT INTO totp_attempts (uid, failures, window_start, locked_until) VALUES ($1, 0, 0, 0)
         ON CONFLICT (uid) DO NOTHING",
        &[&uid],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT failures, window_start, locked_until FROM totp_attempts WHERE uid = $1 FOR UPDATE",
            &[&uid],
        )
        .await?;
    Ok((col(&row, 0)?, col(&row, 1)?, col(&row, 2)?))
}

async fn put_attempts(
    tx: &Tx<'_>,
    uid: u32,
    failures: i64,
    window_start: i64,
    locked_until: i64,
) -> Result<()> {
    tx.execute(
        "UPDATE totp_attempts SET failures = $2, window_start = $3, locked_until = $4 WHERE uid = $1",
        &[&i64::from(uid), &failures, &window_start, &locked_until],
    )
    .await?;
    Ok(())
}

pub(super) async fn withdraw_attempt(tx: &Tx<'_>, uid: u32) -> Result<()> {
    tx.execute(
        "UPDATE totp_attempts SET failures = failures - 1 WHERE uid = $1 AND failures > 0",
        &[&i64::from(uid)],
    )
    .await?;
    Ok(())
}

/// A time step as stored (steps are far below i64::MAX).
fn step(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}
