//! The schema of the state database: its migrations, and applying them at open.

use rusqlite::Connection;

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
    // 7: each audit entry's HMAC-SHA256 (hex) of its hash under the HSM's audit key; NULL
    // on entries written before.
    "ALTER TABLE audit ADD COLUMN mac TEXT;",
    // 8: a refusal of an aws version a node's KMS check saw (code, message, when), so that
    // every node withdraws it; cleared by a successful check.
    "ALTER TABLE versions ADD COLUMN aws_refused_code TEXT;
     ALTER TABLE versions ADD COLUMN aws_refused_why TEXT;
     ALTER TABLE versions ADD COLUMN aws_refused_at INTEGER;",
];

pub(super) fn migrate(conn: &Connection) -> anyhow::Result<()> {
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
