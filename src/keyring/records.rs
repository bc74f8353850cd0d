//! Record encryption, decryption and rewrap in the InCountry SDK format, one record or a
//! batch. Keys come from the live snapshot (no HSM round trip per record); the AES work of a
//! batch runs on a blocking thread, off the async runtime. The api parses requests into
//! `Items` and answers with what comes back.
//!
//! Every encryption (encrypt, and rewrap into the active version) is taken from the
//! version's durable count first (`ledger::EncryptionLedger`); past its limit the item gets
//! 409 `encryption_limit`. The per-version counters (`counters`) count what was done.

use std::collections::HashMap;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{Keyring, RecordEvent};
use crate::domain::crypto::{self, Format};
use crate::domain::error::{Error, Result};
use crate::domain::secret::clear_stack;
use crate::domain::{Code, DataKey, KeyId, KeyState};

/// What a records request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
}

impl Op {
    /// The route's name (metrics labels).
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
        }
    }
}

/// A record to decrypt or rewrap: a `2:` record and the version beside it, or a `pt:` record.
pub struct Sealed {
    pub ciphertext: String,
    pub version: Option<u32>,
}

/// The items of one request, each parsed already or the reason it could not be (answered in
/// its place, after the encryptions are reserved, as if it had failed here).
pub enum Items {
    Encrypt(Vec<Result<String>>),
    Decrypt(Vec<Result<Sealed>>),
    Rewrap(Vec<Result<Sealed>>),
}

