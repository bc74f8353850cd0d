//! Core behaviour of the real daemon against a fresh SoftHSM token per test:
//!
//! - `keys`: create, show, rotate and restart, with the InCountry SDK; the daily limit;
//! - `access`: the reader and admin roles, by peer credentials;
//! - `input`: the documented answers to bad input;
//! - `integrity`: a tampered wrapped key, a missing root key;
//! - `start`: start failures, a second daemon on the same state, a stale socket,
//!   `check-config`.

mod access;
mod input;
mod integrity;
mod keys;
mod start;

use harness::Secrets;

fn secrets_of(doc: &Secrets) -> Vec<String> {
    doc.keys().into_iter().map(|(_, key)| key).collect()
}

fn assert_no_key_in(text: &str, keys: &[String]) {
    for k in keys {
        assert!(
            !text.contains(k.as_str()),
            "a served key appears in the output"
        );
        let hex = hex::encode(base64_decode(k));
        assert!(
            !text.contains(&hex),
            "a served key appears (hex) in the output"
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
