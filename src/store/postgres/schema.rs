//! The schema of the PostgreSQL state: its migrations, versioned in the database
//! (`keyd_schema`), applied in one transaction under an advisory lock, so that nodes
//! starting at once apply each migration once, and a node never sees half a schema.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::domain::audit;

/// `pg_advisory_xact_lock` key of the migrations ("keyd" in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6b65_7964_0000_0001;

/// Migrations, applied in order; `keyd_schema.version` records how many ran. The first is
/// the SQLite schema as it stood at its seventh migration, plus `audit_head`: the chain's
/// head as one row that appends lock, so that entries from several nodes form one chain.
/// The second is SQLite's eighth (aws refusals).
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE keys (
        id BIGSERIAL PRIMARY KEY,
        environment TEXT NOT NULL,
        country TEXT NOT NULL,
        rotation_period_days BIGINT,
        created BIGINT NOT NULL,
        last_version BIGINT NOT NULL,
        UNIQUE (environment, country)
    );
    CREATE TABLE versions (
        key_id BIGINT NOT NULL REFERENCES keys(id),
        version BIGINT NOT NULL,
        type TEXT NOT NULL,
        created BIGINT NOT NULL,
        origin TEXT NOT NULL,
        iv BYTEA NOT NULL,
        wrapped BYTEA NOT NULL,
        aws_region TEXT,
        aws_encrypted_key BYTEA,
        aws_cmk_arn TEXT,
        aws_access_key_id TEXT,
        aws_check_iv BYTEA,
        aws_check BYTEA,
        encryptions BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        time BIGINT NOT NULL,
        actor TEXT NOT NULL,
        uid BIGINT,
        gid BIGINT,
        pid INTEGER,
        action TEXT NOT NULL,
        environment TEXT,
        country TEXT,
        version BIGINT,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        mac TEXT NOT NULL
    );
    CREATE TABLE audit_head (
        one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE totp (
        uid BIGINT PRIMARY KEY,
        iv BYTEA NOT NULL,
        sealed BYTEA NOT NULL,
        created BIGINT NOT NULL,
        last_step BIGINT NOT NULL
    );
    CREATE TABLE totp_attempts (
        uid BIGINT PRIMARY KEY,
        failures BIGINT NOT NULL,
        window_start BIGINT NOT NULL,
        locked_until BIGINT NOT NULL
    );
",
    "
    -- A refusal of an aws version a node's KMS check saw (code, message, when), so that
    -- every node withdraws it; cleared by a successful check on any node.
    ALTER TABLE versions ADD COLUMN aws_refused_code TEXT;
    ALTER TABLE versions ADD COLUMN aws_refused_why TEXT;
    ALTER TABLE versions ADD COLUMN aws_refused_at BIGINT;
",
];

/// Brings the schema up to date (the daemon and the offline admin tools).
pub(super) async fn migrate(client: &mut Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS keyd_schema (version INTEGER NOT NULL)")
        .await?;
    let current = match tx.query_opt("SELECT version FROM keyd_schema", &[]).await? {
        Some(row) => row.try_get::<_, i32>(0)?,
        None => {
            tx.execute("INSERT INTO keyd_schema (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if current > known {
        anyhow::bail!(
            "PostgreSQL state schema version {current} is newer than this daemon understands ({known}); refusing to touch it"
        );
    }
    for sql in MIGRATIONS.iter().skip(current.max(0) as usize) {
        tx.batch_execute(sql).await?;
    }
    tx.execute("UPDATE keyd_schema SET version = $1", &[&known])
        .await?;
    // The chain starts at genesis; later starts find the row and leave it.
    tx.execute(
        "INSERT INTO audit_head (one, seq, hash) VALUES (TRUE, 0, $1) ON CONFLICT DO NOTHING",
        &[&audit::GENESIS],
    )
    .await?;
    tx.commit().await?;
    if current < known {
        tracing::info!(
            from = current,
            to = known,
            "PostgreSQL state schema migrated"
        );
    }
    Ok(())
}

/// Read-only opens (`audit verify`) change nothing: the schema must be there, at this
/// daemon's version.
pub(super) async fn check(client: &Client) -> anyhow::Result<()> {
    let version = match client
        .query_one("SELECT version FROM keyd_schema", &[])
        .await
    {
        Ok(row) => row.try_get::<_, i32>(0)?,
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => anyhow::bail!(
            "no incountry-keyd state in this PostgreSQL database (no daemon has run against it)"
        ),
        Err(e) => return Err(e.into()),
    };
    let known = MIGRATIONS.len() as i32;
    if version != known {
        anyhow::bail!(
            "PostgreSQL state schema version {version}, this tool knows {known}: use the daemon's own version of it"
        );
    }
    Ok(())
}
