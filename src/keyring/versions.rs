//! New versions: a managed key from the HSM RNG or a customer-supplied one from KMS,
//! checked against the limits, wrapped, committed with its audit entry, then published.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{aws, Keyring};
use crate::domain::audit::{Actor, AuditEntry, AuditOutcome};
use crate::domain::clock::rfc3339;
use crate::domain::error::{Error, Result};
use crate::domain::limits::VersionLimits;
use crate::domain::secret::clear_stack;
use crate::domain::{
    Availability, Code, DataKey, Initiator, KeyId, KeyState, VersionState, VersionType,
};
use crate::hsm::{HsmError, WRAP_IV_LEN};
use crate::kms::AwsKeyRef;
use crate::store::{StoredAws, StoredVersion};

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

impl Keyring {
    /// Creates a key (version 1) or adds a version to an existing one.
    pub async fn add_version(&self, id: &KeyId, mut req: NewVersion) -> Result<AddedVersion> {
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
        // The source is used up here (`kind` says which it was).
        let mut aws = match std::mem::replace(&mut req.source, KeySource::Managed) {
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
        let known = self.current.load().keys.contains_key(id);
        // A shared state: this node changes it alone meanwhile, on the key as it is now.
        let _state = self.hold_state(id).await?;
        if !known && !req.existing_only && self.current.load().keys.contains_key(id) {
            return Err(Error::conflict(
                Code::VersionConflict,
                format!("{id} was created meanwhile on another node: this node has it now; ask again to add a version"),
            ));
        }
        let mut retried = false;
        loop {
            let made = self.add_locked(id, &req, kind, &limits, aws.take()).await;
            match made {
                // Another node moved the key (a node that does not take the state's lock):
                // this node's view of it is renewed, and a rotation made again on it once.
                // (A timer rotation planned on an older version comes back as stale: the
                // view is renewed too, but it is never made again.)
                Err(e)
                    if matches!(e.code(), Code::VersionConflict | Code::StaleRotation)
                        && self.shared() =>
                {
                    self.reload_locked(id).await?;
                    let again = kind == VersionType::Managed
                        && known
                        && req.expect_active.is_none()
                        && !retried;
                    if !again {
                        return Err(e);
                    }
                    tracing::info!(env = %id.env, country = %id.country, "another node added a version first: trying again on the state as it is now");
                    retried = true;
                }
                other => return other,
            }
        }
    }

    /// `add_version` under the writer lock (and the state's lock, on a shared state).
    async fn add_locked(
        &self,
        id: &KeyId,
        req: &NewVersion,
        kind: VersionType,
        limits: &VersionLimits,
        aws: Option<(AwsKeyRef, DataKey)>,
    ) -> Result<AddedVersion> {
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
            None if kind == VersionType::Aws => {
                return Err(Error::internal(format!(
                    "{id}: an aws version without its decrypted key"
                )))
            }
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
                    refusal: None,
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
        let planned_on = req.expect_active;
        self.state_op(
            move |store, id| store.add_version(id, period, &stored, &audit),
            id,
        )
        .await
        .map_err(|e| stale_if_planned(e, id, planned_on))?;
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
}

/// The store refused the number a rotation planned on `planned_on` (`expect_active`): the
/// key moved on in the shared state, by another node, after this one last loaded it. The
/// store checks that number under the key's row lock in the rotation's transaction, which
/// is what keeps a deposed leader from rotating a key twice.
fn stale_if_planned(e: Error, id: &KeyId, planned_on: Option<u32>) -> Error {
    match (planned_on, e.code()) {
        (Some(v), Code::VersionConflict) => Error::conflict(
            Code::StaleRotation,
            format!("{id} changed elsewhere since the rotation was planned on version {v}"),
        ),
        _ => e,
    }
}
