//! Two keyrings on one state, as two nodes on one PostgreSQL database (here a SQLite state
//! that says several processes write it): one learns the other's versions, unwrapping only
//! those; the daily limit counts both; a root key this HSM lacks; a lost race for a
//! version number.

use std::sync::{Arc, Mutex};

use crate::domain::audit::anchor::StateHead;
use crate::domain::audit::{Actor, AuditEntry, AuditOutcome, AuditRecord};
use crate::domain::clock::ManualClock;
use crate::domain::error::Result;
use crate::domain::{Code, Initiator, KeyId, VersionType};
use crate::hsm::fake::FakeHsm;
use crate::keyring::fixture::{admin, id, open_store, timer, T0};
use crate::keyring::{KeySource, Keyring};
use crate::kms::fake::FakeKms;
use crate::store::{
    AuditSeal, Store, StoredAwsSeals, StoredKey, StoredTotp, StoredVersion, TotpLimits,
};

type Race = Box<dyn FnOnce(&dyn Store) + Send>;

/// The state shared: `anchored` is false, as for PostgreSQL. `race` runs once before the
/// next `add_version`: another node's commit just before this one's.
struct Shared {
    inner: Arc<dyn Store>,
    race: Mutex<Option<Race>>,
}

impl Store for Shared {
    fn load_all(&self) -> Result<Vec<StoredKey>> {
        self.inner.load_all()
    }
    fn load_key(&self, id: &KeyId) -> Result<Option<StoredKey>> {
        self.inner.load_key(id)
    }
    fn add_version(
        &self,
        id: &KeyId,
        period: Option<u32>,
        v: &StoredVersion,
        audit: &AuditEntry,
    ) -> Result<()> {
        if let Some(race) = self.race.lock().unwrap().take() {
            race(self.inner.as_ref());
        }
        self.inner.add_version(id, period, v, audit)
    }
    fn set_rotation_period(&self, id: &KeyId, days: Option<u32>, a: &AuditEntry) -> Result<()> {
        self.inner.set_rotation_period(id, days, a)
    }
    fn aws_seals(&self, id: &KeyId, version: u32) -> Result<Option<StoredAwsSeals>> {
        self.inner.aws_seals(id, version)
    }
    fn encryptions(&self, id: &KeyId, version: u32) -> Result<u64> {
        self.inner.encryptions(id, version)
    }
    fn reserve_encryptions(&self, id: &KeyId, version: u32, n: u64) -> Result<u64> {
        self.inner.reserve_encryptions(id, version, n)
    }
    fn settle_encryptions(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
        self.inner.settle_encryptions(deltas)
    }
    fn totp_get(&self, uid: u32) -> Result<Option<StoredTotp>> {
        self.inner.totp_get(uid)
    }
    fn totp_count(&self) -> Result<u64> {
        self.inner.totp_count()
    }
    fn totp_put(&self, uid: u32, t: &StoredTotp, created: i64, a: &AuditEntry) -> Result<()> {
        self.inner.totp_put(uid, t, created, a)
    }
    fn totp_delete(&self, uid: u32, a: &AuditEntry) -> Result<bool> {
        self.inner.totp_delete(uid, a)
    }
    fn totp_locked_until(&self, uid: u32, now: i64) -> Result<Option<i64>> {
        self.inner.totp_locked_until(uid, now)
    }
    fn totp_attempt_begin(
        &self,
        uid: u32,
        now: i64,
        limits: TotpLimits,
    ) -> Result<std::result::Result<(), i64>> {
        self.inner.totp_attempt_begin(uid, now, limits)
    }
    fn totp_attempt_failed(&self, uid: u32, now: i64, limits: TotpLimits) -> Result<Option<i64>> {
        self.inner.totp_attempt_failed(uid, now, limits)
    }
    fn totp_attempt_passed(&self, uid: u32, step: u64) -> Result<bool> {
        self.inner.totp_attempt_passed(uid, step)
    }
    fn totp_attempt_withdraw(&self, uid: u32) -> Result<()> {
        self.inner.totp_attempt_withdraw(uid)
    }
    fn set_audit_seal(&self, seal: Arc<dyn AuditSeal>) {
        self.inner.set_audit_seal(seal)
    }
    fn audit(&self, entry: &AuditEntry) -> Result<()> {
        self.inner.audit(entry)
    }
    fn audit_since(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.inner.audit_since(since, limit)
    }
    fn head(&self) -> Result<StateHead> {
        self.inner.head()
    }
    fn audit_hash_at(&self, seq: i64) -> Result<Option<String>> {
        self.inner.audit_hash_at(seq)
    }
    fn audit_has_macs(&self) -> Result<bool> {
        self.inner.audit_has_macs()
    }
    fn anchored(&self) -> bool {
        false
    }
    fn exclusive(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.inner.exclusive(f)
    }
    fn set_aws_refusal(
        &self,
        id: &KeyId,
        version: u32,
        refusal: Option<&crate::store::AwsRefusal>,
    ) -> Result<bool> {
        self.inner.set_aws_refusal(id, version, refusal)
    }
    fn aws_refusals(&self) -> Result<Vec<(KeyId, u32, crate::store::AwsRefusal)>> {
        self.inner.aws_refusals()
    }
    fn export(&self) -> Result<crate::store::StateCopy> {
        self.inner.export()
    }
    fn import(
        &self,
        copy: &crate::store::StateCopy,
        audit: crate::domain::audit::Reader<'_>,
    ) -> Result<()> {
        self.inner.import(copy, audit)
    }
    fn leadership(&self, lease: std::time::Duration) -> crate::store::Leadership {
        self.inner.leadership(lease)
    }
    fn unavailable(&self) -> Option<String> {
        self.inner.unavailable()
    }
}

