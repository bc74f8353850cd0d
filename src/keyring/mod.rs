//! The live keyring: every key's versions, unwrapped, behind an atomic snapshot, and the
//! operations that add versions or change settings (HSM first, then one state transaction,
//! then a new snapshot). Readers never wait for writers.

pub mod anchor;
mod aws;
mod counters;
#[cfg(test)]
pub mod fixture;
mod ledger;
mod load;
pub mod records;
mod sync;
#[cfg(test)]
mod tests;
mod versions;

pub use aws::{recorded_refusals, AwsHealth, AwsProblem, AwsState, AwsStatus, RevalidateSettings};
pub use counters::{CounterValues, RecordCounters, RecordEvent};
pub use records::{Items, Op, Recorded, Sealed};
pub use sync::Propagation;
pub use versions::{AddedVersion, KeySource, NewVersion};

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{Actor, AuditEntry};
use crate::domain::clock::SharedClock;
use crate::domain::error::{Error, Result};
use crate::domain::Code;
use crate::domain::{KeyId, KeyState, Snapshot};
use crate::hsm::{HsmError, HsmStatus, HsmWorker};
use crate::kms::KmsDecrypt;
use crate::store::Store;

pub struct Keyring {
    current: ArcSwap<Snapshot>,
    store: Arc<dyn Store>,
    hsm: HsmWorker,
    clock: SharedClock,
    // Serializes writers (admin requests, timers): version numbers are picked under it.
    writer: tokio::sync::Mutex<()>,
    changes: tokio::sync::watch::Sender<u64>,
    // Records encrypted, decrypted and rewrapped per version since start.
    records: RecordCounters,
    kms: Arc<dyn KmsDecrypt>,
    /// Revalidation state of each aws version.
    aws_checks: std::sync::Mutex<aws::Checks>,
    /// How changes from other nodes reach this one (a shared state).
    propagation: std::sync::Mutex<Propagation>,
}

