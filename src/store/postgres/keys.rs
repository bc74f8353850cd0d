//! Keys and versions in PostgreSQL: loading, adding (the key's row locked, so that of two
//! nodes adding the same number one commits and the other gets `version_conflict`), aws
//! seals, encryption counts, rotation periods. Every change to a key notifies
//! `keyd_changes` with `ENV/COUNTRY` and the time at the end of its transaction
//! (delivered at commit; `notify`).

use std::collections::HashMap;

use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Row};

use super::{col, Tx, CHANGES_CHANNEL};
use crate::domain::error::{Error, Result};
use crate::domain::{Code, Initiator, KeyId, VersionType};
use crate::store::types::{refusal, sealed_check};
use crate::store::{AwsRefusal, StoredAws, StoredAwsSeals, StoredKey, StoredVersion};

const KEY_COLUMNS: &str =
    "SELECT id, environment, country, rotation_period_days, created FROM keys";
/// A version's columns, then its key's row id (column 12), then its aws refusal (13-15).
const VERSION_COLUMNS: &str = "SELECT version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check, key_id, aws_refused_code, aws_refused_why, aws_refused_at FROM versions";

/// Every key with its versions. Called in a repeatable-read transaction: keys and versions
/// as of one moment.
pub(super) async fn load_all(c: &impl GenericClient) -> Result<Vec<StoredKey>> {
    let keys = c
        .query(&format!("{KEY_COLUMNS} ORDER BY environment, country"), &[])
        .await?;
    let mut versions: HashMap<i64, Vec<Row>> = HashMap::new();
    for row in c
        .query(&format!("{VERSION_COLUMNS} ORDER BY key_id, version"), &[])
        .await?
    {
        versions.entry(col(&row, 12)?).or_default().push(row);
    }
    keys.iter()
        .map(|row| {
            let rowid: i64 = col(row, 0)?;
            stored_key(row, versions.remove(&rowid).unwrap_or_default())
        })
        .collect()
}

pub(super) async fn load_key(c: &impl GenericClient, id: &KeyId) -> Result<Option<StoredKey>> {
    let Some(row) = c
        .query_opt(
            &format!("{KEY_COLUMNS} WHERE environment = $1 AND country = $2"),
            &[&id.env, &id.country],
        )
        .await?
    else {
        return Ok(None);
    };
    let rowid: i64 = col(&row, 0)?;
    let versions = c
        .query(
            &format!("{VERSION_COLUMNS} WHERE key_id = $1 ORDER BY version"),
            &[&rowid],
        )
        .await?;
    stored_key(&row, versions).map(Some)
}

pub(super) fn stored_key(row: &Row, versions: Vec<Row>) -> Result<StoredKey> {
    let (env, country): (String, String) = (col(row, 1)?, col(row, 2)?);
    let id = KeyId::parse(&env, &country)
        .map_err(|_| Error::integrity(format!("invalid key name {env}/{country} in state")))?;
    let period: Option<i64> = col(row, 3)?;
    let rotation_period_days = period
        .map(|d| u32::try_from(d).map_err(|_| Error::integrity(format!("{id}: bad period"))))
        .transpose()?;
    let versions = versions
        .iter()
        .map(|v| stored_version(&id, v))
        .collect::<Result<Vec<_>>>()?;
    Ok(StoredKey {
        id,
        rotation_period_days,
        created: col(row, 4)?,
        versions,
    })
}

fn stored_version(id: &KeyId, r: &Row) -> Result<StoredVersion> {
    let version = number(id, col(r, 0)?)?;
    let kind = VersionType::parse(&col::<String>(r, 1)?)?;
    let aws = match kind {
        VersionType::Managed => None,
        VersionType::Aws => match (col(r, 6)?, col(r, 7)?, col(r, 8)?, col(r, 9)?) {
            (Some(region), Some(encrypted_key), Some(cmk_arn), Some(access_key_id)) => {
                Some(StoredAws {
                    region,
                    encrypted_key,
                    cmk_arn,
                    access_key_id,
                    check: sealed_check((col(r, 10)?, col(r, 11)?)),
                    refusal: refusal(col(r, 13)?, col(r, 14)?, col(r, 15)?),
                })
            }
            _ => {
                return Err(Error::integrity(format!(
                    "{id} version {version}: aws version without its KMS details in state"
                )))
            }
        },
    };
    let iv: Vec<u8> = col(r, 4)?;
    Ok(StoredVersion {
        version,
        kind,
        created: col(r, 2)?,
        origin: Initiator::parse(&col::<String>(r, 3)?),
        iv: iv.as_slice().try_into().map_err(|_| {
            Error::integrity(format!(
                "{id} version {version}: stored IV has the wrong length"
            ))
        })?,
        wrapped: col(r, 5)?,
        aws,
    })
}

/// A stored version number as the domain's.
pub(super) fn number(id: &KeyId, n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::integrity(format!("{id}: version number {n} in state")))
}

