//! The wire protocol: what requests carry and answers hold, shared by the server, the CLI
//! and the tests.

/// Header that carries an admin's verification code (TOTP).
pub const VERIFICATION_HEADER: &str = "x-verification-code";

/// Header naming the uid whose code vouches for a `root` request (see `api::admin`).
pub const VOUCHER_HEADER: &str = "x-verification-uid";
