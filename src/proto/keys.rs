//! Keys: the list, one key with its versions, and the SDK secrets document.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::domain::{VersionStatus, VersionType};

/// `GET /v1/keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeySummary>,
}

/// One key in the list (fields alphabetical: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    pub active_version: Option<u32>,
    /// Versions whose key is served.
    pub available_versions: usize,
    pub country: String,
    pub environment: String,
    /// Why the whole key is unavailable.
    pub problem: Option<String>,
    pub rotation_period_months: Option<u32>,
    pub versions: usize,
}

/// `GET /v1/keys/{env}/{country}`, and the answer of `PATCH` there (settings). Fields
/// alphabetical: the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDocument {
    pub active_version: Option<u32>,
    pub country: String,
    /// RFC 3339.
    pub created: String,
    pub environment: String,
    /// RFC 3339; null when the timer will not rotate the key.
    pub next_rotation: Option<String>,
    pub problem: Option<String>,
    pub rotation_period_days: Option<u32>,
    pub rotation_period_months: Option<u32>,
    pub versions: Vec<VersionDocument>,
}

/// One version of a key, with what happened to records under it since the daemon started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDocument {
    pub created: String,
    /// Why the version is unavailable; absent while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub records_decrypted: u64,
    pub records_encrypted: u64,
    pub records_rewrapped: u64,
    pub records_rewrapped_away: u64,
    /// The key's period for managed versions; null for aws versions.
    pub rotation_period_months: Option<u32>,
    pub status: VersionStatus,
    #[serde(rename = "type")]
    pub kind: VersionType,
    pub version: u32,
}

/// `GET /v1/keys/{env}/{country}/secrets`: the InCountry SDK secrets document, for clients to
/// read (the daemon writes it without this type). No Debug: it holds keys, zeroized when
/// dropped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretsDocument {
    pub current_version: u32,
    pub secrets: Vec<SdkSecret>,
}

/// One servable version's key in the secrets document (base64).
#[derive(Deserialize)]
pub struct SdkSecret {
    pub secret: Zeroizing<String>,
    pub version: u32,
    #[serde(rename = "isKey")]
    pub is_key: bool,
}
