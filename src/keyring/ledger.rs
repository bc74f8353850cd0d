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
        if e.made.saturating_add(n) <= e.usable {
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
        // Grants taken meanwhile from this node's reservations (other requests) may leave a
        // new block short of `n`: then another one, until `n` or the limit.
        let mut granted = 0;
        while granted < n {
            let wanted = n - granted;
            if let Some(grant) = self.take_reserved(&key, wanted) {
                return Ok(granted + grant);
            }
            let (grant, more) = self.reserve_block(store.clone(), &key, wanted).await?;
            granted += grant;
            if !more {
                break;
            }
        }
        Ok(granted)
    }

    /// Reserves a block for `n` more encryptions (the writer held); the grant, and whether
    /// another block may grant more.
    async fn reserve_block<S: EncryptionStore + ?Sized>(
        &self,
        store: Arc<S>,
        key: &(KeyId, u32),
        n: u64,
    ) -> Result<(u64, bool)> {
        let (id, version) = (&key.0, key.1);
        // What is missing (with what was made in memory during an outage) and a block ahead,
        // no further than the limit as last seen.
        let amount = {
            let mut map = self.entries();
            let e = map.entry(key.clone()).or_default();
            let amount = e.made.saturating_add(n).saturating_sub(e.usable);
            let amount = amount.saturating_add(self.block);
            let amount = amount.min(self.limit.saturating_sub(e.total.unwrap_or(0)));
            if amount == 0 {
                // At the limit: what is left of this node's reservations, then nothing.
                let grant = n.min(e.usable.saturating_sub(e.made));
                e.made += grant;
                return Ok((grant, false));
            }
            amount
        };
        let (s, k) = (store.clone(), key.clone());
        let written = off_runtime(move || s.reserve(&k.0, k.1, amount)).await;
        let written = match written {
            Ok(total) => Ok(total),
            Err(err) => {
                let unknown = self.entries().get(key).is_none_or(|e| e.total.is_none());
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
        let e = map.entry(key.clone()).or_default();
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
                Ok((grant, total < self.limit))
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
                Ok((grant, false))
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
mod tests;
