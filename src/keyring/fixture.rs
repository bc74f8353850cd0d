//! A real `Keyring` for unit tests: over the fake HSM (through the real worker thread), a
//! SQLite state in a temp dir, the fake KMS and a manual clock. `restart` opens the same
//! state, token, KMS and clock again, as a daemon restart does.

use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{AddedVersion, KeySource, Keyring, NewVersion};
use crate::domain::audit::{Actor, AuditEntry};
use crate::domain::clock::ManualClock;
use crate::domain::error::Result;
use crate::domain::{AwsKeyRef, Initiator, KeyId};
use crate::hsm::fake::FakeHsm;
use crate::hsm::HsmWorker;
use crate::kms::fake::{Answer, FakeKms};
use crate::store::Store;

/// 2030-01-01T00:00:00Z: tests start at a known UTC midnight.
pub const T0: i64 = 1_893_456_000;
pub const DAY: i64 = 86_400;

/// The state under `dir`: the one place a test store is made.
pub fn open_store(dir: &Path) -> Arc<dyn Store> {
    crate::store::open(&dir.join("state")).expect("test state opens")
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub hsm: FakeHsm,
    pub worker: HsmWorker,
    pub kms: Arc<FakeKms>,
    pub clock: Arc<ManualClock>,
    pub store: Arc<dyn Store>,
    pub keyring: Arc<Keyring>,
}

impl Fixture {
    /// An empty state and token, the clock at `T0` + one hour.
    pub async fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::at(T0 + 3600));
        Fixture::open(dir, FakeHsm::default(), Arc::default(), clock).await
    }

    async fn open(
        dir: tempfile::TempDir,
        hsm: FakeHsm,
        kms: Arc<FakeKms>,
        clock: Arc<ManualClock>,
    ) -> Fixture {
        let (worker, _thread) = hsm.start();
        let store = open_store(dir.path());
        let keyring = Keyring::load(store.clone(), worker.clone(), clock.clone(), kms.clone())
            .await
            .expect("keyring loads");
        Fixture {
            dir,
            hsm,
            worker,
            kms,
            clock,
            store,
            keyring: Arc::new(keyring),
        }
    }

    /// Stops this keyring (every handle on the state must be gone) and loads it again.
    pub async fn restart(self) -> Fixture {
        let Fixture {
            dir,
            hsm,
            kms,
            clock,
            store,
            keyring,
            worker,
        } = self;
        drop(keyring);
        drop(worker);
        assert_eq!(Arc::strong_count(&store), 1, "a test still holds the state");
        drop(store);
        Fixture::open(dir, hsm, kms, clock).await
    }

    pub fn now(&self) -> i64 {
        self.clock.unix()
    }

    /// A new managed version (creating the key) asked by an admin.
    pub async fn managed(&self, id: &KeyId, period: Option<u32>) -> Result<AddedVersion> {
        let req = admin(KeySource::Managed, period, 1000, 1000);
        self.keyring.add_version(id, req).await
    }

    /// A customer-supplied version of `encrypted_key`, which KMS decrypts to `plaintext`
    /// (scripted here), asked by an admin.
    pub async fn aws(&self, id: &KeyId, encrypted_key: &[u8], plaintext: [u8; 32]) -> Result<u32> {
        self.kms
            .script(encrypted_key, Answer::Plaintext(plaintext.to_vec()));
        let req = admin(KeySource::Aws(aws_ref(encrypted_key)), None, 1000, 1000);
        Ok(self.keyring.add_version(id, req).await?.version)
    }

    /// Audit entries so far, oldest first.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.keyring
            .audit_since(0, 10_000)
            .expect("audit log reads")
            .into_iter()
            .map(|r| r.entry)
            .collect()
    }
}

/// An admin's request for a new version with these limits.
pub fn admin(source: KeySource, period: Option<u32>, per_day: u32, aws: u32) -> NewVersion {
    NewVersion {
        source,
        rotation_period_days: period,
        origin: Initiator::Admin,
        versions_per_day: per_day,
        customer_supplied_versions: aws,
        existing_only: false,
        expect_active: None,
        actor: Actor::Peer {
            uid: 1000,
            gid: 1000,
            pid: None,
        },
        action: "create",
    }
}

/// The timer's rotation of a key whose active version is `active`, as `rotation` asks it.
pub fn timer(active: u32) -> NewVersion {
    NewVersion {
        source: KeySource::Managed,
        rotation_period_days: None,
        origin: Initiator::Timer,
        versions_per_day: u32::MAX,
        customer_supplied_versions: u32::MAX,
        existing_only: true,
        expect_active: Some(active),
        actor: Actor::Timer,
        action: "rotate",
    }
}

/// What KMS needs for `encrypted_key` (the fake KMS answers by it).
pub fn aws_ref(encrypted_key: &[u8]) -> AwsKeyRef {
    AwsKeyRef {
        region: "eu-central-1".into(),
        encrypted_key: encrypted_key.to_vec(),
        cmk_arn: "arn:aws:kms:eu-central-1:111122223333:key/test".into(),
        access_key_id: "AKIATEST".into(),
        secret_access_key: Zeroizing::new("test-secret".into()),
    }
}

pub fn id(env: &str, country: &str) -> KeyId {
    KeyId::parse(env, country).expect("a valid key id")
}
