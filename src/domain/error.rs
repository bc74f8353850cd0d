//! Errors named by what the caller should do. The HTTP mapping lives in `api::response`.

use std::fmt;

use super::code::Code;

/// Every failure a request or an admin action can meet. Messages are for the caller and the
/// log: they never carry key material, PINs, codes or wrapped blobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fix the input: bad name, bad value, malformed body.
    #[error("{message}")]
    BadInput { code: Code, message: String },
    /// Send (or fix) a verification code.
    #[error("{message}")]
    Unauthorized { code: Code, message: String },
    /// The peer is not allowed to do this.
    #[error("{message}")]
    Forbidden { message: String },
    /// The request body is larger than the server accepts.
    #[error("{message}")]
    TooLarge { message: String },
    /// The request did not arrive in time (`server.request_timeout`): send it faster.
    #[error("{message}")]
    RequestTimeout { message: String },
    /// The key, version or path does not exist.
    #[error("{message}")]
    NotFound { code: Code, message: String },
    /// A limit that does not reset, or a state that forbids the action.
    #[error("{message}")]
    Conflict { code: Code, message: String },
    /// A limit that resets: retry after `retry_after` seconds.
    #[error("{message}")]
    RateLimited {
        code: Code,
        message: String,
        retry_after: u64,
    },
    /// A dependency (HSM, KMS, the state disk) is unavailable: retry after `retry_after`
    /// seconds.
    #[error("{message}")]
    Unavailable {
        code: Code,
        message: String,
        retry_after: u64,
    },
    /// Stored data failed an authenticity check: do not retry, page an operator.
    #[error("{message}")]
    Integrity { message: String },
    /// A bug or an unexpected failure of the machine (disk, database).
    #[error("{message}")]
    Internal { message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `Retry-After` of a 503: long enough for a reconnect or a freed disk, short enough that a
/// client does not wait on a recovered daemon.
pub const RETRY_UNAVAILABLE_SECONDS: u64 = 5;

impl Error {
    pub fn bad_input(code: Code, message: impl fmt::Display) -> Self {
        Error::BadInput {
            code,
            message: message.to_string(),
        }
    }
    pub fn not_found(code: Code, message: impl fmt::Display) -> Self {
        Error::NotFound {
            code,
            message: message.to_string(),
        }
    }
    pub fn conflict(code: Code, message: impl fmt::Display) -> Self {
        Error::Conflict {
            code,
            message: message.to_string(),
        }
    }
    pub fn unavailable(code: Code, message: impl fmt::Display) -> Self {
        Error::Unavailable {
            code,
            message: message.to_string(),
            retry_after: RETRY_UNAVAILABLE_SECONDS,
        }
    }
    pub fn integrity(message: impl fmt::Display) -> Self {
        Error::Integrity {
            message: message.to_string(),
        }
    }
    pub fn internal(message: impl fmt::Display) -> Self {
        Error::Internal {
            message: message.to_string(),
        }
    }
    pub fn forbidden(message: impl fmt::Display) -> Self {
        Error::Forbidden {
            message: message.to_string(),
        }
    }
    pub fn unauthorized(code: Code, message: impl fmt::Display) -> Self {
        Error::Unauthorized {
            code,
            message: message.to_string(),
        }
    }

    /// The stable machine-readable code of the error document.
    pub fn code(&self) -> Code {
        match self {
            Error::BadInput { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::NotFound { code, .. }
            | Error::Conflict { code, .. }
            | Error::RateLimited { code, .. }
            | Error::Unavailable { code, .. } => *code,
            Error::Forbidden { .. } => Code::Forbidden,
            Error::TooLarge { .. } => Code::BodyTooLarge,
            Error::RequestTimeout { .. } => Code::RequestTimeout,
            Error::Integrity { .. } => Code::IntegrityError,
            Error::Internal { .. } => Code::InternalError,
        }
    }
}
