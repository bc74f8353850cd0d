//! PKCS#11 backend (cryptoki), developed against SoftHSMv2. The audit MAC key and the
//! anchor objects are in `anchor`.

mod anchor;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{softhsm, Hsm, HsmError, MAC_LEN, WRAP_IV_LEN};

const TAG_BITS: u64 = 128;

pub struct Pkcs11Hsm {
    /// `None` after a reconnect failed; the next call tries again.
    conn: Option<Conn>,
    module: PathBuf,
    token_label: String,
    pin: AuthPin,
    roots: HashMap<String, ObjectHandle>,
    /// MAC keys found or made on this session, by label.
    macs: HashMap<String, ObjectHandle>,
}

/// A logged-in session and the module context it lives in.
struct Conn {
    // Field order matters: the session must close before the context finalizes.
    session: Session,
    _ctx: Pkcs11,
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

/// Sorts a PKCS#11 failure: the caller's arguments (a bug, not the session's fault) or
/// anything else, which means the session, login or token can no longer be trusted
/// (session closed or invalid, device error or removed, token gone, not logged in, a
/// general error, a stale object handle...): the worker reconnects.
fn classify(e: CkError) -> HsmError {
    match rv(&e) {
        Some(
            RvError::ArgumentsBad
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid
            | RvError::BufferTooSmall
            | RvError::TemplateIncomplete
            | RvError::TemplateInconsistent
            | RvError::AttributeValueInvalid
            | RvError::KeyFunctionNotPermitted
            | RvError::KeyTypeInconsistent
            | RvError::KeySizeRange,
        ) => HsmError::Rejected(describe(&e)),
        _ => HsmError::Unavailable(describe(&e)),
    }
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
        let conn = Conn::open(module, token_label, &pin)?;
        Ok(Pkcs11Hsm {
            conn: Some(conn),
            module: module.to_path_buf(),
            token_label: token_label.to_string(),
            pin,
            roots: HashMap::new(),
            macs: HashMap::new(),
        })
    }

    fn session(&self) -> Result<&Session, HsmError> {
        self.conn
            .as_ref()
            .map(|c| &c.session)
            .ok_or_else(|| HsmError::Unavailable("no HSM session (reconnecting)".into()))
    }

    /// Objects of class secret key with this label.
    fn find_label(&self, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
        self.session()?
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(classify)
    }

    /// The root key with this label (see `find_whole`).
    fn find_root(
        &mut self,
        label: &str,
        must_exist: bool,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        self.find_whole(label, must_exist, Self::usable)
    }

    /// The one whole secret key with this label. A token whose files went away answers
    /// searches with nothing (SoftHSM keeps answering CKR_OK), so for a key that must
    /// exist, "absent" is only believed after a fresh session, with the module initialized
    /// again, finds nothing either. (Not for a key about to be made: a login rewrites
    /// SoftHSM's token file, so logins are kept to start-up and real faults.) An object a
    /// killed process left half-written carries the label but fails `usable` (SoftHSM
    /// cannot even destroy it): passed over, so that a key not made yet gets a whole one.
    pub(super) fn find_whole(
        &mut self,
        label: &str,
        must_exist: bool,
        usable: fn(&Self, ObjectHandle) -> Result<bool, HsmError>,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        let mut found = self.find_label(label)?;
        if found.is_empty() && must_exist {
            self.reconnect()?;
            found = self.find_label(label)?;
        }
        let all = found.len();
        let mut whole = Vec::with_capacity(all);
        for h in found {
            if usable(self, h)? {
                whole.push(h);
            }
        }
        if whole.len() < all {
            tracing::warn!(
                label,
                incomplete = all - whole.len(),
                "passing over key objects that are incomplete (left by an interrupted creation)"
            );
        }
        match whole.len() {
            0 => Ok(None),
            1 => Ok(Some(whole[0])),
            n => Err(HsmError::DuplicateRootKey(n, label.to_string())),
        }
    }

