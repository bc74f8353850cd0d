//! Key material in the daemon's memory (issue 11), read the way root can: `/proc/PID/smaps`
//! for the mappings and which of them are locked, `/proc/PID/mem` for their bytes.
//!
//! - `keys`: after the daemon has served a key's secrets document and records, and a
//!   rotation has made the first version old (and again after a restart, keys loaded from
//!   the HSM), each live data key is in memory exactly once, in the keyring's own locked
//!   page, and its base64 form nowhere once the connections are closed;
//! - `totp`: once an enrollment is confirmed, neither the TOTP secret, its base32 nor the
//!   otpauth URI is left in memory, nor after a code is checked.
//!
//! What the scan cannot see (the kernel's socket buffers) is outside the daemon's memory.
//! Reading a non-dumpable daemon's memory needs root (CAP_SYS_PTRACE): without it the tests
//! say they are skipped.

mod aws;
mod keys;
mod scan;
mod totp;
