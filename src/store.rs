//! Durable state in SQLite (WAL, synchronous FULL): keys, their versions in wrapped form only,
//! settings, and the schema version. Each change is one transaction.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::audit::{self, AuditEntry, AuditRecord};
use crate::error::{Error, Result};
use crate::hsm::WRAP_IV_LEN;
use crate::keyring::KeyId;

pub const DB_FILE: &str = "keyd.sqlite3";
const LOCK_FILE: &str = "keyd.lock";

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: keys and their versions.
    "CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        environment TEXT NOT NULL,
        country TEXT NOT NULL,
        rotation_period_days INTEGER,
        created INTEGER NOT NULL,
        last_version INTEGER NOT NULL,
        UNIQUE (environment, country)
     );
     CREATE TABLE versions (
        key_id INTEGER NOT NULL REFERENCES keys(id),
        version INTEGER NOT NULL,
        type TEXT NOT NULL,
        created INTEGER NOT NULL,
        origin TEXT NOT NULL,
        iv BLOB NOT NULL,
        wrapped BLOB NOT NULL,
        PRIMARY KEY (key_id, version)
     );",
    // 2: the hash-chained audit log.
    "CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL,
        uid INTEGER,
        gid INTEGER,
        pid INTEGER,
        action TEXT NOT NULL,
        environment TEXT,
        country TEXT,
        version INTEGER,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
     );",
    // 3: admins' TOTP secrets, sealed by the HSM's system root key; the last accepted
    // time step refuses replays across restarts.
    "CREATE TABLE totp (
        uid INTEGER PRIMARY KEY,
        iv BLOB NOT NULL,
        sealed BLOB NOT NULL,
        created INTEGER NOT NULL,
        last_step INTEGER NOT NULL
     );",
    // 4: customer-supplied (aws) versions. Their data key is never stored: only what KMS
    // needs to decrypt it again. The IAM secret key is sealed by the HSM root key in
    // `iv`/`wrapped` (for managed versions those hold the wrapped data key).
    "ALTER TABLE versions ADD COLUMN aws_region TEXT;
     ALTER TABLE versions ADD COLUMN aws_encrypted_key BLOB;
     ALTER TABLE versions ADD COLUMN aws_cmk_arn TEXT;
     ALTER TABLE versions ADD COLUMN aws_access_key_id TEXT;",
    // 5: TOTP failures and lockout per uid, so that a restart keeps a lock (and every
    // node of a cluster sees it).
    "CREATE TABLE totp_attempts (
        uid INTEGER PRIMARY KEY,
        failures INTEGER NOT NULL,
        window_start INTEGER NOT NULL,
        locked_until INTEGER NOT NULL
     );",
    // 6: records encrypted per version (AES-GCM with random IVs is safe for 2^32 of them
    // per key), and the sealed key check value that binds an aws version's data key to its
    // KMS parameters.
    "ALTER TABLE versions ADD COLUMN encryptions INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE versions ADD COLUMN aws_check_iv BLOB;
     ALTER TABLE versions ADD COLUMN aws_check BLOB;",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionType {
    Managed,
    Aws,
}

impl VersionType {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionType::Managed => "incountry-managed",
            VersionType::Aws => "aws",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        match s {
            "incountry-managed" => Ok(VersionType::Managed),
            "aws" => Ok(VersionType::Aws),
            other => Err(Error::integrity(format!(
                "unknown version type `{other}` in state"
            ))),
        }
    }
}

/// Who made a version: an admin request (counts against the daily limit) or the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Admin,
    Timer,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Admin => "admin",
            Origin::Timer => "timer",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "timer" {
            Origin::Timer
        } else {
            Origin::Admin
        }
    }
}

/// A version as stored: wrapped, never the data key itself. No Debug: the blob stays out
/// of logs. Managed versions: `wrapped` is the data key sealed by the HSM root key. Aws
/// versions: `wrapped` is the IAM secret key sealed by the HSM root key, and `aws` says
/// where the data key is.
pub struct StoredVersion {
    pub version: u32,
    pub kind: VersionType,
    pub created: i64,
    pub origin: Origin,
    pub iv: [u8; WRAP_IV_LEN],
    pub wrapped: Vec<u8>,
    pub aws: Option<StoredAws>,
}

/// What the state keeps of a customer-supplied version besides the sealed IAM secret.
pub struct StoredAws {
    pub region: String,
    /// The KMS ciphertext blob of the data key.
    pub encrypted_key: Vec<u8>,
    pub cmk_arn: String,
    pub access_key_id: String,
    /// The key check value of the data key, sealed by the HSM root key under AAD over the
    /// slot and the four fields above (`keyring::aws`). `None` for versions registered
    /// before key checks existed.
    pub check: Option<SealedCheck>,
}

