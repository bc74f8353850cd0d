//! `POST /v1/keys/{env}/{country}/{encrypt,decrypt,rewrap}`: the body read into the
//! keyring's items, and the answer. One record (`{"plaintext": ...}`, `{"ciphertext": ...,
//! "version": ...}`) or a batch (`{"batch": [...]}`, each item answered in its place). The
//! work itself, and the encryption budget, are the keyring's (`keyring::records`).

use std::fmt;

use hyper::{Response, StatusCode};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::extract::{fault, Fault};
use super::response::{self, Body};
use super::App;
use crate::domain::error::{Error, Result};
use crate::domain::{Code, KeyId};
use crate::keyring::{Items, Op, Recorded, Sealed};
use crate::proto::{
    max_plaintext, BatchAnswer, CipherRequest, Decrypted, EncryptRequest, Encrypted, ItemResult,
    RecordAnswer, Rewrapped, MAX_BATCH,
};

/// What one item of `op` looks like, for error messages.
fn shape(op: Op) -> &'static str {
    match op {
        Op::Encrypt => "{\"plaintext\": string}",
        Op::Decrypt | Op::Rewrap => "{\"ciphertext\": string, \"version\": integer}",
    }
}

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

/// Answers a records request on `id`; `body` is what the body reader made of it.
pub(super) async fn answer(
    app: &App,
    id: KeyId,
    op: Op,
    body: Option<RecordsBody>,
) -> Result<Response<Body>> {
    let key = app.keyring.record_key(&id)?;
    let limit = max_plaintext(app.config.load().server.max_body);
    let Some(RecordsBody(Value::Object(mut body))) = body else {
        return Err(Error::bad_input(
            Code::InvalidRequest,
            format!(
                "the body must be {} or {{\"batch\": [up to {MAX_BATCH} of them]}}",
                shape(op)
            ),
        ));
    };
    if !body.contains_key("batch") {
        let item = items(op, vec![Value::Object(body)]);
        let done = app.keyring.record_one(&key, item, limit).await?;
        return Ok(response::json(StatusCode::OK, &record_answer(done)));
    }
    if body.len() != 1 {
        return Err(Error::bad_input(
            Code::UnknownField,
            "a batch request has the single field \"batch\"",
        ));
    }
    let batch = match body.remove("batch") {
        Some(Value::Array(batch)) => batch,
        _ => {
            return Err(Error::bad_input(
                Code::InvalidRequest,
                format!("\"batch\" must be an array of {}", shape(op)),
            ))
        }
    };
    if batch.len() > MAX_BATCH {
        return Err(Error::bad_input(
            Code::BatchTooLarge,
            format!(
                "a batch holds at most {MAX_BATCH} items (got {}); split it",
                batch.len()
            ),
        ));
    }
    let results: Vec<_> = app
        .keyring
        .record_batch(key, items(op, batch), limit)
        .await?
        .into_iter()
        .map(|r| match r {
            Ok(done) => ItemResult::Done(record_answer(done)),
            Err(e) => ItemResult::Failed(response::item_error(&e)),
        })
        .collect();
    let failed = results
        .iter()
        .filter(|r| matches!(r, ItemResult::Failed(_)))
        .count();
    Ok(response::json(
        StatusCode::OK,
        &BatchAnswer {
            failed,
            succeeded: results.len() - failed,
            results,
        },
    ))
}

fn record_answer(done: Recorded) -> RecordAnswer {
    match done {
        Recorded::Encrypted {
            ciphertext,
            version,
        } => RecordAnswer::Encrypted(Encrypted {
            ciphertext,
            version,
        }),
        Recorded::Decrypted { plaintext } => RecordAnswer::Decrypted(Decrypted { plaintext }),
        Recorded::Rewrapped {
            ciphertext,
            version,
            rewrapped,
        } => RecordAnswer::Rewrapped(Rewrapped {
            ciphertext,
            rewrapped,
            version,
        }),
    }
}

/// The items of an `op` request, each parsed or the error to answer in its place.
fn items(op: Op, values: Vec<Value>) -> Items {
    let sealed = |v| {
        parse::<CipherRequest>(op, v).map(|r| Sealed {
            ciphertext: r.ciphertext,
            version: r.version,
        })
    };
    match op {
        Op::Encrypt => Items::Encrypt(
            values
                .into_iter()
                .map(|v| parse::<EncryptRequest>(op, v).map(|r| r.plaintext))
                .collect(),
        ),
        Op::Decrypt => Items::Decrypt(values.into_iter().map(sealed).collect()),
        Op::Rewrap => Items::Rewrap(values.into_iter().map(sealed).collect()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(op: Op, item: Value) -> Result<T> {
    if !item.is_object() {
        return Err(Error::bad_input(
            Code::InvalidRequest,
            format!("each item must be {}", shape(op)),
        ));
    }
    serde_json::from_value(item).map_err(|e| match fault(&e) {
        // serde names unknown and missing fields; type errors may quote the value (a
        // record), so those get the shape instead.
        Fault::UnknownField => Error::bad_input(Code::UnknownField, e),
        Fault::MissingField => {
            Error::bad_input(Code::InvalidRequest, format!("{e}: expected {}", shape(op)))
        }
        _ => Error::bad_input(Code::InvalidRequest, format!("expected {}", shape(op))),
    })
}

#[cfg(test)]
mod tests;
