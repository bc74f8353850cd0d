//! Keys and versions in SQLite: loading, adding, aws seals, encryption counts, rotation
//! periods.

use rusqlite::{params, Connection, OptionalExtension};

use super::Tx;
use crate::domain::error::{Error, Result};
use crate::domain::{Code, Initiator, KeyId, VersionType};
use crate::store::types::{refusal, sealed_check};
use crate::store::{AwsRefusal, StoredAws, StoredAwsSeals, StoredKey, StoredVersion};

const KEY_COLUMNS: &str =
    "SELECT id, environment, country, rotation_period_days, created FROM keys";

/// A key row: its rowid, name, rotation period and creation time.
type KeyRow = (i64, String, String, Option<u32>, i64);

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

pub(super) fn load_all(conn: &Connection) -> Result<Vec<StoredKey>> {
    let rows = conn
        .prepare(&format!("{KEY_COLUMNS} ORDER BY environment, country"))?
        .query_map([], key_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|row| with_versions(conn, row))
        .collect()
}

pub(super) fn load_key(conn: &Connection, id: &KeyId) -> Result<Option<StoredKey>> {
    let row = conn
        .query_row(
            &format!("{KEY_COLUMNS} WHERE environment = ?1 AND country = ?2"),
            params![id.env, id.country],
            key_row,
        )
        .optional()?;
    row.map(|row| with_versions(conn, row)).transpose()
}

/// A key row with every version of the key.
fn with_versions(
    conn: &Connection,
    (rowid, env, country, period, created): KeyRow,
) -> Result<StoredKey> {
    let id = KeyId::parse(&env, &country)
        .map_err(|_| Error::integrity(format!("invalid key name {env}/{country} in state")))?;
    let mut ver_stmt = conn.prepare_cached(
        "SELECT version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check, aws_refused_code, aws_refused_why, aws_refused_at FROM versions WHERE key_id = ?1 ORDER BY version",
    )?;
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
                    refusal(r.get(12)?, r.get(13)?, r.get(14)?),
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
                        refusal,
                    ),
                ) => Some(StoredAws {
                    region,
                    encrypted_key,
                    cmk_arn,
                    access_key_id,
                    check: sealed_check(check),
                    refusal,
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
    Ok(StoredKey {
        id,
        rotation_period_days: period,
        created,
        versions,
    })
}

/// Adds version `v.version` to `id`, creating the key row if needed. Refuses unless the
/// number is exactly one past the last number ever used for this key: the transaction's
/// write lock makes the check and the insert one step.
pub(super) fn add_version(
    tx: &Tx<'_>,
    id: &KeyId,
    rotation_period_days: Option<u32>,
    v: &StoredVersion,
) -> Result<()> {
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
    insert_version(tx, rowid, v)?;
    Ok(())
}

/// One version row of the key `key_rowid`, every column as stored (a new version, or one
/// copied whole by `state migrate`).
pub(super) fn insert_version(tx: &Tx<'_>, key_rowid: i64, v: &StoredVersion) -> Result<()> {
    let aws = v.aws.as_ref();
    let check = aws.and_then(|a| a.check.as_ref());
    let refusal = aws.and_then(|a| a.refusal.as_ref());
    tx.execute(
        "INSERT INTO versions (key_id, version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check, aws_refused_code, aws_refused_why, aws_refused_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            key_rowid,
            v.version,
            v.kind.as_str(),
            v.created,
            v.origin.as_str(),
            &v.iv[..],
            v.wrapped,
            aws.map(|a| a.region.as_str()),
            aws.map(|a| a.encrypted_key.as_slice()),
            aws.map(|a| a.cmk_arn.as_str()),
            aws.map(|a| a.access_key_id.as_str()),
            check.map(|c| &c.iv[..]),
            check.map(|c| c.sealed.as_slice()),
            refusal.map(|r| r.code.as_str()),
            refusal.map(|r| r.why.as_str()),
            refusal.map(|r| r.at),
        ],
    )?;
    Ok(())
}

pub(super) fn aws_seals(
    conn: &Connection,
    id: &KeyId,
    version: u32,
) -> Result<Option<StoredAwsSeals>> {
    type Row = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);
    let row: Option<Row> = conn
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

