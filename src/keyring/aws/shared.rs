//! Refusals shared through the state. A node whose check sees KMS refuse an aws version (or
//! the key fail its key check) records it in the state, so that every node withdraws the
//! version, even one whose own KMS calls fail only transiently (it would keep serving its
//! cached key until `aws.max_stale`) or whose next check is not due yet. The next
//! successful check on any node clears it; every node then checks the version itself at
//! once (its data key comes only from its own KMS decrypt).
//!
//! Nodes learn of recorded refusals at load, at the start of each revalidation pass (one
//! read of the recorded refusals), and when a key is reloaded after another node's change
//! (`learn_aws_state`). What a node learns is logged, not audited: the node whose check
//! saw it audited it. A single node (SQLite) keeps a refusal across its restarts the same
//! way.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::{refused_message, Check, Checks, Refusal};
use crate::domain::{Availability, KeyId};
use crate::keyring::Keyring;
use crate::store::{AwsRefusal, StoredKey};

/// Refusals as recorded, by key and version.
type Recorded = BTreeMap<(KeyId, u32), AwsRefusal>;

impl Checks {
    /// The checks of a state just loaded: a version with a recorded refusal starts
    /// withdrawn (`load_version`), refused as the state says, and is checked at the first
    /// pass like every version.
    pub(in crate::keyring) fn seeded(stored: &[StoredKey]) -> Checks {
        let mut checks = Checks::default();
        for key in stored {
            for (n, r) in recorded_refusals(key) {
                let mut check = Check::new(Instant::now());
                check.rejected = Some(Refusal {
                    code: r.code,
                    why: r.why,
                    learned: true,
                });
                check.recorded = true;
                checks.map.insert((key.id.clone(), n), check);
            }
        }
        checks
    }
}

/// The refusals recorded for a key's aws versions, as the state returned them.
pub fn recorded_refusals(key: &StoredKey) -> Vec<(u32, AwsRefusal)> {
    key.versions
        .iter()
        .filter_map(|v| {
            let r = v.aws.as_ref()?.refusal.as_ref()?;
            Some((v.version, r.clone()))
        })
        .collect()
}