/// Two nodes: keyrings on one shared state and one token.
struct Nodes {
    _dir: tempfile::TempDir,
    hsm: FakeHsm,
    state: Arc<Shared>,
    a: Keyring,
    b: Keyring,
}

async fn nodes() -> Nodes {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(Shared {
        inner: open_store(dir.path()),
        race: Mutex::new(None),
    });
    let hsm = FakeHsm::default();
    let clock = Arc::new(ManualClock::at(T0 + 3600));
    let node = || {
        let (worker, _thread) = hsm.start();
        let store: Arc<dyn Store> = state.clone();
        Keyring::load(store, worker, clock.clone(), Arc::new(FakeKms::default()))
    };
    let a = node().await.unwrap();
    let b = node().await.unwrap();
    Nodes {
        _dir: dir,
        hsm: hsm.clone(),
        state,
        a,
        b,
    }
}

fn managed(per_day: u32) -> crate::keyring::NewVersion {
    admin(KeySource::Managed, Some(30), per_day, 0)
}

#[tokio::test]
async fn a_node_loads_another_nodes_versions_unwrapping_only_those() {
    let n = nodes().await;
    let de = id("prod", "DE");
    assert!(n.a.shared() && n.b.propagation().is_some());
    n.a.add_version(&de, managed(100)).await.unwrap();
    assert!(n.b.key(&de).is_err());
    n.b.reload_all().await.unwrap();
    let first = n.b.key(&de).unwrap();
    assert_eq!(first.last_version(), 1);

    n.a.add_version(&de, managed(100)).await.unwrap();
    n.a.add_version(&de, timer(2)).await.unwrap();
    let opens = n.hsm.opens(&de.root_label());
    assert!(n.b.reload_locked(&de).await.unwrap());
    let now = n.b.key(&de).unwrap();
    assert_eq!(now.last_version(), 3);
    // Version 1 keeps its material; 2 and 3 are unwrapped, in one job.
    assert!(Arc::ptr_eq(
        first.versions[0].key().unwrap(),
        now.versions[0].key().unwrap()
    ));
    assert_eq!(n.hsm.opens(&de.root_label()), opens + 2);
    assert_eq!(
        now.secrets_document().unwrap().as_slice(),
        n.a.key(&de).unwrap().secrets_document().unwrap().as_slice()
    );
    // Nothing new: nothing published, nothing unwrapped.
    assert!(!n.b.reload_locked(&de).await.unwrap());
    assert_eq!(n.hsm.opens(&de.root_label()), opens + 2);
    // A settings change is followed too.
    n.a.set_rotation_period(&de, 60, &Actor::Timer)
        .await
        .unwrap();
    n.b.reload_all().await.unwrap();
    assert_eq!(n.b.key(&de).unwrap().rotation_period_days, Some(60));
}

