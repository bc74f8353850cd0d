//! What the state keeps, as stored: wrapped and sealed forms only, never a data key, IAM
//! secret or TOTP secret in the clear. Independent of the backend. No Debug on any of them:
//! the blobs stay out of logs.

use crate::domain::secret::WRAP_IV_LEN;
use crate::domain::{Initiator, KeyId, VersionType};

/// A version as stored: wrapped, never the data key itself. Managed versions: `wrapped` is
/// the data key sealed by the HSM root key. Aws versions: `wrapped` is the IAM secret key
/// sealed by the HSM root key, and `aws` says where the data key is.
pub struct StoredVersion {
    pub version: u32,
    pub kind: VersionType,
    pub created: i64,
    pub origin: Initiator,
    pub iv: [u8; WRAP_IV_LEN],
    pub wrapped: Vec<u8>,
    pub aws: Option<StoredAws>,
}

/// What the state keeps of a customer-supplied version besides the sealed IAM secret.
pub struct StoredAws {
    pub region: String,
    /// The KMS ciphertext blob of the data key.
    pub encrypted_key: Vec<u8>,
    pub cmk_arn: String,
    pub access_key_id: String,
    /// The key check value of the data key, sealed by the HSM root key under AAD over the
    /// slot and the four fields above (`keyring::aws::check`). `None` for versions registered
    /// before key checks existed.
    pub check: Option<SealedCheck>,
}

/// A sealed key check value.
pub struct SealedCheck {
    pub iv: [u8; WRAP_IV_LEN],
    pub sealed: Vec<u8>,
}

/// What `Store::aws_seals` reads of an aws version: its sealed IAM secret and its sealed key
/// check, as stored.
pub struct StoredAwsSeals {
    pub secret_iv: [u8; WRAP_IV_LEN],
    pub secret: Vec<u8>,
    pub check: Option<SealedCheck>,
}

/// A key and every version it ever had, oldest first.
pub struct StoredKey {
    pub id: KeyId,
    pub rotation_period_days: Option<u32>,
    pub created: i64,
    pub versions: Vec<StoredVersion>,
}

/// An admin's sealed TOTP secret, and the last time step a code was accepted for.
pub struct StoredTotp {
    pub iv: [u8; WRAP_IV_LEN],
    pub sealed: Vec<u8>,
    pub last_step: u64,
}

/// How many wrong codes lock a uid, within how long, and for how long (seconds).
#[derive(Debug, Clone, Copy)]
pub struct TotpLimits {
    pub max_failures: i64,
    pub window: i64,
    pub lockout: i64,
}

/// A stored key check from its two stored halves. Anything but both or neither (one half
/// missing, an IV of the wrong length) comes back as a check that cannot be opened, so the
/// version fails its key check instead of the whole state failing to load.
pub(super) fn sealed_check(halves: (Option<Vec<u8>>, Option<Vec<u8>>)) -> Option<SealedCheck> {
    match halves {
        (None, None) => None,
        (Some(iv), Some(sealed)) if iv.len() == WRAP_IV_LEN => Some(SealedCheck {
            iv: iv.as_slice().try_into().unwrap_or([0; WRAP_IV_LEN]),
            sealed,
        }),
        _ => Some(SealedCheck {
            iv: [0; WRAP_IV_LEN],
            sealed: Vec::new(),
        }),
    }
}

/// What a state several processes write tells one of them about the others' changes
/// (`Store::follow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    /// A key's rows changed (a version, its settings): read them again. `sent`: just before
    /// the change committed, in Unix milliseconds by the database's clock (`None` when the
    /// notification does not say).
    Changed { key: KeyId, sent: Option<i64> },
    /// Following (again, after `Lost`): changes committed meanwhile were not heard, so the
    /// whole state is to be read again.
    Following,
    /// Not following: other processes' changes go unheard until `Following`.
    Lost(String),
}

/// The events of `Store::follow`, in the order they happened.
pub type ChangeFeed = tokio::sync::mpsc::UnboundedReceiver<StateEvent>;
