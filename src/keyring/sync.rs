//! Following a state other nodes write too (PostgreSQL; SQLite has no other writer).
//!
//! Reads stay in memory: the state is read only to learn what changed. `follow` takes the
//! store's change feed: for each changed key it reads the key's rows again, unwraps only the
//! versions this node has not loaded (the loaded ones keep their material), and publishes
//! a new snapshot, which wakes long polls and the rotator. When the feed (re)starts, and
//! every `cluster.reconcile_interval`, it reads the whole state again (notifications sent
//! while no one listened are lost). A read that fails (an outage) is tried again soon.
//!
//! Changes on this node take the state's exclusive lock and read the key again first
//! (`hold_state`): one node changes keys at a time, each on the state as it is, so a
//! stale node neither loses a race for a version number nor misses another node's versions
//! in the daily limit.
//!
//! Every read and publish runs under the keyring's writer lock: the state read there holds
//! every change this node committed, so nothing newer is ever replaced by something older.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{load, recorded_refusals, Keyring};
use crate::domain::error::{Error, Result};
use crate::domain::{KeyId, KeyState, VersionState};
use crate::store::{AwsRefusal, StateEvent, Store, StoredKey, StoredVersion};

/// The first wait before a failed read of the state is tried again, doubled up to the
/// reconcile interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// What health and metrics show of a node that follows a shared state.
#[derive(Debug, Clone, Default)]
pub struct Propagation {
    /// From another node's commit (the database's clock) to this node serving the change
    /// (this host's clock), for the last change learned from a notification, in ms.
    pub last_delay_ms: Option<u64>,
    /// When the whole state was last read (Unix seconds, by the keyring's clock).
    pub last_reload: Option<i64>,
}

