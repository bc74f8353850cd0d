//! Durable state behind the [`Store`] trait: keys and their versions in wrapped form only,
//! encryption counts, admins' TOTP secrets and attempts, and the MACed, hash-chained audit
//! log. Two backends: SQLite ([`SqliteStore`]: WAL, synchronous FULL, one file under the
//! state directory; the default) and PostgreSQL ([`PgStore`]: one database several nodes
//! share); every layer above holds an `Arc<dyn Store>`.

// The contract's tests, for any backend: unit tests (SQLite) and, in test-clock builds,
// the integration tests (PostgreSQL).
#[cfg(any(test, feature = "test-clock"))]
pub mod conformance;
mod leader;
mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;
mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, StateBackend};

use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::{AuditEntry, AuditRecord, Reader};
use crate::domain::error::Result;
use crate::domain::KeyId;

pub use leader::{Leadership, Lease};
pub use postgres::{PgConnect, PgStore, CHANGES_CHANNEL};
pub use sqlite::{SqliteStore, DB_FILE};
pub use types::{
    AwsRefusal, ChangeFeed, CopiedAttempts, CopiedTotp, SealedCheck, StateCopy, StateEvent,
    StoredAws, StoredAwsSeals, StoredKey, StoredTotp, StoredVersion, TotpLimits,
};