#[tokio::test]
async fn a_stale_node_counts_the_other_nodes_versions_in_the_daily_limit() {
    let n = nodes().await;
    let de = id("prod", "DE");
    n.a.add_version(&de, managed(2)).await.unwrap();
    n.b.reload_all().await.unwrap();
    n.a.add_version(&de, managed(2)).await.unwrap();
    // B has not heard of version 2: the change reads the key again first.
    assert_eq!(n.b.key(&de).unwrap().last_version(), 1);
    let refused = n.b.add_version(&de, managed(2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::DailyLimit);
    assert_eq!(n.b.key(&de).unwrap().last_version(), 2);
    // A key made meanwhile on another node: a create is refused, and the node has it now.
    let fr = id("prod", "FR");
    n.a.add_version(&fr, managed(2)).await.unwrap();
    let refused = n.b.add_version(&fr, managed(2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::VersionConflict);
    assert_eq!(n.b.key(&fr).unwrap().last_version(), 1);
}

#[tokio::test]
async fn a_root_key_this_hsm_lacks_makes_only_its_key_unavailable() {
    let n = nodes().await;
    let (de, fr) = (id("prod", "DE"), id("prod", "FR"));
    n.a.add_version(&de, managed(100)).await.unwrap();
    n.a.add_version(&fr, managed(100)).await.unwrap();
    n.hsm.hide_root(&fr.root_label(), true);
    n.b.reload_all().await.unwrap();
    assert!(n.b.key(&fr).unwrap().unavailable_reason.is_some());
    assert!(n.b.key(&de).unwrap().secrets_document().is_ok());
    // Once the HSM has it, the key's next change loads it whole.
    n.hsm.hide_root(&fr.root_label(), false);
    n.a.add_version(&fr, timer(1)).await.unwrap();
    n.b.reload_all().await.unwrap();
    let key = n.b.key(&fr).unwrap();
    assert!(key.unavailable_reason.is_none() && key.secrets_document().is_ok());
}

#[tokio::test]
async fn a_rotation_that_lost_its_version_number_tries_again_once() {
    let n = nodes().await;
    let de = id("prod", "DE");
    n.a.add_version(&de, managed(100)).await.unwrap();
    n.b.reload_all().await.unwrap();
    // Another writer takes version 2 just before B commits it.
    let intruder = |version: u32| -> Race {
        let de = de.clone();
        Box::new(move |s: &dyn Store| {
            let v = StoredVersion {
                version,
                kind: VersionType::Managed,
                created: T0,
                origin: Initiator::Timer,
                iv: [7; 12],
                wrapped: vec![7; 48],
                aws: None,
            };
            let entry = AuditEntry::new(T0, &Actor::Timer, "rotate", Some(&de))
                .outcome(AuditOutcome::Ok, "elsewhere");
            s.add_version(&de, Some(30), &v, &entry).unwrap();
        })
    };
    *n.state.race.lock().unwrap() = Some(intruder(2));
    let mut rotate = managed(100);
    rotate.existing_only = true;
    assert_eq!(n.b.add_version(&de, rotate).await.unwrap().version, 3);
    let key = n.b.key(&de).unwrap();
    assert_eq!(key.last_version(), 3);
    // The intruder's version is followed (its blob does not open here: unavailable).
    assert!(key.version(2).unwrap().key().is_none());
    // The timer's rotation, planned on what it saw, is not made again: refused as stale
    // (the rotator ignores that quietly), not retried.
    *n.state.race.lock().unwrap() = Some(intruder(4));
    let refused = n.b.add_version(&de, timer(3)).await.unwrap_err();
    assert_eq!(refused.code(), Code::StaleRotation);
    assert_eq!(n.b.key(&de).unwrap().last_version(), 4);
}
