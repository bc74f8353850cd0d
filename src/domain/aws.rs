//! A customer-supplied (aws) key as KMS needs it.

use zeroize::Zeroizing;

/// Everything KMS needs to decrypt one customer-supplied data key. Never Debug or Serialize.
pub struct AwsKeyRef {
    pub region: String,
    /// The KMS ciphertext blob of the data key (CiphertextBlob).
    pub encrypted_key: Vec<u8>,
    pub cmk_arn: String,
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
}
