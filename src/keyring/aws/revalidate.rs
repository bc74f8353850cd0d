//! The revalidation pass of aws versions: due checks, KMS decrypts, judging answers, publishing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use zeroize::Zeroizing;

use super::check::Binding;
use super::{later, refused_message, Check, Refusal, RevalidateSettings, MISMATCH_CODE};
use crate::domain::audit::Actor;
use crate::domain::audit::AuditOutcome;
use crate::domain::clock::rfc3339;
use crate::domain::Availability;
use crate::domain::Code;
use crate::domain::DataKey;
use crate::domain::KeyId;
use crate::domain::DATA_KEY_LEN;
use crate::keyring::Keyring;
use crate::kms::{AwsKeyRef, KmsError};

/// At most this many KMS calls at once during a revalidation pass.
const PARALLEL_CHECKS: usize = 4;
/// First retry delay after a transient failure; doubles per failure, capped by the interval.
const RETRY_BASE: Duration = Duration::from_secs(2);

pub(super) fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (RETRY_BASE * 2u32.pow(exp)).min(interval)
}

/// What one check found for one version.
pub(super) enum Found {
    /// KMS decrypted it, and the key passed its key check (or has none).
    Key(Zeroizing<Vec<u8>>),
    /// KMS refused, or gave no usable answer (or the HSM could not open the key check).
    Kms(KmsError),
    /// The data key or the stored KMS fields are not those registered: why.
    Mismatch(String),
}

/// One check's result for one version.
type Answer = (KeyId, u32, Found);

/// What one check decided for a version's key.
pub(super) enum Decision {
    Unchanged,
    Becomes(Availability),
}

impl Keyring {
    /// Checks every aws version that is due (all of them on the first call) with KMS,
    /// publishes what changed, and returns when the next check is due.
    pub async fn revalidate_due(&self, settings: RevalidateSettings) -> Instant {
        // First what the state says other nodes saw (or cleared).
        let learned = self.learn_recorded().await;
        if !learned.is_empty() {
            self.publish_materials(learned, false).await;
        }
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
            // Each version's key check first: a version whose check cannot hold needs no
            // KMS call, and one whose check cannot be read now waits like a KMS outage.
            let mut results = Vec::new();
            let mut to_kms = Vec::new();
            for (id, n, aws) in due {
                match self.binding(&id, n, &aws).await {
                    Ok(b) => match &*b {
                        Binding::Broken(why) => results.push((id, n, Found::Mismatch(why.clone()))),
                        _ => to_kms.push((id, n, aws, b)),
                    },
                    Err(msg) => results.push((id, n, Found::Kms(KmsError::Transient(msg)))),
                }
            }
            results.extend(self.decrypt_all(to_kms).await);
            let changes = self.decide(results, settings);
            let changed = changes.len();
            if !changes.is_empty() {
                self.publish_materials(changes, true).await;
            }
            tracing::debug!(checked, changed, "KMS revalidation pass");
        }
        // Then what this node saw, for the others.
        self.record_outcomes().await;
        let checks = self.checks();
        let next = checks
            .map
            .values()
            .map(|c| c.due)
            .min()
            .unwrap_or(later(started, settings.interval));
        next.min(later(Instant::now(), settings.interval))
    }

    /// KMS Decrypt of each version, a few at a time, each key held to its key check.
    async fn decrypt_all(
        &self,
        due: Vec<(KeyId, u32, Arc<AwsKeyRef>, Arc<Binding>)>,
    ) -> Vec<Answer> {
        let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL_CHECKS));
        let mut set = tokio::task::JoinSet::new();
        for (id, n, aws, binding) in due {
            let kms = self.kms.clone();
            let permits = permits.clone();
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let found = match kms.decrypt(&aws).await {
                    Ok(key) => match binding.admits(&key) {
                        Ok(()) => Found::Key(key),
                        Err(why) => Found::Mismatch(why),
                    },
                    Err(e) => Found::Kms(e),
                };
                // The SDK's parsing of the answer (the key in base64 and raw) and the key
                // check ran in frames below this one.
                crate::domain::secret::clear_stack_deep();
                (id, n, found)
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
    fn decide(
        &self,
        results: Vec<Answer>,
        settings: RevalidateSettings,
    ) -> Vec<(KeyId, u32, Availability)> {
        let now = self.clock.now().unix_timestamp();
        let snap = self.snapshot();
        let mut checks = self.checks();
        let mut changes = Vec::new();
        for (id, n, result) in results {
            let Some(current) = snap.keys.get(&id).and_then(|k| k.version(n)) else {
                continue;
            };
            let check = checks
                .map
                .entry((id.clone(), n))
                .or_insert_with(|| Check::new(Instant::now()));
            let outcome = judge_one(&id, n, current.key(), check, result, now, settings);
            if let Decision::Becomes(m) = outcome {
                changes.push((id, n, m));
            }
        }
        changes
    }

    /// Swaps in new material for some versions, under the writer lock (so no concurrent
    /// add_version publishes a key built from an older snapshot). `audited`: what this
    /// node's checks decided (what it learned from the state, the node that recorded it
    /// audited).
    pub(super) async fn publish_materials(
        &self,
        changes: Vec<(KeyId, u32, Availability)>,
        audited: bool,
    ) {
        let _writer = self.writer.lock().await;
        let mut by_key: BTreeMap<KeyId, Vec<(u32, Availability)>> = BTreeMap::new();
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
                    key.version(*n).map(|v| &v.availability),
                    Some(Availability::AwaitingFirstCheck)
                );
                let entry = self
                    .audit_entry(&Actor::Timer, "kms-revalidate", Some(&id))
                    .version(*n);
                match new {
                    Availability::Unavailable(why) => audits.push(
                        entry.outcome(AuditOutcome::Failed, format!("version unavailable: {why}")),
                    ),
                    // Never decided by a check: only loading sets it.
                    Availability::AwaitingFirstCheck => {}
                    // The first successful check after start is routine, not an event.
                    Availability::Ready(_) if !was_waiting => audits.push(
                        entry.outcome(AuditOutcome::Ok, "version restored: KMS decrypts it again"),
                    ),
                    Availability::Ready(_) => {}
                }
            }
            self.publish(key.with_availability(changes));
        }
        if !audited {
            return;
        }
        for entry in audits {
            self.audit(entry).await;
        }
    }
}

