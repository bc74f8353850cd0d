//! Records in the InCountry SDK format: encrypt, decrypt and rewrap, one record or a batch
//! (`{"batch": [...]}` of up to `MAX_BATCH` items, each answered by a result or an error).

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::domain::{crypto, Code};

/// Most items in one `{"batch": [...]}`.
pub const MAX_BATCH: usize = 1000;

/// JSON around the longest ciphertext in a decrypt or rewrap request: a batch of one,
/// `{"batch":[{"ciphertext":"…","version":4294967295}]}`.
const CIPHERTEXT_ENVELOPE: usize = 50;

/// The largest plaintext (bytes of UTF-8) whose record still fits a decrypt or rewrap
/// request (single or a batch of one) under `max_body`: what the daemon encrypts, it can
/// always decrypt and rewrap. With the default 1 MiB this is 786,301 bytes.
pub fn max_plaintext(max_body: usize) -> usize {
    let b64_chars = max_body.saturating_sub(CIPHERTEXT_ENVELOPE + crypto::SDK_PREFIX.len());
    (b64_chars / 4 * 3).saturating_sub(crypto::OVERHEAD)
}

/// One record to encrypt (`POST .../encrypt`, or an item of its batch). No Debug: a record.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptRequest {
    pub plaintext: String,
}

/// One record to decrypt or rewrap (`POST .../decrypt`, `.../rewrap`, or an item of their
/// batch): a `2:` record with the key version beside it, or a `pt:` record (no version).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CipherRequest {
    pub ciphertext: String,
    pub version: Option<u32>,
}

/// `{"batch": [...]}`, as clients write it. The daemon reads batches with a reader of its own
/// (`api::records`), which refuses a field named twice at any depth.
#[derive(Serialize)]
pub struct BatchRequest<T> {
    pub batch: Vec<T>,
}

/// A record encrypted under `version` (the active one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encrypted {
    pub ciphertext: String,
    pub version: u32,
}

/// A record's plaintext. No Debug: zeroized when dropped.
#[derive(Serialize, Deserialize)]
pub struct Decrypted {
    pub plaintext: Zeroizing<String>,
}

/// A record under the active `version`; `rewrapped` is false for one that already was (sent
/// back unchanged). Fields alphabetical: the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrapped {
    pub ciphertext: String,
    pub rewrapped: bool,
    pub version: u32,
}

/// Any record answer, as the daemon writes it.
#[derive(Serialize)]
#[serde(untagged)]
pub enum RecordAnswer {
    Encrypted(Encrypted),
    Decrypted(Decrypted),
    Rewrapped(Rewrapped),
}

/// The answer to a batch: 200 with one result per item, in order, failed or not. Fields
/// alphabetical: the wire order.
#[derive(Serialize, Deserialize)]
pub struct BatchAnswer<T> {
    pub failed: usize,
    pub results: Vec<ItemResult<T>>,
    pub succeeded: usize,
}

/// One item of a batch: its error, or its answer (`Encrypted`, `Decrypted`, `Rewrapped`).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum ItemResult<T> {
    Failed(ItemError),
    Done(T),
}

impl<T> ItemResult<T> {
    /// The item's answer, or its error.
    pub fn into_result(self) -> Result<T, ItemErrorBody> {
        match self {
            ItemResult::Done(answer) => Ok(answer),
            ItemResult::Failed(e) => Err(e.error),
        }
    }
}

/// A failed item: the error document with the status the item would have had alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    pub error: ItemErrorBody,
}

/// Fields alphabetical: the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemErrorBody {
    pub code: Code,
    pub message: String,
    pub status: u16,
}
