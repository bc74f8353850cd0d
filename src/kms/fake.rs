//! A KMS for unit tests: each encrypted key gets the answer a test scripts for it (a
//! plaintext, a refusal or no usable answer), and its calls are counted.

// A test double (unit tests, test-clock builds): a broken test setup may panic.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use zeroize::Zeroizing;

use super::{AwsKeyRef, DecryptFuture, KmsDecrypt, KmsError, Rejection};

#[derive(Clone)]
pub enum Answer {
    Plaintext(Vec<u8>),
    Rejected(Rejection),
    Transient(String),
}

#[derive(Default)]
pub struct FakeKms {
    answers: Mutex<HashMap<Vec<u8>, Answer>>,
    calls: Mutex<HashMap<Vec<u8>, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeKms {
    /// From now on, Decrypt of `encrypted_key` answers `answer`.
    pub fn script(&self, encrypted_key: &[u8], answer: Answer) {
        lock(&self.answers).insert(encrypted_key.to_vec(), answer);
    }

    /// Decrypt calls of `encrypted_key` so far.
    pub fn calls(&self, encrypted_key: &[u8]) -> usize {
        lock(&self.calls).get(encrypted_key).copied().unwrap_or(0)
    }
}

impl KmsDecrypt for FakeKms {
    fn decrypt<'a>(&'a self, key: &'a AwsKeyRef) -> DecryptFuture<'a> {
        *lock(&self.calls)
            .entry(key.encrypted_key.clone())
            .or_default() += 1;
        // What KMS says of a ciphertext it never made.
        let answer = lock(&self.answers)
            .get(&key.encrypted_key)
            .cloned()
            .unwrap_or(Answer::Rejected(Rejection::InvalidCiphertext));
        Box::pin(async move {
            match answer {
                Answer::Plaintext(p) => Ok(Zeroizing::new(p)),
                Answer::Rejected(cause) => Err(KmsError::Rejected {
                    cause,
                    detail: format!("scripted refusal of {}", key.cmk_arn),
                }),
                Answer::Transient(msg) => Err(KmsError::Transient(msg)),
            }
        })
    }
}
