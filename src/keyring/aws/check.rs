//! Key checks of aws versions: the sealed key check value, its AAD and mark, binding decisions.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::domain::error::Result;
use crate::domain::AwsKeyRef;
use crate::domain::KeyId;
use crate::domain::DATA_KEY_LEN;
use crate::hsm::{HsmError, WRAP_IV_LEN};
use crate::keyring::Keyring;
use crate::store::SealedCheck;

/// Starts the sealed IAM secret of a version registered with a key check. The seal
/// authenticates it, so the state cannot drop a version's check and pass it off as one
/// registered before key checks existed. (No AWS secret key contains a NUL.)
pub(super) const CHECKED_MARK: &str = "\0incountry-keyd/aws-key-check/v1\0";

/// Domain separation of the key check value: exactly one SHA-256 block with the key.
const KCV_DOMAIN: &[u8; 32] = b"incountry-keyd aws key check v1:";
pub(super) const KCV_LEN: usize = 32;
/// A sealed key check: the value and the GCM tag.
const SEALED_KCV_LEN: usize = KCV_LEN + 16;

/// The IAM secret as sealed at registration: marked as having a key check.
pub(in crate::keyring) fn mark_checked(secret: &Zeroizing<String>) -> Zeroizing<String> {
    // Sized up front: no reallocation leaves a copy of the secret behind.
    let mut marked = Zeroizing::new(String::with_capacity(CHECKED_MARK.len() + secret.len()));
    marked.push_str(CHECKED_MARK);
    marked.push_str(secret);
    marked
}

/// The key check value of a data key: SHA-256 of a domain prefix and the key. It identifies
/// the key without revealing it.
pub(super) fn key_check_value(key: &[u8]) -> Zeroizing<[u8; KCV_LEN]> {
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
pub(super) fn check_aad(id: &KeyId, version: u32, aws: &AwsKeyRef) -> Vec<u8> {
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
    pub(super) fn admits(&self, key: &[u8]) -> std::result::Result<(), String> {
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
pub(super) fn decide_binding(
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

impl Keyring {
    /// Seals the key check value of a version being registered under the key's root key
    /// (which `seal_aws_secret` made or found), bound to its slot and KMS fields; checked
    /// by opening it again.
    pub(in crate::keyring) async fn seal_key_check(
        &self,
        id: &KeyId,
        version: u32,
        aws: &AwsKeyRef,
        key: &[u8; DATA_KEY_LEN],
    ) -> Result<SealedCheck> {
        let label = id.root_label();
        let aad = check_aad(id, version, aws);
        let kcv = key_check_value(key);
        // SHA-256's frames held the key.
        crate::domain::secret::clear_stack();
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
    pub(super) async fn binding(
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
}
