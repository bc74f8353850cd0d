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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{DataKey, KeyId, Keyring, Material, DATA_KEY_LEN};
use crate::audit::Actor;
use crate::clock::rfc3339;
use crate::error::{Error, Result};
use crate::hsm::{HsmError, WRAP_IV_LEN};
use crate::kms::{AwsKeyRef, KmsError};
use crate::store::{SealedCheck, StoredAws};

/// At most this many KMS calls at once during a revalidation pass.
const PARALLEL_CHECKS: usize = 4;
/// First retry delay after a transient failure; doubles per failure, capped by the interval.
const RETRY_BASE: Duration = Duration::from_secs(2);

/// The code of a version whose data key or KMS parameters are not those it was registered
/// with.
pub const MISMATCH_CODE: &str = "aws_key_mismatch";

/// Starts the sealed IAM secret of a version registered with a key check. The seal
/// authenticates it, so the state cannot drop a version's check and pass it off as one
/// registered before key checks existed. (No AWS secret key contains a NUL.)
const CHECKED_MARK: &str = "\0incountry-keyd/aws-key-check/v1\0";

/// Domain separation of the key check value: exactly one SHA-256 block with the key.
const KCV_DOMAIN: &[u8; 32] = b"incountry-keyd aws key check v1:";
const KCV_LEN: usize = 32;
/// A sealed key check: the value and the GCM tag.
const SEALED_KCV_LEN: usize = KCV_LEN + 16;

/// `from + d`, never overflowing: a duration too large for the clock (the config bounds
/// them) waits 30 days instead of panicking.
pub(super) fn later(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(crate::config::MAX_DURATION))
        .unwrap_or(from)
}

/// The IAM secret as sealed at registration: marked as having a key check.
pub(super) fn mark_checked(secret: &Zeroizing<String>) -> Zeroizing<String> {
    // Sized up front: no reallocation leaves a copy of the secret behind.
    let mut marked = Zeroizing::new(String::with_capacity(CHECKED_MARK.len() + secret.len()));
    marked.push_str(CHECKED_MARK);
    marked.push_str(secret);
    marked
}

/// The key check value of a data key: SHA-256 of a domain prefix and the key. It identifies
/// the key without revealing it.
fn key_check_value(key: &[u8]) -> Zeroizing<[u8; KCV_LEN]> {
    let mut block = Zeroizing::new([0u8; 64]);
    block[..32].copy_from_slice(KCV_DOMAIN);
    let n = key.len().min(32);
    block[32..32 + n].copy_from_slice(&key[..n]);
    let mut h = Sha256::new();
    if key.len() == 32 {
        h.update(&block[..]);
    } else {
        // Not a data key (KMS answered another length): still a value, never equal to one
        // of a 32-byte key.
        h.update(&block[..32]);
        h.update((key.len() as u64).to_be_bytes());
        h.update(key);
    }
    let mut out = Zeroizing::new([0u8; KCV_LEN]);
    out.copy_from_slice(&h.finalize());
    out
}