/// Everything the daemon persists. Each method that changes the state is one transaction:
/// it all commits or none of it does, and the audit entry it takes is appended (chained to
/// the last entry and MACed by the installed [`AuditSeal`]) inside that same transaction.
///
/// Synchronous and object-safe on purpose. Callers on the runtime move calls off it
/// (`spawn_blocking`), which SQLite's fsyncs need anyway; the seal MACs entries in the HSM
/// from inside the transaction, through a blocking call, which an async trait would have to
/// re-enter the runtime for; and `dyn Store` needs no boxed futures. A PostgreSQL backend
/// (tokio-postgres) blocks on its own runtime's handle from those blocking threads.
///
/// What a shared backend (several hosts, one key set) relies on:
/// - Version numbers: a version's number is sealed into its wrap (the AAD), so the caller
///   picks it before the HSM wraps the key; the store is the arbiter. [`Store::add_version`]
///   checks, in its transaction, that the number is exactly one past the last number ever
///   used for the key (1 for a new key) and refuses anything else with `version_conflict`,
///   so of two hosts racing for the same number one wins and the other reloads
///   ([`Store::load_key`]) and tries again or reports the conflict.
/// - The audit chain: appends take the chain's head inside the transaction (SQLite: the
///   immediate transaction's write lock; PostgreSQL: a lock on the head row), so entries
///   from several writers still form one chain.
/// - Reads: the daemon serves from memory; [`Store::load_all`] (start, full reload) and
///   [`Store::load_key`] (one key, after a change made elsewhere) refresh it, and
///   [`Store::head`] (the last audit entry and each key's last version) tells whether
///   anything changed.
pub trait Store: Send + Sync + 'static {
    /// Every key with every version, keys by (environment, country), versions oldest first.
    fn load_all(&self) -> Result<Vec<StoredKey>>;
    /// One key with every version; `None` when the state has no such key.
    fn load_key(&self, id: &KeyId) -> Result<Option<StoredKey>>;
    /// Adds version `v.version` to `id`, creating the key when it is version 1, and sets the
    /// key's rotation period, with its audit entry. Refused (`version_conflict`) unless the
    /// number is exactly one past the last one ever used for the key.
    fn add_version(
        &self,
        id: &KeyId,
        rotation_period_days: Option<u32>,
        v: &StoredVersion,
        audit: &AuditEntry,
    ) -> Result<()>;
    /// Sets a key's rotation period, with its audit entry (`key_not_found`: no such key).
    fn set_rotation_period(&self, id: &KeyId, days: Option<u32>, audit: &AuditEntry) -> Result<()>;
    /// The sealed IAM secret and the sealed key check of an aws version, as stored now
    /// (`None`: no such aws version).
    fn aws_seals(&self, id: &KeyId, version: u32) -> Result<Option<StoredAwsSeals>>;
    /// Records that a node's check refused aws version `version` of `id` (`Some`: KMS
    /// refused, or the key failed its key check), or that a check decrypted it again
    /// (`None`), so that every node withdraws or restores it (`load_all`, `load_key` and
    /// `aws_refusals` return it). A refusal already recorded is left as it is. Whether the
    /// state changed (a change is notified like any change to the key); `version_not_found`
    /// for a version the state lacks (or that is not aws).
    fn set_aws_refusal(
        &self,
        id: &KeyId,
        version: u32,
        refusal: Option<&AwsRefusal>,
    ) -> Result<bool>;
    /// Every recorded refusal, by key and version.
    fn aws_refusals(&self) -> Result<Vec<(KeyId, u32, AwsRefusal)>>;

    /// Records encrypted under a version, as stored (at least as many as all nodes made: see
    /// `keyring::ledger`). 0 for a version the state does not have.
    fn encryptions(&self, id: &KeyId, version: u32) -> Result<u64>;
    /// Adds `n` to a version's stored encryption count, atomically, and returns the new
    /// total (a reservation of `n`, made before the encryptions it covers; the reserving
    /// node owns the `n` just below the total). An error for a version the state lacks.
    fn reserve_encryptions(&self, id: &KeyId, version: u32, n: u64) -> Result<u64>;
    /// Settles encryption counts (at a clean stop), in one transaction: adds each signed
    /// delta to the stored count (never below 0). A node gives back the unused part of its
    /// reservations (a negative delta) or adds encryptions it made beyond them during an
    /// outage (positive): never what other nodes reserved.
    fn settle_encryptions(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()>;

    /// An admin's sealed TOTP secret.
    fn totp_get(&self, uid: u32) -> Result<Option<StoredTotp>>;
    /// How many admins have a TOTP secret.
    fn totp_count(&self) -> Result<u64>;
    /// Stores (or replaces) an admin's sealed secret, with its audit entry.
    fn totp_put(&self, uid: u32, t: &StoredTotp, created: i64, audit: &AuditEntry) -> Result<()>;
    /// Removes an admin's secret and its failures and lock, with its audit entry; false
    /// when it had none (the entry is still appended).
    fn totp_delete(&self, uid: u32, audit: &AuditEntry) -> Result<bool>;
    /// Until when `uid`'s codes are refused (`Some` only while the lock holds at `now`).
    fn totp_locked_until(&self, uid: u32, now: i64) -> Result<Option<i64>>;
    /// Counts an attempt of `uid` as a failure *before* its code is checked, so that a check
    /// that never finishes (a dropped request, a crash) still counts, and refuses it while
    /// the uid is locked. `Err(until)`: locked until then (a window already holding
    /// `max_failures` failures locks here). The caller then checks the code and settles the
    /// attempt with `totp_attempt_failed`, `totp_attempt_passed` or `totp_attempt_withdraw`.
    fn totp_attempt_begin(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<std::result::Result<(), i64>>;
    /// The attempt counted by `totp_attempt_begin` was a wrong (or replayed) code: it stays
    /// counted, and when it is the `max_failures`th of its window the uid is locked for
    /// `lockout` seconds. Returns the end of the lock it set.
    fn totp_attempt_failed(&self, uid: u32, now: i64, limits: TotpLimits) -> Result<Option<i64>>;
    /// The attempt's code was right: marks `step` used (replay protection) and takes the
    /// attempt back from the failures, in one transaction. False when `step` (or a later
    /// one) was used already: the attempt then stays counted (a replay is a failure).
    fn totp_attempt_passed(&self, uid: u32, step: u64) -> Result<bool>;
    /// Takes back an attempt whose code was never checked (the HSM or the state failed) or
    /// that activated a new secret.
    fn totp_attempt_withdraw(&self, uid: u32) -> Result<()>;

    /// Seals every audit entry appended from now on. Until one is installed, appends are
    /// refused: an entry without a MAC after MACed ones would break the log.
    fn set_audit_seal(&self, seal: Arc<dyn AuditSeal>);
    /// Appends one audit entry in its own transaction (refusals, failures).
    fn audit(&self, entry: &AuditEntry) -> Result<()>;
    /// Audit entries with `seq > since`, oldest first, at most `limit`.
    fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>>;
    /// The newest audit entry and each key's last version (what the HSM anchor records),
    /// read as of one moment.
    fn head(&self) -> Result<StateHead>;
    /// The hash of the audit entry at `seq`, if there is one.
    fn audit_hash_at(&self, seq: i64) -> Result<Option<String>>;
    /// Whether any audit entry carries a MAC.
    fn audit_has_macs(&self) -> Result<bool>;

    /// Everything but the audit log, read as of one moment (`state migrate`).
    fn export(&self) -> Result<StateCopy>;
    /// Writes `copy`, and the audit records `audit` reads, into this state in one
    /// transaction: records as they are (sequence, hashes, MACs), nothing appended, no seal
    /// needed. Refused (`version_conflict`) unless the state is empty: no keys, TOTP rows
    /// or audit entries. A record without a MAC is refused where the backend needs one
    /// (PostgreSQL).
    fn import(&self, copy: &StateCopy, audit: Reader<'_>) -> Result<()>;

    /// Whether the HSM anchor can follow this state's head: true when this process is its
    /// only writer (SQLite, under its lock); false for a state several nodes write
    /// (PostgreSQL), whose head moves without this node knowing.
    fn anchored(&self) -> bool;
    /// Runs `f` while no other process runs an `exclusive` section on the same state
    /// (PostgreSQL: a session advisory lock; SQLite: the state lock already excludes
    /// everyone). For set-up that must happen once, such as making the HSM's audit key.
    fn exclusive(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()>;
    /// Starts this node's lease on timer rotations (once per process): SQLite, one node,
    /// always leads; PostgreSQL, the node holding an advisory lock on a session of its own;
    /// `lease` bounds how long a vanished leader keeps it.
    fn leadership(&self, lease: Duration) -> Leadership;

    /// `Some(reason)` while the state fails for a reason of the disk (full, I/O error,
    /// read-only) or of the database's server (connection lost, shut down); clears at the
    /// next operation that succeeds.
    fn unavailable(&self) -> Option<String>;

    /// The changes other processes commit to this state, as they commit (PostgreSQL: LISTEN
    /// on a connection of its own, made again when lost; while it is lost, `unavailable`
    /// says so). `None` for a state no other process writes (SQLite). Starts following at
    /// the call: call it once.
    fn follow(&self) -> Option<ChangeFeed> {
        None
    }
}

/// How audit entries are sealed: installed by the keyring, which holds the HSM (the store
/// does not know it).
pub trait AuditSeal: Send + Sync {
    /// The MAC (hex) of an entry's chain hash. Runs inside the appending transaction, so
    /// it must never wait on the state.
    fn mac(&self, hash: &str) -> Result<String>;
    /// After a transaction that appended entries committed, with the state's lock released.
    fn appended(&self, store: &dyn Store);
}

/// Opens (creating if needed) the SQLite state under `dir`: takes the state lock, applies
/// migrations.
pub fn open(dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    Ok(Arc::new(SqliteStore::open(dir)?))
}

/// Opens the SQLite state under `dir` read-only (`audit verify`): no lock, no migrations,
/// and every write is refused.
pub fn open_read_only(dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    Ok(Arc::new(SqliteStore::open_read_only(dir)?))
}

/// The state the config names, found but not opened yet: secrets it needs (the PostgreSQL
/// password) are read here, so that an offline tool reads them before it drops root.
pub enum Opener {
    Sqlite(PathBuf),
    Postgres(Box<PgConnect>),
}

impl Opener {
    /// The config's backend; `state_dir` (a tool's `--state-dir`) names a SQLite state
    /// whatever the backend.
    pub fn new(config: &Config, state_dir: Option<PathBuf>) -> anyhow::Result<Opener> {
        Ok(match (state_dir, config.state.backend) {
            (Some(dir), _) => Opener::Sqlite(dir),
            (None, StateBackend::Sqlite) => Opener::Sqlite(config.state.dir.clone()),
            (None, StateBackend::Postgres) => {
                Opener::Postgres(Box::new(PgConnect::from_config(config)?))
            }
        })
    }

    /// For the daemon or an offline admin tool: creates the state if needed, applies
    /// migrations (SQLite: takes the state lock).
    pub fn open(self) -> anyhow::Result<Arc<dyn Store>> {
        match self {
            Opener::Sqlite(dir) => open(&dir),
            Opener::Postgres(c) => Ok(Arc::new(PgStore::open(*c)?)),
        }
    }

    /// Read-only (`audit verify`): no migrations, every write refused.
    pub fn open_read_only(self) -> anyhow::Result<Arc<dyn Store>> {
        match self {
            Opener::Sqlite(dir) => open_read_only(&dir),
            Opener::Postgres(c) => Ok(Arc::new(PgStore::open_read_only(*c)?)),
        }
    }
}

/// The daemon's state, as its config names it.
pub fn open_for(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Opener::new(config, None)?.open()
}

/// A seal for tests of the state: a fixed MAC, no anchor.
#[cfg(any(test, feature = "test-clock"))]
pub struct TestSeal;

#[cfg(any(test, feature = "test-clock"))]
impl AuditSeal for TestSeal {
    fn mac(&self, _: &str) -> Result<String> {
        Ok("00".repeat(crate::domain::audit::MAC_LEN))
    }
    fn appended(&self, _: &dyn Store) {}
}