/// Adds version `v.version` to `id`, creating the key row if needed. Refused unless the
/// number is exactly one past the last number ever used for the key: the key's row is
/// locked (`FOR UPDATE`) while it is checked, so a node that read the same last number
/// waits, then sees the new one. A key two nodes create at once: the second insert waits
/// for the first and then inserts nothing. The versions' primary key backs both.
pub(super) async fn add_version(
    tx: &Tx<'_>,
    id: &KeyId,
    rotation_period_days: Option<u32>,
    v: &StoredVersion,
) -> Result<()> {
    let conflict = |why: String| Error::conflict(Code::VersionConflict, format!("{id}: {why}"));
    let period = rotation_period_days.map(i64::from);
    let number = i64::from(v.version);
    let existing = tx
        .query_opt(
            "SELECT id, last_version FROM keys WHERE environment = $1 AND country = $2 FOR UPDATE",
            &[&id.env, &id.country],
        )
        .await?;
    let rowid: i64 = match existing {
        Some(row) => {
            let (rowid, last): (i64, i64) = (col(&row, 0)?, col(&row, 1)?);
            if number != last + 1 {
                return Err(conflict(format!(
                    "version {} is not next after {last}",
                    v.version
                )));
            }
            tx.execute(
                "UPDATE keys SET last_version = $2, rotation_period_days = $3 WHERE id = $1",
                &[&rowid, &number, &period],
            )
            .await?;
            rowid
        }
        None => {
            if v.version != 1 {
                return Err(conflict("a new key starts at version 1".into()));
            }
            let inserted = tx
                .query_opt(
                    "INSERT INTO keys (environment, country, rotation_period_days, created, last_version)
                     VALUES ($1, $2, $3, $4, 1)
                     ON CONFLICT (environment, country) DO NOTHING RETURNING id",
                    &[&id.env, &id.country, &period, &v.created],
                )
                .await?;
            match inserted {
                Some(row) => col(&row, 0)?,
                None => return Err(conflict("created meanwhile on another node".into())),
            }
        }
    };
    let inserted = insert_version(tx, rowid, v).await;
    match inserted {
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(conflict(format!("version {} exists", v.version)))
        }
        other => other?,
    };
    Ok(())
}

/// One version row of the key `key_rowid`, every column as stored (a new version, or one
/// copied whole by `state migrate`).
pub(super) async fn insert_version(
    tx: &Tx<'_>,
    key_rowid: i64,
    v: &StoredVersion,
) -> std::result::Result<u64, tokio_postgres::Error> {
    let aws = v.aws.as_ref();
    let check = aws.and_then(|a| a.check.as_ref());
    let refusal = aws.and_then(|a| a.refusal.as_ref());
    tx.execute(
        "INSERT INTO versions (key_id, version, type, created, origin, iv, wrapped, aws_region, aws_encrypted_key, aws_cmk_arn, aws_access_key_id, aws_check_iv, aws_check, aws_refused_code, aws_refused_why, aws_refused_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        &[
            &key_rowid,
            &i64::from(v.version),
            &v.kind.as_str(),
            &v.created,
            &v.origin.as_str(),
            &&v.iv[..],
            &v.wrapped,
            &aws.map(|a| a.region.as_str()),
            &aws.map(|a| a.encrypted_key.as_slice()),
            &aws.map(|a| a.cmk_arn.as_str()),
            &aws.map(|a| a.access_key_id.as_str()),
            &check.map(|c| &c.iv[..]),
            &check.map(|c| c.sealed.as_slice()),
            &refusal.map(|r| r.code.as_str()),
            &refusal.map(|r| r.why.as_str()),
            &refusal.map(|r| r.at),
        ],
    )
    .await
}

/// Records or clears an aws version's refusal (a recorded one is kept as it is), and tells
/// every node when that changed the state.
pub(super) async fn set_aws_refusal(
    tx: &Tx<'_>,
    id: &KeyId,
    version: u32,
    r: Option<&AwsRefusal>,
) -> Result<bool> {
    let is_aws = tx
        .query_opt(
            "SELECT v.type = 'aws' FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = $1 AND k.country = $2 AND v.version = $3",
            &[&id.env, &id.country, &i64::from(version)],
        )
        .await?
        .map(|row| col::<bool>(&row, 0))
        .transpose()?;
    if is_aws != Some(true) {
        return Err(Error::not_found(
            Code::VersionNotFound,
            format!("{id} has no aws version {version}"),
        ));
    }
    let n = match r {
        Some(r) => {
            tx.execute(
                "UPDATE versions SET aws_refused_code = $4, aws_refused_why = $5, aws_refused_at = $6
                 WHERE version = $3 AND aws_refused_code IS NULL
                   AND key_id = (SELECT id FROM keys WHERE environment = $1 AND country = $2)",
                &[&id.env, &id.country, &i64::from(version), &r.code.as_str(), &r.why, &r.at],
            )
            .await?
        }
        None => {
            tx.execute(
                "UPDATE versions SET aws_refused_code = NULL, aws_refused_why = NULL, aws_refused_at = NULL
                 WHERE version = $3 AND aws_refused_code IS NOT NULL
                   AND key_id = (SELECT id FROM keys WHERE environment = $1 AND country = $2)",
                &[&id.env, &id.country, &i64::from(version)],
            )
            .await?
        }
    };
    if n == 1 {
        notify(tx, id).await?;
    }
    Ok(n == 1)
}