/// A sealed key check value (`versions.aws_check_iv`, `versions.aws_check`). No Debug.
pub struct SealedCheck {
    pub iv: [u8; WRAP_IV_LEN],
    pub sealed: Vec<u8>,
}

/// What `Store::aws_seals` reads of an aws version: its sealed IAM secret and its sealed key
/// check, as stored. No Debug.
pub struct StoredAwsSeals {
    pub secret_iv: [u8; WRAP_IV_LEN],
    pub secret: Vec<u8>,
    pub check: Option<SealedCheck>,
}

pub struct StoredKey {
    pub id: KeyId,
    pub rotation_period_days: Option<u32>,
    pub created: i64,
    pub versions: Vec<StoredVersion>,
}

/// An admin's sealed TOTP secret. No Debug.
pub struct StoredTotp {
    pub iv: [u8; WRAP_IV_LEN],
    pub sealed: Vec<u8>,
    pub last_step: u64,
}

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

    pub fn load_all(&self) -> Result<Vec<StoredKey>> {
        let conn = self.conn();
        let mut keys_stmt = conn.prepare(
            "SELECT id, environment, country, rotation_period_days, created FROM keys ORDER BY environment, country",
        )?;
        let mut ver_stmt = conn.prepare(
            "SELECT version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check FROM versions WHERE key_id = ?1 ORDER BY version",
        )?;
        let rows = keys_stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<u32>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (rowid, env, country, period, created) in rows {
            let id = KeyId::parse(&env, &country).map_err(|_| {
                Error::integrity(format!("invalid key name {env}/{country} in state"))
            })?;
            let versions = ver_stmt
                .query_map([rowid], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Vec<u8>>(5)?,
                        (
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, Option<Vec<u8>>>(7)?,
                            r.get::<_, Option<String>>(8)?,
                            r.get::<_, Option<String>>(9)?,
                            (
                                r.get::<_, Option<Vec<u8>>>(10)?,
                                r.get::<_, Option<Vec<u8>>>(11)?,
                            ),
                        ),
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .into_iter()
                .map(|(version, kind, created, origin, iv, wrapped, aws)| {
                    let kind = VersionType::parse(&kind)?;
                    let aws = match (kind, aws) {
                        (VersionType::Managed, _) => None,
                        (
                            VersionType::Aws,
                            (
                                Some(region),
                                Some(encrypted_key),
                                Some(cmk_arn),
                                Some(access_key_id),
                                check,
                            ),
                        ) => Some(StoredAws {
                            region,
                            encrypted_key,
                            cmk_arn,
                            access_key_id,
                            check: sealed_check(check),
                        }),
                        (VersionType::Aws, _) => {
                            return Err(Error::integrity(format!(
                            "{id} version {version}: aws version without its KMS details in state"
                        )))
                        }
                    };
                    Ok(StoredVersion {
                        version,
                        kind,
                        created,
                        origin: Origin::parse(&origin),
                        iv: iv.as_slice().try_into().map_err(|_| {
                            Error::integrity(format!(
                                "{id} version {version}: stored IV has the wrong length"
                            ))
                        })?,
                        wrapped,
                        aws,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(StoredKey {
                id,
                rotation_period_days: period,
                created,
                versions,
            });
        }
        Ok(out)
    }

    /// Adds version `v.version` to `id` in one transaction, creating the key row if needed.
    /// Refuses unless the number is exactly one past the last number ever used for this key.
    pub fn add_version(
        &self,
        id: &KeyId,
        rotation_period_days: Option<u32>,
        v: &StoredVersion,
        audit: &AuditEntry,
    ) -> Result<()> {
        self.write(|tx| {
        let existing: Option<(i64, u32)> = tx
            .query_row(
                "SELECT id, last_version FROM keys WHERE environment = ?1 AND country = ?2",
                params![id.env, id.country],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let rowid = match existing {
            Some((rowid, last)) => {
                if v.version != last + 1 {
                    return Err(Error::conflict(
                        "version_conflict",
                        format!("{id}: version {} is not next after {last}", v.version),
                    ));
                }
                tx.execute(
                    "UPDATE keys SET last_version = ?2, rotation_period_days = ?3 WHERE id = ?1",
                    params![rowid, v.version, rotation_period_days],
                )?;
                rowid
            }
            None => {
                if v.version != 1 {
                    return Err(Error::conflict(
                        "version_conflict",
                        format!("{id}: a new key starts at version 1"),
                    ));
                }
                tx.execute(
                    "INSERT INTO keys (environment, country, rotation_period_days, created, last_version) VALUES (?1, ?2, ?3, ?4, 1)",
                    params![id.env, id.country, rotation_period_days, v.created],
                )?;
                tx.last_insert_rowid()
            }
        };
        tx.execute(
            "INSERT INTO versions (key_id, version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                rowid,
                v.version,
                v.kind.as_str(),
                v.created,
                v.origin.as_str(),
                &v.iv[..],
                v.wrapped,
                v.aws.as_ref().map(|a| a.region.as_str()),
                v.aws.as_ref().map(|a| a.encrypted_key.as_slice()),
                v.aws.as_ref().map(|a| a.cmk_arn.as_str()),
                v.aws.as_ref().map(|a| a.access_key_id.as_str()),
                v.aws.as_ref().and_then(|a| a.check.as_ref()).map(|c| &c.iv[..]),
                v.aws.as_ref().and_then(|a| a.check.as_ref()).map(|c| c.sealed.as_slice()),
            ],
        )?;
        append_audit(tx, audit)
        })
    }

    /// The sealed IAM secret and the sealed key check of an aws version, as stored now
    /// (`None`: no such aws version).
    pub fn aws_seals(&self, id: &KeyId, version: u32) -> Result<Option<StoredAwsSeals>> {
        type Row = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
        let row: Option<Row> = self
            .conn()
            .query_row(
                "SELECT v.iv, v.wrapped, v.aws_check_iv, v.aws_check FROM versions v JOIN keys k ON k.id = v.key_id
                 WHERE k.environment = ?1 AND k.country = ?2 AND v.version = ?3 AND v.type = 'aws'",
                params![id.env, id.country, version],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(iv, secret, check_iv, check)| {
            Ok(StoredAwsSeals {
                secret_iv: iv.as_slice().try_into().map_err(|_| {
                    Error::integrity(format!(
                        "{id} version {version}: stored IV has the wrong length"
                    ))
                })?,
                secret,
                check: sealed_check((check_iv, check)),
            })
        })
        .transpose()
    }

    /// Records encrypted under a version, as stored (at least as many as were made: see
    /// `keyring::counters`). 0 for a version the state does not have.
    pub fn encryptions(&self, id: &KeyId, version: u32) -> Result<u64> {
        let n: Option<i64> = self
            .conn()
            .query_row(
                "SELECT v.encryptions FROM versions v JOIN keys k ON k.id = v.key_id
                 WHERE k.environment = ?1 AND k.country = ?2 AND v.version = ?3",
                params![id.env, id.country, version],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Raises a version's stored encryption count to at least `at_least` (a reservation
    /// made before the encryptions it covers).
    pub fn reserve_encryptions(&self, id: &KeyId, version: u32, at_least: u64) -> Result<()> {
        let at_least = i64::try_from(at_least).unwrap_or(i64::MAX);
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE versions SET encryptions = MAX(encryptions, ?4)
                 WHERE version = ?3 AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
                params![id.env, id.country, version, at_least],
            )?;
            if n == 0 {
                return Err(Error::internal(format!(
                    "{id} version {version} is not in the state: cannot count its encryptions"
                )));
            }
            Ok(())
        })
    }

    /// Stores exact encryption counts (at a clean stop), in one transaction.
    pub fn set_encryptions(&self, counts: &[(KeyId, u32, u64)]) -> Result<()> {
        self.write(|tx| {
            for (id, version, n) in counts {
                tx.execute(
                    "UPDATE versions SET encryptions = ?4
                     WHERE version = ?3 AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
                    params![
                        id.env,
                        id.country,
                        version,
                        i64::try_from(*n).unwrap_or(i64::MAX)
                    ],
                )?;
            }
            Ok(())
        })
    }

    pub fn set_rotation_period(
        &self,
        id: &KeyId,
        days: Option<u32>,
        audit: &AuditEntry,
    ) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE keys SET rotation_period_days = ?3 WHERE environment = ?1 AND country = ?2",
                params![id.env, id.country, days],
            )?;
            if n == 0 {
                return Err(Error::not_found("key_not_found", format!("no key {id}")));
            }
            append_audit(tx, audit)
        })
    }

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
            append_audit(tx, audit)
        })
    }

    /// Removes an admin's secret (offline reset), and its failures and lock, with its audit
    /// entry.
    pub fn totp_delete(&self, uid: u32, audit: &AuditEntry) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute("DELETE FROM totp WHERE uid = ?1", [uid])?;
            tx.execute("DELETE FROM totp_attempts WHERE uid = ?1", [uid])?;
            append_audit(tx, audit)?;
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

    /// Appends one audit entry in its own transaction (refusals, failures).
    pub fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.write(|tx| append_audit(tx, entry))
    }

    /// Audit entries with `seq > since`, oldest first, at most `limit`.
    pub fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        read_audit(&self.conn(), since, limit)
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

