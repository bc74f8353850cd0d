//! Immutable in-memory state that readers see: a snapshot of every key and its versions.

use crate::domain::Code;
use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::domain::error::{Error, Result};
use crate::domain::AwsKeyRef;
use crate::domain::DataKey;
use crate::domain::KeyId;
use crate::domain::DATA_KEY_LEN;
use crate::domain::{Initiator, VersionType};

/// One published state of every key. Replaced whole, never changed in place.
#[derive(Default)]
pub struct Snapshot {
    pub keys: BTreeMap<KeyId, Arc<KeyState>>,
}

impl Snapshot {
    pub fn version_count(&self) -> usize {
        self.keys.values().map(|k| k.versions.len()).sum()
    }

    /// Every version that cannot be served, with its key.
    pub fn unavailable(&self) -> impl Iterator<Item = (&KeyState, &VersionState)> {
        self.keys.values().flat_map(|k| {
            k.versions
                .iter()
                .filter(|v| v.key().is_none())
                .map(move |v| (k.as_ref(), v))
        })
    }
}

/// Whether a version's key can be served.
pub enum Availability {
    Ready(Arc<DataKey>),
    /// Why the version cannot be served (integrity failure, missing root key, revoked).
    Unavailable(String),
    /// An aws version between start and its first KMS check: not served yet.
    AwaitingFirstCheck,
}

/// A version's status as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionStatus {
    /// The newest version: new records are encrypted under it.
    Active,
    /// An older version, kept to decrypt.
    Deprecated,
    /// Its key cannot be served (see the version's `error`).
    Unavailable,
}

impl VersionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Active => "active",
            VersionStatus::Deprecated => "deprecated",
            VersionStatus::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for VersionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct VersionState {
    pub version: u32,
    pub kind: VersionType,
    pub created: i64,
    pub origin: Initiator,
    pub availability: Availability,
    /// For aws versions: what KMS needs to decrypt the data key again (revalidation).
    pub aws: Option<Arc<AwsKeyRef>>,
}

impl VersionState {
    /// The same version (its key shared, not copied).
    pub fn share(&self) -> VersionState {
        share(self)
    }

    pub fn key(&self) -> Option<&Arc<DataKey>> {
        match &self.availability {
            Availability::Ready(k) => Some(k),
            Availability::Unavailable(_) | Availability::AwaitingFirstCheck => None,
        }
    }
}

pub struct KeyState {
    pub id: KeyId,
    pub rotation_period_days: Option<u32>,
    pub created: i64,
    /// Set when the whole key is unavailable (root key missing from the HSM).
    pub unavailable_reason: Option<String>,
    /// Ascending by version; never empty.
    pub versions: Vec<VersionState>,
}

impl KeyState {
    pub fn new(id: KeyId, period: Option<u32>, created: i64, first: VersionState) -> KeyState {
        KeyState {
            id,
            rotation_period_days: period,
            created,
            unavailable_reason: None,
            versions: vec![first],
        }
    }

    /// A copy with one more version (material is shared, not copied).
    pub fn with_version(&self, v: VersionState, period: Option<u32>) -> KeyState {
        let mut versions: Vec<VersionState> = self.versions.iter().map(share).collect();
        versions.push(v);
        KeyState {
            id: self.id.clone(),
            rotation_period_days: period,
            created: self.created,
            unavailable_reason: self.unavailable_reason.clone(),
            versions,
        }
    }

    /// A copy where the versions in `changes` (version number, new material) get new
    /// material; everything else is shared.
    pub fn with_availability(&self, changes: Vec<(u32, Availability)>) -> KeyState {
        let mut versions: Vec<VersionState> = self.versions.iter().map(share).collect();
        for (n, material) in changes {
            if let Some(v) = versions.iter_mut().find(|v| v.version == n) {
                v.availability = material;
            }
        }
        KeyState {
            id: self.id.clone(),
            rotation_period_days: self.rotation_period_days,
            created: self.created,
            unavailable_reason: self.unavailable_reason.clone(),
            versions,
        }
    }

    /// How many customer-supplied (aws) versions the key has had (versions are never
    /// removed, so this counts over the key's life).
    pub fn customer_supplied_versions(&self) -> usize {
        self.versions
            .iter()
            .filter(|v| v.kind == VersionType::Aws)
            .count()
    }

    /// Whether the rotation timer may rotate this key: never while an aws version is active
    /// (the customer decides when their key changes).
    pub fn rotates_automatically(&self) -> bool {
        self.rotation_period_days.is_some()
            && self
                .active()
                .is_some_and(|v| v.kind == VersionType::Managed)
    }

    pub fn with_period(&self, period: Option<u32>) -> KeyState {
        KeyState {
            id: self.id.clone(),
            rotation_period_days: period,
            created: self.created,
            unavailable_reason: self.unavailable_reason.clone(),
            versions: self.versions.iter().map(share).collect(),
        }
    }

    pub fn last_version(&self) -> u32 {
        self.versions.last().map_or(0, |v| v.version)
    }

    /// The newest version: the one that encrypts.
    pub fn active(&self) -> Option<&VersionState> {
        self.versions.last()
    }

    /// When the timer rotates this key: the active managed version's creation plus the
    /// rotation period. `None` while a customer-supplied version is active, without a
    /// period, or while the key is unavailable.
    pub fn next_rotation(&self) -> Option<i64> {
        if self.unavailable_reason.is_some() {
            return None;
        }
        let active = self.active()?;
        if active.kind != VersionType::Managed {
            return None;
        }
        Some(active.created + i64::from(self.rotation_period_days?) * 86_400)
    }

