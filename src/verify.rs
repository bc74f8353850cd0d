//! Verification codes for admin changes: RFC 6238 TOTP (SHA-1, 6 digits, 30 s, ±1 step)
//! per admin uid. Secrets are sealed by an HSM-held system root key (not any country's key);
//! each time step is accepted once per uid; 5 wrong codes in 5 minutes lock that uid's
//! changes for 5 minutes. Codes and secrets never reach a log line.
//!
//! Checks of one uid's codes run one at a time, and each attempt is counted as a failure in
//! the state *before* its code is checked (taken back when it passes): parallel guesses get
//! no more than 5 checks per window, a dropped request still counts, and a restart keeps
//! the failures and the lock (`totp_attempts`).
//!
//! Enrollment: replacing a secret needs a code from the current one; the first secret of a
//! uid needs a code of another enrolled admin (`X-Verification-Uid` names that admin), or
//! the offline bootstrap by root with the daemon stopped (`admin totp-enroll --uid N`),
//! which is the only way while no admin is enrolled.

mod enroll;

pub use enroll::Enrollment;

use crate::domain::Code;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use totp_rs::{Algorithm, Builder, Secret, Totp};
use zeroize::Zeroizing;

use crate::config::VerificationMode;
use crate::domain::audit::Actor;
use crate::domain::clock::SharedClock;
use crate::domain::error::{Error, Result};
use crate::domain::Caller;
use crate::hsm::HsmWorker;
use crate::store::{Store, StoredTotp, TotpLimits};
use enroll::{Basis, Pending};

/// Label of the HSM root key that seals TOTP secrets.
pub const SYSTEM_ROOT: &str = "keyd-system/totp";
const LIMITS: TotpLimits = TotpLimits {
    max_failures: 5,
    window: 300,
    lockout: 300,
};

pub enum Verifier {
    /// Development only: no code is asked for (warned at start, shown in health).
    Off,
    Totp(TotpVerifier),
}

pub struct TotpVerifier {
    store: Arc<dyn Store>,
    hsm: HsmWorker,
    clock: SharedClock,
    pending: Mutex<HashMap<u32, Pending>>,
    /// One check at a time per uid (held across the state reads and the HSM unseal).
    turns: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
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

fn locked_error(uid: u32, until: i64, now: i64) -> Error {
    let left = (until - now).max(1);
    Error::RateLimited {
        code: Code::VerificationLocked,
        message: format!(
            "too many wrong verification codes: admin changes by uid {uid} are locked for {left} more seconds"
        ),
        retry_after: left as u64,
    }
}

fn required_error() -> Error {
    Error::unauthorized(
        Code::VerificationRequired,
        "this change needs a verification code (X-Verification-Code header, or --code)",
    )
}

fn verification_off() -> Error {
    Error::conflict(
        Code::VerificationOff,
        "verification.mode is \"off\"; nothing to enroll",
    )
}

impl Verifier {
    pub fn new(
        mode: VerificationMode,
        store: Arc<dyn Store>,
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
                turns: Mutex::default(),
            }),
        }
    }

    pub fn mode(&self) -> VerificationMode {
        match self {
            Verifier::Off => VerificationMode::Off,
            Verifier::Totp(_) => VerificationMode::Totp,
        }
    }

    fn totp(&self) -> Result<&TotpVerifier> {
        match self {
            Verifier::Off => Err(verification_off()),
            Verifier::Totp(t) => Ok(t),
        }
    }

    /// Checks the code of an admin change (after the admin role was confirmed).
    pub async fn check(&self, peer: &Caller, code: Option<&str>, _action: &str) -> Result<()> {
        match self {
            Verifier::Off => Ok(()),
            Verifier::Totp(t) => t.check(peer.uid, code).await,
        }
    }

    /// Starts an enrollment of the calling admin: a new secret, active only once
    /// `enroll_confirm` sees a code from it. Replacing an existing secret needs a valid code
    /// from the current one. A first enrollment needs `code` to be a valid code of
    /// `voucher`, another enrolled admin (the caller has checked that `voucher` is in
    /// access.admins); while no admin is enrolled it is refused (offline bootstrap only).
    pub async fn enroll_begin(
        &self,
        peer: &Caller,
        code: Option<&str>,
        voucher: Option<u32>,
    ) -> Result<Enrollment> {
        self.totp()?.enroll_begin(peer, code, voucher).await
    }

    pub async fn enroll_confirm(&self, peer: &Caller, code: &str) -> Result<()> {
        self.totp()?
            .activate(peer.uid, code, &Actor::of(peer), true)
            .await
    }

    /// Offline bootstrap (root, daemon stopped, state lock held): starts the first
    /// enrollment of `uid` with no code from anyone. Refused when `uid` has a secret.
    pub async fn offline_enroll_begin(&self, uid: u32) -> Result<Enrollment> {
        let t = self.totp()?;
        if t.state(move |s| s.totp_get(uid)).await?.is_some() {
            return Err(Error::conflict(
                Code::AlreadyEnrolled,
                format!("uid {uid} already has a verification secret: remove it first with `incountry-keyd admin totp-reset --uid {uid}`"),
            ));
        }
        t.begin(uid, Basis::Offline).await
    }

    /// Activates the secret `offline_enroll_begin` made, once `code` is from it; audited
    /// as `actor` (the root process).
    pub async fn offline_enroll_confirm(&self, uid: u32, code: &str, actor: &Actor) -> Result<()> {
        self.totp()?.activate(uid, code, actor, false).await
    }
}

