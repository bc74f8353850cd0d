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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{DataKey, KeyId, Keyring, Material, DATA_KEY_LEN};
use crate::audit::Actor;
use crate::clock::rfc3339;
use crate::error::{Error, Result};
use crate::hsm::HsmError;
use crate::kms::{AwsKeyRef, KmsError};
use crate::store::StoredAws;

/// At most this many KMS calls at once during a revalidation pass.
const PARALLEL_CHECKS: usize = 4;
/// First retry delay after a transient failure; doubles per failure, capped by the interval.
const RETRY_BASE: Duration = Duration::from_secs(2);

/// Revalidation state of one aws version.
pub(super) struct Check {
    /// Daemon clock (unix seconds) of the last successful Decrypt.
    last_success: Option<i64>,
    /// Consecutive transient failures, and the last one's message.
    failures: u32,
    transient: Option<String>,
    /// Set while KMS refuses the key: why.
    rejected: Option<String>,
    /// Set while the version is unavailable because its last success is too old.
    stale: bool,
    due: Instant,
}

#[derive(Default)]
pub(super) struct Checks {
    map: BTreeMap<(KeyId, u32), Check>,
    /// The interval of the last pass (for versions registered between passes).
    interval: Option<Duration>,
}

/// Timing of revalidation, from `[aws]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct RevalidateSettings {
    pub interval: Duration,
    pub max_stale: Duration,
}

/// What health shows about aws versions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AwsHealth {
    /// "ok", "degraded" (a check failed) or "none" (no aws versions).
    pub status: &'static str,
    pub versions: usize,
    pub problems: Vec<AwsProblem>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AwsProblem {
    pub key: String,
    pub version: u32,
    /// "revoked" (KMS refuses: not served), "unreachable" (KMS cannot be reached; the cached
    /// key still serves) or "stale" (no successful check within aws.max_stale, or none since
    /// the daemon started: not served).
    pub state: &'static str,
    pub error: String,
    /// RFC 3339; null when no check has succeeded since the daemon started.
    pub last_success: Option<String>,
    pub failures: u32,
}

/// Why an aws version is not served between start and its first KMS check.
const AWAITING_FIRST_CHECK: &str = "waiting for the first KMS check since start";

/// One aws version read from state: its IAM secret opened by the HSM. The data key comes
/// later, from KMS.
pub(super) fn load_version(
    id: &KeyId,
    version: u32,
    problem: &Option<String>,
    stored: StoredAws,
    opened: Option<std::result::Result<Zeroizing<Vec<u8>>, HsmError>>,
) -> Result<(Material, Option<Arc<AwsKeyRef>>)> {
    let secret = match (problem, opened) {
        (Some(p), _) => return Ok((Material::Unavailable(p.clone()), None)),
        (None, Some(Ok(bytes))) => match String::from_utf8(bytes.to_vec()) {
            Ok(s) => Zeroizing::new(s),
            Err(e) => {
                // The bytes are the secret: zeroize them, say nothing about them.
                drop(Zeroizing::new(e.into_bytes()));
                let msg = format!("integrity check failed for {id} version {version}: sealed IAM secret is not text");
                tracing::error!(env = %id.env, country = %id.country, version, "{msg}");
                return Ok((Material::Unavailable(msg), None));
            }
        },
        (None, Some(Err(HsmError::Integrity))) => {
            let msg = format!("integrity check failed for {id} version {version}");
            tracing::error!(env = %id.env, country = %id.country, version, "{msg}: the sealed IAM secret was altered or moved");
            return Ok((Material::Unavailable(msg), None));
        }
        (None, Some(Err(e))) => return Err(e.into()),
        (None, None) => return Ok((Material::Unavailable("not unwrapped".into()), None)),
    };
    let aws = AwsKeyRef {
        region: stored.region,
        encrypted_key: stored.encrypted_key,
        cmk_arn: stored.cmk_arn,
        access_key_id: stored.access_key_id,
        secret_access_key: secret,
    };
    Ok((
        Material::Unavailable(AWAITING_FIRST_CHECK.into()),
        Some(Arc::new(aws)),
    ))
}

fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (RETRY_BASE * 2u32.pow(exp)).min(interval)
}

/// One KMS answer for one version.
type Answer = (
    KeyId,
    u32,
    std::result::Result<Zeroizing<Vec<u8>>, KmsError>,
);

/// What one check decided for a version's material.
enum Outcome {
    Keep,
    Set(Material),
}

impl Keyring {
    /// KMS Decrypt of a version being registered; refusals become errors naming the cause.
    pub(super) async fn decrypt_for_registration(
        &self,
        id: &KeyId,
        aws: &AwsKeyRef,
    ) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>> {
        let plaintext = self.kms.decrypt(aws).await.map_err(|e| match e {
            KmsError::Rejected { cause, .. } => Error::bad_input(
                cause.code(),
                format!(
                    "{id}: KMS in {} refused to decrypt the encrypted key with CMK {}: {e}; nothing was stored",
                    aws.region, aws.cmk_arn
                ),
            ),
            KmsError::Transient(msg) => Error::unavailable(
                "kms_unavailable",
                format!(
                    "{id}: cannot reach KMS in {}: {msg}; nothing was stored, retry later",
                    aws.region
                ),
            ),
        })?;
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        if plaintext.len() != DATA_KEY_LEN {
            return Err(Error::bad_input(
                "aws_key_length",
                format!(
                    "{id}: KMS decrypted the encrypted key to {} bytes; a data key must be exactly {DATA_KEY_LEN} bytes (AES-256, e.g. GenerateDataKey with KeySpec AES_256); nothing was stored",
                    plaintext.len()
                ),
            ));
        }
        key.copy_from_slice(&plaintext);
        Ok(key)
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, Checks> {
        // Plain bookkeeping: a panic elsewhere cannot leave it inconsistent.
        self.aws_checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A version just registered: KMS decrypted it now.
    pub(super) fn record_registration(&self, id: &KeyId, version: u32, now: i64) {
        let mut checks = self.checks();
        let interval = checks.interval.unwrap_or(Duration::from_secs(15 * 60));
        checks.map.insert(
            (id.clone(), version),
            Check {
                last_success: Some(now),
                failures: 0,
                transient: None,
                rejected: None,
                stale: false,
                due: Instant::now() + interval,
            },
        );
    }

    /// Checks every aws version that is due (all of them on the first call) with KMS,
    /// publishes what changed, and returns when the next check is due.
    pub async fn revalidate_due(&self, settings: RevalidateSettings) -> Instant {
        let started = Instant::now();
        let snap = self.snapshot();
        let due: Vec<(KeyId, u32, Arc<AwsKeyRef>)> = {
            let mut checks = self.checks();
            checks.interval = Some(settings.interval);
            snap.keys
                .values()
                .flat_map(|k| {
                    k.versions.iter().filter_map(move |v| {
                        v.aws.as_ref().map(|a| (k.id.clone(), v.version, a.clone()))
                    })
                })
                .filter(|(id, n, _)| {
                    checks
                        .map
                        .get(&(id.clone(), *n))
                        .is_none_or(|c| c.due <= started)
                })
                .collect()
        };
        if !due.is_empty() {
            let checked = due.len();
            let results = self.decrypt_all(due).await;
            let changes = self.judge(results, settings);
            let changed = changes.len();
            if !changes.is_empty() {
                self.publish_materials(changes).await;
            }
            tracing::debug!(checked, changed, "KMS revalidation pass");
        }
        let checks = self.checks();
        let next = checks
            .map
            .values()
            .map(|c| c.due)
            .min()
            .unwrap_or(started + settings.interval);
        next.min(Instant::now() + settings.interval)
    }

    /// KMS Decrypt of each version, a few at a time.
    async fn decrypt_all(&self, due: Vec<(KeyId, u32, Arc<AwsKeyRef>)>) -> Vec<Answer> {
        let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL_CHECKS));
        let mut set = tokio::task::JoinSet::new();
        for (id, n, aws) in due {
            let kms = self.kms.clone();
            let permits = permits.clone();
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let r = kms.decrypt(&aws).await;
                (id, n, r)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!("KMS check task failed: {e}"),
            }
        }
        out
    }

    /// Turns check results into new check state and material changes (logging transitions).
    fn judge(
        &self,
        results: Vec<Answer>,
        settings: RevalidateSettings,
    ) -> Vec<(KeyId, u32, Material)> {
        let now = self.clock.now().unix_timestamp();
        let snap = self.snapshot();
        let mut checks = self.checks();
        let mut changes = Vec::new();
        for (id, n, result) in results {
            let Some(current) = snap.keys.get(&id).and_then(|k| k.version(n)) else {
                continue;
            };
            let check = checks.map.entry((id.clone(), n)).or_insert_with(|| Check {
                last_success: None,
                failures: 0,
                transient: None,
                rejected: None,
                stale: false,
                due: Instant::now(),
            });
            let outcome = judge_one(&id, n, current.key(), check, result, now, settings);
            if let Outcome::Set(m) = outcome {
                changes.push((id, n, m));
            }
        }
        changes
    }

    /// Swaps in new material for some versions, under the writer lock (so no concurrent
    /// add_version publishes a key built from an older snapshot).
    async fn publish_materials(&self, changes: Vec<(KeyId, u32, Material)>) {
        let _writer = self.writer.lock().await;
        let mut by_key: BTreeMap<KeyId, Vec<(u32, Material)>> = BTreeMap::new();
        for (id, n, m) in changes {
            by_key.entry(id).or_default().push((n, m));
        }
        let snap = self.snapshot();
        let mut audits = Vec::new();
        for (id, changes) in by_key {
            let Some(key) = snap.keys.get(&id) else {
                continue;
            };
            for (n, new) in &changes {
                let was_waiting = matches!(
                    key.version(*n).map(|v| &v.material),
                    Some(Material::Unavailable(why)) if why == AWAITING_FIRST_CHECK
                );
                let entry = self
                    .audit_entry(&Actor::Timer, "kms-revalidate", Some(&id))
                    .version(*n);
                match new {
                    Material::Unavailable(why) => {
                        audits.push(entry.outcome("failed", format!("version unavailable: {why}")))
                    }
                    // The first successful check after start is routine, not an event.
                    Material::Ready(_) if !was_waiting => {
                        audits.push(entry.outcome("ok", "version restored: KMS decrypts it again"))
                    }
                    Material::Ready(_) => {}
                }
            }
            self.publish(key.with_materials(changes));
        }
        for entry in audits {
            self.audit(entry).await;
        }
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
            let (state, error) = if let Some(why) = &c.rejected {
                ("revoked", why.clone())
            } else if c.stale {
                ("stale", c.transient.clone().unwrap_or_default())
            } else if let Some(e) = &c.transient {
                ("unreachable", e.clone())
            } else {
                continue;
            };
            problems.push(AwsProblem {
                key: id.to_string(),
                version: *n,
                state,
                error,
                last_success: c.last_success.map(rfc3339),
                failures: c.failures,
            });
        }
        AwsHealth {
            status: if versions == 0 {
                "none"
            } else if problems.is_empty() {
                "ok"
            } else {
                "degraded"
            },
            versions,
            problems,
        }
    }
}

