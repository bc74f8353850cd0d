//! Customer-supplied (aws) versions: registration checks with KMS, loading from state, and
//! revalidation (decrypting again on a schedule, so that a customer who revokes their CMK
//! stops our copy being served).
//!
//! The data key of an aws version lives only in memory. At start it is unavailable until
//! the first successful KMS check. Each check is one KMS Decrypt:
//! - success: the version serves (restored if it did not);
//! - rejected (disabled, pending deletion, access denied, invalid ciphertext, credentials):
//!   the version becomes unavailable at once and its key is dropped from memory;
//! - transient (network, timeout, throttling): the cached key keeps serving and health is
//!   degraded; retried with backoff; once `aws.max_stale` has passed since the last
//!   successful check (by the daemon's clock), the version becomes unavailable.
//!
//! Key checks bind a version to what it was registered with. At registration the daemon
//! seals a key check value (SHA-256 over a domain prefix and the data key; never the key)
//! under the key's HSM root key, with AAD over environment, country, version, region,
//! encrypted key, CMK ARN and access key id (`versions.aws_check_iv`, `versions.aws_check`),
//! and marks the sealed IAM secret as "has a key check", so that a check deleted from the
//! state is noticed too. Every later KMS decrypt must match it: a state whose KMS fields
//! were changed (another encrypted key, CMK, region or access key id), or whose check was
//! removed or altered, makes the version unavailable with the code `aws_key_mismatch`
//! (audited and logged like a revocation). Versions registered before key checks existed
//! (no check and no mark) keep working unbound.

mod check;
mod revalidate;
mod shared;
#[cfg(test)]
mod tests;

use crate::domain::Code;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use zeroize::Zeroizing;

use self::check::{Binding, CHECKED_MARK};
use super::Keyring;
use crate::domain::clock::rfc3339;
use crate::domain::error::{Error, Result};
use crate::domain::Availability;
use crate::domain::DataKey;
use crate::domain::KeyId;
use crate::domain::DATA_KEY_LEN;
use crate::hsm::HsmError;
use crate::kms::{AwsKeyRef, KmsError};
use crate::store::StoredAws;

pub(super) use self::check::mark_checked;
pub use self::shared::recorded_refusals;
pub use crate::domain::aws::{AwsHealth, AwsProblem, AwsState, AwsStatus};

/// The code of a version whose data key or KMS parameters are not those it was registered
/// with.
pub const MISMATCH_CODE: Code = Code::AwsKeyMismatch;

/// `from + d`, never overflowing: a duration too large for the clock (the config bounds
/// them) waits 30 days instead of panicking.
pub(super) fn later(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(crate::config::MAX_DURATION))
        .unwrap_or(from)
}

/// A KMS refusal or a key check failure: what health and the version's error say.
struct Refusal {
    code: Code,
    why: String,
    /// Learned from the state (another node's check, or this one's before a restart), not
    /// seen by this node's own check since.
    learned: bool,
}

/// What a version's error says while it is refused (by KMS, or its key check).
fn refused_message(code: Code, why: &str, learned: bool) -> String {
    let said = if code == MISMATCH_CODE {
        format!("key check failed ({code}): {why}; not served")
    } else {
        format!("revoked: {why}")
    };
    match learned {
        false => said,
        true => format!(
            "{said} (a refusal recorded in the state; withdrawn here until KMS decrypts it again)"
        ),
    }
}

/// Revalidation state of one aws version.
pub(super) struct Check {
    /// Daemon clock (unix seconds) of the last successful Decrypt.
    last_success: Option<i64>,
    /// Consecutive transient failures, and the last one's message.
    failures: u32,
    transient: Option<String>,
    /// Set while KMS refuses the key or the key fails its check: which, and why.
    rejected: Option<Refusal>,
    /// Set while the version is unavailable because its last success is too old.
    stale: bool,
    due: Instant,
    /// Whether the state holds a refusal of this version, as far as this node knows (read
    /// at load and in each pass, or written by this node).
    recorded: bool,
}

impl Check {
    fn new(due: Instant) -> Check {
        Check {
            last_success: None,
            failures: 0,
            transient: None,
            rejected: None,
            stale: false,
            due,
            recorded: false,
        }
    }
}

#[derive(Default)]
pub(super) struct Checks {
    map: BTreeMap<(KeyId, u32), Check>,
    /// Wakes the revalidation loop when a version should be checked at once (a refusal
    /// another node recorded was cleared).
    wake: Arc<tokio::sync::Notify>,
    /// Each version's key check, read and opened once per run (the KMS fields in memory
    /// are those loaded at start).
    bindings: BTreeMap<(KeyId, u32), Arc<Binding>>,
    /// The interval of the last pass (for versions registered between passes).
    interval: Option<Duration>,
}

/// Timing of revalidation, from `[aws]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct RevalidateSettings {
    pub interval: Duration,
    pub max_stale: Duration,
}