impl Keyring {
    /// Loads every key from state and unwraps every version in the HSM. Keys whose root key
    /// is gone, and versions that fail their integrity check, load as unavailable (with an
    /// error in the log), so the rest still serve. Aws versions load as unavailable until
    /// their first KMS check (`revalidate_due`).
    pub async fn load(
        store: Arc<dyn Store>,
        hsm: HsmWorker,
        clock: SharedClock,
        kms: Arc<dyn KmsDecrypt>,
    ) -> Result<Keyring> {
        // Before anything is appended: the state against the HSM anchor (see `anchor`).
        anchor::open_async(store.clone(), hsm.clone()).await?;
        let stored = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.load_all())
                .await
                .map_err(|e| Error::internal(format!("state loader: {e}")))??
        };
        // Before the keys are taken apart: the refusals the state records.
        let aws_checks = aws::Checks::seeded(&stored);
        let mut keys = BTreeMap::new();
        for key in stored {
            let state = load::unwrap_key(&hsm, key).await?;
            keys.insert(state.id.clone(), Arc::new(state));
        }
        let (changes, _) = tokio::sync::watch::channel(0);
        let loaded_at = clock.now().unix_timestamp();
        Ok(Keyring {
            current: ArcSwap::from_pointee(Snapshot { keys }),
            store,
            hsm,
            clock,
            writer: tokio::sync::Mutex::new(()),
            changes,
            records: RecordCounters::default(),
            kms,
            aws_checks: std::sync::Mutex::new(aws_checks),
            propagation: std::sync::Mutex::new(Propagation {
                last_delay_ms: None,
                last_reload: Some(loaded_at),
            }),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn key(&self, id: &KeyId) -> Result<Arc<KeyState>> {
        self.current
            .load()
            .keys
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(Code::KeyNotFound, format!("no key {id}")))
    }

    /// A receiver that sees a new value after every change to any key.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Starts this node's lease on timer rotations (once per process; see
    /// `store::Leadership`).
    pub fn leadership(&self, lease: std::time::Duration) -> crate::store::Leadership {
        self.store.leadership(lease)
    }

    /// Now, in Unix seconds, by the keyring's clock.
    pub fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Moves the test clock forward; false where time cannot be moved.
    pub fn advance_clock(&self, seconds: i64) -> bool {
        self.clock.advance(seconds)
    }

    /// Proves the HSM session against the token; a failure makes the worker reconnect.
    pub async fn hsm_ping(&self) -> std::result::Result<(), HsmError> {
        self.hsm.call(|h| h.ping()).await
    }

    /// Whether the HSM worker holds a working session, and how often it reconnected.
    pub fn hsm_status(&self) -> HsmStatus {
        self.hsm.status()
    }

    /// Whether the HSM worker thread answers at all (the watchdog's question).
    pub async fn hsm_alive(&self) -> bool {
        self.hsm.alive().await
    }

    /// Counts failed HSM calls (for metrics).
    pub fn hsm_error_counter(&self) -> prometheus_client::metrics::counter::Counter {
        self.hsm.error_counter()
    }

    /// Per-version record counters (outside the snapshot: counting never republishes).
    pub fn records(&self) -> &RecordCounters {
        &self.records
    }

    /// Changes a key's rotation period.
    pub async fn set_rotation_period(&self, id: &KeyId, days: u32, actor: &Actor) -> Result<()> {
        let _writer = self.writer.lock().await;
        let _state = self.hold_state(id).await?;
        let key = self.key(id)?;
        let audit = AuditEntry::new(
            self.clock.now().unix_timestamp(),
            actor,
            "settings",
            Some(id),
        )
        .outcome(AuditOutcome::Ok, format!("rotation_period_days = {days}"));
        self.state_op(
            move |store, id| store.set_rotation_period(id, Some(days), &audit),
            id,
        )
        .await?;
        self.publish(key.with_period(Some(days)));
        Ok(())
    }

    /// Records an audit entry made outside a key change (refusals, failures). A failure to
    /// write it is logged loudly; it does not change the caller's answer.
    pub async fn audit(&self, entry: AuditEntry) {
        let action = entry.action.clone();
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.audit(&entry)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e @ Error::Unavailable { .. })) => tracing::error!(
                action,
                error = %e,
                "cannot write audit entry: the state (or the HSM that MACs it) is unavailable, so this refusal is recorded only in this log"
            ),
            Ok(Err(e)) => tracing::error!(action, error = %e, "cannot write audit entry"),
            Err(e) => tracing::error!(action, error = %e, "cannot write audit entry"),
        }
    }

    /// An audit entry stamped with the keyring's clock.
    pub fn audit_entry(&self, actor: &Actor, action: &str, id: Option<&KeyId>) -> AuditEntry {
        AuditEntry::new(self.clock.now().unix_timestamp(), actor, action, id)
    }

    /// Why the state does not take writes, while it does not.
    pub fn state_unavailable(&self) -> Option<String> {
        self.store.unavailable()
    }

    /// Audit entries after `since`, oldest first, at most `limit`, read off the runtime
    /// (the state may be a database across the network).
    pub async fn audit_page(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<crate::domain::audit::AuditRecord>> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.audit_since(since, limit))
            .await
            .map_err(|e| Error::internal(format!("audit reader: {e}")))?
    }

    /// `audit_page`, blocking the calling thread (tests, blocking callers).
    pub fn audit_since(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<crate::domain::audit::AuditRecord>> {
        self.store.audit_since(since, limit)
    }

    /// Takes up to `wanted` encryptions under `version` from its durable count; returns how
    /// many are left to take (see `ledger`).
    pub async fn reserve_encryptions(&self, id: &KeyId, version: u32, wanted: u64) -> Result<u64> {
        self.records
            .encryptions()
            .reserve(self.store.clone(), id, version, wanted)
            .await
    }

    /// Gives back the unused part of this node's encryption reservations (at shutdown).
    pub async fn flush_encryptions(&self) -> Result<()> {
        self.records.encryptions().flush(self.store.clone()).await
    }

    /// Runs a state operation off the runtime (SQLite fsyncs).
    async fn state_op<T, F>(&self, f: F, id: &KeyId) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store, &KeyId) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref(), &id))
            .await
            .map_err(|e| Error::internal(format!("state writer: {e}")))?
    }

    fn publish(&self, key: KeyState) {
        let key = Arc::new(key);
        self.current.rcu(|snap| {
            let mut keys = snap.keys.clone();
            keys.insert(key.id.clone(), key.clone());
            Snapshot { keys }
        });
        self.changes.send_modify(|g| *g += 1);
    }
}
