//! Enrolling verification secrets: a replacement, a first one vouched for, the offline bootstrap.

use crate::domain::Code;
use totp_rs::Secret;
use zeroize::Zeroizing;

use super::{aad, lock, totp, TotpVerifier, SYSTEM_ROOT};
use crate::domain::audit::AuditOutcome;
use crate::domain::audit::{Actor, AuditEntry};
use crate::domain::error::{Error, Result};
use crate::domain::Caller;
use crate::hsm::WRAP_IV_LEN;
use crate::store::StoredTotp;

const SECRET_LEN: usize = 20;
const ENROLL_WINDOW: i64 = 600;

pub(super) struct Pending {
    secret: Zeroizing<Vec<u8>>,
    expires: i64,
    basis: Basis,
}

/// What allowed an enrollment to begin.
#[derive(Clone, Copy)]
pub(super) enum Basis {
    /// The uid proved possession of its current secret.
    Replace,
    /// A first enrollment, vouched for by this enrolled admin's code.
    Vouched(u32),
    /// A first enrollment by root, offline, with the daemon stopped.
    Offline,
}

/// What `totp-enroll` shows the admin once. Both strings carry the secret: zeroized when
/// dropped, moved into the answer (`proto::Enrollment`), which the api sends in a body
/// that zeroizes itself. Neither Debug nor Serialize.
pub struct Enrollment {
    pub otpauth_uri: Zeroizing<String>,
    pub secret_base32: Zeroizing<String>,
    pub expires_in_seconds: i64,
}

/// The secret in base32 (RFC 4648, no padding: 20 bytes are 32 characters), encoded by
/// totp-rs five bytes at a time: each piece comes out in a buffer of its final size, which
/// is zeroized (the encoder reallocates its buffer for longer input, leaving a partial copy
/// behind).
fn base32(secret: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(secret.len().div_ceil(5) * 8));
    for chunk in secret.chunks(5) {
        let piece = Zeroizing::new(Secret::from(chunk).to_base32());
        out.push_str(&piece);
    }
    out
}

/// The otpauth URI of `secret`: totp-rs makes it for an all-zero secret of the same length
/// (its intermediate strings then hold nothing secret), and the real base32 is put in place
/// of the zeros' in a zeroizing buffer of its final size.
fn otpauth_uri(secret: &[u8], uid: u32) -> Result<Zeroizing<String>> {
    let zeros = vec![0u8; secret.len()];
    let shape = totp(&zeros, uid)?
        .to_url()
        .map_err(|e| Error::internal(format!("otpauth URI: {e}")))?;
    let placeholder = format!("secret={}", base32(&zeros).as_str());
    let at = shape
        .find(&placeholder)
        .ok_or_else(|| Error::internal("otpauth URI without its secret"))?;
    let encoded = base32(secret);
    let mut uri = Zeroizing::new(String::with_capacity(shape.len()));
    uri.push_str(&shape[..at + "secret=".len()]);
    uri.push_str(&encoded);
    uri.push_str(&shape[at + placeholder.len()..]);
    Ok(uri)
}

/// Names the vouching admin in a refusal of its code (for the caller and the audit).
fn about_voucher(e: Error, voucher: u32) -> Error {
    let note =
        |m: String| format!("{m} (the code of uid {voucher}, vouching for a first enrollment)");
    match e {
        Error::Unauthorized { code, message } => Error::Unauthorized {
            code,
            message: note(message),
        },
        Error::RateLimited {
            code,
            message,
            retry_after,
        } => Error::RateLimited {
            code,
            message: note(message),
            retry_after,
        },
        other => other,
    }
}

impl TotpVerifier {
    pub(super) async fn enroll_begin(
        &self,
        peer: &Caller,
        code: Option<&str>,
        voucher: Option<u32>,
    ) -> Result<Enrollment> {
        let uid = peer.uid;
        let basis = if self.state(move |s| s.totp_get(uid)).await?.is_some() {
            // Replacing a secret: prove possession of the current one.
            if voucher.is_some_and(|v| v != uid) {
                return Err(Error::bad_input(
                    Code::InvalidVerificationUid,
                    format!("uid {uid} is enrolled: replacing its secret needs a code from its current secret, not another admin's (leave out X-Verification-Uid)"),
                ));
            }
            self.check(uid, code).await?;
            Basis::Replace
        } else if self.state(|s| s.totp_count()).await? == 0 {
            return Err(Error::conflict(
                Code::BootstrapRequired,
                format!("no admin is enrolled yet: the first one is enrolled offline, as root with the daemon stopped: `incountry-keyd admin totp-enroll --uid {uid}`"),
            ));
        } else {
            let Some(voucher) = voucher else {
                return Err(Error::unauthorized(
                    Code::VerificationRequired,
                    format!("the first enrollment of uid {uid} needs a code of an enrolled admin: X-Verification-Uid (that admin's uid) with X-Verification-Code (CLI: --code-uid N --code CODE); or the offline bootstrap by root with the daemon stopped: `incountry-keyd admin totp-enroll --uid {uid}`"),
                ));
            };
            self.check(voucher, code)
                .await
                .map_err(|e| about_voucher(e, voucher))?;
            let entry = AuditEntry::new(self.now(), &Actor::of(peer), "totp-vouch", None).outcome(
                AuditOutcome::Ok,
                format!("uid {voucher}'s verification code vouched for the first enrollment of uid {uid}"),
            );
            self.state(move |s| s.audit(&entry)).await?;
            tracing::info!(
                uid,
                voucher,
                "first enrollment vouched for by an enrolled admin"
            );
            Basis::Vouched(voucher)
        };
        self.begin(uid, basis).await
    }

