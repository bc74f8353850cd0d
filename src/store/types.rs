//! What the state keeps, as stored: wrapped and sealed forms only, never a data key, IAM
//! secret or TOTP secret in the clear. Independent of the backend. No Debug on any of them:
//! the blobs stay out of logs.

use crate::domain::secret::WRAP_IV_LEN;
use crate::domain::{Code, Initiator, KeyId, VersionType};

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
    /// Set while a node's KMS check refused the key (or its key check failed), so that every
    /// node withdraws the version; cleared by the next successful check on any node. Read
    /// from the state only: `Store::add_version` stores a new version without one.
    pub refusal: Option<AwsRefusal>,
}

/// A refusal of an aws version, recorded in the state by the node whose check saw it.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsRefusal {
    /// Why, as an error code (`aws_key_disabled`, `aws_key_mismatch`, ...).
    pub code: Code,
    /// What KMS (or the key check) said: no key material, no IAM secret.
    pub why: String,
    /// When it was recorded (Unix seconds, the recording node's clock).
    pub at: i64,
}

impl AwsRefusal {
    /// A code as stored back to its enum; a code this build does not know reads as the
    /// generic refusal.
    pub fn code_of(stored: &str) -> Code {
        Code::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == stored)
            .unwrap_or(Code::AwsRejected)
    }
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

/// Everything a state holds but its audit log, as stored, read as of one moment: what
/// `state migrate` copies to another backend (`Store::export`, `Store::import`). The
/// audit log is copied beside it, page by page (`Store::audit_since`).
pub struct StateCopy {
    /// Every key with every version (aws refusals included).
    pub keys: Vec<StoredKey>,
    /// Each version's stored encryption count, keys and versions in the order of `keys`.
    pub encryptions: Vec<(KeyId, u32, u64)>,
    pub totp: Vec<CopiedTotp>,
    pub attempts: Vec<CopiedAttempts>,
}

/// An admin's TOTP row as stored.
pub struct CopiedTotp {
    pub uid: u32,
    pub secret: StoredTotp,
    pub created: i64,
}

/// A uid's TOTP failures and lock as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CopiedAttempts {
    pub uid: u32,
    pub failures: i64,
    pub window_start: i64,
    pub locked_until: i64,
}

impl StateCopy {
    /// Whether the state holds nothing at all (with an empty audit log: a target to copy to).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.totp.is_empty() && self.attempts.is_empty()
    }

    /// How many versions, over every key.
    pub fn versions(&self) -> usize {
        self.keys.iter().map(|k| k.versions.len()).sum()
    }

    /// SHA-256 over every field and blob, length-prefixed: two states with the same
    /// fingerprint hold the same keys, versions (wrapped bytes and all), counts and TOTP
    /// rows. Hex; says nothing about the contents.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut put = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        let num = |n: i64| n.to_be_bytes();
        for k in &self.keys {
            put(k.id.env.as_bytes());
            put(k.id.country.as_bytes());
            put(&num(k.rotation_period_days.map_or(-1, i64::from)));
            put(&num(k.created));
            for v in &k.versions {
                put(&num(i64::from(v.version)));
                put(v.kind.as_str().as_bytes());
                put(&num(v.created));
                put(v.origin.as_str().as_bytes());
                put(&v.iv);
                put(&v.wrapped);
                let Some(a) = &v.aws else {
                    put(b"-");
                    continue;
                };
                put(a.region.as_bytes());
                put(&a.encrypted_key);
                put(a.cmk_arn.as_bytes());
                put(a.access_key_id.as_bytes());
                match &a.check {
                    Some(c) => {
                        put(&c.iv);
                        put(&c.sealed);
                    }
                    None => put(b"-"),
                }
                match &a.refusal {
                    Some(r) => {
                        put(r.code.as_str().as_bytes());
                        put(r.why.as_bytes());
                        put(&num(r.at));
                    }
                    None => put(b"-"),
                }
            }
        }
        for (id, v, n) in &self.encryptions {
            put(id.env.as_bytes());
            put(id.country.as_bytes());
            put(&num(i64::from(*v)));
            put(&n.to_be_bytes());
        }
        for t in &self.totp {
            put(&num(i64::from(t.uid)));
            put(&t.secret.iv);
            put(&t.secret.sealed);
            put(&t.secret.last_step.to_be_bytes());
            put(&num(t.created));
        }
        for a in &self.attempts {
            for n in [i64::from(a.uid), a.failures, a.window_start, a.locked_until] {
                put(&num(n));
            }
        }
        hex::encode(h.finalize())
    }
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

/// A stored refusal from its three columns (all set, or none: a refusal).
pub(super) fn refusal(
    code: Option<String>,
    why: Option<String>,
    at: Option<i64>,
) -> Option<AwsRefusal> {
    code.map(|code| AwsRefusal {
        code: AwsRefusal::code_of(&code),
        why: why.unwrap_or_default(),
        at: at.unwrap_or(0),
    })
}
