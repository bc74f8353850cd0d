//! The durable count of encryptions per version (`EncryptionLedger`), against AES-GCM's bound.
//!
//! AES-GCM with random 96-bit IVs is safe for 2^32 encryptions under one key, so the daemon
//! counts every record it encrypts under a version (encrypt and rewrap) in the state and
//! refuses encryption under a version past [`ENCRYPTION_LIMIT`] (2^31).
//!
//! Counts are reserved in blocks before use, additively: a reservation atomically adds a
//! block to the version's stored count and returns the new total, and the node may then make
//! the part of that block below the limit. Several nodes on one state (PostgreSQL) thus each
//! own blocks of their own, and the stored count is at least what all of them made: a crash
//! leaves it ahead by at most one block per node and version, never behind. The new total
//! also tells the node how far the cluster is, so it refuses at the limit without a read.
//!
//! A clean stop gives back the unused part of the node's reservations (`encryptions -
//! unused`, one signed delta per version; it also adds what was made in memory during an
//! outage): the count never goes below what was made, and never loses what other nodes
//! reserved. A single node (SQLite) thus ends with the exact count, as before.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::domain::error::Result;
use crate::domain::KeyId;
use crate::store::Store;

/// Most records encrypted under one version: half the 2^32 random-IV bound of AES-GCM.
pub const ENCRYPTION_LIMIT: u64 = 1 << 31;
/// Encryptions reserved in the state at a time, per version.
pub const RESERVE_BLOCK: u64 = 1 << 16;
/// While the state cannot be written, encryption goes on counted in memory for at most this
/// many blocks past the last reservation; then it waits for the state (503).
const UNPERSISTED_BLOCKS: u64 = 16;

/// Where encryption counts are kept: the part of the state the ledger needs (`dyn Store`),
/// narrow so that its tests need only a fake of this part.
pub trait EncryptionStore: Send + Sync + 'static {
    /// The stored count of a version (read only when a first reservation fails).
    fn stored(&self, id: &KeyId, version: u32) -> Result<u64>;
    /// Adds `n` to the stored count, atomically; the new total.
    fn reserve(&self, id: &KeyId, version: u32, n: u64) -> Result<u64>;
    /// Adds signed deltas to stored counts (a clean stop), in one transaction.
    fn settle(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()>;
}

impl EncryptionStore for dyn Store {
    fn stored(&self, id: &KeyId, version: u32) -> Result<u64> {
        self.encryptions(id, version)
    }
    fn reserve(&self, id: &KeyId, version: u32, n: u64) -> Result<u64> {
        self.reserve_encryptions(id, version, n)
    }
    fn settle(&self, deltas: &[(KeyId, u32, i64)]) -> Result<()> {
        self.settle_encryptions(deltas)
    }
}

/// One version's encryptions on this node, this run: `made` (granted, less given back),
/// `usable` what this node's reservations let it make (their parts below the limit),
/// `added` what it added to the stored count (less given back), `total` the stored count
/// as last seen (`None` until then).
#[derive(Default)]
struct Entry {
    made: u64,
    usable: u64,
    added: u64,
    total: Option<u64>,
}

/// Encryptions per version, counted durably against [`ENCRYPTION_LIMIT`].
pub struct EncryptionLedger {
    limit: u64,
    block: u64,
    map: Mutex<HashMap<(KeyId, u32), Entry>>,
    /// One state write at a time (reservations and the final flush).
    writing: tokio::sync::Mutex<()>,
    /// Whether the last reservation failed (logged once per run of failures).
    failing: std::sync::atomic::AtomicBool,
}

impl Default for EncryptionLedger {
    fn default() -> Self {
        EncryptionLedger::with_limits(ENCRYPTION_LIMIT, RESERVE_BLOCK)
    }
}

