//! The JSON body reader: size limit, body deadline, objects only, serde errors as 400 codes.

use crate::domain::Code;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::Request;
use serde::de::DeserializeOwned;

use crate::api::App;
use crate::domain::error::{Error, Result};

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
    let deadline = req.extensions().get::<super::BodyDeadline>().map(|d| d.0);
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
    match body.0.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(None),
        // serde's derived structs also read a positional array of their fields: the
        // contract's bodies are objects, named field by field.
        Some(b'{') => {}
        Some(_)
            if std::str::from_utf8(&body.0).is_err()
                || serde_json::from_slice::<serde::de::IgnoredAny>(&body.0).is_err() =>
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
    serde_json::from_slice(&body.0)
        .map(Some)
        .map_err(json_error)
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

fn json_error(e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Error::bad_input(
            Code::MalformedJson,
            format!("request body is not valid JSON: {e}"),
        ),
        Category::Data if e.to_string().starts_with("unknown field") => {
            Error::bad_input(Code::UnknownField, e)
        }
        // A key twice in one object: serde's typed bodies and `records::RecordsBody`.
        Category::Data if e.to_string().starts_with("duplicate field") => {
            Error::bad_input(Code::DuplicateField, e)
        }
        Category::Data => Error::bad_input(Code::InvalidRequest, e),
    }
}
