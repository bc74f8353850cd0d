//! Unit tests of the encryption ledger (a fake state, and the SQLite state).

use std::sync::atomic::AtomicU64;

use super::*;

/// A state in memory whose writes can be made to fail.
#[derive(Default)]
struct FakeStore {
    counts: Mutex<HashMap<(KeyId, u32), u64>>,
    writes: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

impl FakeStore {
    fn get(&self, id: &KeyId, v: u32) -> u64 {
        *self
            .counts
            .lock()
            .unwrap()
            .get(&(id.clone(), v))
            .unwrap_or(&0)
    }
    fn write(&self) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(crate::domain::error::Error::unavailable(
                crate::domain::Code::StateUnavailable,
                "disk full",
            ));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl EncryptionStore for FakeStore {
    fn stored(&self, id: &KeyId, v: u32) -> Result<u64> {
        Ok(self.get(id, v))
    }
    fn reserve(&self, id: &KeyId, v: u32, n: u64) -> Result<u64> {
        self.write()?;
        let mut c = self.counts.lock().unwrap();
        let total = c.entry((id.clone(), v)).or_default();
        *total += n;
        Ok(*total)
    }
    fn settle(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
        self.write()?;
        let mut c = self.counts.lock().unwrap();
        for (id, v, d) in deltas {
            let total = c.entry((id.clone(), *v)).or_default();
            *total = total.saturating_add_signed(*d);
        }
        Ok(())
    }
}

fn id() -> KeyId {
    KeyId::parse("p", "DE").unwrap()
}

#[tokio::test]
async fn reserves_blocks_ahead_and_refuses_past_the_limit() {
    let store = Arc::new(FakeStore::default());
    let ledger = EncryptionLedger::with_limits(10, 4);
    let s: Arc<dyn EncryptionStore> = store.clone();
    let id = id();
    // First use: a block is reserved in the state before any encryption.
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 3).await.unwrap(), 3);
    assert_eq!(store.get(&id, 1), 7);
    assert_eq!(store.writes.load(Ordering::SeqCst), 1);
    // Within the block: no write.
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 3).await.unwrap(), 3);
    assert_eq!(store.writes.load(Ordering::SeqCst), 1);
    // Past it: the next block, capped at the limit.
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 3).await.unwrap(), 3);
    assert_eq!(store.get(&id, 1), 10);
    // The limit: what is left, then nothing.
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 3).await.unwrap(), 1);
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 1).await.unwrap(), 0);
    assert_eq!(ledger.used(&id, 1), Some(10));
    // Another version counts on its own.
    assert_eq!(ledger.reserve(s.clone(), &id, 2, 2).await.unwrap(), 2);
    assert_eq!(ledger.used(&id, 2), Some(2));
    assert_eq!(ledger.reserve(s.clone(), &id, 2, 0).await.unwrap(), 0);
}

#[tokio::test]
async fn stored_count_never_falls_behind_and_a_clean_stop_stores_it_exactly() {
    let store = Arc::new(FakeStore::default());
    let s: Arc<dyn EncryptionStore> = store.clone();
    let id = id();
    let ledger = EncryptionLedger::with_limits(1000, 16);
    let mut made = 0;
    for n in [1, 5, 16, 3, 40, 7] {
        made += ledger.reserve(s.clone(), &id, 1, n).await.unwrap();
        // A crash now finds at least what was made, at most a block (+ the request) more.
        assert!(store.get(&id, 1) >= made, "{} < {made}", store.get(&id, 1));
        assert!(store.get(&id, 1) <= made + 16 + n);
    }
    // Granted but not made (items that failed) are given back.
    ledger.release(&id, 1, 2);
    made -= 2;
    ledger.flush(s.clone()).await.unwrap();
    assert_eq!(store.get(&id, 1), made);
    // A restart goes on from the stored count.
    let again = EncryptionLedger::with_limits(made + 3, 16);
    assert_eq!(again.reserve(s.clone(), &id, 1, 10).await.unwrap(), 3);
    assert_eq!(again.reserve(s.clone(), &id, 1, 1).await.unwrap(), 0);
    // A crash after reservations (no flush): the stored count is ahead, never behind.
    let crashed = EncryptionLedger::with_limits(1 << 20, 16);
    let other = KeyId::parse("p", "FR").unwrap();
    crashed.reserve(s.clone(), &other, 1, 5).await.unwrap();
    drop(crashed);
    let after = EncryptionLedger::with_limits(1 << 20, 16);
    after.reserve(s.clone(), &other, 1, 1).await.unwrap();
    assert_eq!(after.used(&other, 1), Some(5 + 16 + 1));
}

