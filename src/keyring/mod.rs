//! The live keyring: every key's versions, unwrapped, behind an atomic snapshot, and the
//! operations that add versions or change settings (HSM first, then one state transaction,
//! then a new snapshot). Readers never wait for writers.

pub mod anchor;
mod aws;
mod counters;
#[cfg(test)]
pub mod fixture;
mod ledger;
pub mod records;
#[cfg(test)]
mod tests;

pub use aws::{AwsHealth, AwsProblem, AwsState, AwsStatus, RevalidateSettings};
pub use counters::{CounterValues, RecordCounters, RecordEvent};
pub use records::{Items, Op, Recorded, Sealed};

use crate::domain::Code;
use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{Actor, AuditEntry};
use crate::domain::clock::{rfc3339, SharedClock};
use crate::domain::error::{Error, Result};
use crate::domain::limits::VersionLimits;
use crate::domain::secret::clear_stack;
use crate::domain::{
    Availability, DataKey, Initiator, KeyId, KeyState, Snapshot, VersionState, VersionType,
};
use crate::hsm::{HsmError, HsmStatus, HsmWorker, WRAP_IV_LEN};
use crate::kms::{AwsKeyRef, KmsDecrypt};
use crate::store::{Store, StoredAws, StoredKey, StoredVersion};

/// Where a new version's data key comes from.
pub enum KeySource {
    /// 32 bytes from the HSM's RNG.
    Managed,
    /// Customer-supplied: the customer's data key encrypted under their KMS CMK, decrypted
    /// with their IAM credentials.
    Aws(AwsKeyRef),
}

impl KeySource {
    fn kind(&self) -> VersionType {
        match self {
            KeySource::Managed => VersionType::Managed,
            KeySource::Aws(_) => VersionType::Aws,
        }
    }
}

/// A request for a new version.
pub struct NewVersion {
    pub source: KeySource,
    /// The key's rotation period from now on; `None` keeps the current one.
    pub rotation_period_days: Option<u32>,
    pub origin: Initiator,
    /// New versions per key per UTC day allowed to admin requests.
    pub versions_per_day: u32,
    /// Customer-supplied versions per key over its life.
    pub customer_supplied_versions: u32,
    /// Only add a version to an existing key (rotate), never create one.
    pub existing_only: bool,
    /// Only if this is still the active version (the timer's guard against racing an
    /// admin rotation).
    pub expect_active: Option<u32>,
    pub actor: Actor,
    /// For the audit log: "create", "rotate".
    pub action: &'static str,
}

