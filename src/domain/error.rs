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
    /// The request did not arrive in time (`server.request_timeout`): send it faster.
    #[error("{message}")]
    RequestTimeout { message: String },
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
    /// A dependency (HSM, KMS, the state disk) is unavailable: retry after `retry_after`
    /// seconds.
    #[error("{message}")]
    Unavailable {
        code: &'static str,
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
            Error::RequestTimeout { .. } => "request_timeout",
            Error::Integrity { .. } => "integrity_error",
            Error::Internal { .. } => "internal_error",
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // SQLite messages name tables and constraints, never values: safe to pass on.
        if state_unavailable(&e) {
            Error::unavailable("state_unavailable", format!("state database: {e}"))
        } else {
            Error::internal(format!("state database: {e}"))
        }
    }
}

/// Failures of the disk or of the database's access to it (full, I/O error, read-only,
/// locked): they pass when the disk does, so the caller should retry, not report a bug.
pub fn state_unavailable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | SystemIoFailure
                | ReadOnly
                | DatabaseBusy
                | DatabaseLocked
                | CannotOpen
                | OutOfMemory
                | FileLockingProtocolFailed
        )
    )
}
