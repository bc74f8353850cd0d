//! Responses: JSON bodies and the one place where errors become HTTP statuses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::domain::error::Error;
use crate::domain::Code;
use crate::proto::{ErrorDocument, ItemError, ItemErrorBody};

pub type Body = Full<Bytes>;

pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::BadInput { .. } => StatusCode::BAD_REQUEST,
        Error::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
        Error::Forbidden { .. } => StatusCode::FORBIDDEN,
        Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::Conflict { .. } => StatusCode::CONFLICT,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Error::Integrity { .. } | Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn error(e: &Error) -> Response<Body> {
    let mut resp = error_doc(status_of(e), e.code(), &e.to_string());
    if let Error::RateLimited { retry_after, .. } | Error::Unavailable { retry_after, .. } = e {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(*retry_after));
    }
    resp
}

/// An error document for failures that happen before a handler runs (HTTP-level).
pub fn error_doc(status: StatusCode, code: Code, message: &str) -> Response<Body> {
    // Strings and a unit enum: encoding cannot fail (and must not recurse into `error`).
    let body = serde_json::to_vec(&ErrorDocument::new(code, message)).unwrap_or_default();
    bytes(status, Bytes::from(body))
}

/// A failed item of a batch: its error with the status it would have had alone.
pub fn item_error(e: &Error) -> ItemError {
    ItemError {
        error: ItemErrorBody {
            code: e.code(),
            message: e.to_string(),
            status: status_of(e).as_u16(),
        },
    }
}

pub fn method_not_allowed(allow: &str) -> Response<Body> {
    let mut resp = error_doc(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::MethodNotAllowed,
        &format!("method not allowed here; allowed: {allow}"),
    );
    if let Ok(v) = HeaderValue::from_str(allow) {
        resp.headers_mut().insert(ALLOW, v);
    }
    resp
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => bytes(status, Bytes::from(body)),
        Err(e) => error(&Error::internal(format!("cannot encode response: {e}"))),
    }
}

/// A JSON body that carries a secret (an enrollment's TOTP secret): encoded into one buffer
/// of exactly its size (measured by a first pass, so it is never reallocated and no partial
/// copy is left behind), which the body owns and zeroizes when hyper has sent it.
pub fn secret_json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut counter = Counter(0);
    if let Err(e) = serde_json::to_writer(&mut counter, value) {
        return error(&Error::internal(format!("cannot encode response: {e}")));
    }
    let mut body = Zeroizing::new(Vec::with_capacity(counter.0));
    match serde_json::to_writer(&mut *body, value) {
        Ok(()) => secret_bytes(status, body),
        Err(e) => error(&Error::internal(format!("cannot encode response: {e}"))),
    }
}

/// A JSON body that carries key availability: it owns the buffer and zeroizes it once the last
/// reference (hyper's, while it writes) is dropped. The connection writes it out vectored
/// (`http1::Builder::writev`), so hyper does not copy it into a buffer of its own.
pub fn secret_bytes(status: StatusCode, body: Zeroizing<Vec<u8>>) -> Response<Body> {
    bytes(status, Bytes::from_owner(body))
}

/// Counts what a serializer writes.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON body that is already encoded.
pub fn bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Responses may carry keys: no cache anywhere may keep them.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