pub(super) async fn aws_refusals(c: &impl GenericClient) -> Result<Vec<(KeyId, u32, AwsRefusal)>> {
    let rows = c
        .query(
            "SELECT k.environment, k.country, v.version, v.aws_refused_code, v.aws_refused_why, v.aws_refused_at
             FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE v.aws_refused_code IS NOT NULL ORDER BY k.environment, k.country, v.version",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let (env, country): (String, String) = (col(&row, 0)?, col(&row, 1)?);
        let id = KeyId::parse(&env, &country)
            .map_err(|_| Error::integrity(format!("invalid key name {env}/{country} in state")))?;
        let version = number(&id, col(&row, 2)?)?;
        if let Some(r) = refusal(col(&row, 3)?, col(&row, 4)?, col(&row, 5)?) {
            out.push((id, version, r));
        }
    }
    Ok(out)
}

/// Tells every node listening that `id` changed: `ENV/COUNTRY` and the database's time in
/// Unix ms, which nodes measure the propagation delay from (delivered when the transaction
/// commits, never when it rolls back). The last statement of a change's transaction, so
/// that the time is its commit's, give or take the commit itself.
pub(super) async fn notify(tx: &Tx<'_>, id: &KeyId) -> Result<()> {
    tx.execute(
        "SELECT pg_notify($1, $2::text || ' ' || floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint::text)",
        &[&CHANGES_CHANNEL, &format!("{}/{}", id.env, id.country)],
    )
    .await?;
    Ok(())
}

pub(super) async fn aws_seals(
    c: &impl GenericClient,
    id: &KeyId,
    version: u32,
) -> Result<Option<StoredAwsSeals>> {
    let Some(row) = c
        .query_opt(
            "SELECT v.iv, v.wrapped, v.aws_check_iv, v.aws_check FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = $1 AND k.country = $2 AND v.version = $3 AND v.type = 'aws'",
            &[&id.env, &id.country, &i64::from(version)],
        )
        .await?
    else {
        return Ok(None);
    };
    let iv: Vec<u8> = col(&row, 0)?;
    Ok(Some(StoredAwsSeals {
        secret_iv: iv.as_slice().try_into().map_err(|_| {
            Error::integrity(format!(
                "{id} version {version}: stored IV has the wrong length"
            ))
        })?,
        secret: col(&row, 1)?,
        check: sealed_check((col(&row, 2)?, col(&row, 3)?)),
    }))
}

pub(super) async fn encryptions(c: &impl GenericClient, id: &KeyId, version: u32) -> Result<u64> {
    let row = c
        .query_opt(
            "SELECT v.encryptions FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = $1 AND k.country = $2 AND v.version = $3",
            &[&id.env, &id.country, &i64::from(version)],
        )
        .await?;
    let n: i64 = row.map(|r| col(&r, 0)).transpose()?.unwrap_or(0);
    Ok(n.max(0) as u64)
}

/// Adds a reservation of `n` to a version's count under the version's row lock (nodes
/// reserving at once each get a block of their own) and returns the new total.
pub(super) async fn reserve_encryptions(
    tx: &Tx<'_>,
    id: &KeyId,
    version: u32,
    n: u64,
) -> Result<u64> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let row = tx
        .query_opt(
            "UPDATE versions SET encryptions = encryptions + $4
             WHERE version = $3 AND key_id = (SELECT id FROM keys WHERE environment = $1 AND country = $2)
             RETURNING encryptions",
            &[&id.env, &id.country, &i64::from(version), &n],
        )
        .await?;
    match row {
        Some(r) => Ok(col::<i64>(&r, 0)?.max(0) as u64),
        None => Err(Error::internal(format!(
            "{id} version {version} is not in the state: cannot count its encryptions"
        ))),
    }
}

/// A clean stop's deltas, each added to its count (never below 0): a node gives back only
/// the unused part of its own reservations, so what other nodes reserved stays counted.
pub(super) async fn settle_encryptions(tx: &Tx<'_>, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
    for (id, version, delta) in deltas {
        tx.execute(
            "UPDATE versions SET encryptions = GREATEST(encryptions + $4, 0)
             WHERE version = $3 AND key_id = (SELECT id FROM keys WHERE environment = $1 AND country = $2)",
            &[&id.env, &id.country, &i64::from(*version), delta],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn set_rotation_period(tx: &Tx<'_>, id: &KeyId, days: Option<u32>) -> Result<()> {
    let n = tx
        .execute(
            "UPDATE keys SET rotation_period_days = $3 WHERE environment = $1 AND country = $2",
            &[&id.env, &id.country, &days.map(i64::from)],
        )
        .await?;
    if n == 0 {
        return Err(Error::not_found(Code::KeyNotFound, format!("no key {id}")));
    }
    Ok(())
}
