//! HTTP to the daemon through the crate's own client (`cli::client::Client`), one request per
//! connection, for synchronous tests. Every request of the tests goes through
//! `try_request`; answers are read through the wire protocol's types (`Reply::ok`,
//! `Reply::read`, `Reply::error`), or as `serde_json::Value` (`Reply::json`) by the tests
//! that look at a document's raw shape on purpose.

use std::path::Path;
use std::time::Duration;

use incountry_keyd::cli::client::{self, Client};
use incountry_keyd::domain::Code;
use incountry_keyd::proto::ErrorDocument;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long `request` waits for an answer (long polls wait up to 300 s).
pub const TIMEOUT: Duration = Duration::from_secs(330);

/// An answer: status, headers and the whole body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON; fails the test when it is not.
    pub fn json(&self) -> Value {
        self.try_json().unwrap_or_else(|| {
            panic!(
                "status {} body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as a wire type (`proto::KeyDocument`, `proto::Encrypted`, ...); fails the
    /// test, showing the status and body, when it does not read as one.
    pub fn read<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body does not read as {}: {e}: {}",
                self.status,
                std::any::type_name::<T>(),
                self.text()
            )
        })
    }

    /// Asserts the status; returns the body as a wire type (`Value` for a raw look).
    pub fn ok<T: DeserializeOwned>(&self, status: u16) -> T {
        self.assert_status(status);
        self.read()
    }

    /// Asserts the status, showing the body when it differs.
    pub fn assert_status(&self, status: u16) -> &Reply {
        assert_eq!(self.status, status, "{}", self.text());
        self
    }

    /// The error document; fails the test when the body is not one.
    pub fn error(&self) -> ErrorDocument {
        self.read()
    }

    /// The error document, when the body is one.
    pub fn try_error(&self) -> Option<ErrorDocument> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `error.code` of the error document; fails the test when the body is not one.
    pub fn code(&self) -> Code {
        self.error().error.code
    }

    /// `error.code`, when the body is an error document (for property tests, which report
    /// a mismatch rather than panic).
    pub fn error_code(&self) -> Option<Code> {
        self.try_error().map(|e| e.error.code)
    }

    /// `error.message` of the error document; fails the test when the body is not one.
    pub fn message(&self) -> String {
        self.error().error.message
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl From<client::Reply> for Reply {
    fn from(r: client::Reply) -> Reply {
        Reply {
            status: r.status.as_u16(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: r.body.to_vec(),
        }
    }
}

/// One request on a fresh connection; fails the test when no whole answer comes within
/// `TIMEOUT`. A GET with an empty `body` sends none; anything else sends `body` as JSON.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_request(socket, method, path, headers, body, TIMEOUT)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request on a fresh connection: `Err` when the connection fails, the answer is
/// incomplete, or none comes within `timeout`.
pub fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Reply, String> {
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let body = (method != hyper::Method::GET || !body.is_empty()).then(|| body.to_vec());
    let run = || {
        // A runtime per request: when it is dropped, so is the connection.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        runtime.block_on(async {
            let client = Client::new(socket);
            match tokio::time::timeout(
                timeout,
                client.request(method.clone(), path, headers, body.clone()),
            )
            .await
            {
                Err(_) => Err(format!("no answer within {timeout:?}")),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Ok(Ok(reply)) => Ok(Reply::from(reply)),
            }
        })
    };
    let answer = if tokio::runtime::Handle::try_current().is_ok() {
        // Called from async code: a runtime cannot block inside another.
        std::thread::scope(|s| s.spawn(run).join().expect("request thread"))
    } else {
        run()
    };
    match answer {
        // The daemon answers a body over its limit at once (413) and closes; hyper's client
        // then reports the failed write, not the answer waiting on the socket. Read it raw.
        Err(e) if e.contains("error writing a body") => {
            let mut raw = format!(
                "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.as_ref().map_or(0, Vec::len)
            );
            for (name, value) in headers {
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            raw.push_str("\r\n");
            let mut bytes = raw.into_bytes();
            bytes.extend_from_slice(body.as_deref().unwrap_or_default());
            // No daemon to ask again (killed by the test): the failed write is the answer.
            let raw = crate::raw::try_exchange(socket, &bytes, timeout)
                .map_err(|c| format!("{e}; read raw: connect: {c}"))?;
            crate::raw::parse(&raw).map_err(|p| format!("{e}; read raw: {p}"))
        }
        other => other,
    }
}
