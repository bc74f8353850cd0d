//! Verification codes for admin changes: RFC 6238 TOTP (SHA-1, 6 digits, 30 s, ±1 step)
//! per admin uid. Secrets are sealed by an HSM-held system root key (not any country's key);
//! each time step is accepted once per uid; 5 wrong codes in 5 minutes lock that uid's
//! changes for 5 minutes. Codes and secrets never reach a log line.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use totp_rs::{Algorithm, Builder, Secret, Totp};
use zeroize::Zeroizing;

use crate::api::Peer;
use crate::audit::{Actor, AuditEntry};
use crate::clock::SharedClock;
use crate::config::VerificationMode;
use crate::error::{Error, Result};
use crate::hsm::{HsmWorker, WRAP_IV_LEN};
use crate::store::{Store, StoredTotp};

/// Label of the HSM root key that seals TOTP secrets.
pub const SYSTEM_ROOT: &str = "keyd-system/totp";
const SECRET_LEN: usize = 20;
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: i64 = 300;
const LOCKOUT: i64 = 300;
const ENROLL_WINDOW: i64 = 600;

pub enum Verifier {
    /// Development only: no code is asked for (warned at start, shown in health).
    Off,
    Totp(TotpVerifier),
}

pub struct TotpVerifier {
    store: Arc<Store>,
    hsm: HsmWorker,
    clock: SharedClock,
    pending: Mutex<HashMap<u32, Pending>>,
    attempts: Mutex<HashMap<u32, Attempts>>,
}

struct Pending {
    secret: Zeroizing<Vec<u8>>,
    expires: i64,
}

#[derive(Default)]
struct Attempts {
    failures: VecDeque<i64>,
    locked_until: Option<i64>,
}

/// What `totp-enroll` shows the admin once.
#[derive(Serialize)]
pub struct Enrollment {
    pub otpauth_uri: String,
    pub secret_base32: String,
    pub expires_in_seconds: i64,
}

fn aad(uid: u32) -> Vec<u8> {
    format!("incountry-keyd/totp\0{uid}").into_bytes()
}

