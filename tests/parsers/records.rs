//! The SDK record strings (`2:` / `pt:`) and their crypto: `format_of`, `decrypt`,
//! `open_plain`, `encrypt`, `into_text`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use incountry_keyd::domain::crypto::{self, Format, OVERHEAD, SALT_LEN};
use incountry_keyd::domain::error::Error;

use crate::strategies::{arb_record, config, is_bad_input};

/// The one 400 of a record that is not `2:` or `pt:`.
fn is_unsupported(e: &Error) -> bool {
    is_bad_input(e, "unsupported_format")
}

/// The one 400 of a record that does not decrypt, with its one message.
fn is_decryption_failed(e: &Error) -> bool {
    is_bad_input(e, "decryption_failed") && e.to_string() == crypto::decryption_failed().to_string()
}

proptest! {
    #![proptest_config(config(256))]

    /// Guards `decrypt`, `format_of` and `open_plain` on arbitrary strings: no panic, and
    /// every refusal is one of the two documented errors — `unsupported_format` exactly when
    /// the string starts with neither "2:" nor "pt:", otherwise the one `decryption_failed`
    /// with its one message (nothing that says where or why). A random "2:" string never
    /// decrypts (the GCM tag). Fails if a new error code, a cause in the message, or a
    /// panic on short or odd input (slicing before the length check) appears.
    #[test]
    fn record_strings_fail_with_one_error(key in any::<[u8; 32]>(), record in arb_record()) {
        let prefixed = record.starts_with("2:") || record.starts_with("pt:");
        match crypto::format_of(&record) {
            Ok(Format::Sdk) => prop_assert!(record.starts_with("2:")),
            Ok(Format::Plain) => prop_assert!(record.starts_with("pt:")),
            Err(e) => {
                prop_assert!(!prefixed);
                prop_assert!(is_unsupported(&e), "{}", e.code());
            }
        }
        let e = crypto::decrypt(&key, &record).expect_err("a random record decrypted");
        if prefixed {
            prop_assert!(is_decryption_failed(&e), "{}: {}", e.code(), e);
        } else {
            prop_assert!(is_unsupported(&e), "{}", e.code());
        }
        match crypto::open_plain(&record) {
            Ok(bytes) => {
                // Only a "pt:" record with valid base64 opens, to exactly its bytes.
                let b64 = record.strip_prefix("pt:");
                prop_assert!(b64.is_some());
                prop_assert_eq!(&bytes[..], &STANDARD.decode(b64.unwrap()).unwrap()[..]);
            }
            Err(e) if record.starts_with("pt:") => prop_assert!(is_decryption_failed(&e)),
            Err(e) => prop_assert!(is_unsupported(&e), "{}", e.code()),
        }
    }

    /// Guards the encrypt → decrypt round trip for any key and any bytes (including empty
    /// and non-UTF-8): the record is "2:" + canonical base64 of exactly OVERHEAD + n bytes,
    /// decrypts to the same bytes, and `into_text` gives them back as text exactly when they
    /// are UTF-8. Fails on any framing change (salt, IV or tag length or position).
    #[test]
    fn records_round_trip(key in any::<[u8; 32]>(), plain in prop::collection::vec(any::<u8>(), 0..600)) {
        let record = crypto::encrypt(&key, &plain).unwrap();
        let b64 = record.strip_prefix("2:").expect("emitted records are 2:");
        let blob = STANDARD.decode(b64).unwrap();
        prop_assert_eq!(blob.len(), OVERHEAD + plain.len());
        prop_assert_eq!(STANDARD.encode(&blob), b64);
        let back = crypto::decrypt(&key, &record).unwrap();
        prop_assert_eq!(&back[..], &plain[..]);
        match (crypto::into_text(back), std::str::from_utf8(&plain)) {
            (Ok(text), Ok(s)) => prop_assert_eq!(text.as_str(), s),
            (Err(e), Err(_)) => prop_assert!(is_bad_input(&e, "plaintext_not_text")),
            (got, want) => {
                return Err(TestCaseError::fail(format!(
                    "into_text ok: {} but UTF-8: {}",
                    got.is_ok(),
                    want.is_ok()
                )))
            }
        }
    }

    /// Guards the "any altered bit is refused" promise: one bit flipped anywhere in the IV,
    /// ciphertext or tag gives the one `decryption_failed`; a flip in the salt (unused and
    /// unauthenticated, as in the SDKs) changes nothing. Fails if the tag stops covering a
    /// byte (e.g. a tag check over a shorter range, or the IV read from the wrong place).
    #[test]
    fn any_flipped_bit_is_refused(
        key in any::<[u8; 32]>(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let record = crypto::encrypt(&key, &plain).unwrap();
        let mut blob = STANDARD.decode(&record[2..]).unwrap();
        let i = at.index(blob.len());
        blob[i] ^= 1 << bit;
        let altered = format!("2:{}", STANDARD.encode(&blob));
        if i < SALT_LEN {
            prop_assert_eq!(&crypto::decrypt(&key, &altered).unwrap()[..], &plain[..]);
        } else {
            let e = crypto::decrypt(&key, &altered).expect_err("altered record decrypted");
            prop_assert!(is_decryption_failed(&e), "byte {} bit {}: {}", i, bit, e);
        }
    }

    /// Guards against records that decrypt after a change of length or of key: any blob
    /// cut short or lengthened, and any other key, gives the one `decryption_failed`.
    #[test]
    fn resized_or_rekeyed_records_are_refused(
        key in any::<[u8; 32]>(),
        other in any::<[u8; 32]>(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..20),
    ) {
        let record = crypto::encrypt(&key, &plain).unwrap();
        let blob = STANDARD.decode(&record[2..]).unwrap();
        let shorter = format!("2:{}", STANDARD.encode(&blob[..cut.index(blob.len())]));
        let longer = format!("2:{}", STANDARD.encode([&blob[..], &extra[..]].concat()));
        for r in [&shorter, &longer] {
            let e = crypto::decrypt(&key, r).expect_err("resized record decrypted");
            prop_assert!(is_decryption_failed(&e));
        }
        if other != key {
            prop_assert!(is_decryption_failed(&crypto::decrypt(&other, &record).unwrap_err()));
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Guards "truncated / bad base64 is refused" on the record string itself, not only on
    /// the decoded blob: every proper prefix of a record (the '=' padding dropped, a
    /// character short, the bare prefix) is refused with one of the two errors and never
    /// decrypts. Fails if base64 decoding turns lenient (padding optional, trailing bits
    /// ignored) or a short string slips past the length check.
    #[test]
    fn truncated_record_strings_are_refused(
        key in any::<[u8; 32]>(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let record = crypto::encrypt(&key, &plain).unwrap();
        let prefix = &record[..cut.index(record.len())];
        let e = crypto::decrypt(&key, prefix).expect_err("truncated record decrypted");
        prop_assert!(is_decryption_failed(&e) || (is_unsupported(&e) && prefix.len() < 2), "{:?}", prefix);
        let unpadded = record.trim_end_matches('=');
        if unpadded != record {
            prop_assert!(is_decryption_failed(&crypto::decrypt(&key, unpadded).unwrap_err()));
        }
    }

    /// Guards the record string against one changed base64 character: the result is refused
    /// with `decryption_failed`, unless the change only touches salt bits (the salt is the
    /// first 64 bytes, unused and unauthenticated), where it decrypts to the same plaintext.
    /// Fails if a non-canonical encoding of the same bytes (changed unused trailing bits, a
    /// padding character changed) is accepted, or a bit after the salt goes unauthenticated.
    #[test]
    fn any_changed_base64_character_is_refused(
        key in any::<[u8; 32]>(),
        plain in prop::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
        to in prop::sample::select(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ ".to_vec()
        ),
    ) {
        let record = crypto::encrypt(&key, &plain).unwrap();
        let mut bytes = record.clone().into_bytes();
        let i = 2 + at.index(bytes.len() - 2);
        let from = bytes[i];
        prop_assume!(from != to);
        bytes[i] = to;
        let altered = String::from_utf8(bytes).unwrap();
        // Base64 character k carries bits 6k..6k+5 of the blob (most significant first); the
        // salt is bits 0..511. Which bits the change flips, from the alphabet alone:
        let sextet = |c: u8| match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        };
        let k = i - 2;
        let salt_only = match (sextet(from), sextet(to)) {
            (Some(a), Some(b)) => (0..6)
                .filter(|j| (a ^ b) & (1 << j) != 0)
                .all(|j| 6 * k + (5 - j) < SALT_LEN * 8),
            _ => false,
        };
        if salt_only {
            prop_assert_eq!(&crypto::decrypt(&key, &altered).unwrap()[..], &plain[..]);
        } else {
            let e = crypto::decrypt(&key, &altered).expect_err("altered record decrypted");
            prop_assert!(is_decryption_failed(&e), "char {} to {:?}: {}", i, to as char, e);
        }
    }
}
