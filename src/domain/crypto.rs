//! The InCountry SDK record format: `"2:" + base64(salt[64] ‖ iv[12] ‖ ciphertext ‖ tag[16])`,
//! AES-256-GCM without AAD under the raw 32-byte data key (the salt is random and unused, as
//! in the SDKs with `isKey: true`). Decryption also accepts the SDK's unencrypted
//! `"pt:" + base64(plaintext)` records; they are never emitted.
//!
//! Every way a record can fail to decrypt (bad base64, too short, altered, another key) gives
//! the same error: nothing in it tells an attacker where or why.
//!
//! The cipher's key schedule (which begins with the raw key) is wiped when it is dropped
//! (`aes`'s `zeroize` feature); the copies its moves leave in finished stack frames are
//! overwritten by the caller once its records are done (`keyring::clear_stack`).

use crate::domain::Code;
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{AeadInPlace, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::domain::error::{Error, Result};
use crate::domain::DATA_KEY_LEN;

pub const SALT_LEN: usize = 64;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a record adds to its plaintext before base64.
pub const OVERHEAD: usize = SALT_LEN + IV_LEN + TAG_LEN;

/// Prefix of the SDK's AES-GCM records: the only format this daemon emits.
pub const SDK_PREFIX: &str = "2:";
/// Prefix of the SDK's unencrypted records (base64 of the plaintext).
pub const PLAIN_PREFIX: &str = "pt:";

/// The formats `decrypt` accepts, as an error message says them.
pub const ACCEPTED_FORMATS: &str =
    "ciphertext must be an InCountry SDK record: \"2:\" + base64 (AES-256-GCM) or \"pt:\" + base64 (unencrypted)";

/// What a record string holds, judged by its prefix alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2:`: encrypted under a key version.
    Sdk,
    /// `pt:`: not encrypted.
    Plain,
}

/// The format of a record string, or a 400 naming the accepted formats.
pub fn format_of(record: &str) -> Result<Format> {
    if record.starts_with(SDK_PREFIX) {
        Ok(Format::Sdk)
    } else if record.starts_with(PLAIN_PREFIX) {
        Ok(Format::Plain)
    } else {
        Err(Error::bad_input(Code::UnsupportedFormat, ACCEPTED_FORMATS))
    }
}

/// The one error of every record that does not decrypt.
pub fn decryption_failed() -> Error {
    Error::bad_input(
        Code::DecryptionFailed,
        "the record cannot be decrypted: it is malformed, altered, or not encrypted under this key version",
    )
}

/// Encrypts `plaintext` under `key` with a fresh random salt and IV from the OS RNG.
pub fn encrypt(key: &[u8; DATA_KEY_LEN], plaintext: &[u8]) -> Result<String> {
    let mut salt = [0u8; SALT_LEN];
    let mut iv = [0u8; IV_LEN];
    OsRng
        .try_fill_bytes(&mut salt)
        .and_then(|()| OsRng.try_fill_bytes(&mut iv))
        .map_err(|_| Error::internal("the OS random number generator failed"))?;
    seal(key, &salt, &iv, plaintext)
}

/// Test-only seam: encryption with a given salt and IV, for known answers.
#[cfg(test)]
pub fn encrypt_with(
    key: &[u8; DATA_KEY_LEN],
    salt: &[u8; SALT_LEN],
    iv: &[u8; IV_LEN],
    plaintext: &[u8],
) -> Result<String> {
    seal(key, salt, iv, plaintext)
}

fn seal(
    key: &[u8; DATA_KEY_LEN],
    salt: &[u8; SALT_LEN],
    iv: &[u8; IV_LEN],
    plaintext: &[u8],
) -> Result<String> {
    let cipher = Aes256Gcm::new(key.into());
    // salt ‖ iv ‖ plaintext, encrypted in place, then the tag.
    let mut blob = Zeroizing::new(Vec::with_capacity(OVERHEAD + plaintext.len()));
    blob.extend_from_slice(salt);
    blob.extend_from_slice(iv);
    blob.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(iv), b"", &mut blob[SALT_LEN + IV_LEN..])
        .map_err(|_| Error::bad_input(Code::PlaintextTooLarge, "the plaintext is too large"))?;
    blob.extend_from_slice(&tag);
    let mut out = String::with_capacity(SDK_PREFIX.len() + blob.len().div_ceil(3) * 4);
    out.push_str(SDK_PREFIX);
    STANDARD.encode_string(&blob[..], &mut out);
    Ok(out)
}

/// Decrypts a `2:` record under `key`. A `pt:` record needs no key: see [`open_plain`].
pub fn decrypt(key: &[u8; DATA_KEY_LEN], record: &str) -> Result<Zeroizing<Vec<u8>>> {
    let packed = record
        .strip_prefix(SDK_PREFIX)
        .ok_or_else(|| match format_of(record) {
            Ok(_) => decryption_failed(),
            Err(e) => e,
        })?;
    let mut blob = Zeroizing::new(STANDARD.decode(packed).map_err(|_| decryption_failed())?);
    if blob.len() < OVERHEAD {
        return Err(decryption_failed());
    }
    let tag_at = blob.len() - TAG_LEN;
    let tag = *Tag::from_slice(&blob[tag_at..]);
    let iv = *Nonce::from_slice(&blob[SALT_LEN..SALT_LEN + IV_LEN]);
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt_in_place_detached(&iv, b"", &mut blob[SALT_LEN + IV_LEN..tag_at], &tag)
        .map_err(|_| decryption_failed())?;
    Ok(Zeroizing::new(blob[SALT_LEN + IV_LEN..tag_at].to_vec()))
}

