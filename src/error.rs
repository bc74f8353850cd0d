//! Errors named by what the caller should do. The HTTP mapping lives in `api::response`.

use std::fmt;

/// Every failure a request or an admin action can meet. Messages are for the caller and the
/// log: they never carry key material, PINs, codes or wrapped blobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fix the input: bad name, bad value, malformed body.
    #[error("{message}")]
    BadInput { code: &'static str, message: String },
    /// Send (or fix) a verification code.
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    /// The peer is not allowed to do this.
    #[error("{message}")]
    Forbidden { message: String },
    /// The request body is larger than the server accepts.
    #[error("{message}")]
    TooLarge { message: String },
    /// The key, version or path does not exist.
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// A limit that does not reset, or a state that forbids the action.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A limit that resets: retry after `retry_after` seconds.
    #[error("{message}")]
    RateLimited {
        code: &'static str,
        message: String,
        retry_after: u64,
    },
    /// A dependency (HSM, KMS) is unavailable: retry later.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// Stored data failed an authenticity check: do not retry, page an operator.
    #[error("{message}")]
    Integrity { message: String },
    /// A bug or an unexpected failure of the machine (disk, database).
    #[error("{message}")]
    Internal { message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bad_input(code: &'static str, message: impl fmt::Display) -> Self {
        Error::BadInput {
            code,
            message: message.to_string(),
        }
    }
    pub fn not_found(code: &'static str, message: impl fmt::Display) -> Self {
        Error::NotFound {
            code,
            message: message.to_string(),
        }
    }
    pub fn conflict(code: &'static str, message: impl fmt::Display) -> Self {
        Error::Conflict {
            code,
            message: message.to_string(),
        }
    }
    pub fn unavailable(code: &'static str, message: impl fmt::Display) -> Self {
        Error::Unavailable {
            code,
            message: message.to_string(),
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
    pub fn unauthorized(code: &'static str, message: impl fmt::Display) -> Self {
        Error::Unauthorized {
            code,
            message: message.to_string(),
        }
    }

    /// The stable machine-readable code of the error document.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadInput { code, .. }
            | Error::Unauthorized { code, .. }
            | Error::NotFound { code, .. }
            | Error::Conflict { code, .. }
            | Error::RateLimited { code, .. }
            | Error::Unavailable { code, .. } => code,
            Error::Forbidden { .. } => "forbidden",
            Error::TooLarge { .. } => "body_too_large",
            Error::Integrity { .. } => "integrity_error",
            Error::Internal { .. } => "internal_error",
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite messages name tables and constraints, never values: safe to pass on.
        Error::internal(format!("state database: {e}"))
    }
}