impl EncryptionLedger {
    pub fn with_limits(limit: u64, block: u64) -> EncryptionLedger {
        EncryptionLedger {
            limit,
            block: block.max(1),
            map: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The most encryptions one version may make.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(KeyId, u32), Entry>> {
        // Plain numbers: a panic elsewhere cannot leave them inconsistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants `n` encryptions under a version from what this node has reserved; `None`
    /// when that is not enough (a reservation, or the limit, decides).
    fn take_reserved(&self, key: &(KeyId, u32), n: u64) -> Option<u64> {
        let mut map = self.entries();
        let e = map.get_mut(key)?;
        if e.made + n <= e.usable {
            e.made += n;
            Some(n)
        } else {
            None
        }
    }

    /// Takes up to `n` encryptions under a version, and returns how many were granted:
    /// fewer than `n` (0) only at the limit. Reserves a block in the state first when this
    /// node's reservations are used up. `Err` when the state has not taken a reservation
    /// for too long (or cannot be read when nothing is known of the version).
    pub async fn reserve<S: EncryptionStore + ?Sized>(
        &self,
        store: Arc<S>,
        id: &KeyId,
        version: u32,
        n: u64,
    ) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        let key = (id.clone(), version);
        if let Some(grant) = self.take_reserved(&key, n) {
            return Ok(grant);
        }
        let _writing = self.writing.lock().await;
        if let Some(grant) = self.take_reserved(&key, n) {
            return Ok(grant);
        }
        // What is missing (with what was made in memory during an outage) and a block ahead,
        // no further than the limit as last seen.
        let amount = {
            let mut map = self.entries();
            let e = map.entry(key.clone()).or_default();
            let amount = (e.made + n - e.usable) + self.block;
            let amount = match e.total {
                Some(t) => amount.min(self.limit.saturating_sub(t)),
                None => amount,
            };
            if amount == 0 {
                // At the limit: what is left of this node's reservations, then nothing.
                let grant = e.usable.saturating_sub(e.made);
                e.made += grant;
                return Ok(grant);
            }
            amount
        };
        let (s, k) = (store.clone(), key.clone());
        let written = off_runtime(move || s.reserve(&k.0, k.1, amount)).await;
        let written = match written {
            Ok(total) => Ok(total),
            Err(err) => {
                let unknown = self.entries().get(&key).is_none_or(|e| e.total.is_none());
                if unknown {
                    // Nothing known of the version yet: bridge from the stored count, if read.
                    let (s, k) = (store.clone(), key.clone());
                    let stored = off_runtime(move || s.stored(&k.0, k.1)).await;
                    let mut map = self.entries();
                    let e = map.entry(key.clone()).or_default();
                    e.total = Some(stored?);
                }
                Err(err)
            }
        };
        let mut map = self.entries();
        let e = map.entry(key).or_default();
        match written {
            Ok(total) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("encryption counts are stored again");
                }
                // This node owns [total - amount, total); it may make the part below the limit.
                e.usable += amount.min(self.limit.saturating_sub(total.saturating_sub(amount)));
                e.added += amount;
                e.total = Some(total);
                let grant = n.min(e.usable.saturating_sub(e.made));
                e.made += grant;
                Ok(grant)
            }
            // The state does not take writes: go on counting in memory for a while (a crash
            // now under-counts by at most that much), so records keep being served.
            Err(err) => {
                let t = e.total.unwrap_or(0);
                let most = e.usable + self.limit.saturating_sub(t);
                let grant = n.min(most.saturating_sub(e.made));
                if e.made + grant > e.usable + UNPERSISTED_BLOCKS * self.block {
                    return Err(err);
                }
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(env = %id.env, country = %id.country, version, error = %err,
                        "cannot store the encryption count; counting in memory until the state takes writes");
                }
                e.made += grant;
                Ok(grant)
            }
        }
    }

    /// Gives back encryptions granted by `reserve` but not made.
    pub fn release(&self, id: &KeyId, version: u32, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(e) = self.entries().get_mut(&(id.clone(), version)) {
            e.made = e.made.saturating_sub(n);
        }
    }

    /// Encryptions made under a version as far as this node knows: the stored count as
    /// last seen, less this node's unused reservations (others' are counted whole). `None`:
    /// nothing known this run.
    pub fn used(&self, id: &KeyId, version: u32) -> Option<u64> {
        let map = self.entries();
        let e = map.get(&(id.clone(), version))?;
        e.total.map(|t| (t + e.made).saturating_sub(e.usable))
    }

    /// Settles the counts of every version used this run (at a clean stop): gives back the
    /// unused part of this node's reservations, and adds what was made past them in an
    /// outage. Other nodes' reservations stay counted.
    pub async fn flush<S: EncryptionStore + ?Sized>(&self, store: Arc<S>) -> Result<()> {
        let _writing = self.writing.lock().await;
        let deltas: Vec<(KeyId, u32, i64)> = self
            .entries()
            .iter()
            .filter(|(_, e)| e.made != e.added)
            .map(|((id, v), e)| (id.clone(), *v, delta(e.made, e.added)))
            .collect();
        if deltas.is_empty() {
            return Ok(());
        }
        let settled = deltas.clone();
        off_runtime(move || store.settle(&settled)).await?;
        let mut map = self.entries();
        for (id, v, d) in deltas {
            if let Some(e) = map.get_mut(&(id, v)) {
                // What is left is exactly what was made; more needs a new reservation.
                e.added = e.made;
                e.usable = e.made;
                e.total = e.total.map(|t| t.saturating_add_signed(d));
            }
        }
        Ok(())
    }
}

/// `made - added`, as a signed delta (saturating).
fn delta(made: u64, added: u64) -> i64 {
    if made >= added {
        i64::try_from(made - added).unwrap_or(i64::MAX)
    } else {
        i64::try_from(added - made).map_or(i64::MIN, |d| -d)
    }
}

/// Runs a state operation off the runtime (SQLite fsyncs).
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::domain::error::Error::internal(format!("state writer: {e}")))?
}

#[cfg(test)]
mod tests {
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
}