impl TotpVerifier {
    async fn state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::internal(format!("state: {e}")))?
    }

    fn now(&self) -> i64 {
        self.clock.now().unix_timestamp()
    }

    /// Waits for `uid`'s turn: checks of one uid's codes run one at a time.
    async fn turn(&self, uid: u32) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut turns = lock(&self.turns);
            // Forget the uids nobody is checking (only this map holds their mutex).
            turns.retain(|_, m| Arc::strong_count(m) > 1);
            turns.entry(uid).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Counts an attempt of `uid` (as a failure until it passes); refuses while locked.
    async fn attempt(&self, uid: u32, now: i64) -> Result<()> {
        match self
            .state(move |s| s.totp_attempt_begin(uid, now, LIMITS))
            .await?
        {
            Ok(()) => Ok(()),
            Err(until) => Err(locked_error(uid, until, now)),
        }
    }

    /// A counted attempt had a wrong or replayed code: it stays counted; the fifth within
    /// the window locks the uid.
    async fn failed(&self, uid: u32, now: i64, err: Error) -> Error {
        match self
            .state(move |s| s.totp_attempt_failed(uid, now, LIMITS))
            .await
        {
            Ok(Some(until)) => tracing::warn!(
                uid,
                "verification locked for {} s after {} wrong codes",
                until - now,
                LIMITS.max_failures
            ),
            Ok(None) => {}
            // The failure was counted before the check; the next attempt locks if due.
            Err(e) => tracing::error!(uid, error = %e, "cannot record a wrong verification code"),
        }
        err
    }

    /// A counted attempt was never checked (the HSM or the state failed): take it back.
    async fn withdraw(&self, uid: u32) {
        if let Err(e) = self.state(move |s| s.totp_attempt_withdraw(uid)).await {
            tracing::error!(uid, error = %e, "cannot take back a verification attempt");
        }
    }

    async fn check(&self, uid: u32, code: Option<&str>) -> Result<()> {
        let _turn = self.turn(uid).await;
        let now = self.now();
        let Some(code) = code.map(str::trim).filter(|c| !c.is_empty()) else {
            if let Some(until) = self.state(move |s| s.totp_locked_until(uid, now)).await? {
                return Err(locked_error(uid, until, now));
            }
            return Err(required_error());
        };
        let stored = self.state(move |s| s.totp_get(uid)).await?.ok_or_else(|| {
            Error::unauthorized(
                Code::TotpNotEnrolled,
                format!(
                    "uid {uid} has no verification secret: enroll it with `incountry-keyd admin totp-enroll --code-uid N --code CODE` (a code of an enrolled admin), or offline, as root with the daemon stopped, with `incountry-keyd admin totp-enroll --uid {uid}`"
                ),
            )
        })?;
        self.attempt(uid, now).await?;
        // From here on the attempt counts as a failure until it is settled.
        let checked = async {
            let secret = self.unseal(uid, &stored).await?;
            let step = totp(&secret, uid)?.check(code, now.max(0) as u64);
            // The HMAC's frames held the secret (XORed with its pads).
            crate::domain::secret::clear_stack();
            Ok::<_, Error>(step)
        }
        .await;
        let step = match checked {
            Err(e) => {
                self.withdraw(uid).await;
                return Err(e);
            }
            Ok(Some(step)) => step,
            Ok(None) => {
                let e =
                    Error::unauthorized(Code::VerificationFailed, "the verification code is wrong");
                return Err(self.failed(uid, now, e).await);
            }
        };
        let fresh = step > stored.last_step
            && match self.state(move |s| s.totp_attempt_passed(uid, step)).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    self.withdraw(uid).await;
                    return Err(e);
                }
            };
        if !fresh {
            let e = Error::unauthorized(
                Code::VerificationReplayed,
                "this verification code was already used; wait for the next one",
            );
            return Err(self.failed(uid, now, e).await);
        }
        Ok(())
    }

    async fn unseal(&self, uid: u32, stored: &StoredTotp) -> Result<Zeroizing<Vec<u8>>> {
        let (iv, sealed) = (stored.iv, stored.sealed.clone());
        self.hsm
            .call(move |h| {
                let opened = h.open(SYSTEM_ROOT, &iv, &aad(uid), &sealed);
                crate::domain::secret::clear_stack();
                opened
            })
            .await
            .map_err(|e| {
                tracing::error!(uid, error = %e, "cannot unseal TOTP secret");
                e.into()
            })
    }
}

#[cfg(test)]
mod tests;
