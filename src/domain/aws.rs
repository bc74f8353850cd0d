//! A customer-supplied (aws) key as KMS needs it, and what health says about aws versions.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::code::Code;

/// Everything KMS needs to decrypt one customer-supplied data key. Never Debug or Serialize.
pub struct AwsKeyRef {
    pub region: String,
    /// The KMS ciphertext blob of the data key (CiphertextBlob).
    pub encrypted_key: Vec<u8>,
    pub cmk_arn: String,
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
}

// The health view of aws versions. Fields are in alphabetical order: the order the health
// document has always had on the wire (it was built as a sorted JSON map).

/// What health shows about aws versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AwsHealth {
    pub problems: Vec<AwsProblem>,
    pub status: AwsStatus,
    pub versions: usize,
}

/// The aws versions taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AwsStatus {
    /// Every aws version passed its last check.
    Ok,
    /// A check failed (see `problems`).
    Degraded,
    /// No aws versions.
    None,
}

/// What is wrong with one aws version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AwsState {
    /// KMS refuses it: not served.
    Revoked,
    /// The data key or the stored KMS fields are not those registered: not served.
    Mismatch,
    /// KMS cannot be reached; the cached key still serves.
    Unreachable,
    /// No successful check within aws.max_stale, or none since the daemon started: not
    /// served.
    Stale,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AwsProblem {
    /// The refusal's code (`aws_key_disabled`, `aws_key_mismatch`, ...), `kms_unavailable`
    /// or `aws_key_stale`.
    pub code: Code,
    pub error: String,
    pub failures: u32,
    pub key: String,
    /// RFC 3339; null when no check has succeeded since the daemon started.
    pub last_success: Option<String>,
    pub state: AwsState,
    pub version: u32,
}
