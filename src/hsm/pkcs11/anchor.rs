//! The audit MAC key (HMAC-SHA256, a generic secret that never leaves the HSM) and the
//! anchor objects (private token data objects, one per slot, written in turn).
//!
//! SoftHSM rewrites an object's file in place when it changes, and refuses to change a data
//! object's value at all: each write makes a new object (a new file) and then destroys the
//! slot's older ones. A kill mid-write leaves the slot's older object whole, or an
//! unreadable remnant that is passed over; and since the caller alternates between the two
//! slots, the other one holds the anchor before in any case.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

use super::{classify, root_id, Pkcs11Hsm};
use crate::hsm::{HsmError, ANCHOR_SLOTS, MAC_LEN};

/// CKA_APPLICATION of the anchor objects.
const APPLICATION: &[u8] = b"incountry-keyd";
/// An object's `(CKA_LABEL, CKA_VALUE)`.
type LabelledValue = (Vec<u8>, Vec<u8>);

/// CKA_LABEL of each anchor slot.
pub const ANCHOR_LABELS: [&str; ANCHOR_SLOTS] = ["keyd-anchor/a", "keyd-anchor/b"];

impl Pkcs11Hsm {
    /// The MAC key with this label (see `find_whole`).
    fn find_mac(
        &mut self,
        label: &str,
        must_exist: bool,
    ) -> Result<Option<ObjectHandle>, HsmError> {
        self.find_whole(label, must_exist, Self::usable_mac)
    }

    /// Whether a found MAC key object is whole: a 32-byte generic secret allowed to sign,
    /// that does sign.
    fn usable_mac(&self, h: ObjectHandle) -> Result<bool, HsmError> {
        let wanted = [
            AttributeType::KeyType,
            AttributeType::Sign,
            AttributeType::ValueLen,
        ];
        let Some(attrs) = self.attributes_of(h, &wanted)? else {
            return Ok(false);
        };
        let mut whole = [false; 3];
        for a in attrs {
            match a {
                Attribute::KeyType(t) => whole[0] = t == KeyType::GENERIC_SECRET,
                Attribute::Sign(b) => whole[1] = b,
                Attribute::ValueLen(n) => whole[2] = u64::from(n) == MAC_LEN as u64,
                _ => {}
            }
        }
        if !whole.iter().all(|w| *w) {
            return Ok(false);
        }
        match self.session()?.sign(&Mechanism::Sha256Hmac, h, b"") {
            Ok(tag) => Ok(tag.len() == MAC_LEN),
            Err(e) => match classify(e) {
                HsmError::Rejected(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    fn generate_mac(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen((MAC_LEN as u64).into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(root_id(label)),
        ];
        self.session()?
            .generate_key(&Mechanism::GenericSecretKeyGen, &template)
            .map_err(classify)
    }

    pub(super) fn ensure_mac(&mut self, label: &str, create: bool) -> Result<bool, HsmError> {
        self.macs.remove(label);
        if let Some(h) = self.find_mac(label, !create)? {
            self.macs.insert(label.to_string(), h);
            return Ok(false);
        }
        if !create {
            return Err(HsmError::RootKeyMissing(label.to_string()));
        }
        let h = self.generate_mac(label)?;
        self.macs.insert(label.to_string(), h);
        Ok(true)
    }

    pub(super) fn hmac(&mut self, label: &str, data: &[u8]) -> Result<[u8; MAC_LEN], HsmError> {
        let h = match self.macs.get(label) {
            Some(h) => *h,
            None => {
                let h = self
                    .find_mac(label, true)?
                    .ok_or_else(|| HsmError::RootKeyMissing(label.to_string()))?;
                self.macs.insert(label.to_string(), h);
                h
            }
        };
        match self.session()?.sign(&Mechanism::Sha256Hmac, h, data) {
            Ok(tag) => tag.try_into().map_err(|_| {
                HsmError::Rejected("HMAC-SHA256 answered a tag of another length".into())
            }),
            Err(e) => {
                let e = classify(e);
                if matches!(e, HsmError::Unavailable(_)) {
                    // The token may have been reloaded: its handles are then stale.
                    self.macs.remove(label);
                }
                Err(e)
            }
        }
    }

    /// Anchor objects, optionally of one slot.
    fn anchor_objects(&self, label: Option<&str>) -> Result<Vec<ObjectHandle>, HsmError> {
        let mut template = vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(APPLICATION.to_vec()),
        ];
        if let Some(label) = label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        self.session()?.find_objects(&template).map_err(classify)
    }

    /// `(label, value)` of an anchor object; `None` when it cannot be read (an object a
    /// killed write left incomplete: SoftHSM may list it and fail on its attributes).
    fn anchor_value(&self, h: ObjectHandle) -> Result<Option<LabelledValue>, HsmError> {
        let attrs = match self
            .session()?
            .get_attributes(h, &[AttributeType::Label, AttributeType::Value])
        {
            Ok(attrs) => attrs,
            Err(e) => {
                tracing::debug!(error = %classify(e), "an anchor object cannot be read; passed over");
                return Ok(None);
            }
        };
        let (mut label, mut value) = (None, None);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = Some(l),
                Attribute::Value(v) => value = Some(v),
                _ => {}
            }
        }
        Ok(label.zip(value))
    }

    pub(super) fn anchors(&mut self) -> Result<Vec<Vec<u8>>, HsmError> {
        let mut out = Vec::new();
        for h in self.anchor_objects(None)? {
            if let Some((label, value)) = self.anchor_value(h)? {
                if ANCHOR_LABELS.iter().any(|l| l.as_bytes() == label) {
                    out.push(value);
                }
            }
        }
        Ok(out)
    }

    /// Replaces the slot's object: SoftHSM does not let a data object's value change, so a
    /// new object is made (a new file: a kill meanwhile leaves the old one whole) and then
    /// the slot's older objects are destroyed (an unlink each). What a kill leaves behind
    /// is passed over by the reader and destroyed at the slot's next write.
    pub(super) fn store_anchor(&mut self, slot: usize, bytes: &[u8]) -> Result<(), HsmError> {
        let label = *ANCHOR_LABELS
            .get(slot)
            .ok_or_else(|| HsmError::Rejected(format!("no anchor slot {slot}")))?;
        let older = self.anchor_objects(Some(label))?;
        let template = [
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Application(APPLICATION.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(bytes.to_vec()),
        ];
        let session = self.session()?;
        session.create_object(&template).map_err(classify)?;
        for h in older {
            if let Err(e) = session.destroy_object(h) {
                tracing::debug!(label, error = %classify(e), "an older anchor object cannot be destroyed; passed over");
            }
        }
        Ok(())
    }
}
