//! `Store` for `PgStore`: each method as one operation on one connection (a change: one
//! transaction with its audit entry).

use std::sync::Arc;
use std::time::Duration;

use super::pool::OP_TIMEOUT;
use super::{audit_log, copy, keys, lease, listen, totp, PgStore, EXCLUSIVE_LOCK};
use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::{AuditEntry, AuditRecord, Reader};
use crate::domain::error::Result;
use crate::domain::KeyId;
use crate::store::{
    AuditSeal, AwsRefusal, ChangeFeed, Leadership, StateCopy, Store, StoredAwsSeals, StoredKey,
    StoredTotp, StoredVersion, TotpLimits,
};

/// How long copying a whole state into the database may take (`state migrate`).
const IMPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Store for PgStore {
    fn load_all(&self) -> Result<Vec<StoredKey>> {
        self.snapshot(async |tx| keys::load_all(tx).await)
    }

    fn load_key(&self, id: &KeyId) -> Result<Option<StoredKey>> {
        self.snapshot(async |tx| keys::load_key(tx, id).await)
    }

    fn add_version(
        &self,
        id: &KeyId,
        rotation_period_days: Option<u32>,
        v: &StoredVersion,
        audit: &AuditEntry,
    ) -> Result<()> {
        self.write(async |tx| {
            keys::add_version(tx, id, rotation_period_days, v).await?;
            audit_log::append(tx, audit).await?;
            keys::notify(tx, id).await
        })
    }

    fn set_rotation_period(&self, id: &KeyId, days: Option<u32>, audit: &AuditEntry) -> Result<()> {
        self.write(async |tx| {
            keys::set_rotation_period(tx, id, days).await?;
            audit_log::append(tx, audit).await?;
            keys::notify(tx, id).await
        })
    }

    fn aws_seals(&self, id: &KeyId, version: u32) -> Result<Option<StoredAwsSeals>> {
        self.run(async |c| keys::aws_seals(c, id, version).await)
    }

    fn set_aws_refusal(
        &self,
        id: &KeyId,
        version: u32,
        refusal: Option<&AwsRefusal>,
    ) -> Result<bool> {
        self.write(async |tx| keys::set_aws_refusal(tx, id, version, refusal).await)
    }

    fn aws_refusals(&self) -> Result<Vec<(KeyId, u32, AwsRefusal)>> {
        self.run(async |c| keys::aws_refusals(c).await)
    }

    fn encryptions(&self, id: &KeyId, version: u32) -> Result<u64> {
        self.run(async |c| keys::encryptions(c, id, version).await)
    }

    fn reserve_encryptions(&self, id: &KeyId, version: u32, n: u64) -> Result<u64> {
        self.write(async |tx| keys::reserve_encryptions(tx, id, version, n).await)
    }

    fn settle_encryptions(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
        self.write(async |tx| keys::settle_encryptions(tx, deltas).await)
    }

    fn totp_get(&self, uid: u32) -> Result<Option<StoredTotp>> {
        self.run(async |c| totp::get(c, uid).await)
    }

    fn totp_count(&self) -> Result<u64> {
        self.run(async |c| totp::count(c).await)
    }

    fn totp_put(&self, uid: u32, t: &StoredTotp, created: i64, audit: &AuditEntry) -> Result<()> {
        self.write(async |tx| {
            totp::put(tx, uid, t, created).await?;
            audit_log::append(tx, audit).await
        })
    }

    fn totp_delete(&self, uid: u32, audit: &AuditEntry) -> Result<bool> {
        self.write(async |tx| {
            let had = totp::delete(tx, uid).await?;
            audit_log::append(tx, audit).await?;
            Ok(had)
        })
    }

    fn totp_locked_until(&self, uid: u32, now: i64) -> Result<Option<i64>> {
        self.run(async |c| totp::locked_until(c, uid, now).await)
    }

    fn totp_attempt_begin(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<std::result::Result<(), i64>> {
        self.write(async |tx| totp::attempt_begin(tx, uid, now, limits).await)
    }

    fn totp_attempt_failed(&self, uid: u32, now: i64, limits: TotpLimits) -> Result<Option<i64>> {
        self.write(async |tx| totp::attempt_failed(tx, uid, now, limits).await)
    }

    fn totp_attempt_passed(&self, uid: u32, step: u64) -> Result<bool> {
        self.write(async |tx| totp::attempt_passed(tx, uid, step).await)
    }

    fn totp_attempt_withdraw(&self, uid: u32) -> Result<()> {
        self.write(async |tx| totp::withdraw_attempt(tx, uid).await)
    }

    fn set_audit_seal(&self, seal: Arc<dyn AuditSeal>) {
        *self.seal.lock().unwrap_or_else(|p| p.into_inner()) = Some(seal);
    }

    fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.write(async |tx| audit_log::append(tx, entry).await)
    }

    fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.run(async |c| audit_log::read(c, since, limit).await)
    }

    fn head(&self) -> Result<StateHead> {
        self.snapshot(async |tx| audit_log::head(tx).await)
    }

    fn audit_hash_at(&self, seq: i64) -> Result<Option<String>> {
        self.run(async |c| audit_log::hash_at(c, seq).await)
    }

    fn audit_has_macs(&self) -> Result<bool> {
        self.run(async |c| audit_log::has_macs(c).await)
    }

    fn export(&self) -> Result<StateCopy> {
        self.snapshot(async |tx| copy::export(tx).await)
    }

    fn import(&self, state: &StateCopy, audit: Reader<'_>) -> Result<()> {
        self.write_within(IMPORT_TIMEOUT.max(OP_TIMEOUT), async |tx| {
            copy::import(tx, state, audit).await
        })
    }

    /// Several nodes write this state: the HSM anchor cannot follow its head.
    fn anchored(&self) -> bool {
        false
    }

    /// A session advisory lock, held on one connection while `f` runs (released when the
    /// connection is lost too).
    fn exclusive(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let mut lease = self.pool.take()?;
        let locked = self.on(&mut lease, async |c| {
            c.execute("SELECT pg_advisory_lock($1)", &[&EXCLUSIVE_LOCK])
                .await?;
            Ok(())
        });
        self.note(&locked);
        if locked.is_err() {
            lease.discard();
        }
        locked?;
        let out = f();
        let unlocked = self.on(&mut lease, async |c| {
            c.execute("SELECT pg_advisory_unlock($1)", &[&EXCLUSIVE_LOCK])
                .await?;
            Ok(())
        });
        if unlocked.is_err() {
            // Closing the session releases the lock.
            lease.discard();
        }
        out
    }

    /// The rotator's lease (`lease`): an advisory lock on a session of this node's own.
    fn leadership(&self, lease: Duration) -> Leadership {
        if self.read_only {
            // A tool reading the state never rotates.
            return Leadership::cluster(&self.node).1;
        }
        let (config, tls) = self.pool.target();
        lease::start(&self.handle, config.clone(), tls.clone(), &self.node, lease)
    }

    /// A failed operation, else a lost change listener: either way this node is not in
    /// step with the state.
    fn unavailable(&self) -> Option<String> {
        let failed = self
            .unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        failed.or_else(|| {
            self.following
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    fn follow(&self) -> Option<ChangeFeed> {
        Some(listen::start(
            self.pool.dialer(),
            &self.handle,
            self.following.clone(),
        ))
    }
}