#[tokio::test]
async fn a_state_that_takes_no_writes_is_bridged_for_a_while_only() {
    let store = Arc::new(FakeStore::default());
    let s: Arc<dyn EncryptionStore> = store.clone();
    let id = id();
    let ledger = EncryptionLedger::with_limits(1 << 20, 4);
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 1).await.unwrap(), 1);
    store.fail.store(true, Ordering::SeqCst);
    // What was reserved (1 + a block of 4), then UNPERSISTED_BLOCKS blocks counted in
    // memory only; then refused until the state takes writes.
    let bridged = 5 + UNPERSISTED_BLOCKS * 4;
    let mut granted = 1;
    let e = loop {
        match ledger.reserve(s.clone(), &id, 1, 1).await {
            Ok(n) => granted += n,
            Err(e) => break e,
        }
        assert!(granted <= bridged);
    };
    assert_eq!(granted, bridged);
    assert_eq!(e.code(), crate::domain::Code::StateUnavailable);
    assert_eq!(store.get(&id, 1), 5);
    // The state takes writes again: the count catches up.
    store.fail.store(false, Ordering::SeqCst);
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 1).await.unwrap(), 1);
    assert!(store.get(&id, 1) > bridged);
}

#[tokio::test]
async fn two_nodes_on_one_state_reserve_for_all_they_make() {
    let store = Arc::new(FakeStore::default());
    let s: Arc<dyn EncryptionStore> = store.clone();
    let id = id();
    let (a, b) = (
        EncryptionLedger::with_limits(1 << 20, 16),
        EncryptionLedger::with_limits(1 << 20, 16),
    );
    let mut made = 0;
    for n in [1, 5, 16, 3, 40, 7, 16, 2] {
        made += a.reserve(s.clone(), &id, 1, n).await.unwrap();
        made += b.reserve(s.clone(), &id, 1, n).await.unwrap();
        // A crash of both now finds at least what the two made together.
        assert!(store.get(&id, 1) >= made, "{} < {made}", store.get(&id, 1));
    }
    // A clean stop of one never lowers what the other reserved.
    a.flush(s.clone()).await.unwrap();
    assert!(store.get(&id, 1) >= made, "{} < {made}", store.get(&id, 1));
    b.flush(s.clone()).await.unwrap();
    assert_eq!(store.get(&id, 1), made);
}

#[tokio::test]
async fn two_nodes_at_the_limit_make_the_limit_together_and_no_more() {
    let store = Arc::new(FakeStore::default());
    let s: Arc<dyn EncryptionStore> = store.clone();
    let id = id();
    let (a, b) = (
        EncryptionLedger::with_limits(40, 8),
        EncryptionLedger::with_limits(40, 8),
    );
    let mut made = 0;
    loop {
        let n = a.reserve(s.clone(), &id, 1, 3).await.unwrap()
            + b.reserve(s.clone(), &id, 1, 3).await.unwrap();
        if n == 0 {
            break;
        }
        made += n;
    }
    assert_eq!(made, 40);
    assert!(store.get(&id, 1) >= 40);
}

#[tokio::test]
async fn counts_in_the_real_state() {
    use crate::domain::audit::{Actor, AuditEntry};
    use crate::domain::{Initiator, VersionType};
    use crate::store::StoredVersion;
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::open(dir.path()).unwrap();
    store.set_audit_seal(Arc::new(crate::store::TestSeal));
    let id = id();
    let v = StoredVersion {
        version: 1,
        kind: VersionType::Managed,
        created: 0,
        origin: Initiator::Admin,
        iv: [0; 12],
        wrapped: vec![1; 48],
        aws: None,
    };
    let audit = AuditEntry::new(0, &Actor::Timer, "create", Some(&id));
    store.add_version(&id, Some(30), &v, &audit).unwrap();
    let s = store.clone();
    let ledger = EncryptionLedger::with_limits(100, 8);
    assert_eq!(ledger.reserve(s.clone(), &id, 1, 3).await.unwrap(), 3);
    assert_eq!(store.encryptions(&id, 1).unwrap(), 11);
    ledger.flush(s.clone()).await.unwrap();
    assert_eq!(store.encryptions(&id, 1).unwrap(), 3);
    // A reservation adds to the stored count and returns the total.
    assert_eq!(store.reserve_encryptions(&id, 1, 2).unwrap(), 5);
    assert_eq!(store.encryptions(&id, 1).unwrap(), 5);
    // A version the state does not have is an error, not a silent zero.
    assert!(store.reserve_encryptions(&id, 2, 5).is_err());
}