/// A stored key check from its two columns. Anything but both or neither (one column
/// missing, an IV of the wrong length) comes back as a check that cannot be opened, so the
/// version fails its key check instead of the whole state failing to load.
fn sealed_check(columns: (Option<Vec<u8>>, Option<Vec<u8>>)) -> Option<SealedCheck> {
    match columns {
        (None, None) => None,
        (Some(iv), Some(sealed)) if iv.len() == WRAP_IV_LEN => Some(SealedCheck {
            iv: iv.as_slice().try_into().unwrap_or([0; WRAP_IV_LEN]),
            sealed,
        }),
        _ => Some(SealedCheck {
            iv: [0; WRAP_IV_LEN],
            sealed: Vec::new(),
        }),
    }
}

/// Adds an entry chained to the last one; runs inside the caller's transaction.
fn append_audit(tx: &rusqlite::Transaction<'_>, e: &AuditEntry) -> Result<()> {
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

/// Opens the state database read-only (offline tools such as `audit verify`).
pub fn open_read_only(dir: &Path) -> anyhow::Result<Connection> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        anyhow::bail!("no state database at {}", path.display());
    }
    Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| anyhow::anyhow!("cannot open {} read-only: {e}", path.display()))
}

fn migrate(conn: &Connection) -> anyhow::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        anyhow::bail!(
            "state schema version {current} is newer than this daemon understands ({}); refusing to touch it",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Takes an exclusive flock on the state directory's lock file and writes our pid into it.
/// The state directory must be the daemon's own: owned by its user and writable by no one
/// else (whoever can write there can swap the database).
fn check_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("cannot read state directory {}: {e}", dir.display()))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        anyhow::bail!(
            "state directory {} is owned by uid {}, not by this daemon's user (uid {euid}): chown it",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        anyhow::bail!(
            "state directory {} is writable by its group or by others (mode {mode:04o}): chmod 0700 it",
            dir.display()
        );
    }
    Ok(())
}