/// Holds the shared state's exclusive lock (`Store::exclusive`) until dropped.
pub(super) struct StateLock {
    _release: oneshot::Sender<()>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Keyring {
    /// Whether other nodes write this keyring's state too.
    pub fn shared(&self) -> bool {
        !self.store.anchored()
    }

    /// `None` when no other node writes the state.
    pub fn propagation(&self) -> Option<Propagation> {
        self.shared().then(|| self.propagated().clone())
    }

    fn propagated(&self) -> std::sync::MutexGuard<'_, Propagation> {
        // Two numbers: a panic elsewhere cannot leave them inconsistent.
        self.propagation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the changes other nodes commit until `stopping`; returns at once when no
    /// other node writes the state. `reconcile` is read at every pass (a reload of the
    /// config applies it).
    pub async fn follow(
        &self,
        reconcile: impl Fn() -> Duration,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(mut feed) = self.store.follow() else {
            return;
        };
        let mut retry = FIRST_RETRY;
        let mut next_full = Instant::now() + reconcile();
        let mut events = Vec::new();
        loop {
            let full = tokio::select! {
                n = feed.recv_many(&mut events, 1024) => {
                    if n == 0 {
                        return;
                    }
                    match self.apply(std::mem::take(&mut events)).await {
                        Ok(full) => full,
                        Err(e) => {
                            tracing::debug!(error = %e, "a change could not be read: reading the whole state again soon");
                            next_full = next_full.min(Instant::now() + retry);
                            false
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_full) => match self.reload_all().await {
                    Ok(()) => true,
                    Err(e) => {
                        // The store has said so already when the database is out of reach.
                        match self.store.unavailable() {
                            Some(_) => tracing::debug!(error = %e, "cannot read the whole state; trying again"),
                            None => tracing::warn!(error = %e, "cannot read the whole state; trying again"),
                        }
                        next_full = Instant::now() + retry;
                        retry = (retry * 2).min(reconcile());
                        false
                    }
                },
                // (Its guard is not kept: the other arms await.)
                _ = async { stopping.wait_for(|s| *s).await.is_ok() } => return,
            };
            if full {
                retry = FIRST_RETRY;
                next_full = Instant::now() + reconcile();
            }
        }
    }

    /// One batch of the feed; whether it read the whole state.
    async fn apply(&self, events: Vec<StateEvent>) -> Result<bool> {
        let mut changed: BTreeMap<KeyId, Option<i64>> = BTreeMap::new();
        let mut everything = false;
        for event in events {
            match event {
                StateEvent::Changed { key, sent } => {
                    // Of several notices of one key, the oldest: how long it waited.
                    let oldest = changed.entry(key).or_insert(sent);
                    *oldest = match (*oldest, sent) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                StateEvent::Following => everything = true,
                StateEvent::Lost(why) => tracing::debug!(why, "change feed lost"),
            }
        }
        if everything {
            self.reload_all().await?;
            return Ok(true);
        }
        for (key, sent) in changed {
            let (learned, refusals) = {
                let _writer = self.writer.lock().await;
                self.reload_key(&key).await?
            };
            if let (true, Some(sent)) = (learned, sent) {
                let delay = (unix_ms() - sent).max(0) as u64;
                self.propagated().last_delay_ms = Some(delay);
                tracing::debug!(env = %key.env, country = %key.country, delay_ms = delay, "change from another node served");
            }
            // Refusals of aws versions another node recorded (or cleared): outside the writer
            // lock, which learning them takes itself.
            self.learn_aws_state(&key, refusals).await;
        }
        Ok(false)
    }

    /// Reads every key again and publishes what changed.
    async fn reload_all(&self) -> Result<()> {
        let _writer = self.writer.lock().await;
        let stored = self.read_state(|s| s.load_all()).await?;
        let mut learned = 0;
        for key in stored {
            // Refusals need nothing here: every revalidation pass reads them all.
            learned += usize::from(self.absorb(key).await?.0);
        }
        self.propagated().last_reload = Some(self.now());
        match learned {
            0 => tracing::debug!("whole state read: nothing new"),
            n => tracing::info!(
                keys = n,
                "whole state read: keys changed by other nodes loaded"
            ),
        }
        Ok(())
    }

    /// Reads one key again and publishes it if it changed; whether it did. Called with the
    /// writer lock held.
    pub(super) async fn reload_locked(&self, id: &KeyId) -> Result<bool> {
        Ok(self.reload_key(id).await?.0)
    }

    /// `reload_locked`, with the aws refusals the state records for the key.
    async fn reload_key(&self, id: &KeyId) -> Result<(bool, Vec<(u32, AwsRefusal)>)> {
        let id2 = id.clone();
        match self.read_state(move |s| s.load_key(&id2)).await? {
            Some(key) => self.absorb(key).await,
            // Keys are never removed: one the state lacks was never committed.
            None => Ok((false, Vec::new())),
        }
    }

    /// Publishes a key as the state has it, unwrapping only the versions this node lacks;
    /// whether anything changed. Called with the writer lock held.
    async fn absorb(&self, stored: StoredKey) -> Result<(bool, Vec<(u32, AwsRefusal)>)> {
        let refusals = recorded_refusals(&stored);
        let current = self.current.load().keys.get(&stored.id).cloned();
        let key = match current {
            Some(cur) if same(&cur, &stored) => return Ok((false, refusals)),
            // New here, or without its root key so far: the whole key, loudly if it still
            // cannot be unwrapped.
            None => load::unwrap_key(&self.hsm, stored).await?,
            Some(cur) if cur.unavailable_reason.is_some() => {
                load::unwrap_key(&self.hsm, stored).await?
            }
            Some(cur) => self.merge(&cur, stored).await?,
        };
        self.publish(key);
        Ok((true, refusals))
    }

    /// `stored` with the material of the versions `cur` has loaded, and the others
    /// unwrapped now.
    async fn merge(&self, cur: &KeyState, stored: StoredKey) -> Result<KeyState> {
        let id = stored.id;
        for v in &cur.versions {
            if !stored.versions.iter().any(|s| s.version == v.version) {
                tracing::error!(env = %id.env, country = %id.country, version = v.version,
                    "the state no longer has {id} version {}: following the state", v.version);
            }
        }
        let (kept, new): (Vec<StoredVersion>, Vec<StoredVersion>) = stored
            .versions
            .into_iter()
            .partition(|s| cur.version(s.version).is_some_and(|v| is(v, s)));
        let (_, opened) = load::unwrap_versions(&self.hsm, &id, new).await?;
        let mut versions: Vec<VersionState> = kept
            .iter()
            .filter_map(|s| cur.version(s.version).map(VersionState::share))
            .chain(opened)
            .collect();
        versions.sort_by_key(|v| v.version);
        Ok(KeyState {
            id,
            rotation_period_days: stored.rotation_period_days,
            created: cur.created,
            unavailable_reason: None,
            versions,
        })
    }

    /// A blocking read of the state, off the runtime.
    async fn read_state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::internal(format!("state reader: {e}")))?
    }

    /// Before a change on a shared state: takes the state's exclusive lock (held until the
    /// lock returned is dropped) and reads `id` again, so that the change is made on the
    /// state as it is, and by one node at a time. `None` when no other node writes the
    /// state. Called with the writer lock held.
    pub(super) async fn hold_state(&self, id: &KeyId) -> Result<Option<StateLock>> {
        if !self.shared() {
            return Ok(None);
        }
        let (locked_tx, locked) = oneshot::channel::<()>();
        let (release, released) = oneshot::channel::<()>();
        let store = self.store.clone();
        // `exclusive` runs its section on this blocking thread, which waits there until the
        // lock is dropped (or the change is abandoned with it).
        let holder = tokio::task::spawn_blocking(move || {
            let mut pair = Some((locked_tx, released));
            store.exclusive(&mut || {
                if let Some((locked_tx, released)) = pair.take() {
                    if locked_tx.send(()).is_ok() {
                        let _ = released.blocking_recv();
                    }
                }
                Ok(())
            })
        });
        if locked.await.is_err() {
            return Err(match holder.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::internal("the state's lock was let go before it was used"),
                Err(e) => Error::internal(format!("state lock: {e}")),
            });
        }
        let lock = StateLock { _release: release };
        self.reload_locked(id).await?;
        Ok(Some(lock))
    }
}

/// Whether a loaded version is the stored one (the same number with other material would
/// be a state that went back and forth: the stored one wins).
fn is(v: &VersionState, s: &StoredVersion) -> bool {
    v.version == s.version && v.kind == s.kind && v.created == s.created
}

/// Whether the key in memory is the stored one.
fn same(cur: &KeyState, stored: &StoredKey) -> bool {
    cur.rotation_period_days == stored.rotation_period_days
        && cur.versions.len() == stored.versions.len()
        && cur
            .versions
            .iter()
            .zip(&stored.versions)
            .all(|(v, s)| is(v, s))
}

#[cfg(test)]
mod tests;
