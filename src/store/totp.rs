//! Admins' TOTP secrets and their attempts: failures, lockout and replay protection.

use rusqlite::{params, OptionalExtension};

use super::Store;
use crate::domain::audit::AuditEntry;
use crate::domain::error::{Error, Result};
use crate::hsm::WRAP_IV_LEN;

/// An admin's sealed TOTP secret. No Debug.
pub struct StoredTotp {
    pub iv: [u8; WRAP_IV_LEN],
    pub sealed: Vec<u8>,
    pub last_step: u64,
}

impl Store {
    pub fn totp_get(&self, uid: u32) -> Result<Option<StoredTotp>> {
        let row: Option<(Vec<u8>, Vec<u8>, i64)> = self
            .conn()
            .query_row(
                "SELECT iv, sealed, last_step FROM totp WHERE uid = ?1",
                [uid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(iv, sealed, last_step)| {
            Ok(StoredTotp {
                iv: iv.as_slice().try_into().map_err(|_| {
                    Error::integrity(format!("TOTP row of uid {uid}: bad IV length"))
                })?,
                sealed,
                last_step: last_step.max(0) as u64,
            })
        })
        .transpose()
    }

    pub fn totp_count(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM totp", [], |r| r.get::<_, i64>(0))?
            .max(0) as u64)
    }

    /// Stores (or replaces) an admin's sealed secret, with its audit entry, in one transaction.
    pub fn totp_put(
        &self,
        uid: u32,
        t: &StoredTotp,
        created: i64,
        audit: &AuditEntry,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO totp (uid, iv, sealed, created, last_step) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![uid, &t.iv[..], t.sealed, created, t.last_step as i64],
            )?;
            self.append_audit(tx, audit)
        })
    }

    /// Removes an admin's secret (offline reset), and its failures and lock, with its audit
    /// entry.
    pub fn totp_delete(&self, uid: u32, audit: &AuditEntry) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute("DELETE FROM totp WHERE uid = ?1", [uid])?;
            tx.execute("DELETE FROM totp_attempts WHERE uid = ?1", [uid])?;
            self.append_audit(tx, audit)?;
            Ok(n == 1)
        })
    }

    /// Until when `uid`'s codes are refused (`Some` only while the lock holds at `now`).
    pub fn totp_locked_until(&self, uid: u32, now: i64) -> Result<Option<i64>> {
        let until: Option<i64> = self
            .conn()
            .query_row(
                "SELECT locked_until FROM totp_attempts WHERE uid = ?1",
                [uid],
                |r| r.get(0),
            )
            .optional()?;
        Ok(until.filter(|u| *u > now))
    }

    /// Counts an attempt of `uid` as a failure *before* its code is checked, so that a check
    /// that never finishes (a dropped request, a crash) still counts, and refuses it while
    /// the uid is locked. `Err(until)`: locked until then (a window already holding
    /// `max_failures` failures locks here). The caller then checks the code and settles the
    /// attempt with `totp_attempt_failed`, `totp_attempt_passed` or `totp_attempt_withdraw`.
    pub fn totp_attempt_begin(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<std::result::Result<(), i64>> {
        self.write(|tx| {
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
        })
    }

    /// The attempt counted by `totp_attempt_begin` was a wrong (or replayed) code: it stays
    /// counted, and when it is the `max_failures`th of its window the uid is locked for
    /// `lockout` seconds. Returns the end of the lock it set.
    pub fn totp_attempt_failed(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<Option<i64>> {
        self.write(|tx| {
            let (failures, _, locked_until) = attempts_row(tx, uid)?;
            if failures >= limits.max_failures && locked_until <= now {
                let until = now + limits.lockout;
                put_attempts(tx, uid, 0, now, until)?;
                return Ok(Some(until));
            }
            Ok(None)
        })
    }

    /// The attempt's code was right: marks `step` used (replay protection) and takes the
    /// attempt back from the failures, in one transaction. False when `step` (or a later
    /// one) was used already: the attempt then stays counted (a replay is a failure).
    pub fn totp_attempt_passed(&self, uid: u32, step: u64) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE totp SET last_step = ?2 WHERE uid = ?1 AND last_step < ?2",
                params![uid, step as i64],
            )?;
            if n == 1 {
                withdraw_attempt(tx, uid)?;
            }
            Ok(n == 1)
        })
    }

    /// Takes back an attempt whose code was never checked (the HSM or the state failed) or
    /// that activated a new secret.
    pub fn totp_attempt_withdraw(&self, uid: u32) -> Result<()> {
        self.write(|tx| withdraw_attempt(tx, uid))
    }
}

/// How many wrong codes lock a uid, within how long, and for how long (seconds).
#[derive(Debug, Clone, Copy)]
pub struct TotpLimits {
    pub max_failures: i64,
    pub window: i64,
    pub lockout: i64,
}

/// `(failures, window_start, locked_until)` of a uid; zeros when it has no row.
fn attempts_row(tx: &rusqlite::Transaction<'_>, uid: u32) -> Result<(i64, i64, i64)> {
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
    tx: &rusqlite::Transaction<'_>,
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

fn withdraw_attempt(tx: &rusqlite::Transaction<'_>, uid: u32) -> Result<()> {
    tx.execute(
        "UPDATE totp_attempts SET failures = failures - 1 WHERE uid = ?1 AND failures > 0",
        [uid],
    )?;
    Ok(())
}