pub(super) fn encryptions(conn: &Connection, id: &KeyId, version: u32) -> Result<u64> {
    let n: Option<i64> = conn
        .query_row(
            "SELECT v.encryptions FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = ?1 AND k.country = ?2 AND v.version = ?3",
            params![id.env, id.country, version],
            |r| r.get(0),
        )
        .optional()?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// Adds a reservation of `n` to a version's count (atomically, in the write transaction);
/// the new total.
pub(super) fn reserve_encryptions(tx: &Tx<'_>, id: &KeyId, version: u32, n: u64) -> Result<u64> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let total: Option<i64> = tx
        .query_row(
            "UPDATE versions SET encryptions = encryptions + ?4
             WHERE version = ?3 AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)
             RETURNING encryptions",
            params![id.env, id.country, version, n],
            |r| r.get(0),
        )
        .optional()?;
    match total {
        Some(t) => Ok(t.max(0) as u64),
        None => Err(Error::internal(format!(
            "{id} version {version} is not in the state: cannot count its encryptions"
        ))),
    }
}

/// A clean stop's deltas: each added to its count, never below 0.
pub(super) fn settle_encryptions(tx: &Tx<'_>, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
    for (id, version, delta) in deltas {
        tx.execute(
            "UPDATE versions SET encryptions = MAX(encryptions + ?4, 0)
             WHERE version = ?3 AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
            params![id.env, id.country, version, delta],
        )?;
    }
    Ok(())
}

pub(super) fn set_rotation_period(tx: &Tx<'_>, id: &KeyId, days: Option<u32>) -> Result<()> {
    let n = tx.execute(
        "UPDATE keys SET rotation_period_days = ?3 WHERE environment = ?1 AND country = ?2",
        params![id.env, id.country, days],
    )?;
    if n == 0 {
        return Err(Error::not_found(Code::KeyNotFound, format!("no key {id}")));
    }
    Ok(())
}

/// Records or clears an aws version's refusal; a recorded one is kept as it is.
pub(super) fn set_aws_refusal(
    tx: &Tx<'_>,
    id: &KeyId,
    version: u32,
    r: Option<&AwsRefusal>,
) -> Result<bool> {
    let is_aws: Option<bool> = tx
        .query_row(
            "SELECT v.type = 'aws' FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = ?1 AND k.country = ?2 AND v.version = ?3",
            params![id.env, id.country, version],
            |r| r.get(0),
        )
        .optional()?;
    if is_aws != Some(true) {
        return Err(Error::not_found(
            Code::VersionNotFound,
            format!("{id} has no aws version {version}"),
        ));
    }
    let n = match r {
        Some(r) => tx.execute(
            "UPDATE versions SET aws_refused_code = ?4, aws_refused_why = ?5, aws_refused_at = ?6
             WHERE version = ?3 AND aws_refused_code IS NULL
               AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
            params![id.env, id.country, version, r.code.as_str(), r.why, r.at],
        )?,
        None => tx.execute(
            "UPDATE versions SET aws_refused_code = NULL, aws_refused_why = NULL, aws_refused_at = NULL
             WHERE version = ?3 AND aws_refused_code IS NOT NULL
               AND key_id = (SELECT id FROM keys WHERE environment = ?1 AND country = ?2)",
            params![id.env, id.country, version],
        )?,
    };
    Ok(n == 1)
}

pub(super) fn aws_refusals(conn: &Connection) -> Result<Vec<(KeyId, u32, AwsRefusal)>> {
    let rows = conn
        .prepare_cached(
            "SELECT k.environment, k.country, v.version, v.aws_refused_code, v.aws_refused_why, v.aws_refused_at
             FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE v.aws_refused_code IS NOT NULL ORDER BY k.environment, k.country, v.version",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                refusal(r.get(3)?, r.get(4)?, r.get(5)?),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (env, country, version, refusal) in rows {
        let id = KeyId::parse(&env, &country)
            .map_err(|_| Error::integrity(format!("invalid key name {env}/{country} in state")))?;
        if let Some(r) = refusal {
            out.push((id, version, r));
        }
    }
    Ok(out)
}