impl Items {
    pub fn op(&self) -> Op {
        match self {
            Items::Encrypt(_) => Op::Encrypt,
            Items::Decrypt(_) => Op::Decrypt,
            Items::Rewrap(_) => Op::Rewrap,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Items::Encrypt(items) => items.len(),
            Items::Decrypt(items) | Items::Rewrap(items) => items.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What became of one record.
pub enum Recorded {
    Encrypted {
        ciphertext: String,
        version: u32,
    },
    Decrypted {
        plaintext: Zeroizing<String>,
    },
    /// Under the active `version`; `rewrapped` is false for a record that already was
    /// (returned unchanged).
    Rewrapped {
        ciphertext: String,
        version: u32,
        rewrapped: bool,
    },
}

/// Counts to add once a request is done: (version, what) → n.
type EventCounts = HashMap<(u32, RecordEvent), u64>;

/// Encryptions a request may still make under the active version (taken from its durable
/// count before the work).
struct Budget {
    left: u64,
    limit: u64,
}

impl Budget {
    /// One encryption under `version`, or 409 once the version's limit is reached.
    fn take(&mut self, key: &KeyState, version: u32) -> Result<()> {
        if self.left == 0 {
            return Err(Error::conflict(
                Code::EncryptionLimit,
                format!(
                    "{} version {version} has encrypted {} records, the most one version may (AES-GCM with random IVs is safe for 2^32 per key); no more are encrypted under it: rotate the key to a new version (incountry-keyd keys rotate {} {}), then encrypt or rewrap again",
                    key.id, self.limit, key.id.env, key.id.country
                ),
            ));
        }
        self.left -= 1;
        Ok(())
    }
}

impl Keyring {
    /// The key a records request works on: 404 without one, 503 while its root key is
    /// missing from the HSM.
    pub fn record_key(&self, id: &KeyId) -> Result<Arc<KeyState>> {
        let key = self.key(id)?;
        if let Some(p) = &key.unavailable_reason {
            return Err(Error::unavailable(Code::RootKeyMissing, p));
        }
        Ok(key)
    }

    /// One record, on this thread; its failure is the request's. `max_plaintext` is the
    /// largest plaintext to encrypt (`proto::max_plaintext`).
    pub async fn record_one(
        &self,
        key: &KeyState,
        item: Items,
        max_plaintext: usize,
    ) -> Result<Recorded> {
        if item.len() != 1 {
            return Err(Error::internal("a single record request holds one item"));
        }
        let (version, mut budget) = self.reserve(key, item.op(), 1).await?;
        let mut tally = EventCounts::new();
        let result = run(key, item, max_plaintext, &mut tally, &mut budget).pop();
        // AES key expansion and the cipher's moves left key bytes in finished frames.
        clear_stack();
        self.release(&key.id, version, budget);
        self.count(&key.id, tally);
        result.unwrap_or_else(|| Err(Error::internal("a record request lost its item")))
    }

    /// A batch, on a blocking thread: one result per item, in order.
    pub async fn record_batch(
        &self,
        key: Arc<KeyState>,
        items: Items,
        max_plaintext: usize,
    ) -> Result<Vec<Result<Recorded>>> {
        let (version, mut budget) = self.reserve(&key, items.op(), items.len() as u64).await?;
        let worker_key = key.clone();
        let (results, tally, budget) = tokio::task::spawn_blocking(move || {
            let mut tally = EventCounts::new();
            let results = run(&worker_key, items, max_plaintext, &mut tally, &mut budget);
            // AES key expansion and the cipher's moves left key bytes in finished frames.
            clear_stack();
            (results, tally, budget)
        })
        .await
        .map_err(|e| Error::internal(format!("record worker: {e}")))?;
        self.release(&key.id, version, budget);
        self.count(&key.id, tally);
        Ok(results)
    }

    /// Takes up to `items` encryptions under the active version from its durable count
    /// (none for decrypt, or while the active version cannot encrypt anyway).
    async fn reserve(&self, key: &KeyState, op: Op, items: u64) -> Result<(u32, Budget)> {
        let ledger = self.records.encryptions();
        let limit = ledger.limit();
        let active = key.active().filter(|v| v.key().is_some());
        let (version, wanted) = match (op, active) {
            (Op::Encrypt | Op::Rewrap, Some(v)) => (v.version, items),
            (_, v) => (v.map_or(0, |v| v.version), 0),
        };
        let left = self.reserve_encryptions(&key.id, version, wanted).await?;
        Ok((version, Budget { left, limit }))
    }

    /// Gives back the encryptions a request took but did not make.
    fn release(&self, id: &KeyId, version: u32, budget: Budget) {
        self.records.encryptions().release(id, version, budget.left);
    }

    fn count(&self, id: &KeyId, tally: EventCounts) {
        for ((version, what), n) in tally {
            self.records.add(id, version, what, n);
        }
    }
}

/// Every item, in order; each encryption is taken from `budget`.
fn run(
    key: &KeyState,
    items: Items,
    max_plaintext: usize,
    tally: &mut EventCounts,
    budget: &mut Budget,
) -> Vec<Result<Recorded>> {
    match items {
        Items::Encrypt(items) => items
            .into_iter()
            .map(|item| encrypt(key, item?, max_plaintext, tally, budget))
            .collect(),
        Items::Decrypt(items) => items
            .into_iter()
            .map(|item| decrypt(key, &item?, tally))
            .collect(),
        Items::Rewrap(items) => items
            .into_iter()
            .map(|item| rewrap(key, item?, tally, budget))
            .collect(),
    }
}

fn encrypt(
    key: &KeyState,
    plaintext: String,
    max_plaintext: usize,
    tally: &mut EventCounts,
    budget: &mut Budget,
) -> Result<Recorded> {
    if plaintext.len() > max_plaintext {
        return Err(Error::TooLarge {
            message: format!(
                "a record holds at most {max_plaintext} bytes of plaintext (so that its ciphertext fits a decrypt request under server.max_body)"
            ),
        });
    }
    let (version, data_key) = active(key)?;
    budget.take(key, version)?;
    let ciphertext = crypto::encrypt(data_key.expose(), plaintext.as_bytes())?;
    *tally.entry((version, RecordEvent::Encrypted)).or_default() += 1;
    Ok(Recorded::Encrypted {
        ciphertext,
        version,
    })
}

fn decrypt(key: &KeyState, item: &Sealed, tally: &mut EventCounts) -> Result<Recorded> {
    let (plain, version) = open(key, item)?;
    let plaintext = crypto::into_text(plain)?;
    if let Some(v) = version {
        *tally.entry((v, RecordEvent::Decrypted)).or_default() += 1;
    }
    Ok(Recorded::Decrypted { plaintext })
}

fn rewrap(
    key: &KeyState,
    item: Sealed,
    tally: &mut EventCounts,
    budget: &mut Budget,
) -> Result<Recorded> {
    let (active_version, data_key) = active(key)?;
    let (plain, version) = open(key, &item)?;
    if version == Some(active_version) {
        // Already under the active version (and proven to decrypt): unchanged.
        return Ok(Recorded::Rewrapped {
            ciphertext: item.ciphertext,
            version: active_version,
            rewrapped: false,
        });
    }
    budget.take(key, active_version)?;
    let ciphertext = crypto::encrypt(data_key.expose(), &plain)?;
    *tally
        .entry((active_version, RecordEvent::Rewrapped))
        .or_default() += 1;
    if let Some(v) = version {
        *tally.entry((v, RecordEvent::RewrappedAway)).or_default() += 1;
    }
    Ok(Recorded::Rewrapped {
        ciphertext,
        version: active_version,
        rewrapped: true,
    })
}

/// The active version and its data key.
fn active(key: &KeyState) -> Result<(u32, &Arc<DataKey>)> {
    let v = key
        .active()
        .ok_or_else(|| Error::internal("key without versions"))?;
    let dk = v.key().ok_or_else(|| {
        Error::unavailable(
            Code::ActiveVersionUnavailable,
            format!(
                "{} active version {} is unavailable; records cannot be encrypted",
                key.id, v.version
            ),
        )
    })?;
    Ok((v.version, dk))
}

/// Decrypts a `2:` record under its version, or opens a `pt:` record (no version).
fn open(key: &KeyState, item: &Sealed) -> Result<(Zeroizing<Vec<u8>>, Option<u32>)> {
    match crypto::format_of(&item.ciphertext)? {
        Format::Plain => Ok((crypto::open_plain(&item.ciphertext)?, None)),
        Format::Sdk => {
            let n = item.version.ok_or_else(|| {
                Error::bad_input(
                    Code::MissingVersion,
                    "\"version\" is required: the key version travels beside a \"2:\" record",
                )
            })?;
            let v = key.version(n).ok_or_else(|| {
                Error::not_found(
                    Code::VersionNotFound,
                    format!("{} has no version {n}", key.id),
                )
            })?;
            let dk = v.key().ok_or_else(|| {
                Error::unavailable(
                    Code::VersionUnavailable,
                    format!("{} version {n} is unavailable", key.id),
                )
            })?;
            Ok((crypto::decrypt(dk.expose(), &item.ciphertext)?, Some(n)))
        }
    }
}

#[cfg(test)]
mod tests;
