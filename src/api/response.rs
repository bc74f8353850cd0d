//! Responses: JSON bodies and the one place where errors become HTTP statuses.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::error::Error;

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
pub fn error_doc(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    bytes(status, Bytes::from(body.to_string()))
}

pub fn method_not_allowed(allow: &str) -> Response<Body> {
    let mut resp = error_doc(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
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