/// Decides one version's fate from one check; updates its check state.
pub(super) fn judge_one(
    id: &KeyId,
    n: u32,
    cached: Option<&Arc<DataKey>>,
    check: &mut Check,
    found: Found,
    now: i64,
    settings: RevalidateSettings,
) -> Decision {
    let (env, country) = (&id.env, &id.country);
    match found {
        Found::Key(plaintext) if plaintext.len() == DATA_KEY_LEN => {
            match cached {
                Some(k) if k.expose()[..] == plaintext[..] => {}
                Some(_) => {
                    let why = "KMS decrypts the stored encrypted key to another data key than the one in use".to_string();
                    return refuse(id, n, cached, check, MISMATCH_CODE, why, settings);
                }
                None => {}
            }
            check.last_success = Some(now);
            check.failures = 0;
            check.transient = None;
            check.due = later(Instant::now(), settings.interval);
            let was_revoked = check.rejected.take().is_some();
            let was_stale = std::mem::replace(&mut check.stale, false);
            if cached.is_some() {
                return Decision::Unchanged;
            }
            match DataKey::new(&plaintext) {
                Some(k) => {
                    if was_revoked || was_stale {
                        tracing::warn!(%env, %country, version = n, "customer-supplied key is decryptable again: version restored");
                    } else {
                        tracing::info!(%env, %country, version = n, "customer-supplied key checked with KMS: serving");
                    }
                    Decision::Becomes(Availability::Ready(Arc::new(k)))
                }
                None => Decision::Becomes(Availability::Unavailable(
                    "cannot allocate key memory".into(),
                )),
            }
        }
        Found::Key(plaintext) => refuse(
            id,
            n,
            cached,
            check,
            Code::AwsKeyLength,
            format!(
                "KMS now decrypts the encrypted key to {} bytes, not {DATA_KEY_LEN}",
                plaintext.len()
            ),
            settings,
        ),
        Found::Mismatch(why) => refuse(id, n, cached, check, MISMATCH_CODE, why, settings),
        Found::Kms(e @ KmsError::Rejected { cause, .. }) => {
            refuse(id, n, cached, check, cause.code(), e.to_string(), settings)
        }
        Found::Kms(KmsError::Transient(msg)) => {
            check.failures += 1;
            check.transient = Some(msg.clone());
            check.due = later(Instant::now(), backoff(check.failures, settings.interval));
            if check.rejected.is_some() {
                // Refused at the last answer: stays unavailable until KMS decrypts again.
                return Decision::Unchanged;
            }
            let last = check.last_success.map(rfc3339);
            let too_old = check
                .last_success
                .is_none_or(|t| now.saturating_sub(t).max(0) as u64 > settings.max_stale.as_secs());
            if cached.is_some() && !too_old {
                tracing::warn!(%env, %country, version = n, failures = check.failures,
                    last_success = %last.unwrap_or_default(),
                    "KMS check failed, still serving the cached key: {msg}");
                return Decision::Unchanged;
            }
            check.stale = true;
            if cached.is_none() {
                // Not served already (no check has succeeded since start, or already stale).
                tracing::warn!(%env, %country, version = n, failures = check.failures,
                    "KMS check failed, version stays unavailable: {msg}");
                return Decision::Unchanged;
            }
            let why = format!(
                "no successful KMS check since {} (longer than aws.max_stale = {}); last error: {msg}",
                last.unwrap_or_default(),
                humantime::format_duration(settings.max_stale)
            );
            tracing::error!(%env, %country, version = n, "customer-supplied key no longer served: {why}");
            Decision::Becomes(Availability::Unavailable(why))
        }
    }
}

/// The version is not served: KMS refuses it (`code` from the refusal) or its key fails its
/// key check (`aws_key_mismatch`). Said (logged, and audited by the publish) once per cause.
fn refuse(
    id: &KeyId,
    n: u32,
    cached: Option<&Arc<DataKey>>,
    check: &mut Check,
    code: Code,
    why: String,
    settings: RevalidateSettings,
) -> Decision {
    check.failures = 0;
    check.transient = None;
    check.stale = false;
    check.due = later(Instant::now(), settings.interval);
    // Said once per cause by this node's own checks (a refusal learned from the state is
    // said again when this node sees it too).
    let repeated = check
        .rejected
        .as_ref()
        .is_some_and(|r| r.code == code && r.why == why && !r.learned);
    check.rejected = Some(Refusal {
        code,
        why: why.clone(),
        learned: false,
    });
    if repeated && cached.is_none() {
        return Decision::Unchanged;
    }
    let (env, country) = (&id.env, &id.country);
    if code == MISMATCH_CODE {
        tracing::error!(%env, %country, version = n, %code,
            "customer-supplied key is not served: it fails its key check: {why}");
    } else {
        tracing::error!(%env, %country, version = n, %code,
            "customer-supplied key is no longer served: KMS refuses to decrypt it: {why}");
    }
    Decision::Becomes(Availability::Unavailable(refused_message(
        code, &why, false,
    )))
}