    pub fn version(&self, n: u32) -> Option<&VersionState> {
        self.versions.iter().find(|v| v.version == n)
    }

    pub fn status(&self, v: &VersionState) -> VersionStatus {
        if v.key().is_none() {
            VersionStatus::Unavailable
        } else if Some(v.version) == self.active().map(|a| a.version) {
            VersionStatus::Active
        } else {
            VersionStatus::Deprecated
        }
    }

    /// Changes exactly when the version list (numbers or statuses) changes.
    pub fn etag(&self) -> String {
        let mut h = Sha256::new();
        for v in &self.versions {
            h.update(format!("{}:{};", v.version, self.status(v)));
        }
        format!("\"{}\"", hex::encode(&h.finalize()[..12]))
    }

    /// The InCountry SDK secrets document: every servable version, `currentVersion` = active.
    /// Written into one buffer sized up front (never reallocated, so no copy of a key is left
    /// behind), the base64 of each key encoded straight into it: no JSON tree, no string or
    /// encoder buffer of its own ever holds a key. Zeroized when dropped; the response body
    /// owns it (`bytes::Bytes::from_owner`).
    pub fn secrets_document(&self) -> Result<Zeroizing<Vec<u8>>> {
        use std::io::Write;
        if let Some(p) = &self.unavailable_reason {
            return Err(Error::unavailable(Code::RootKeyMissing, p));
        }
        let active = self
            .active()
            .ok_or_else(|| Error::internal("key without versions"))?;
        if let Some(why) = active.availability.unavailable_reason() {
            return Err(Error::unavailable(
                Code::ActiveVersionUnavailable,
                format!(
                    "{} active version {} is unavailable: {why}",
                    self.id, active.version
                ),
            ));
        }
        let b64 = KEY_BASE64_LEN;
        // Around each key at most `{"secret":"` + `","version":4294967295,"isKey":true},`
        // (48 bytes); around the list `{"currentVersion":4294967295,"secrets":[` + `]}` (42).
        let capacity = 64 + self.versions.len() * (b64 + 64);
        let mut doc = Zeroizing::new(Vec::with_capacity(capacity));
        let failed = |_| Error::internal("cannot write the secrets document");
        write!(doc, "{{\"currentVersion\":{},\"secrets\":[", active.version).map_err(failed)?;
        let mut first = true;
        for v in &self.versions {
            if let Some(k) = v.key() {
                if !first {
                    doc.push(b',');
                }
                first = false;
                doc.extend_from_slice(b"{\"secret\":\"");
                let at = doc.len();
                doc.resize(at + b64, 0);
                base64::engine::general_purpose::STANDARD
                    .encode_slice(k.expose(), &mut doc[at..])
                    .map_err(|_| Error::internal("cannot encode a key"))?;
                write!(doc, "\",\"version\":{},\"isKey\":true}}", v.version).map_err(failed)?;
            }
        }
        doc.extend_from_slice(b"]}");
        debug_assert!(
            doc.len() <= capacity,
            "the secrets document outgrew its buffer"
        );
        Ok(doc)
    }
}

/// The length of a data key in padded base64.
const KEY_BASE64_LEN: usize = DATA_KEY_LEN.div_ceil(3) * 4;

fn share(v: &VersionState) -> VersionState {
    VersionState {
        version: v.version,
        kind: v.kind,
        created: v.created,
        origin: v.origin,
        availability: v.availability.share(),
        aws: v.aws.clone(),
    }
}

impl Availability {
    /// Why the key cannot be served; `None` when it can.
    pub fn unavailable_reason(&self) -> Option<&str> {
        match self {
            Availability::Ready(_) => None,
            Availability::Unavailable(why) => Some(why),
            Availability::AwaitingFirstCheck => Some("waiting for the first KMS check since start"),
        }
    }

    /// The same material (the key itself is shared, not copied).
    pub fn share(&self) -> Availability {
        match self {
            Availability::Ready(k) => Availability::Ready(k.clone()),
            Availability::Unavailable(s) => Availability::Unavailable(s.clone()),
            Availability::AwaitingFirstCheck => Availability::AwaitingFirstCheck,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u32, byte: u8) -> VersionState {
        VersionState {
            version: n,
            kind: VersionType::Managed,
            created: 0,
            origin: Initiator::Admin,
            availability: Availability::Ready(Arc::new(DataKey::new(&[byte; 32]).unwrap())),
            aws: None,
        }
    }

    #[test]
    fn secrets_document_shape() {
        let id = KeyId::parse("p", "DE").unwrap();
        let k = KeyState::new(id, Some(30), 0, version(1, 1));
        let e1 = k.etag();
        let k = k.with_version(version(2, 2), Some(30));
        assert_ne!(e1, k.etag());
        let doc: serde_json::Value =
            serde_json::from_slice(&k.secrets_document().unwrap()).unwrap();
        assert_eq!(doc["currentVersion"], 2);
        assert_eq!(doc["secrets"].as_array().unwrap().len(), 2);
        assert_eq!(doc["secrets"][0]["isKey"], true);
        assert_eq!(
            doc["secrets"][1]["secret"],
            base64::engine::general_purpose::STANDARD.encode([2u8; 32])
        );
        assert_eq!(k.status(&k.versions[0]), VersionStatus::Deprecated);
        assert_eq!(k.status(&k.versions[1]), VersionStatus::Active);
    }
}