fn totp(secret: &[u8], uid: u32) -> Result<Totp> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
        .replace(':', "-");
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_step_duration(30)
        .with_skew(1)
        .with_secret(Secret::from(secret))
        .with_account_name(format!("uid{uid}@{host}"))
        .with_issuer(Some("incountry-keyd"))
        .build()
        .map_err(|e| Error::internal(format!("TOTP setup: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Verifier {
    pub fn new(
        mode: VerificationMode,
        store: Arc<Store>,
        hsm: HsmWorker,
        clock: SharedClock,
    ) -> Verifier {
        match mode {
            VerificationMode::Off => Verifier::Off,
            VerificationMode::Totp => Verifier::Totp(TotpVerifier {
                store,
                hsm,
                clock,
                pending: Mutex::default(),
                attempts: Mutex::default(),
            }),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Verifier::Off => "off",
            Verifier::Totp(_) => "totp",
        }
    }

    /// Checks the code of an admin change (after the admin role was confirmed).
    pub async fn check(&self, peer: &Peer, code: Option<&str>, _action: &str) -> Result<()> {
        match self {
            Verifier::Off => Ok(()),
            Verifier::Totp(t) => t.check(peer.uid, code).await,
        }
    }

    /// Starts an enrollment: a new secret, active only once `enroll_confirm` sees a code
    /// from it. Replacing an existing secret needs a valid code from the current one.
    pub async fn enroll_begin(&self, peer: &Peer, code: Option<&str>) -> Result<Enrollment> {
        let Verifier::Totp(t) = self else {
            return Err(Error::conflict(
                "verification_off",
                "verification.mode is \"off\"; nothing to enroll",
            ));
        };
        t.enroll_begin(peer.uid, code).await
    }

    pub async fn enroll_confirm(&self, peer: &Peer, code: &str) -> Result<()> {
        let Verifier::Totp(t) = self else {
            return Err(Error::conflict(
                "verification_off",
                "verification.mode is \"off\"; nothing to enroll",
            ));
        };
        t.enroll_confirm(peer, code).await
    }
}

impl TotpVerifier {
    async fn state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::internal(format!("state: {e}")))?
    }

    fn locked(&self, uid: u32, now: i64) -> Result<()> {
        if let Some(until) = lock(&self.attempts).get(&uid).and_then(|a| a.locked_until) {
            if until > now {
                return Err(Error::RateLimited {
                    code: "verification_locked",
                    message: format!(
                        "too many wrong verification codes: admin changes by uid {uid} are locked for {} more seconds",
                        until - now
                    ),
                    retry_after: (until - now) as u64,
                });
            }
        }
        Ok(())
    }

    /// Counts a wrong or replayed code; the fifth within the window locks the uid.
    fn failed(&self, uid: u32, now: i64, err: Error) -> Error {
        let mut attempts = lock(&self.attempts);
        let a = attempts.entry(uid).or_default();
        a.failures.retain(|t| now - t < FAILURE_WINDOW);
        a.failures.push_back(now);
        if a.failures.len() >= MAX_FAILURES {
            a.failures.clear();
            a.locked_until = Some(now + LOCKOUT);
            tracing::warn!(
                uid,
                "verification locked for {LOCKOUT} s after {MAX_FAILURES} wrong codes"
            );
        }
        err
    }

    async fn check(&self, uid: u32, code: Option<&str>) -> Result<()> {
        let now = self.clock.now().unix_timestamp();
        self.locked(uid, now)?;
        let code = code
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Error::unauthorized(
                    "verification_required",
                    "this change needs a verification code (X-Verification-Code header, or --code)",
                )
            })?;
        let stored = self.state(move |s| s.totp_get(uid)).await?.ok_or_else(|| {
            Error::unauthorized(
                "totp_not_enrolled",
                format!(
                    "uid {uid} has no verification secret: run `incountry-keyd admin totp-enroll`"
                ),
            )
        })?;
        let secret = self.unseal(uid, &stored).await?;
        let step = match totp(&secret, uid)?.check(code, now.max(0) as u64) {
            Some(step) => step,
            None => {
                return Err(self.failed(
                    uid,
                    now,
                    Error::unauthorized("verification_failed", "the verification code is wrong"),
                ))
            }
        };
        let fresh =
            step > stored.last_step && self.state(move |s| s.totp_use_step(uid, step)).await?;
        if !fresh {
            return Err(self.failed(
                uid,
                now,
                Error::unauthorized(
                    "verification_replayed",
                    "this verification code was already used; wait for the next one",
                ),
            ));
        }
        Ok(())
    }

    async fn unseal(&self, uid: u32, stored: &StoredTotp) -> Result<Zeroizing<Vec<u8>>> {
        let (iv, sealed) = (stored.iv, stored.sealed.clone());
        self.hsm
            .call(move |h| h.open(SYSTEM_ROOT, &iv, &aad(uid), &sealed))
            .await
            .map_err(|e| {
                tracing::error!(uid, error = %e, "cannot unseal TOTP secret");
                e.into()
            })
    }

    async fn enroll_begin(&self, uid: u32, code: Option<&str>) -> Result<Enrollment> {
        if self.state(move |s| s.totp_get(uid)).await?.is_some() {
            // Replacing a secret: prove possession of the current one.
            self.check(uid, code).await?;
        }
        let secret = self
            .hsm
            .call(|h| {
                let mut s = Zeroizing::new(vec![0u8; SECRET_LEN]);
                h.random(&mut s)?;
                Ok(s)
            })
            .await?;
        let t = totp(&secret, uid)?;
        let enrollment = Enrollment {
            otpauth_uri: t
                .to_url()
                .map_err(|e| Error::internal(format!("otpauth URI: {e}")))?,
            secret_base32: Secret::from(secret.as_slice()).to_base32(),
            expires_in_seconds: ENROLL_WINDOW,
        };
        let expires = self.clock.now().unix_timestamp() + ENROLL_WINDOW;
        lock(&self.pending).insert(uid, Pending { secret, expires });
        Ok(enrollment)
    }

    async fn enroll_confirm(&self, peer: &Peer, code: &str) -> Result<()> {
        let uid = peer.uid;
        let now = self.clock.now().unix_timestamp();
        self.locked(uid, now)?;
        let secret = {
            let pending = lock(&self.pending);
            match pending.get(&uid) {
                Some(p) if p.expires > now => p.secret.clone(),
                _ => return Err(Error::not_found(
                    "no_pending_enrollment",
                    "no enrollment in progress for this uid (or it expired): run totp-enroll again",
                )),
            }
        };
        let step = totp(&secret, uid)?
            .check(code.trim(), now.max(0) as u64)
            .ok_or_else(|| {
                self.failed(
                    uid,
                    now,
                    Error::unauthorized(
                        "verification_failed",
                        "the code does not match the new secret",
                    ),
                )
            })?;
        // The system root key is made with the first enrollment; once secrets exist, a
        // missing key is an error, never silently replaced.
        let create_root = self.state(|s| s.totp_count()).await? == 0;
        let (iv, sealed) = self
            .hsm
            .call(move |h| {
                h.ensure_root_key(SYSTEM_ROOT, create_root)?;
                let mut iv = [0u8; WRAP_IV_LEN];
                h.random(&mut iv)?;
                let sealed = h.seal(SYSTEM_ROOT, &iv, &aad(uid), &secret)?;
                Ok((iv, sealed))
            })
            .await?;
        let stored = StoredTotp {
            iv,
            sealed,
            last_step: step,
        };
        let audit = AuditEntry::new(now, &Actor::of(peer), "totp-enroll", None)
            .outcome("ok", "verification secret enrolled");
        self.state(move |s| s.totp_put(uid, &stored, now, &audit))
            .await?;
        lock(&self.pending).remove(&uid);
        tracing::info!(uid, "verification secret enrolled");
        Ok(())
    }
}
