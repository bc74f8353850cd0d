//! PKCS#11 backend (cryptoki), developed against SoftHSMv2.

use std::collections::HashMap;
use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{Hsm, HsmError, WRAP_IV_LEN};

const TAG_BITS: u64 = 128;

pub struct Pkcs11Hsm {
    // Field order matters: the session must close before the context finalizes.
    session: Session,
    _ctx: Pkcs11,
    roots: HashMap<String, ObjectHandle>,
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A short, secret-free description of a PKCS#11 failure.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, func) => format!("{func:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

fn unavailable(e: CkError) -> HsmError {
    HsmError::Unavailable(describe(&e))
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token by label and logs in as the user.
    pub fn open(module: &Path, token_label: &str, pin: AuthPin) -> Result<Pkcs11Hsm, HsmError> {
        if !module.exists() {
            return Err(HsmError::Setup(format!(
                "PKCS#11 module {} does not exist (hsm.module)",
                module.display()
            )));
        }
        let ctx = Pkcs11::new(module).map_err(|e| {
            HsmError::Setup(format!(
                "cannot load PKCS#11 module {}: {e}",
                module.display()
            ))
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| HsmError::Setup(format!("C_Initialize failed: {}", describe(&e))))?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| HsmError::Setup(format!("cannot list HSM slots: {}", describe(&e))))?;
        let mut seen = Vec::new();
        let mut slot = None;
        for s in slots {
            if let Ok(info) = ctx.get_token_info(s) {
                let label = info.label().trim_end().to_string();
                if label == token_label {
                    slot = Some(s);
                    break;
                }
                seen.push(label);
            }
        }
        let slot = slot.ok_or_else(|| {
            HsmError::Setup(format!(
                "no HSM token labelled `{token_label}` (tokens found: {}); check hsm.token_label and SOFTHSM2_CONF",
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
            ))
        })?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| HsmError::Setup(format!("cannot open HSM session: {}", describe(&e))))?;
        session.login(UserType::User, Some(&pin)).map_err(|e| {
            HsmError::Setup(match rv(&e) {
                Some(RvError::PinIncorrect) => {
                    format!("HSM login to token `{token_label}` failed: wrong PIN")
                }
                Some(RvError::PinLocked) => {
                    format!("HSM login to token `{token_label}` failed: the PIN is locked")
                }
                _ => format!("HSM login failed: {}", describe(&e)),
            })
        })?;
        Ok(Pkcs11Hsm {
            session,
            _ctx: ctx,
            roots: HashMap::new(),
        })
    }

    fn find_root(&self, label: &str) -> Result<Option<ObjectHandle>, HsmError> {
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(unavailable)?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(Some(found[0])),
            n => Err(HsmError::DuplicateRootKey(n, label.to_string())),
        }
    }

    fn root(&mut self, label: &str) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = self.roots.get(label) {
            return Ok(*h);
        }
        let h = self
            .find_root(label)?
            .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
        self.roots.insert(label.to_string(), h);
        Ok(h)
    }

    fn generate_root(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            // CKA_ID: the label's SHA-256 prefix, so tools that list by id still tell keys apart.
            Attribute::Id(root_id(label)),
        ];
        self.session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(unavailable)
    }
}

/// CKA_ID of a root key: the first 16 bytes of SHA-256 over its label.
pub fn root_id(label: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(label.as_bytes())[..16].to_vec()
}

impl Hsm for Pkcs11Hsm {
    fn ensure_root_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        self.roots.remove(label);
        if let Some(h) = self.find_root(label)? {
            self.roots.insert(label.to_string(), h);
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        let h = self.generate_root(label)?;
        self.roots.insert(label.to_string(), h);
        Ok(true)
    }

    fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError> {
        self.session.generate_random_slice(buf).map_err(unavailable)
    }

    fn seal(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let key = self.root(label)?;
        let mut iv = *iv;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(unavailable)?;
        self.session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(unavailable)
    }

    fn open(
        &mut self,
        label: &str,
        iv: &[u8; WRAP_IV_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let key = self.root(label)?;
        let mut iv = *iv;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(unavailable)?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), key, sealed)
            .map(Zeroizing::new)
            .map_err(|e| match rv(&e) {
                // SoftHSM reports a failed GCM tag check as CKR_GENERAL_ERROR.
                Some(
                    RvError::GeneralError
                    | RvError::EncryptedDataInvalid
                    | RvError::EncryptedDataLenRange,
                ) => HsmError::Integrity,
                _ => unavailable(e),
            })
    }

    fn ping(&mut self) -> Result<(), HsmError> {
        self.session
            .get_session_info()
            .map(|_| ())
            .map_err(unavailable)
    }
}
