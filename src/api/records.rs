//! Record encryption, decryption and rewrap in the InCountry SDK format, single and batch.
//! Keys come from the live snapshot (no HSM round trip per record); the AES work of a batch
//! runs on a blocking thread, off the async runtime.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::response::{self, Body};
use crate::crypto::{self, Format};
use crate::daemon::App;
use crate::error::{Error, Result};
use crate::keyring::{Count, DataKey, KeyId, KeyState};

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
type Tally = HashMap<(u32, Count), u64>;

pub async fn handle(app: &App, id: KeyId, op: Op, body: Option<Value>) -> Result<Response<Body>> {
    let key = app.keyring.key(&id)?;
    let limit = max_plaintext(app.config.load().server.max_body);
    if let Some(p) = &key.problem {
        return Err(Error::unavailable("root_key_missing", p));
    }
    let Some(Value::Object(mut body)) = body else {
        return Err(Error::bad_input(
            "invalid_request",
            format!(
                "the body must be {} or {{\"batch\": [up to {MAX_BATCH} of them]}}",
                op.shape()
            ),
        ));
    };
    if body.contains_key("batch") {
        if body.len() != 1 {
            return Err(Error::bad_input(
                "unknown_field",
                "a batch request has the single field \"batch\"",
            ));
        }
        let items = match body.remove("batch") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(Error::bad_input(
                    "invalid_request",
                    format!("\"batch\" must be an array of {}", op.shape()),
                ))
            }
        };
        if items.len() > MAX_BATCH {
            return Err(Error::bad_input(
                "batch_too_large",
                format!(
                    "a batch holds at most {MAX_BATCH} items (got {}); split it",
                    items.len()
                ),
            ));
        }
        let worker_key = key.clone();
        let (results, tally) =
            tokio::task::spawn_blocking(move || run_batch(&worker_key, op, items, limit))
                .await
                .map_err(|e| Error::internal(format!("record worker: {e}")))?;
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
        let mut tally = Tally::new();
        let result = run_one(&key, op, Value::Object(body), limit, &mut tally);
        count(app, &key.id, tally);
        Ok(response::json(StatusCode::OK, &result?))
    }
}

fn count(app: &App, id: &KeyId, tally: Tally) {
    for ((version, what), n) in tally {
        app.keyring.records().add(id, version, what, n);
    }
}

fn run_batch(key: &KeyState, op: Op, items: Vec<Value>, limit: usize) -> (Vec<Value>, Tally) {
    let mut tally = Tally::new();
    let results = items
        .into_iter()
        .map(|item| match run_one(key, op, item, limit, &mut tally) {
            Ok(v) => v,
            Err(e) => json!({"error": {
                "code": e.code(),
                "status": response::status_of(&e).as_u16(),
                "message": e.to_string(),
            }}),
        })
        .collect();
    (results, tally)
}

/// One item; `limit` is the largest plaintext to encrypt (see [`max_plaintext`]).
fn run_one(key: &KeyState, op: Op, item: Value, limit: usize, tally: &mut Tally) -> Result<Value> {
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
            let ciphertext = crypto::encrypt(data_key.expose(), item.plaintext.as_bytes())?;
            *tally.entry((version, Count::Encrypted)).or_default() += 1;
            Ok(json!({"ciphertext": ciphertext, "version": version}))
        }
        Op::Decrypt => {
            let item: CipherItem = parse(op, item)?;
            let (plain, version) = open(key, &item)?;
            let text = crypto::into_text(plain)?;
            if let Some(v) = version {
                *tally.entry((v, Count::Decrypted)).or_default() += 1;
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
            let ciphertext = crypto::encrypt(data_key.expose(), &plain)?;
            *tally.entry((active_version, Count::Rewrapped)).or_default() += 1;
            if let Some(v) = version {
                *tally.entry((v, Count::RewrappedAway)).or_default() += 1;
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
            "invalid_request",
            format!("each item must be {}", op.shape()),
        ));
    }
    serde_json::from_value(item).map_err(|e| {
        let msg = e.to_string();
        // serde names unknown and missing fields; type errors may quote the value (a record),
        // so those get the shape instead.
        if msg.starts_with("unknown field") {
            Error::bad_input("unknown_field", msg)
        } else if msg.starts_with("missing field") {
            Error::bad_input("invalid_request", format!("{msg}: expected {}", op.shape()))
        } else {
            Error::bad_input("invalid_request", format!("expected {}", op.shape()))
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
            "active_version_unavailable",
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
                    "missing_version",
                    "\"version\" is required: the key version travels beside a \"2:\" record",
                )
            })?;
            let v = key.version(n).ok_or_else(|| {
                Error::not_found(
                    "version_not_found",
                    format!("{} has no version {n}", key.id),
                )
            })?;
            let dk = v.key().ok_or_else(|| {
                Error::unavailable(
                    "version_unavailable",
                    format!("{} version {n} is unavailable", key.id),
                )
            })?;
            Ok((crypto::decrypt(dk.expose(), &item.ciphertext)?, Some(n)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_record_fits_a_batch_of_one() {
        let max_body = 1024 * 1024;
        let n = max_plaintext(max_body);
        assert_eq!(n, 786_301);
        let ct = crypto::encrypt(&[3u8; 32], &vec![b'a'; n]).unwrap();
        let request = json!({"batch": [{"ciphertext": ct, "version": u32::MAX}]}).to_string();
        assert!(request.len() <= max_body, "{}", request.len());
        let ct = crypto::encrypt(&[3u8; 32], &vec![b'a'; n + 3]).unwrap();
        let request = json!({"batch": [{"ciphertext": ct, "version": u32::MAX}]}).to_string();
        assert!(request.len() > max_body);
        assert_eq!(max_plaintext(10), 0);
    }
}
