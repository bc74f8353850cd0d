//! Admin changes (create, rotate, settings), verification-code enrollment, the audit log and
//! the test clock.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::domain::audit::AuditOutcome;
use crate::domain::VersionType;

/// `POST /v1/keys/{env}/{country}`: create a key, or add a version of `type` to it. `type`
/// stays a string so that an unknown one is answered by name (`invalid_type`). No Debug: it
/// may hold an IAM secret key, zeroized wherever the body is dropped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_days: Option<u32>,
    // Customer-supplied (aws) versions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The KMS ciphertext blob of the data key, standard base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmk_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Zeroizing<String>>,
}

/// `POST .../rotate` and `PATCH /v1/keys/{env}/{country}` (settings).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_days: Option<u32>,
}

/// What create and rotate made (declaration order: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionAdded {
    pub environment: String,
    pub country: String,
    pub version: u32,
    #[serde(rename = "type")]
    pub kind: VersionType,
    /// RFC 3339.
    pub created: String,
    /// Whether this made the key (version 1).
    pub key_created: bool,
}

/// `POST /v1/admin/totp/enroll`: the pending secret, shown once. No Debug: both strings carry
/// the secret, zeroized when dropped; the daemon sends it in a body that zeroizes itself.
#[derive(Serialize, Deserialize)]
pub struct Enrollment {
    pub otpauth_uri: Zeroizing<String>,
    pub secret_base32: Zeroizing<String>,
    pub expires_in_seconds: i64,
}

/// `POST /v1/admin/totp/confirm`: a code from the pending secret. No Debug (a live code).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmRequest {
    pub code: String,
}

/// The answer of a confirmed enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub enrolled: bool,
    pub uid: u32,
}

/// `GET /v1/audit?since=SEQ`: the entries after SEQ, and the SEQ to ask from next.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntryDocument>,
    pub next: i64,
}

/// One audit entry as the API shows it (fields alphabetical: the wire order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntryDocument {
    pub action: String,
    /// `uid:N` or `timer`.
    pub actor: String,
    pub country: Option<String>,
    pub detail: String,
    pub environment: Option<String>,
    pub gid: Option<u32>,
    pub hash: String,
    /// Absent on entries written before entries were MACed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub outcome: AuditOutcome,
    pub pid: Option<i32>,
    pub prev_hash: String,
    pub seq: i64,
    pub time: i64,
    pub uid: Option<u32>,
    pub version: Option<u32>,
}

/// `POST /v1/test/clock` (test builds only): moves the daemon's clock forward.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    pub advance_seconds: i64,
}

/// The clock after the move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockAnswer {
    /// RFC 3339.
    pub now: String,
    pub unix: i64,
}
