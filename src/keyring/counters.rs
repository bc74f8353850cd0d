//! Per-version record counters (since start), kept beside the snapshot so that counting never
//! rebuilds it. A counter, not a promise about data outside the daemon. The durable count of
//! encryptions per version is the `ledger`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::ledger::EncryptionLedger;
use crate::domain::KeyId;

/// What happened to records under one version.
#[derive(Default)]
pub struct VersionCounters {
    encrypted: AtomicU64,
    decrypted: AtomicU64,
    rewrapped: AtomicU64,
    rewrapped_away: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordEvent {
    /// Encrypted under this version.
    Encrypted,
    /// Decrypted with this version.
    Decrypted,
    /// Rewrapped into this version.
    Rewrapped,
    /// Rewrapped from this version into a newer one.
    RewrappedAway,
}

/// The counters of one version as the API shows them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterValues {
    pub records_encrypted: u64,
    pub records_decrypted: u64,
    pub records_rewrapped: u64,
    pub records_rewrapped_away: u64,
}

#[derive(Default)]
pub struct RecordCounters {
    map: Mutex<HashMap<(KeyId, u32), Arc<VersionCounters>>>,
    encryptions: EncryptionLedger,
}

impl RecordCounters {
    fn entry(&self, id: &KeyId, version: u32) -> Arc<VersionCounters> {
        // A poisoned lock only means another thread panicked while inserting; the map is
        // still usable.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((id.clone(), version)).or_default().clone()
    }

    pub fn add(&self, id: &KeyId, version: u32, what: RecordEvent, n: u64) {
        if n == 0 {
            return;
        }
        let c = self.entry(id, version);
        let field = match what {
            RecordEvent::Encrypted => &c.encrypted,
            RecordEvent::Decrypted => &c.decrypted,
            RecordEvent::Rewrapped => &c.rewrapped,
            RecordEvent::RewrappedAway => &c.rewrapped_away,
        };
        field.fetch_add(n, Ordering::Relaxed);
    }

    /// The durable encryption counts per version.
    pub fn encryptions(&self) -> &EncryptionLedger {
        &self.encryptions
    }

    pub fn get(&self, id: &KeyId, version: u32) -> CounterValues {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&(id.clone(), version)) {
            None => CounterValues::default(),
            Some(c) => CounterValues {
                records_encrypted: c.encrypted.load(Ordering::Relaxed),
                records_decrypted: c.decrypted.load(Ordering::Relaxed),
                records_rewrapped: c.rewrapped.load(Ordering::Relaxed),
                records_rewrapped_away: c.rewrapped_away.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_version() {
        let c = RecordCounters::default();
        let id = KeyId::parse("p", "DE").unwrap();
        c.add(&id, 1, RecordEvent::Encrypted, 3);
        c.add(&id, 1, RecordEvent::Encrypted, 2);
        c.add(&id, 2, RecordEvent::Rewrapped, 7);
        c.add(&id, 1, RecordEvent::RewrappedAway, 7);
        assert_eq!(c.get(&id, 1).records_encrypted, 5);
        assert_eq!(c.get(&id, 1).records_rewrapped_away, 7);
        assert_eq!(c.get(&id, 2).records_rewrapped, 7);
        assert_eq!(c.get(&id, 3), CounterValues::default());
    }
}