/// Decides one version's fate from one KMS answer; updates its check state.
fn judge_one(
    id: &KeyId,
    n: u32,
    cached: Option<&Arc<DataKey>>,
    check: &mut Check,
    result: std::result::Result<Zeroizing<Vec<u8>>, KmsError>,
    now: i64,
    settings: RevalidateSettings,
) -> Outcome {
    let (env, country) = (&id.env, &id.country);
    match result {
        Ok(plaintext) if plaintext.len() == DATA_KEY_LEN => {
            check.last_success = Some(now);
            check.failures = 0;
            check.transient = None;
            check.due = Instant::now() + settings.interval;
            let was_revoked = check.rejected.take().is_some();
            let was_stale = std::mem::replace(&mut check.stale, false);
            match cached {
                Some(k) if k.expose()[..] == plaintext[..] => Outcome::Keep,
                Some(_) => {
                    let msg = format!("KMS decrypted {id} version {n} to a different key than the one in use; not served");
                    tracing::error!(%env, %country, version = n, "{msg}");
                    check.rejected = Some(msg.clone());
                    Outcome::Set(Material::Unavailable(msg))
                }
                None => match DataKey::new(&plaintext) {
                    Some(k) => {
                        if was_revoked || was_stale {
                            tracing::warn!(%env, %country, version = n, "customer-supplied key is decryptable again: version restored");
                        } else {
                            tracing::info!(%env, %country, version = n, "customer-supplied key checked with KMS: serving");
                        }
                        Outcome::Set(Material::Ready(Arc::new(k)))
                    }
                    None => {
                        Outcome::Set(Material::Unavailable("cannot allocate key memory".into()))
                    }
                },
            }
        }
        Ok(plaintext) => revoke(
            id,
            n,
            check,
            format!(
                "KMS now decrypts the encrypted key to {} bytes, not {DATA_KEY_LEN}",
                plaintext.len()
            ),
            settings,
        ),
        Err(e @ KmsError::Rejected { .. }) => revoke(id, n, check, e.to_string(), settings),
        Err(KmsError::Transient(msg)) => {
            check.failures += 1;
            check.transient = Some(msg.clone());
            check.due = Instant::now() + backoff(check.failures, settings.interval);
            if check.rejected.is_some() {
                // Refused at the last answer: stays unavailable until KMS decrypts again.
                return Outcome::Keep;
            }
            let last = check.last_success.map(rfc3339);
            let too_old = check
                .last_success
                .is_none_or(|t| now.saturating_sub(t) as u64 > settings.max_stale.as_secs());
            if cached.is_some() && !too_old {
                tracing::warn!(%env, %country, version = n, failures = check.failures,
                    last_success = %last.unwrap_or_default(),
                    "KMS check failed, still serving the cached key: {msg}");
                return Outcome::Keep;
            }
            check.stale = true;
            if cached.is_none() {
                // Not served already (no check has succeeded since start, or already stale).
                tracing::warn!(%env, %country, version = n, failures = check.failures,
                    "KMS check failed, version stays unavailable: {msg}");
                return Outcome::Keep;
            }
            let why = format!(
                "no successful KMS check since {} (longer than aws.max_stale = {}); last error: {msg}",
                last.unwrap_or_default(),
                humantime::format_duration(settings.max_stale)
            );
            tracing::error!(%env, %country, version = n, "customer-supplied key no longer served: {why}");
            Outcome::Set(Material::Unavailable(why))
        }
    }
}

fn revoke(
    id: &KeyId,
    n: u32,
    check: &mut Check,
    why: String,
    settings: RevalidateSettings,
) -> Outcome {
    check.failures = 0;
    check.transient = None;
    check.stale = false;
    check.due = Instant::now() + settings.interval;
    let first = check.rejected.is_none();
    let msg = format!("revoked: {why}");
    check.rejected = Some(msg.clone());
    if first {
        tracing::error!(env = %id.env, country = %id.country, version = n,
            "customer-supplied key is no longer served: KMS refuses to decrypt it: {why}");
    }
    Outcome::Set(Material::Unavailable(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_interval() {
        let i = Duration::from_secs(900);
        assert_eq!(backoff(1, i), Duration::from_secs(2));
        assert_eq!(backoff(2, i), Duration::from_secs(4));
        assert_eq!(backoff(30, i), i);
        assert_eq!(backoff(3, Duration::from_secs(1)), Duration::from_secs(1));
    }
}
