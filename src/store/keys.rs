//! Keys and versions in the state: stored forms, loading, adding, aws seals, counts, rotation.

use crate::domain::Code;
use rusqlite::{params, OptionalExtension};

use super::Store;
use crate::domain::audit::AuditEntry;
use crate::domain::error::{Error, Result};
use crate::domain::{Initiator, KeyId, VersionType};
use crate::hsm::WRAP_IV_LEN;

/// A version as stored: wrapped, never the data key itself. No Debug: the blob stays out
/// of logs. Managed versions: `wrapped` is the data key sealed by the HSM root key. Aws
/// versions: `wrapped` is the IAM secret key sealed by the HSM root key, and `aws` says
/// where the data key is.
pub struct StoredVersion {
    pub version: u32,
    pub kind: VersionType,
    pub created: i64,
    pub origin: Initiator,
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
    /// slot and the four fields above (`keyring::aws::check`). `None` for versions registered
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

impl Store {
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
                        origin: Initiator::parse(&origin),
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
                        Code::VersionConflict,
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
                        Code::VersionConflict,
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
        self.append_audit(tx, audit)
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
                return Err(Error::not_found(Code::KeyNotFound, format!("no key {id}")));
            }
            self.append_audit(tx, audit)
        })
    }
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
