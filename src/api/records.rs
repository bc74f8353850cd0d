//! Record encryption, decryption and rewrap in the InCountry SDK format, single and batch.
//! Keys come from the live snapshot (no HSM round trip per record); the AES work of a batch
//! runs on a blocking thread, off the async runtime.
//!
//! Every encryption (encrypt, and rewrap into the active version) is taken from the
//! version's durable count first (`keyring::ledger::EncryptionLedger`); past its limit the
//! item gets 409 `encryption_limit`.

use crate::domain::Code;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::response::{self, Body};
use crate::api::App;
use crate::domain::crypto::{self, Format};
use crate::domain::error::{Error, Result};
use crate::domain::DataKey;
use crate::domain::KeyId;
use crate::domain::KeyState;
use crate::keyring::RecordEvent;

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

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
}

impl Op {
    /// Route name for metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
        }
    }

    fn shape(self) -> &'static str {
        match self {
            Op::Encrypt => "{\"plaintext\": string}",
            Op::Decrypt | Op::Rewrap => "{\"ciphertext\": string, \"version\": integer}",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptItem {
    plaintext: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CipherItem {
    ciphertext: String,
    version: Option<u32>,
}

/// Counts to add once a request is done: (version, what) → n.
type EventCounts = HashMap<(u32, RecordEvent), u64>;

/// A records request body: JSON whose objects name no field twice, at any depth. (serde_json's
/// `Value` keeps the last of two equal keys, so `{"plaintext":"a","plaintext":"b"}` would
/// encrypt "b".) A duplicate fails the parse with serde's "duplicate field" error, which
/// the body reader answers with 400 `duplicate_field`.
pub struct RecordsBody(Value);

impl<'de> Deserialize<'de> for RecordsBody {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(Strict).map(RecordsBody)
    }
}

/// Builds a `Value` like serde_json's own visitor, refusing an object key seen twice.
struct Strict;

impl<'de> de::DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element_seed(Strict)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if object.contains_key(&name) {
                // Named like serde's own error for typed bodies; a long name is not echoed.
                return Err(if name.len() <= 64 {
                    de::Error::custom(format_args!("duplicate field `{name}`"))
                } else {
                    de::Error::custom("duplicate field")
                });
            }
            let value = map.next_value_seed(Strict)?;
            object.insert(name, value);
        }
        Ok(Value::Object(object))
    }
}

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

pub async fn handle(
    app: &App,
    id: KeyId,
    op: Op,
    body: Option<RecordsBody>,
) -> Result<Response<Body>> {
    let key = app.keyring.key(&id)?;
    let limit = max_plaintext(app.config.load().server.max_body);
    if let Some(p) = &key.unavailable_reason {
        return Err(Error::unavailable(Code::RootKeyMissing, p));
    }
    let Some(RecordsBody(Value::Object(mut body))) = body else {
        return Err(Error::bad_input(
            Code::InvalidRequest,
            format!(
                "the body must be {} or {{\"batch\": [up to {MAX_BATCH} of them]}}",
                op.shape()
            ),
        ));
    };
    if body.contains_key("batch") {
        if body.len() != 1 {
            return Err(Error::bad_input(
                Code::UnknownField,
                "a batch request has the single field \"batch\"",
            ));
        }
        let items = match body.remove("batch") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(Error::bad_input(
                    Code::InvalidRequest,
                    format!("\"batch\" must be an array of {}", op.shape()),
                ))
            }
        };
        if items.len() > MAX_BATCH {
            return Err(Error::bad_input(
                Code::BatchTooLarge,
                format!(
                    "a batch holds at most {MAX_BATCH} items (got {}); split it",
                    items.len()
                ),
            ));
        }
        let (version, mut budget) = reserve(app, &key, op, items.len() as u64).await?;
        let worker_key = key.clone();
        let (results, tally, budget) = tokio::task::spawn_blocking(move || {
            let (results, tally) = run_batch(&worker_key, op, items, limit, &mut budget);
            // AES key expansion and the cipher's moves left key bytes in finished frames.
            crate::domain::secret::clear_stack();
            (results, tally, budget)
        })
        .await
        .map_err(|e| Error::internal(format!("record worker: {e}")))?;
        release(app, &key.id, version, budget);
        count(app, &key.id, tally);
        let failed = results.iter().filter(|r| r.get("error").is_some()).count();
        Ok(response::json(
            StatusCode::OK,
            &json!({
                "succeeded": results.len() - failed,
                "failed": failed,
                "results": results,
            }),
        ))
    } else {
        let (version, mut budget) = reserve(app, &key, op, 1).await?;
        let mut tally = EventCounts::new();
        let result = run_one(
            &key,
            op,
            Value::Object(body),
            limit,
            &mut tally,
            &mut budget,
        );
        crate::domain::secret::clear_stack();
        release(app, &key.id, version, budget);
        count(app, &key.id, tally);
        Ok(response::json(StatusCode::OK, &result?))
    }
}