/// Additional data of a sealed key check: the slot and the four KMS fields, each
/// length-prefixed. It differs from every data-key and IAM-secret AAD.
fn check_aad(id: &KeyId, version: u32, aws: &AwsKeyRef) -> Vec<u8> {
    let mut aad = format!(
        "incountry-keyd/v1/aws-key-check\0{}\0{}\0{}\0",
        id.env, id.country, version
    )
    .into_bytes();
    for field in [
        aws.region.as_bytes(),
        aws.encrypted_key.as_slice(),
        aws.cmk_arn.as_bytes(),
        aws.access_key_id.as_bytes(),
    ] {
        aad.extend_from_slice(&(field.len() as u64).to_be_bytes());
        aad.extend_from_slice(field);
    }
    aad
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a version's data key must match, from its sealed key check.
pub(super) enum Binding {
    /// Registered before key checks: no check, no mark.
    Unbound,
    /// The key check value sealed at registration.
    Bound(Zeroizing<[u8; KCV_LEN]>),
    /// The check cannot hold (removed, altered, or the KMS fields changed): why.
    Broken(String),
}

impl Binding {
    /// Whether a data key KMS returned is the one registered.
    fn admits(&self, key: &[u8]) -> std::result::Result<(), String> {
        match self {
            Binding::Unbound => Ok(()),
            Binding::Bound(kcv) if same(&key_check_value(key)[..], &kcv[..]) => Ok(()),
            Binding::Bound(_) => Err(
                "KMS decrypts the stored encrypted key to another data key than the one registered"
                    .into(),
            ),
            Binding::Broken(why) => Err(why.clone()),
        }
    }
}

/// Judges what opening a version's seals found: `marked` from the sealed IAM secret, `check`
/// from the sealed key check (absent when the state has none). HSM failures other than a
/// failed tag check are `Err` (retry later).
fn decide_binding(
    marked: std::result::Result<bool, HsmError>,
    check: Option<std::result::Result<Zeroizing<Vec<u8>>, HsmError>>,
) -> std::result::Result<Binding, String> {
    let transient = |e: HsmError| format!("cannot open the key check in the HSM: {e}");
    let marked = match marked {
        Ok(m) => m,
        Err(HsmError::Integrity) => {
            return Ok(Binding::Broken(
                "its sealed IAM secret fails its integrity check".into(),
            ))
        }
        Err(e) => return Err(transient(e)),
    };
    match check {
        None if marked => Ok(Binding::Broken(
            "its key check was removed from the state".into(),
        )),
        None => Ok(Binding::Unbound),
        Some(Err(HsmError::Integrity)) => Ok(Binding::Broken(
            "the stored region, encrypted key, CMK ARN or access key id differ from those it was registered with (or its sealed key check was altered)".into(),
        )),
        Some(Err(e)) => Err(transient(e)),
        Some(Ok(v)) if v.len() != KCV_LEN => Ok(Binding::Broken(
            "its sealed key check has the wrong length".into(),
        )),
        Some(Ok(v)) => {
            let mut kcv = Zeroizing::new([0u8; KCV_LEN]);
            kcv.copy_from_slice(&v);
            Ok(Binding::Bound(kcv))
        }
    }
}

/// A KMS refusal or a key check failure: what health and the version's error say.
struct Refusal {
    code: &'static str,
    why: String,
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
}

#[derive(Default)]
pub(super) struct Checks {
    map: BTreeMap<(KeyId, u32), Check>,
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
    /// "revoked" (KMS refuses: not served), "mismatch" (the data key or the stored KMS
    /// fields are not those registered: not served), "unreachable" (KMS cannot be reached;
    /// the cached key still serves) or "stale" (no successful check within aws.max_stale, or
    /// none since the daemon started: not served).
    pub state: &'static str,
    /// The refusal's code (`aws_key_disabled`, `aws_key_mismatch`, ...), `kms_unavailable`
    /// or `aws_key_stale`.
    pub code: &'static str,
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

/// What one check found for one version.
enum Found {
    /// KMS decrypted it, and the key passed its key check (or has none).
    Key(Zeroizing<Vec<u8>>),
    /// KMS refused, or gave no usable answer (or the HSM could not open the key check).
    Kms(KmsError),
    /// The data key or the stored KMS fields are not those registered: why.
    Mismatch(String),
}

/// One check's result for one version.
type Answer = (KeyId, u32, Found);

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
                due: later(Instant::now(), interval),
            },
        );
    }

    /// Seals the key check value of a version being registered under the key's root key
    /// (which `seal_aws_secret` made or found), bound to its slot and KMS fields; checked
    /// by opening it again.
    pub(super) async fn seal_key_check(
        &self,
        id: &KeyId,
        version: u32,
        aws: &AwsKeyRef,
        key: &[u8; DATA_KEY_LEN],
    ) -> Result<SealedCheck> {
        let label = id.root_label();
        let aad = check_aad(id, version, aws);
        let kcv = key_check_value(key);
        let sealed = self
            .hsm
            .call(move |h| {
                let mut iv = [0u8; WRAP_IV_LEN];
                h.random(&mut iv)?;
                let sealed = h.seal(&label, &iv, &aad, &kcv[..])?;
                let back = h.open(&label, &iv, &aad, &sealed)?;
                if !same(&back, &kcv[..]) {
                    return Err(HsmError::Integrity);
                }
                Ok(SealedCheck { iv, sealed })
            })
            .await?;
        Ok(sealed)
    }

    /// A version's key check: from the cache, else read from the state and opened in the
    /// HSM (with the KMS fields in memory, which are those loaded at start or registered).
    /// `Err`: cannot be known now (state or HSM unavailable); retried at the next check.
    async fn binding(
        &self,
        id: &KeyId,
        n: u32,
        aws: &AwsKeyRef,
    ) -> std::result::Result<Arc<Binding>, String> {
        if let Some(b) = self.checks().bindings.get(&(id.clone(), n)) {
            return Ok(b.clone());
        }
        let store = self.store.clone();
        let (sid, sn) = (id.clone(), n);
        let seals = tokio::task::spawn_blocking(move || store.aws_seals(&sid, sn))
            .await
            .map_err(|e| format!("state reader: {e}"))?
            .map_err(|e| format!("cannot read the key check from the state: {e}"))?;
        let binding = match seals {
            None => Binding::Broken("the version is no longer in the state".into()),
            Some(seals) => {
                let label = id.root_label();
                let secret_aad = id.aws_secret_aad(n);
                let check_aad = check_aad(id, n, aws);
                let opened = self
                    .hsm
                    .call(move |h| {
                        // A lost session is the worker's to see (it reconnects); a failed
                        // tag check is an answer.
                        let lost = |e: &HsmError| {
                            matches!(e, HsmError::Unavailable(_) | HsmError::Setup(_))
                        };
                        let marked =
                            match h.open(&label, &seals.secret_iv, &secret_aad, &seals.secret) {
                                Ok(secret) => Ok(secret.starts_with(CHECKED_MARK.as_bytes())),
                                Err(e) if lost(&e) => return Err(e),
                                Err(e) => Err(e),
                            };
                        let check = match seals.check {
                            None => None,
                            Some(c) if c.sealed.len() != SEALED_KCV_LEN => {
                                Some(Err(HsmError::Integrity))
                            }
                            Some(c) => match h.open(&label, &c.iv, &check_aad, &c.sealed) {
                                Err(e) if lost(&e) => return Err(e),
                                r => Some(r),
                            },
                        };
                        Ok((marked, check))
                    })
                    .await
                    .map_err(|e| format!("cannot open the key check in the HSM: {e}"))?;
                decide_binding(opened.0, opened.1)?
            }
        };
        let binding = Arc::new(binding);
        self.checks()
            .bindings
            .insert((id.clone(), n), binding.clone());
        Ok(binding)
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
            let (state, code, error) = if let Some(r) = &c.rejected {
                let state = if r.code == MISMATCH_CODE {
                    "mismatch"
                } else {
                    "revoked"
                };
                (state, r.code, r.why.clone())
            } else if c.stale {
                (
                    "stale",
                    "aws_key_stale",
                    c.transient.clone().unwrap_or_default(),
                )
            } else if let Some(e) = &c.transient {
                ("unreachable", "kms_unavailable", e.clone())
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

/// Decides one version's fate from one check; updates its check state.
fn judge_one(
    id: &KeyId,
    n: u32,
    cached: Option<&Arc<DataKey>>,
    check: &mut Check,
    found: Found,
    now: i64,
    settings: RevalidateSettings,
) -> Outcome {
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
                return Outcome::Keep;
            }
            match DataKey::new(&plaintext) {
                Some(k) => {
                    if was_revoked || was_stale {
                        tracing::warn!(%env, %country, version = n, "customer-supplied key is decryptable again: version restored");
                    } else {
                        tracing::info!(%env, %country, version = n, "customer-supplied key checked with KMS: serving");
                    }
                    Outcome::Set(Material::Ready(Arc::new(k)))
                }
                None => Outcome::Set(Material::Unavailable("cannot allocate key memory".into())),
            }
        }
        Found::Key(plaintext) => refuse(
            id,
            n,
            cached,
            check,
            "aws_key_length",
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
                return Outcome::Keep;
            }
            let last = check.last_success.map(rfc3339);
            let too_old = check
                .last_success
                .is_none_or(|t| now.saturating_sub(t).max(0) as u64 > settings.max_stale.as_secs());
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

/// The version is not served: KMS refuses it (`code` from the refusal) or its key fails its
/// key check (`aws_key_mismatch`). Said (logged, and audited by the publish) once per cause.
fn refuse(
    id: &KeyId,
    n: u32,
    cached: Option<&Arc<DataKey>>,
    check: &mut Check,
    code: &'static str,
    why: String,
    settings: RevalidateSettings,
) -> Outcome {
    check.failures = 0;
    check.transient = None;
    check.stale = false;
    check.due = later(Instant::now(), settings.interval);
    let repeated = check
        .rejected
        .as_ref()
        .is_some_and(|r| r.code == code && r.why == why);
    check.rejected = Some(Refusal {
        code,
        why: why.clone(),
    });
    if repeated && cached.is_none() {
        return Outcome::Keep;
    }
    let (env, country) = (&id.env, &id.country);
    let msg = if code == MISMATCH_CODE {
        tracing::error!(%env, %country, version = n, code,
            "customer-supplied key is not served: it fails its key check: {why}");
        format!("key check failed ({code}): {why}; not served")
    } else {
        tracing::error!(%env, %country, version = n, code,
            "customer-supplied key is no longer served: KMS refuses to decrypt it: {why}");
        format!("revoked: {why}")
    };
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

    #[test]
    fn later_never_overflows() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = later(now, Duration::MAX);
        assert!(far > now && far <= now + crate::config::MAX_DURATION);
    }

    fn aws_ref(region: &str, blob: &[u8], arn: &str, akid: &str) -> AwsKeyRef {
        AwsKeyRef {
            region: region.into(),
            encrypted_key: blob.to_vec(),
            cmk_arn: arn.into(),
            access_key_id: akid.into(),
            secret_access_key: Zeroizing::new("secret".into()),
        }
    }

    #[test]
    fn key_check_aad_covers_the_slot_and_every_kms_field() {
        let id = KeyId::parse("p", "DE").unwrap();
        let base = aws_ref("eu-central-1", b"blob", "arn:1", "AKIA1");
        let aad = check_aad(&id, 1, &base);
        let others = [
            check_aad(&id, 2, &base),
            check_aad(&KeyId::parse("p", "FR").unwrap(), 1, &base),
            check_aad(&KeyId::parse("q", "DE").unwrap(), 1, &base),
            check_aad(&id, 1, &aws_ref("eu-west-1", b"blob", "arn:1", "AKIA1")),
            check_aad(&id, 1, &aws_ref("eu-central-1", b"blob2", "arn:1", "AKIA1")),
            check_aad(&id, 1, &aws_ref("eu-central-1", b"blob", "arn:2", "AKIA1")),
            check_aad(&id, 1, &aws_ref("eu-central-1", b"blob", "arn:1", "AKIA2")),
            // Moving bytes from one field to the next is not the same AAD either.
            check_aad(&id, 1, &aws_ref("eu-central-1b", b"lob", "arn:1", "AKIA1")),
        ];
        for o in &others {
            assert_ne!(&aad, o);
        }
        assert_ne!(aad, id.aws_secret_aad(1));
        assert_ne!(aad, id.wrap_aad(1));
        // The IAM secret is never part of it.
        let mut other_secret = aws_ref("eu-central-1", b"blob", "arn:1", "AKIA1");
        other_secret.secret_access_key = Zeroizing::new("other".into());
        assert_eq!(aad, check_aad(&id, 1, &other_secret));
    }

    #[test]
    fn key_check_value_identifies_the_key_without_being_it() {
        let a = key_check_value(&[1u8; 32]);
        assert_eq!(a, key_check_value(&[1u8; 32]));
        assert_ne!(a, key_check_value(&[2u8; 32]));
        assert_ne!(&a[..], &[1u8; 32][..]);
        // Domain-separated: not the plain SHA-256 of the key.
        assert_ne!(&a[..], &Sha256::digest([1u8; 32])[..]);
        assert_ne!(key_check_value(&[1u8; 16]), key_check_value(&[1u8; 17]));
        let bound = Binding::Bound(key_check_value(&[7u8; 32]));
        assert!(bound.admits(&[7u8; 32]).is_ok());
        assert!(bound.admits(&[8u8; 32]).is_err());
        assert!(bound.admits(&[7u8; 16]).is_err());
        assert!(Binding::Unbound.admits(&[8u8; 32]).is_ok());
        assert!(Binding::Broken("x".into()).admits(&[7u8; 32]).is_err());
    }

    #[test]
    fn binding_decisions() {
        let kcv = || Some(Ok(Zeroizing::new(vec![5u8; KCV_LEN])));
        // Registered with a check: bound.
        assert!(matches!(
            decide_binding(Ok(true), kcv()),
            Ok(Binding::Bound(_))
        ));
        // Registered before key checks (no mark, no check): keeps working, unbound.
        assert!(matches!(
            decide_binding(Ok(false), None),
            Ok(Binding::Unbound)
        ));
        // The check removed from the state of a marked version: broken.
        match decide_binding(Ok(true), None) {
            Ok(Binding::Broken(why)) => assert!(why.contains("removed"), "{why}"),
            _ => panic!("a removed check must break the binding"),
        }
        // The KMS fields changed (the AAD no longer matches) or the check altered: broken.
        match decide_binding(Ok(true), Some(Err(HsmError::Integrity))) {
            Ok(Binding::Broken(why)) => assert!(why.contains("encrypted key"), "{why}"),
            _ => panic!("a failed tag check must break the binding"),
        }
        assert!(matches!(
            decide_binding(Ok(false), Some(Err(HsmError::Integrity))),
            Ok(Binding::Broken(_))
        ));
        assert!(matches!(
            decide_binding(Ok(true), Some(Ok(Zeroizing::new(vec![1u8; 3])))),
            Ok(Binding::Broken(_))
        ));
        assert!(matches!(
            decide_binding(Err(HsmError::Integrity), None),
            Ok(Binding::Broken(_))
        ));
        // An HSM that cannot answer now: retried, not judged.
        assert!(decide_binding(Err(HsmError::Unavailable("gone".into())), None).is_err());
        assert!(decide_binding(Ok(true), Some(Err(HsmError::Unavailable("gone".into())))).is_err());
    }

    #[test]
    fn the_mark_is_taken_off_the_loaded_secret() {
        let id = KeyId::parse("p", "DE").unwrap();
        let stored = || StoredAws {
            region: "r".into(),
            encrypted_key: vec![1],
            cmk_arn: "a".into(),
            access_key_id: "k".into(),
            check: None,
        };
        let secret = Zeroizing::new("wJalrXUtnFEMI/K7MDENG".to_string());
        let marked = mark_checked(&secret);
        assert!(marked.starts_with('\0') && marked.ends_with(secret.as_str()));
        for sealed in [marked.as_bytes(), secret.as_bytes()] {
            let opened = Some(Ok(Zeroizing::new(sealed.to_vec())));
            let (material, aws) = load_version(&id, 1, &None, stored(), opened).unwrap();
            assert!(matches!(material, Material::Unavailable(_)));
            assert_eq!(aws.unwrap().secret_access_key.as_str(), secret.as_str());
        }
    }

    fn check() -> Check {
        Check {
            last_success: None,
            failures: 0,
            transient: None,
            rejected: None,
            stale: false,
            due: Instant::now(),
        }
    }

    const SETTINGS: RevalidateSettings = RevalidateSettings {
        interval: Duration::from_secs(60),
        max_stale: Duration::from_secs(3600),
    };

    #[test]
    fn a_mismatch_is_unavailable_with_its_code_once() {
        let id = KeyId::parse("p", "DE").unwrap();
        let mut c = check();
        let found = || Found::Mismatch("its key check was removed from the state".into());
        match judge_one(&id, 1, None, &mut c, found(), 0, SETTINGS) {
            Outcome::Set(Material::Unavailable(why)) => {
                assert!(
                    why.contains(MISMATCH_CODE) && why.contains("removed"),
                    "{why}"
                )
            }
            _ => panic!("a mismatch must make the version unavailable"),
        }
        assert_eq!(c.rejected.as_ref().unwrap().code, MISMATCH_CODE);
        // Said once: the next check that finds the same changes nothing.
        assert!(matches!(
            judge_one(&id, 1, None, &mut c, found(), 0, SETTINGS),
            Outcome::Keep
        ));
        // A served key that KMS now decrypts to another one: a mismatch too.
        let mut c = check();
        let cached = Arc::new(DataKey::new(&[1u8; 32]).unwrap());
        let other = Found::Key(Zeroizing::new(vec![2u8; 32]));
        match judge_one(&id, 1, Some(&cached), &mut c, other, 0, SETTINGS) {
            Outcome::Set(Material::Unavailable(why)) => {
                assert!(why.contains(MISMATCH_CODE), "{why}")
            }
            _ => panic!("another key must not be served"),
        }
        // A KMS refusal keeps its own code.
        let mut c = check();
        let refused = Found::Kms(crate::kms::classify_code("DisabledException", "", 400));
        judge_one(&id, 1, Some(&cached), &mut c, refused, 0, SETTINGS);
        assert_eq!(c.rejected.as_ref().unwrap().code, "aws_key_disabled");
    }
}