    /// Makes a pending secret for `uid`.
    pub(super) async fn begin(&self, uid: u32, basis: Basis) -> Result<Enrollment> {
        let secret = self
            .hsm
            .call(|h| {
                let mut s = Zeroizing::new(vec![0u8; SECRET_LEN]);
                h.random(&mut s)?;
                Ok(s)
            })
            .await?;
        let enrollment = Enrollment {
            otpauth_uri: otpauth_uri(&secret, uid)?,
            secret_base32: base32(&secret),
            expires_in_seconds: ENROLL_WINDOW,
        };
        // The encoders' frames held pieces of the secret.
        crate::domain::secret::clear_stack();
        let now = self.now();
        let expires = now + ENROLL_WINDOW;
        let mut pending = lock(&self.pending);
        // Abandoned enrollments' secrets are not kept past their window.
        pending.retain(|_, p| p.expires > now);
        pending.insert(
            uid,
            Pending {
                secret,
                expires,
                basis,
            },
        );
        Ok(enrollment)
    }

    /// Activates `uid`'s pending secret once `code` is from it. Online (`count`), the
    /// attempt counts toward the uid's lockout like any code.
    pub(super) async fn activate(
        &self,
        uid: u32,
        code: &str,
        actor: &Actor,
        count: bool,
    ) -> Result<()> {
        let _turn = self.turn(uid).await;
        let now = self.now();
        let (secret, basis) = {
            let pending = lock(&self.pending);
            match pending.get(&uid) {
                Some(p) if p.expires > now => (p.secret.clone(), p.basis),
                _ => return Err(Error::not_found(
                    Code::NoPendingEnrollment,
                    "no enrollment in progress for this uid (or it expired): run totp-enroll again",
                )),
            }
        };
        if !count {
            return self
                .store_secret(uid, code, secret, basis, actor, now)
                .await
                .map_err(|(e, _)| e);
        }
        self.attempt(uid, now).await?;
        match self
            .store_secret(uid, code, secret, basis, actor, now)
            .await
        {
            // A code that activated a secret is not a failure: take the attempt back.
            Ok(()) => {
                self.withdraw(uid).await;
                Ok(())
            }
            Err((e, true)) => Err(self.failed(uid, now, e).await),
            Err((e, false)) => {
                self.withdraw(uid).await;
                Err(e)
            }
        }
    }

    /// Checks `code` against the new secret, seals the secret with the system root key and
    /// stores it with its audit entry. An error says whether the code was wrong (`true`) or
    /// something else failed.
    async fn store_secret(
        &self,
        uid: u32,
        code: &str,
        secret: Zeroizing<Vec<u8>>,
        basis: Basis,
        actor: &Actor,
        now: i64,
    ) -> std::result::Result<(), (Error, bool)> {
        let other = |e: Error| (e, false);
        let step = totp(&secret, uid)
            .map_err(other)?
            .check(code.trim(), now.max(0) as u64);
        crate::domain::secret::clear_stack();
        let step = step.ok_or_else(|| {
            let e = Error::unauthorized(
                Code::VerificationFailed,
                "the code does not match the new secret",
            );
            (e, true)
        })?;
        // The system root key is made with the first enrollment; once secrets exist, a
        // missing key is an error, never silently replaced.
        let create_root = self.state(|s| s.totp_count()).await.map_err(other)? == 0;
        let (iv, sealed) = self
            .hsm
            .call(move |h| {
                h.ensure_root_key(SYSTEM_ROOT, create_root)?;
                let mut iv = [0u8; WRAP_IV_LEN];
                h.random(&mut iv)?;
                let sealed = h.seal(SYSTEM_ROOT, &iv, &aad(uid), &secret)?;
                Ok((iv, sealed))
            })
            .await
            .map_err(|e| other(e.into()))?;
        let stored = StoredTotp {
            iv,
            sealed,
            last_step: step,
        };
        let detail = match basis {
            Basis::Replace => {
                "verification secret replaced (proved with the current one)".to_string()
            }
            Basis::Vouched(v) => format!(
                "verification secret enrolled (first enrollment, vouched for by uid {v}'s code)"
            ),
            Basis::Offline => format!(
                "verification secret of uid {uid} enrolled offline (bootstrap by root with the daemon stopped)"
            ),
        };
        let audit =
            AuditEntry::new(now, actor, "totp-enroll", None).outcome(AuditOutcome::Ok, detail);
        self.state(move |s| s.totp_put(uid, &stored, now, &audit))
            .await
            .map_err(other)?;
        lock(&self.pending).remove(&uid);
        tracing::info!(uid, "verification secret enrolled");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_and_uri_are_those_of_totp_rs() {
        let secret: Vec<u8> = (1..=SECRET_LEN as u8).collect();
        assert_eq!(
            base32(&secret).as_str(),
            Secret::from(secret.as_slice()).to_base32()
        );
        assert_eq!(
            otpauth_uri(&secret, 7).unwrap().as_str(),
            totp(&secret, 7).unwrap().to_url().unwrap()
        );
    }
}