/// The database and its WAL and shared-memory files are the daemon's alone, whatever the
/// umask: made 0600 before SQLite opens them (SQLite gives its -wal and -shm files the
/// database's mode), and tightened if an older run left them looser.
fn private_files(db: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", db.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(meta) = fs::metadata(&p) {
            if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                    .map_err(|e| anyhow::anyhow!("cannot chmod 0600 {}: {e}", p.display()))?;
            }
        }
    }
    Ok(())
}

fn lock_state(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open lock file {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor that `file` owns for the whole call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        anyhow::bail!(
            "state directory {} is in use by another incountry-keyd (pid {}); stop it first",
            dir.display(),
            if holder.is_empty() { "unknown" } else { holder }
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

#[cfg(test)]
mod totp_attempt_tests {
    use super::*;

    const LIMITS: TotpLimits = TotpLimits {
        max_failures: 5,
        window: 300,
        lockout: 300,
    };

    fn wrong(s: &Store, uid: u32, now: i64) -> std::result::Result<Option<i64>, i64> {
        s.totp_attempt_begin(uid, now, LIMITS).unwrap()?;
        Ok(s.totp_attempt_failed(uid, now, LIMITS).unwrap())
    }

    #[test]
    fn counts_before_the_check_locks_at_five_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let t = 1_000_000;
        for i in 0..4 {
            assert_eq!(wrong(&s, 7, t + i), Ok(None));
        }
        // The fifth wrong code locks the uid; another uid is not affected.
        assert_eq!(wrong(&s, 7, t + 4), Ok(Some(t + 4 + 300)));
        assert_eq!(wrong(&s, 7, t + 5), Err(t + 304));
        assert_eq!(wrong(&s, 8, t + 5), Ok(None));
        assert_eq!(s.totp_locked_until(7, t + 5).unwrap(), Some(t + 304));
        // A restart keeps the lock.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.totp_locked_until(7, t + 303).unwrap(), Some(t + 304));
        assert_eq!(wrong(&s, 7, t + 303), Err(t + 304));
        assert_eq!(s.totp_locked_until(7, t + 304).unwrap(), None);
        assert_eq!(wrong(&s, 7, t + 304), Ok(None));
    }

    #[test]
    fn abandoned_checks_count_and_withdrawn_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let t = 2_000_000;
        // Five attempts begun and never settled (requests dropped mid-check): the sixth is
        // refused and locks.
        for _ in 0..5 {
            s.totp_attempt_begin(1, t, LIMITS).unwrap().unwrap();
        }
        assert_eq!(s.totp_attempt_begin(1, t, LIMITS).unwrap(), Err(t + 300));
        // Attempts taken back (HSM failures, right codes) never add up to a lock.
        for _ in 0..20 {
            s.totp_attempt_begin(2, t, LIMITS).unwrap().unwrap();
            s.totp_attempt_withdraw(2).unwrap();
        }
        assert_eq!(s.totp_locked_until(2, t).unwrap(), None);
        // Failures older than the window are forgotten.
        for i in 0..4 {
            assert_eq!(wrong(&s, 3, t + i), Ok(None));
        }
        assert_eq!(wrong(&s, 3, t + 300), Ok(None));
    }
}