/// One aws version read from state: its IAM secret opened by the HSM. The data key comes
/// later, from KMS.
/// A refusal recorded in the state withdraws the version from the start (its first KMS
/// check may restore it).
pub(super) fn load_version(
    id: &KeyId,
    version: u32,
    problem: &Option<String>,
    stored: StoredAws,
    opened: Option<std::result::Result<Zeroizing<Vec<u8>>, HsmError>>,
) -> Result<(Availability, Option<Arc<AwsKeyRef>>)> {
    let secret = match (problem, opened) {
        (Some(p), _) => return Ok((Availability::Unavailable(p.clone()), None)),
        (None, Some(Ok(bytes))) => match String::from_utf8(bytes.to_vec()) {
            // The mark says a key check must exist; revalidation reads it again from the
            // seal, so here it is only taken off.
            Ok(s) => match s.strip_prefix(CHECKED_MARK) {
                Some(rest) => {
                    let mut secret = Zeroizing::new(String::with_capacity(rest.len()));
                    secret.push_str(rest);
                    drop(Zeroizing::new(s));
                    secret
                }
                None => Zeroizing::new(s),
            },
            Err(e) => {
                // The bytes are the secret: zeroize them, say nothing about them.
                drop(Zeroizing::new(e.into_bytes()));
                let msg = format!("integrity check failed for {id} version {version}: sealed IAM secret is not text");
                tracing::error!(env = %id.env, country = %id.country, version, "{msg}");
                return Ok((Availability::Unavailable(msg), None));
            }
        },
        (None, Some(Err(HsmError::Integrity))) => {
            let msg = format!("integrity check failed for {id} version {version}");
            tracing::error!(env = %id.env, country = %id.country, version, "{msg}: the sealed IAM secret was altered or moved");
            return Ok((Availability::Unavailable(msg), None));
        }
        (None, Some(Err(e))) => return Err(e.into()),
        (None, None) => return Ok((Availability::Unavailable("not unwrapped".into()), None)),
    };
    let aws = AwsKeyRef {
        region: stored.region,
        encrypted_key: stored.encrypted_key,
        cmk_arn: stored.cmk_arn,
        access_key_id: stored.access_key_id,
        secret_access_key: secret,
    };
    let availability = match &stored.refusal {
        Some(r) => Availability::Unavailable(refused_message(r.code, &r.why, true)),
        None => Availability::AwaitingFirstCheck,
    };
    Ok((availability, Some(Arc::new(aws))))
}

impl Keyring {
    /// KMS Decrypt of a version being registered, into its locked page (moved from here on
    /// as the page's pointer); refusals become errors naming the cause.
    pub(super) async fn decrypt_for_registration(
        &self,
        id: &KeyId,
        aws: &AwsKeyRef,
    ) -> Result<DataKey> {
        let plaintext = self.kms.decrypt(aws).await;
        // The SDK's answer parsing (the key in base64 and raw) ran in frames below this one.
        crate::domain::secret::clear_stack_deep();
        let plaintext = plaintext.map_err(|e| match e {
            KmsError::Rejected { cause, .. } => Error::bad_input(
                cause.code(),
                format!(
                    "{id}: KMS in {} refused to decrypt the encrypted key with CMK {}: {e}; nothing was stored",
                    aws.region, aws.cmk_arn
                ),
            ),
            KmsError::Transient(msg) => Error::unavailable(
                Code::KmsUnavailable,
                format!(
                    "{id}: cannot reach KMS in {}: {msg}; nothing was stored, retry later",
                    aws.region
                ),
            ),
        })?;
        if plaintext.len() != DATA_KEY_LEN {
            return Err(Error::bad_input(
                Code::AwsKeyLength,
                format!(
                    "{id}: KMS decrypted the encrypted key to {} bytes; a data key must be exactly {DATA_KEY_LEN} bytes (AES-256, e.g. GenerateDataKey with KeySpec AES_256); nothing was stored",
                    plaintext.len()
                ),
            ));
        }
        DataKey::new(&plaintext).ok_or_else(|| Error::internal("cannot allocate key memory"))
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, Checks> {
        // Plain bookkeeping: a panic elsewhere cannot leave it inconsistent.
        self.aws_checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A version just registered: KMS decrypted it now.
    pub(super) fn record_registration(&self, id: &KeyId, version: u32, now: i64) {
        let mut checks = self.checks();
        let interval = checks.interval.unwrap_or(Duration::from_secs(15 * 60));
        let mut check = Check::new(later(Instant::now(), interval));
        check.last_success = Some(now);
        checks.map.insert((id.clone(), version), check);
    }

    /// Revalidation state for health.
    pub fn aws_health(&self) -> AwsHealth {
        let snap = self.snapshot();
        let versions = snap
            .keys
            .values()
            .flat_map(|k| k.versions.iter())
            .filter(|v| v.aws.is_some())
            .count();
        let checks = self.checks();
        let mut problems = Vec::new();
        for ((id, n), c) in checks.map.iter() {
            let (state, code, error) = if let Some(r) = &c.rejected {
                let state = if r.code == MISMATCH_CODE {
                    AwsState::Mismatch
                } else {
                    AwsState::Revoked
                };
                (state, r.code, r.why.clone())
            } else if c.stale {
                (
                    AwsState::Stale,
                    Code::AwsKeyStale,
                    c.transient.clone().unwrap_or_default(),
                )
            } else if let Some(e) = &c.transient {
                (AwsState::Unreachable, Code::KmsUnavailable, e.clone())
            } else {
                continue;
            };
            problems.push(AwsProblem {
                key: id.to_string(),
                version: *n,
                state,
                code,
                error,
                last_success: c.last_success.map(rfc3339),
                failures: c.failures,
            });
        }
        AwsHealth {
            status: if versions == 0 {
                AwsStatus::None
            } else if problems.is_empty() {
                AwsStatus::Ok
            } else {
                AwsStatus::Degraded
            },
            versions,
            problems,
        }
    }
}
