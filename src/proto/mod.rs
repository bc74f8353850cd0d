//! The wire protocol: what requests carry and answers hold, shared by the server (which
//! answers with these types), the CLI and the tests (which read answers through them).
//!
//! Request bodies refuse unknown fields. Answers declare their fields in the order they
//! have on the wire: documents the daemon used to build as JSON maps keep their keys in
//! alphabetical order (serde_json's maps are sorted), so those structs list their fields
//! alphabetically; the rest keep the order of the struct that was serialized.
//!
//! One document is not built from these types: the secrets document, which the daemon
//! writes into one zeroizing buffer itself (`domain::KeyState::secrets_document`) so that
//! key bytes never pass through a serializer; `SecretsDocument` is for clients to read it.

mod admin;
mod health;
mod keys;
mod records;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use admin::{
    AuditEntryDocument, AuditPage, ClockAnswer, ClockRequest, ConfirmRequest, CreateKeyRequest,
    Enrolled, Enrollment, PeriodRequest, VersionAdded,
};
pub use health::{
    BareHealth, ClusterHealth, Condition, Health, HealthDocument, HealthStatus, NodeRole,
    PropagationHealth, RotationFailure, RotationHealth,
};
pub use keys::{KeyDocument, KeyList, KeySummary, SdkSecret, SecretsDocument, VersionDocument};
pub use records::{
    max_plaintext, BatchAnswer, BatchRequest, CipherRequest, Decrypted, EncryptRequest, Encrypted,
    ItemError, ItemErrorBody, ItemResult, RecordAnswer, Rewrapped, MAX_BATCH,
};

use crate::domain::Code;

/// Header that carries an admin's verification code (TOTP).
pub const VERIFICATION_HEADER: &str = "x-verification-code";

/// Header naming the uid whose code vouches for a first enrollment (see `api::totp`).
pub const VOUCHER_HEADER: &str = "x-verification-uid";

/// Every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDocument {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: Code,
    pub message: String,
}

impl ErrorDocument {
    pub fn new(code: Code, message: impl Into<String>) -> ErrorDocument {
        ErrorDocument {
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}