/// The plaintext of a `pt:` record.
pub fn open_plain(record: &str) -> Result<Zeroizing<Vec<u8>>> {
    let packed = record
        .strip_prefix(PLAIN_PREFIX)
        .ok_or_else(|| Error::bad_input(Code::UnsupportedFormat, ACCEPTED_FORMATS))?;
    STANDARD
        .decode(packed)
        .map(Zeroizing::new)
        .map_err(|_| decryption_failed())
}

/// Decrypted bytes as text: the SDKs only encrypt UTF-8 strings.
pub fn into_text(bytes: Zeroizing<Vec<u8>>) -> Result<Zeroizing<String>> {
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(Error::bad_input(
            Code::PlaintextNotText,
            "the record decrypts to bytes that are not UTF-8 text, which the InCountry SDKs never encrypt",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        // A copy of ../shared/vectors/sdk-format.json, kept in the repo.
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/sdk-format.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn raw_key(v: &serde_json::Value) -> [u8; 32] {
        STANDARD
            .decode(v["raw_key"]["key_b64"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    }

    #[test]
    fn known_answer_decrypts() {
        let v = vectors();
        let key = raw_key(&v);
        let ct = v["raw_key"]["ciphertext"].as_str().unwrap();
        let plain = decrypt(&key, ct).unwrap();
        assert_eq!(
            &plain[..],
            v["raw_key"]["plaintext"].as_str().unwrap().as_bytes()
        );
        assert_eq!(&plain[..], b"InCountry");
    }

    #[test]
    fn known_answer_encrypts_byte_for_byte() {
        let v = vectors();
        let key = raw_key(&v);
        let salt: [u8; SALT_LEN] = hex::decode(v["raw_key"]["salt_hex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let iv: [u8; IV_LEN] = hex::decode(v["raw_key"]["iv_hex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let plaintext = v["raw_key"]["plaintext"].as_str().unwrap();
        let ct = encrypt_with(&key, &salt, &iv, plaintext.as_bytes()).unwrap();
        assert_eq!(ct, v["raw_key"]["ciphertext"].as_str().unwrap());
    }

    #[test]
    fn fresh_salt_and_iv_per_record() {
        let key = [9u8; 32];
        let a = encrypt(&key, b"same").unwrap();
        let b = encrypt(&key, b"same").unwrap();
        assert_ne!(a, b);
        let (da, db) = (
            STANDARD.decode(&a[2..]).unwrap(),
            STANDARD.decode(&b[2..]).unwrap(),
        );
        assert_ne!(da[..SALT_LEN], db[..SALT_LEN]);
        assert_ne!(
            da[SALT_LEN..SALT_LEN + IV_LEN],
            db[SALT_LEN..SALT_LEN + IV_LEN]
        );
        assert_eq!(&decrypt(&key, &a).unwrap()[..], b"same");
        assert_eq!(da.len(), OVERHEAD + 4);
        // The empty string is a record too.
        let e = encrypt(&key, b"").unwrap();
        assert_eq!(&decrypt(&key, &e).unwrap()[..], b"");
    }

    #[test]
    fn failures_are_one_error() {
        let key = [1u8; 32];
        let ct = encrypt(&key, b"secret record").unwrap();
        let blob = STANDARD.decode(&ct[2..]).unwrap();
        let mut failures = Vec::new();
        // Every bit outside the (unused, unauthenticated) salt.
        for byte in SALT_LEN..blob.len() {
            for bit in 0..8 {
                let mut b = blob.clone();
                b[byte] ^= 1 << bit;
                failures.push(format!("2:{}", STANDARD.encode(&b)));
            }
        }
        failures.push(ct[..ct.len() - 4].to_string()); // truncated base64
        failures.push(format!("2:{}", STANDARD.encode(&blob[..OVERHEAD - 1])));
        failures.push("2:".to_string());
        failures.push("2:!!!!".to_string());
        for f in &failures {
            let e = decrypt(&key, f).unwrap_err();
            assert_eq!(e.code(), Code::DecryptionFailed);
            assert_eq!(e.to_string(), decryption_failed().to_string());
        }
        // Another key.
        assert_eq!(
            decrypt(&[2u8; 32], &ct).unwrap_err().code(),
            Code::DecryptionFailed
        );
        // A flipped salt bit changes nothing: the salt is unused with raw keys (as in the SDK).
        let mut b = blob.clone();
        b[0] ^= 1;
        assert_eq!(
            &decrypt(&key, &format!("2:{}", STANDARD.encode(&b))).unwrap()[..],
            b"secret record"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(format_of("2:abc").unwrap(), Format::Sdk);
        assert_eq!(format_of("pt:abc").unwrap(), Format::Plain);
        for bad in ["", "1:00", "3:abc", "c1:abc", "PT:abc", "2", "abc"] {
            let e = format_of(bad).unwrap_err();
            assert_eq!(e.code(), crate::domain::Code::UnsupportedFormat, "{bad}");
            assert!(e.to_string().contains("\"2:\"") && e.to_string().contains("\"pt:\""));
            assert_eq!(
                decrypt(&[0u8; 32], bad).unwrap_err().code(),
                crate::domain::Code::UnsupportedFormat
            );
        }
        assert_eq!(&open_plain("pt:SW5Db3VudHJ5").unwrap()[..], b"InCountry");
        assert_eq!(
            open_plain("pt:%%").unwrap_err().code(),
            crate::domain::Code::DecryptionFailed
        );
        assert_eq!(
            into_text(Zeroizing::new(vec![0xff])).unwrap_err().code(),
            crate::domain::Code::PlaintextNotText
        );
    }
}