impl Keyring {
    /// Every refusal the state records, applied to this node's aws versions: the
    /// availability changes to publish. Nothing when the node has no aws version or the
    /// state cannot be read now (the next pass reads it again).
    pub(super) async fn learn_recorded(&self) -> Vec<(KeyId, u32, Availability)> {
        let snap = self.snapshot();
        let any_aws = snap
            .keys
            .values()
            .any(|k| k.versions.iter().any(|v| v.aws.is_some()));
        if !any_aws {
            return Vec::new();
        }
        let store = self.store.clone();
        let recorded = match tokio::task::spawn_blocking(move || store.aws_refusals()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the refusals recorded in the state; this pass goes without them");
                return Vec::new();
            }
            Err(e) => {
                tracing::error!("refusal reader failed: {e}");
                return Vec::new();
            }
        };
        let recorded: Recorded = recorded
            .into_iter()
            .map(|(id, n, r)| ((id, n), r))
            .collect();
        self.apply_recorded(&recorded, |_| true)
    }

    /// What the state says of one key's aws versions' refusals (`recorded_refusals` of
    /// the key `Store::load_key` returned), for a reload after another node changed it:
    /// withdraws the versions another node refused, and checks at once those whose
    /// refusal was cleared. Takes the writer lock: call it without holding it, after the
    /// reloaded key is published.
    pub async fn learn_aws_state(&self, id: &KeyId, recorded: Vec<(u32, AwsRefusal)>) {
        let recorded: Recorded = recorded
            .into_iter()
            .map(|(n, r)| ((id.clone(), n), r))
            .collect();
        let changes = self.apply_recorded(&recorded, |k| k == id);
        if !changes.is_empty() {
            self.publish_materials(changes, false).await;
        }
    }

    /// Wakes the revalidation loop when a version is to be checked at once.
    pub fn aws_wake(&self) -> Arc<tokio::sync::Notify> {
        self.checks().wake.clone()
    }

    /// Applies `recorded` to the aws versions of the keys in scope (a version in scope
    /// without an entry has no recorded refusal).
    fn apply_recorded(
        &self,
        recorded: &Recorded,
        in_scope: impl Fn(&KeyId) -> bool,
    ) -> Vec<(KeyId, u32, Availability)> {
        let snap = self.snapshot();
        let mut checks = self.checks();
        let mut changes = Vec::new();
        let mut wake = false;
        for key in snap.keys.values().filter(|k| in_scope(&k.id)) {
            let (env, country) = (&key.id.env, &key.id.country);
            for v in key.versions.iter().filter(|v| v.aws.is_some()) {
                let slot = (key.id.clone(), v.version);
                match recorded.get(&slot) {
                    Some(r) => {
                        let check = checks
                            .map
                            .entry(slot)
                            .or_insert_with(|| Check::new(Instant::now()));
                        check.recorded = true;
                        if check.rejected.is_some() {
                            continue;
                        }
                        // Refused until this node's own check decrypts it again.
                        check.rejected = Some(Refusal {
                            code: r.code,
                            why: r.why.clone(),
                            learned: true,
                        });
                        check.transient = None;
                        check.stale = false;
                        tracing::warn!(%env, %country, version = v.version, code = %r.code,
                            "customer-supplied key withdrawn: a refusal is recorded in the state (another node's KMS check): {}", r.why);
                        let why = refused_message(r.code, &r.why, true);
                        changes.push((key.id.clone(), v.version, Availability::Unavailable(why)));
                    }
                    None => {
                        let Some(check) = checks.map.get_mut(&slot) else {
                            continue;
                        };
                        if !check.recorded {
                            continue;
                        }
                        check.recorded = false;
                        if check.rejected.as_ref().is_some_and(|r| r.learned) {
                            check.rejected = None;
                        }
                        if check.rejected.is_some() || v.key().is_none() {
                            tracing::info!(%env, %country, version = v.version,
                                "the recorded refusal was cleared (another node's KMS check decrypts it): checking it here now");
                            check.due = Instant::now();
                            wake = true;
                        }
                    }
                }
            }
        }
        if wake {
            checks.wake.notify_one();
        }
        changes
    }

    /// Writes what this node's checks found that the state does not say yet: a refusal it
    /// saw, or that a version it found recorded decrypts again. A write that fails is
    /// tried again at the next pass.
    pub(super) async fn record_outcomes(&self) {
        let now = self.clock.now().unix_timestamp();
        let writes: Vec<(KeyId, u32, Option<AwsRefusal>)> = {
            let checks = self.checks();
            checks
                .map
                .iter()
                .filter_map(|((id, n), c)| match (&c.rejected, c.recorded) {
                    (Some(r), false) if !r.learned => Some((
                        id.clone(),
                        *n,
                        Some(AwsRefusal {
                            code: r.code,
                            why: r.why.clone(),
                            at: now,
                        }),
                    )),
                    (None, true) => Some((id.clone(), *n, None)),
                    _ => None,
                })
                .collect()
        };
        if writes.is_empty() {
            return;
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            writes
                .into_iter()
                .map(|(id, n, r)| {
                    let out = store.set_aws_refusal(&id, n, r.as_ref());
                    (id, n, r.is_some(), out)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("refusal writer failed: {e}");
                return;
            }
        };
        let mut checks = self.checks();
        for (id, n, refused, out) in written {
            let (env, country) = (&id.env, &id.country);
            match out {
                Ok(changed) => {
                    if let Some(c) = checks.map.get_mut(&(id.clone(), n)) {
                        c.recorded = refused;
                    }
                    if changed && refused {
                        tracing::info!(%env, %country, version = n, "refusal recorded in the state: every node withdraws the version");
                    } else if changed {
                        tracing::info!(%env, %country, version = n, "recorded refusal cleared in the state: every node checks the version again");
                    }
                }
                Err(e) => tracing::warn!(%env, %country, version = n, error = %e,
                    "cannot record this node's check of a customer-supplied key in the state; tried again at the next pass"),
            }
        }
    }
}