    fn root(&mut self, label: &str) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = self.roots.get(label) {
            return Ok(*h);
        }
        let h = self
            .find_root(label, true)?
            .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
        self.roots.insert(label.to_string(), h);
        Ok(h)
    }

    /// An object's attributes; `None` when it cannot even state them (an object left
    /// half-written), which makes it no key one can use.
    pub(super) fn attributes_of(
        &self,
        h: ObjectHandle,
        wanted: &[AttributeType],
    ) -> Result<Option<Vec<Attribute>>, HsmError> {
        match self.session()?.get_attributes(h, wanted) {
            Ok(attrs) => Ok(Some(attrs)),
            Err(e)
                if matches!(
                    rv(&e),
                    Some(RvError::AttributeTypeInvalid | RvError::AttributeSensitive)
                ) =>
            {
                Ok(None)
            }
            Err(e) => match classify(e) {
                HsmError::Rejected(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Whether a found root key object is whole: a 32-byte AES key allowed to encrypt and
    /// decrypt, that does encrypt.
    fn usable(&self, h: ObjectHandle) -> Result<bool, HsmError> {
        let wanted = [
            AttributeType::KeyType,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::ValueLen,
        ];
        let Some(attrs) = self.attributes_of(h, &wanted)? else {
            return Ok(false);
        };
        let mut whole = [false; 4];
        for a in attrs {
            match a {
                Attribute::KeyType(t) => whole[0] = t == KeyType::AES,
                Attribute::Encrypt(b) => whole[1] = b,
                Attribute::Decrypt(b) => whole[2] = b,
                Attribute::ValueLen(n) => whole[3] = u64::from(n) == 32,
                _ => {}
            }
        }
        if !whole.iter().all(|w| *w) {
            return Ok(false);
        }
        // Attributes can be whole while the key value is not: a GCM encryption of nothing,
        // under a fresh IV, proves the object works (its tag is thrown away).
        let session = self.session()?;
        let mut iv = [0u8; WRAP_IV_LEN];
        session.generate_random_slice(&mut iv).map_err(classify)?;
        let params = GcmParams::new(&mut iv, &[], TAG_BITS.into()).map_err(classify)?;
        match session.encrypt(&Mechanism::AesGcm(params), h, &[]) {
            Ok(_) => Ok(true),
            Err(e) => match classify(e) {
                HsmError::Rejected(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    fn generate_root(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        let session = self.session()?;
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
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(classify)
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
        if let Some(h) = self.find_root(label, !create)? {
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
        self.session()?.generate_random_slice(buf).map_err(classify)
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
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(classify)?;
        let sealed = self
            .session()?
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .map_err(classify);
        self.forget_on_loss(label, sealed)
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
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(classify)?;
        let opened = self
            .session()?
            .decrypt(&Mechanism::AesGcm(params), key, sealed)
            .map(Zeroizing::new);
        match opened {
            Ok(plain) => Ok(plain),
            // SoftHSM reports a failed GCM tag check as CKR_GENERAL_ERROR, and a broken
            // token may answer the same: it is an integrity failure only if the key is
            // still there on a working session.
            Err(e) if matches!(rv(&e), Some(RvError::GeneralError)) => {
                self.roots.remove(label);
                match self.find_label(label)?.len() {
                    1 => Err(HsmError::Integrity),
                    _ => Err(HsmError::Unavailable(describe(&e))),
                }
            }
            Err(e)
                if matches!(
                    rv(&e),
                    Some(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange)
                ) =>
            {
                Err(HsmError::Integrity)
            }
            Err(e) => self.forget_on_loss(label, Err(classify(e))),
        }
    }

    fn ensure_mac_key(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        self.ensure_mac(label, create)
    }

    fn mac(&mut self, label: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError> {
        self.hmac(label, data)
    }

    fn read_anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError> {
        self.anchors()
    }

    fn write_anchor(&mut self, slot: usize, bytes: &[u8]) -> Result<(), HsmError> {
        self.store_anchor(slot, bytes)
    }

    fn ping(&mut self) -> Result<(), HsmError> {
        self.session()?.get_session_info().map_err(classify)?;
        // A session can look fine while its token's files are gone: look up a root key
        // this session has used; finding none means the token no longer answers truly.
        if let Some(label) = self.roots.keys().next().cloned() {
            if self.find_label(&label)?.is_empty() {
                self.roots.clear();
                return Err(HsmError::Unavailable(format!(
                    "root key `{label}` no longer found on the token"
                )));
            }
        }
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), HsmError> {
        // The old session and context go first: the module cannot be initialized twice.
        self.conn = None;
        self.roots.clear();
        self.macs.clear();
        self.conn = Some(Conn::open(&self.module, &self.token_label, &self.pin)?);
        Ok(())
    }
}

impl Pkcs11Hsm {
    /// Drops the cached handle of a root key after a failure that may mean the token was
    /// reloaded (its handles are then stale).
    fn forget_on_loss<T>(&mut self, label: &str, r: Result<T, HsmError>) -> Result<T, HsmError> {
        if matches!(r, Err(HsmError::Unavailable(_))) {
            self.roots.remove(label);
        }
        r
    }
}

impl Conn {
    /// Initializes the module (OS locking), finds the token by label, opens one session
    /// and logs in. Every error names the likely cause in one line.
    fn open(module: &Path, token_label: &str, pin: &AuthPin) -> Result<Conn, HsmError> {
        softhsm::restore_cut_token_files();
        let ctx = Pkcs11::new(module).map_err(|e| {
            HsmError::Setup(format!(
                "cannot load PKCS#11 module {}: {e}",
                module.display()
            ))
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                HsmError::Setup(format!(
                    "C_Initialize failed ({}); likely cause: {}",
                    describe(&e),
                    softhsm::hint()
                ))
            })?;
        let slots = ctx.get_slots_with_token().map_err(|e| {
            HsmError::Setup(format!(
                "cannot list HSM slots ({}); likely cause: {}",
                describe(&e),
                softhsm::hint()
            ))
        })?;
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
                "no HSM token labelled `{token_label}` (tokens found: {}); check hsm.token_label; {}",
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") },
                softhsm::hint()
            ))
        })?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| HsmError::Setup(format!("cannot open HSM session: {}", describe(&e))))?;
        session.login(UserType::User, Some(pin)).map_err(|e| {
            HsmError::Setup(match rv(&e) {
                Some(RvError::PinIncorrect) => format!(
                    "HSM login to token `{token_label}` failed: wrong PIN (hsm.pin_file or the hsm-pin credential)"
                ),
                Some(RvError::PinLocked) => {
                    format!("HSM login to token `{token_label}` failed: the PIN is locked")
                }
                _ => format!("HSM login failed: {}", describe(&e)),
            })
        })?;
        softhsm::keep_token_files();
        Ok(Conn { session, _ctx: ctx })
    }
}
