//! What handlers take from a request: the JSON body (size limit, body deadline, objects only,
//! serde's errors as 400 codes), query parameters and the verification headers. Handlers use
//! these and nothing of the router's.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, IF_NONE_MATCH};
use hyper::Request;
use serde::de::DeserializeOwned;

use super::App;
use crate::domain::error::{Error, Result};
use crate::domain::Code;
use crate::proto::{VERIFICATION_HEADER, VOUCHER_HEADER};

/// Longest `?wait=` of a long poll, in seconds.
const MAX_WAIT_SECONDS: u64 = 300;

/// The deadline by which a request's body must have arrived (`server.request_timeout`
/// after its first byte), set on each request for the handlers that read a body.
#[derive(Clone, Copy)]
pub(crate) struct BodyDeadline(pub tokio::time::Instant);

/// Reads a JSON body of at most `server.max_body` bytes. `None` for an empty body.
pub(super) async fn read_json<T: DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
) -> Result<Option<T>> {
    let max = app.config.load().server.max_body;
    let too_large = || Error::TooLarge {
        message: format!("request body is larger than server.max_body ({max} bytes)"),
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let deadline = req.extensions().get::<BodyDeadline>().map(|d| d.0);
    let collect = Limited::new(req.into_body(), max).collect();
    let collected = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, collect)
            .await
            .map_err(|_| Error::RequestTimeout {
                message: format!(
                    "the request body did not arrive within server.request_timeout ({})",
                    humantime::format_duration(app.config.load().server.request_timeout)
                ),
            })?,
        None => collect.await,
    };
    let body = Wipe(
        collected
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    Error::bad_input(Code::BadBody, "cannot read the request body")
                }
            })?
            .to_bytes(),
    );
    parse_json(&body.0)
}

/// A body's JSON: `None` when it is blank; an object only.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<Option<T>> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(None),
        // serde's derived structs also read a positional array of their fields: the
        // contract's bodies are objects, named field by field.
        Some(b'{') => {}
        Some(_)
            if std::str::from_utf8(body).is_err()
                || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() =>
        {
            return Err(Error::bad_input(
                Code::MalformedJson,
                "request body is not valid JSON",
            ))
        }
        Some(_) => {
            return Err(Error::bad_input(
                Code::InvalidRequest,
                "request body must be a JSON object",
            ))
        }
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| match fault(&e) {
            Fault::Syntax => Error::bad_input(
                Code::MalformedJson,
                format!("request body is not valid JSON: {e}"),
            ),
            Fault::UnknownField => Error::bad_input(Code::UnknownField, e),
            // A key twice in one object: serde's typed bodies and `records::RecordsBody`.
            Fault::DuplicateField => Error::bad_input(Code::DuplicateField, e),
            Fault::MissingField | Fault::Other => Error::bad_input(Code::InvalidRequest, e),
        })
}

/// A request body, zeroized once parsed (or refused) when this reader owns it alone: a body
/// of several frames was gathered into a buffer of its own. A body that came in one read is
/// a view of hyper's connection buffer, which is shared and cannot be written here.
struct Wipe(bytes::Bytes);

impl Drop for Wipe {
    fn drop(&mut self) {
        if let Ok(mut owned) = std::mem::take(&mut self.0).try_into_mut() {
            zeroize::Zeroize::zeroize(&mut owned[..]);
        }
    }
}

/// What serde found wrong with JSON. The one place that reads serde_json's messages: it
/// names unknown, duplicate and missing fields only in their text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// Not JSON at all (or cut short).
    Syntax,
    UnknownField,
    DuplicateField,
    MissingField,
    /// JSON of the wrong shape: a wrong type, an unknown variant.
    Other,
}

pub(super) fn fault(e: &serde_json::Error) -> Fault {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Fault::Syntax,
        Category::Data => {
            let message = e.to_string();
            if message.starts_with("unknown field") {
                Fault::UnknownField
            } else if message.starts_with("duplicate field") {
                Fault::DuplicateField
            } else if message.starts_with("missing field") {
                Fault::MissingField
            } else {
                Fault::Other
            }
        }
    }
}

/// The value of `name` in a query string (the first, undecoded).
pub(super) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// `?wait=S` of a long poll: 1 to 300 seconds.
pub(super) fn wait_param(query: Option<&str>) -> Result<Option<Duration>> {
    let Some(value) = query_param(query, "wait") else {
        return Ok(None);
    };
    let secs: u64 = value
        .parse()
        .ok()
        .filter(|s| (1..=MAX_WAIT_SECONDS).contains(s))
        .ok_or_else(|| {
            Error::bad_input(
                Code::InvalidWait,
                "wait must be a whole number of seconds from 1 to 300",
            )
        })?;
    Ok(Some(Duration::from_secs(secs)))
}

/// `?since=SEQ` of the audit read: a sequence number, 0 when absent.
pub(super) fn since_param(query: Option<&str>) -> Result<i64> {
    match query_param(query, "since") {
        Some(v) => v.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
            Error::bad_input(Code::InvalidSince, "since must be a sequence number >= 0")
        }),
        None => Ok(0),
    }
}

/// The `If-None-Match` of a long poll.
pub(super) fn if_none_match<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The admin's verification code (`X-Verification-Code`), if any.
pub(super) fn verification_code<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(VERIFICATION_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// The uid named by `X-Verification-Uid` (the enrolled admin whose code vouches for a
/// first enrollment), if the header is there.
pub(super) fn voucher_header<B>(req: &Request<B>) -> Option<&HeaderValue> {
    req.headers().get(VOUCHER_HEADER)
}

/// The uid in an `X-Verification-Uid` header: digits only.
pub(super) fn voucher_uid(value: &HeaderValue) -> Result<u32> {
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::bad_input(
                Code::InvalidVerificationUid,
                "X-Verification-Uid must be the uid (a number) of the enrolled admin whose code X-Verification-Code carries",
            )
        })
}

#[cfg(test)]
mod tests;