/// What an admin change made.
#[derive(Debug, Clone)]
pub struct AddedVersion {
    pub environment: String,
    pub country: String,
    pub version: u32,
    pub kind: VersionType,
    pub created: String,
    pub key_created: bool,
}

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
        let mut keys = BTreeMap::new();
        for key in stored {
            let state = unwrap_key(&hsm, key).await?;
            keys.insert(state.id.clone(), Arc::new(state));
        }
        let (changes, _) = tokio::sync::watch::channel(0);
        Ok(Keyring {
            current: ArcSwap::from_pointee(Snapshot { keys }),
            store,
            hsm,
            clock,
            writer: tokio::sync::Mutex::new(()),
            changes,
            records: RecordCounters::default(),
            kms,
            aws_checks: std::sync::Mutex::new(aws::Checks::default()),
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

    /// Creates a key (version 1) or adds a version to an existing one.
    pub async fn add_version(&self, id: &KeyId, req: NewVersion) -> Result<AddedVersion> {
        // A customer-supplied key is decrypted with KMS before the writer lock is taken, so
        // that a slow KMS never holds up other changes; the limits are checked before (to
        // spare KMS a call that would be refused) and again under the lock.
        let kind = req.source.kind();
        let limits = VersionLimits {
            aws: kind == VersionType::Aws,
            origin: req.origin,
            versions_per_day: req.versions_per_day,
            customer_supplied_versions: req.customer_supplied_versions,
        };
        let aws = match req.source {
            KeySource::Managed => None,
            KeySource::Aws(aws) => {
                if let Some(key) = self.current.load().keys.get(id) {
                    limits.check(key, self.clock.now())?;
                }
                let plaintext = self.decrypt_for_registration(id, &aws).await?;
                Some((aws, plaintext))
            }
        };

        let _writer = self.writer.lock().await;
        let now = self.clock.now();
        let existing = self.current.load().keys.get(id).cloned();
        let (version, period) = match &existing {
            Some(key) => {
                if req.expect_active.is_some_and(|v| v != key.last_version()) {
                    return Err(Error::conflict(
                        Code::StaleRotation,
                        format!("{id} changed since the rotation was planned"),
                    ));
                }
                limits.check(key, now)?;
                let period = req.rotation_period_days.or(key.rotation_period_days);
                (key.last_version() + 1, period)
            }
            None if req.existing_only => {
                return Err(Error::not_found(Code::KeyNotFound, format!("no key {id}")))
            }
            None => (1, req.rotation_period_days),
        };
        if kind == VersionType::Managed && period.is_none() {
            return Err(Error::bad_input(
                Code::MissingRotationPeriod,
                "rotation_period_days is required for a managed key (30, 60, 180 or 360)",
            ));
        }

        let (key, iv, wrapped, root_created, stored_aws, aws_ref) = match aws {
            None => {
                let (key, iv, wrapped, root_created) = self.make_managed(id, version).await?;
                (key, iv, wrapped, root_created, None, None)
            }
            Some((aws, key)) => {
                let (iv, sealed, root_created) = self
                    .seal_aws_secret(id, version, &aws::mark_checked(&aws.secret_access_key))
                    .await?;
                let check = self.seal_key_check(id, version, &aws, key.expose()).await?;
                let stored = StoredAws {
                    region: aws.region.clone(),
                    encrypted_key: aws.encrypted_key.clone(),
                    cmk_arn: aws.cmk_arn.clone(),
                    access_key_id: aws.access_key_id.clone(),
                    check: Some(check),
                };
                (
                    key,
                    iv,
                    sealed,
                    root_created,
                    Some(stored),
                    Some(Arc::new(aws)),
                )
            }
        };
        let stored = StoredVersion {
            version,
            kind,
            created: now.unix_timestamp(),
            origin: req.origin,
            iv,
            wrapped,
            aws: stored_aws,
        };
        let material = Availability::Ready(Arc::new(key));
        let audit = AuditEntry::new(now.unix_timestamp(), &req.actor, req.action, Some(id))
            .version(version)
            .outcome(AuditOutcome::Ok, format!("new {} version", kind.as_str()));
        self.state_op(
            move |store, id| store.add_version(id, period, &stored, &audit),
            id,
        )
        .await?;
        if root_created {
            tracing::info!(env = %id.env, country = %id.country, "created root key in HSM");
        }
        if aws_ref.is_some() {
            self.record_registration(id, version, now.unix_timestamp());
        }
        let new_version = VersionState {
            version,
            kind,
            created: now.unix_timestamp(),
            origin: req.origin,
            availability: material,
            aws: aws_ref,
        };
        let key = match existing {
            Some(key) => key.with_version(new_version, period),
            None => KeyState::new(id.clone(), period, now.unix_timestamp(), new_version),
        };
        self.publish(key);
        Ok(AddedVersion {
            environment: id.env.clone(),
            country: id.country.clone(),
            version,
            kind,
            created: rfc3339(now.unix_timestamp()),
            key_created: version == 1,
        })
    }

    /// Changes a key's rotation period.
    pub async fn set_rotation_period(&self, id: &KeyId, days: u32, actor: &Actor) -> Result<()> {
        let _writer = self.writer.lock().await;
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

    /// Audit entries after `since`, oldest first, at most `limit`.
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

    /// Stores the exact encryption counts in place of the reserved ones (at shutdown).
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

    /// A fresh data key from the HSM RNG, written straight into its locked page (what
    /// crosses the channel is the page's pointer, never the bytes), wrapped under the key's
    /// root key (created on first use, adopted when it already exists). The wrap is checked
    /// by unwrapping it again before anything is stored.
    async fn make_managed(
        &self,
        id: &KeyId,
        version: u32,
    ) -> Result<(DataKey, [u8; WRAP_IV_LEN], Vec<u8>, bool)> {
        let label = id.root_label();
        let aad = id.wrap_aad(version);
        let create_root = version == 1;
        let made = self
            .hsm
            .call(move |h| {
                let root_created = h.ensure_root_key(&label, create_root)?;
                let mut key = DataKey::zeroed()
                    .ok_or_else(|| HsmError::Rejected("cannot allocate key memory".into()))?;
                h.random(key.bytes_mut())?;
                let mut iv = [0u8; WRAP_IV_LEN];
                h.random(&mut iv)?;
                let wrapped = h.seal(&label, &iv, &aad, key.expose())?;
                let back = h.open(&label, &iv, &aad, &wrapped)?;
                let same = back.as_slice() == key.expose();
                drop(back);
                // The HSM module's frames (the key as its input and output) are gone.
                clear_stack();
                if !same {
                    return Err(HsmError::Integrity);
                }
                Ok((key, iv, wrapped, root_created))
            })
            .await?;
        Ok(made)
    }

    /// Seals an aws version's IAM secret key under the key's root key (created on first use,
    /// adopted when it exists), with its own AAD; checked by opening it again.
    async fn seal_aws_secret(
        &self,
        id: &KeyId,
        version: u32,
        secret: &Zeroizing<String>,
    ) -> Result<([u8; WRAP_IV_LEN], Vec<u8>, bool)> {
        let label = id.root_label();
        let aad = id.aws_secret_aad(version);
        let create_root = version == 1;
        let secret = Zeroizing::new(secret.as_bytes().to_vec());
        let sealed = self
            .hsm
            .call(move |h| {
                let root_created = h.ensure_root_key(&label, create_root)?;
                let mut iv = [0u8; WRAP_IV_LEN];
                h.random(&mut iv)?;
                let sealed = h.seal(&label, &iv, &aad, &secret)?;
                let back = h.open(&label, &iv, &aad, &sealed)?;
                if back.as_slice() != secret.as_slice() {
                    return Err(HsmError::Integrity);
                }
                Ok((iv, sealed, root_created))
            })
            .await?;
        Ok(sealed)
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

/// Unwraps every version of a stored key in one HSM job.
async fn unwrap_key(hsm: &HsmWorker, key: StoredKey) -> Result<KeyState> {
    let label = key.id.root_label();
    let jobs: Vec<_> = key
        .versions
        .iter()
        .map(|v| {
            let aad = match v.kind {
                VersionType::Managed => key.id.wrap_aad(v.version),
                VersionType::Aws => key.id.aws_secret_aad(v.version),
            };
            (v.iv, aad, v.wrapped.clone())
        })
        .collect();
    let opened = hsm
        .call(move |h| {
            h.ensure_root_key(&label, false)?;
            Ok(jobs
                .into_iter()
                .map(|(iv, aad, wrapped)| h.open(&label, &iv, &aad, &wrapped))
                .collect::<Vec<_>>())
        })
        .await;
    let (problem, opened) = match opened {
        Ok(opened) => (None, opened),
        Err(e @ HsmError::RootKeyMissing(_)) | Err(e @ HsmError::DuplicateRootKey(..)) => {
            tracing::error!(
                env = %key.id.env, country = %key.id.country,
                "state has key {} but {e}: the key is unavailable (no new root key is made)",
                key.id
            );
            (Some(format!("{}: {e}", key.id)), Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let mut versions = Vec::with_capacity(key.versions.len());
    let mut opened = opened.into_iter();
    for v in key.versions {
        let opened = opened.next();
        let (material, aws) = match v.aws {
            Some(stored) => aws::load_version(&key.id, v.version, &problem, stored, opened)?,
            None => (
                managed_material(&key.id, v.version, &problem, opened)?,
                None,
            ),
        };
        versions.push(VersionState {
            version: v.version,
            kind: v.kind,
            created: v.created,
            origin: v.origin,
            availability: material,
            aws,
        });
    }
    Ok(KeyState {
        id: key.id,
        rotation_period_days: key.rotation_period_days,
        created: key.created,
        unavailable_reason: problem,
        versions,
    })
}

/// A managed version's data key from its unwrap result; a failed tag check makes only this
/// version unavailable (loudly), an HSM failure stops the load.
fn managed_material(
    id: &KeyId,
    version: u32,
    problem: &Option<String>,
    opened: Option<std::result::Result<Zeroizing<Vec<u8>>, HsmError>>,
) -> Result<Availability> {
    Ok(match (problem, opened) {
        (Some(p), _) => Availability::Unavailable(p.clone()),
        (None, Some(Ok(bytes))) => match DataKey::new(&bytes) {
            Some(k) => Availability::Ready(Arc::new(k)),
            None => Availability::Unavailable(format!(
                "integrity check failed for {id} version {version}: wrong key length"
            )),
        },
        (None, Some(Err(HsmError::Integrity))) => {
            let msg = format!("integrity check failed for {id} version {version}");
            tracing::error!(env = %id.env, country = %id.country, version, "{msg}: the stored wrapped key was altered or moved");
            Availability::Unavailable(msg)
        }
        (None, Some(Err(e))) => return Err(e.into()),
        (None, None) => Availability::Unavailable("not unwrapped".into()),
    })
}