/// Takes up to `items` encryptions under the active version from its durable count (none
/// for decrypt, or while the active version cannot encrypt anyway).
async fn reserve(app: &App, key: &KeyState, op: Op, items: u64) -> Result<(u32, Budget)> {
    let ledger = app.keyring.records().encryptions();
    let limit = ledger.limit();
    let active = key.active().filter(|v| v.key().is_some());
    let (version, wanted) = match (op, active) {
        (Op::Encrypt | Op::Rewrap, Some(v)) => (v.version, items),
        (_, v) => (v.map_or(0, |v| v.version), 0),
    };
    let left = app
        .keyring
        .reserve_encryptions(&key.id, version, wanted)
        .await?;
    Ok((version, Budget { left, limit }))
}

/// Gives back the encryptions a request took but did not make.
fn release(app: &App, id: &KeyId, version: u32, budget: Budget) {
    app.keyring
        .records()
        .encryptions()
        .release(id, version, budget.left);
}

fn count(app: &App, id: &KeyId, tally: EventCounts) {
    for ((version, what), n) in tally {
        app.keyring.records().add(id, version, what, n);
    }
}

fn run_batch(
    key: &KeyState,
    op: Op,
    items: Vec<Value>,
    limit: usize,
    budget: &mut Budget,
) -> (Vec<Value>, EventCounts) {
    let mut tally = EventCounts::new();
    let results = items
        .into_iter()
        .map(
            |item| match run_one(key, op, item, limit, &mut tally, budget) {
                Ok(v) => v,
                Err(e) => json!({"error": {
                    "code": e.code(),
                    "status": response::status_of(&e).as_u16(),
                    "message": e.to_string(),
                }}),
            },
        )
        .collect();
    (results, tally)
}

/// One item; `limit` is the largest plaintext to encrypt (see [`max_plaintext`]); each
/// encryption is taken from `budget`.
fn run_one(
    key: &KeyState,
    op: Op,
    item: Value,
    limit: usize,
    tally: &mut EventCounts,
    budget: &mut Budget,
) -> Result<Value> {
    match op {
        Op::Encrypt => {
            let item: EncryptItem = parse(op, item)?;
            if item.plaintext.len() > limit {
                return Err(Error::TooLarge {
                    message: format!(
                        "a record holds at most {limit} bytes of plaintext (so that its ciphertext fits a decrypt request under server.max_body)"
                    ),
                });
            }
            let (version, data_key) = active(key)?;
            budget.take(key, version)?;
            let ciphertext = crypto::encrypt(data_key.expose(), item.plaintext.as_bytes())?;
            *tally.entry((version, RecordEvent::Encrypted)).or_default() += 1;
            Ok(json!({"ciphertext": ciphertext, "version": version}))
        }
        Op::Decrypt => {
            let item: CipherItem = parse(op, item)?;
            let (plain, version) = open(key, &item)?;
            let text = crypto::into_text(plain)?;
            if let Some(v) = version {
                *tally.entry((v, RecordEvent::Decrypted)).or_default() += 1;
            }
            Ok(json!({"plaintext": text.as_str()}))
        }
        Op::Rewrap => {
            let item: CipherItem = parse(op, item)?;
            let (active_version, data_key) = active(key)?;
            let (plain, version) = open(key, &item)?;
            if version == Some(active_version) {
                // Already under the active version (and proven to decrypt): unchanged.
                return Ok(json!({
                    "ciphertext": item.ciphertext,
                    "version": active_version,
                    "rewrapped": false,
                }));
            }
            budget.take(key, active_version)?;
            let ciphertext = crypto::encrypt(data_key.expose(), &plain)?;
            *tally
                .entry((active_version, RecordEvent::Rewrapped))
                .or_default() += 1;
            if let Some(v) = version {
                *tally.entry((v, RecordEvent::RewrappedAway)).or_default() += 1;
            }
            Ok(json!({
                "ciphertext": ciphertext,
                "version": active_version,
                "rewrapped": true,
            }))
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(op: Op, item: Value) -> Result<T> {
    if !item.is_object() {
        return Err(Error::bad_input(
            Code::InvalidRequest,
            format!("each item must be {}", op.shape()),
        ));
    }
    serde_json::from_value(item).map_err(|e| {
        let msg = e.to_string();
        // serde names unknown and missing fields; type errors may quote the value (a record),
        // so those get the shape instead.
        if msg.starts_with("unknown field") {
            Error::bad_input(Code::UnknownField, msg)
        } else if msg.starts_with("missing field") {
            Error::bad_input(
                Code::InvalidRequest,
                format!("{msg}: expected {}", op.shape()),
            )
        } else {
            Error::bad_input(Code::InvalidRequest, format!("expected {}", op.shape()))
        }
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
fn open(key: &KeyState, item: &CipherItem) -> Result<(zeroize::Zeroizing<Vec<u8>>, Option<u32>)> {
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
