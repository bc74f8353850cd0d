//! Property tests (proptest) of every parser of untrusted input in the daemon:
//!
//! - environment and country names (`KeyId::parse`): `names`;
//! - the SDK record strings (`2:` / `pt:`, `crypto`): `records`;
//! - JSON request bodies, sent over HTTP to a daemon running in this process: the rules
//!   every body shares and u32 numbers (`bodies`), records single and `{"batch": [...]}`
//!   (`record_bodies`), create, rotate, settings and TOTP confirmation (`admin_bodies`);
//! - the `X-Verification-Code` header (over HTTP) and the code the verifier checks: `totp`;
//! - the `wait` and `since` query parameters: `queries`.
//!
//! The daemon (`daemon`) is the real one (`api::serve`, `Keyring`, `Verifier`, SQLite
//! `Store`) with an in-memory AES-GCM HSM and a KMS that accepts everything, on a Unix
//! socket in a temp dir, with a clock that only moves when a test moves it. A handler that
//! panics drops its connection: the client then gets no answer, and the property fails
//! with the input. `json` holds the JSON oracles, `strategies` what several modules draw.
//!
//! Each property says in a comment what it guards. Case counts are modest (256, fewer for
//! the ones that commit state); `PROPTEST_CASES` raises them for a longer run.

mod admin_bodies;
mod bodies;
mod daemon;
mod json;
mod names;
mod queries;
mod record_bodies;
mod records;
mod strategies;
mod totp;
