//! Unit tests of the record work against a snapshot key: each operation, the order of
//! its checks, the per-version tally and the encryption budget.

use super::*;
use crate::domain::{Availability, Initiator, VersionState, VersionType};

fn version(n: u32, byte: u8) -> VersionState {
    VersionState {
        version: n,
        kind: VersionType::Managed,
        created: 0,
        origin: Initiator::Admin,
        availability: Availability::Ready(Arc::new(DataKey::new(&[byte; 32]).unwrap())),
        aws: None,
    }
}

/// p/DE with versions 1 and 2 (active).
fn key() -> KeyState {
    let id = KeyId::parse("p", "DE").unwrap();
    KeyState::new(id, Some(30), 0, version(1, 1)).with_version(version(2, 2), Some(30))
}

fn plenty() -> Budget {
    Budget {
        left: 100,
        limit: 100,
    }
}

fn sealed(ciphertext: &str, version: Option<u32>) -> Sealed {
    Sealed {
        ciphertext: ciphertext.to_string(),
        version,
    }
}

fn code(r: &Result<Recorded>) -> Code {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

#[test]
fn budget_refuses_once_spent() {
    let key = key();
    let mut b = Budget { left: 2, limit: 8 };
    b.take(&key, 3).unwrap();
    b.take(&key, 3).unwrap();
    let e = b.take(&key, 3).unwrap_err();
    assert_eq!(e.code(), Code::EncryptionLimit);
    assert!(matches!(e, Error::Conflict { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("p/DE version 3") && msg.contains("rotate"),
        "{msg}"
    );
}

#[test]
fn encrypts_under_the_active_version_and_decrypts_back() {
    let key = key();
    let (mut tally, mut budget) = (EventCounts::new(), plenty());
    let items = Items::Encrypt(vec![Ok("hello".into()), Ok("world".into())]);
    let out = run(&key, items, 1000, &mut tally, &mut budget);
    let cts: Vec<String> = out
        .into_iter()
        .map(|r| match r {
            Ok(Recorded::Encrypted {
                ciphertext,
                version,
            }) => {
                assert_eq!(version, 2);
                ciphertext
            }
            _ => panic!("expected a record"),
        })
        .collect();
    assert_eq!(budget.left, 98);
    assert_eq!(tally[&(2, RecordEvent::Encrypted)], 2);

    let items = Items::Decrypt(cts.iter().map(|c| Ok(sealed(c, Some(2)))).collect());
    let out = run(&key, items, 1000, &mut tally, &mut budget);
    let texts: Vec<String> = out
        .into_iter()
        .map(|r| match r {
            Ok(Recorded::Decrypted { plaintext }) => plaintext.to_string(),
            _ => panic!("expected a plaintext"),
        })
        .collect();
    assert_eq!(texts, ["hello", "world"]);
    assert_eq!(tally[&(2, RecordEvent::Decrypted)], 2);
    assert_eq!(budget.left, 98, "decryption takes nothing");
}

#[test]
fn each_item_fails_on_its_own() {
    let key = key();
    let (mut tally, mut budget) = (EventCounts::new(), Budget { left: 1, limit: 1 });
    let items = Items::Encrypt(vec![
        Err(Error::bad_input(Code::UnknownField, "unknown field `x`")),
        Ok("x".repeat(21)),
        Ok("fits".into()),
        Ok("no budget left".into()),
    ]);
    let out = run(&key, items, 20, &mut tally, &mut budget);
    assert_eq!(code(&out[0]), Code::UnknownField);
    assert_eq!(code(&out[1]), Code::BodyTooLarge);
    assert!(out[2].is_ok());
    assert_eq!(code(&out[3]), Code::EncryptionLimit);
    assert_eq!(tally.len(), 1);
}

#[test]
fn decrypt_needs_the_version_of_a_sdk_record() {
    let key = key();
    let (mut tally, mut budget) = (EventCounts::new(), plenty());
    let ct = crypto::encrypt(&[1; 32], b"old").unwrap();
    let items = Items::Decrypt(vec![
        Ok(sealed(&ct, None)),
        Ok(sealed(&ct, Some(7))),
        Ok(sealed(&ct, Some(2))),
        Ok(sealed(&ct, Some(1))),
        Ok(sealed("pt:aGk=", None)),
    ]);
    let out = run(&key, items, 1000, &mut tally, &mut budget);
    assert_eq!(code(&out[0]), Code::MissingVersion);
    assert_eq!(code(&out[1]), Code::VersionNotFound);
    assert_eq!(code(&out[2]), Code::DecryptionFailed);
    assert!(
        matches!(&out[3], Ok(Recorded::Decrypted { plaintext }) if plaintext.as_str() == "old")
    );
    assert!(matches!(&out[4], Ok(Recorded::Decrypted { plaintext }) if plaintext.as_str() == "hi"));
    // A `pt:` record has no version to count under.
    assert_eq!(tally.len(), 1);
}

#[test]
fn rewrap_moves_old_records_and_keeps_current_ones() {
    let key = key();
    let (mut tally, mut budget) = (EventCounts::new(), plenty());
    let old = crypto::encrypt(&[1; 32], b"a").unwrap();
    let current = crypto::encrypt(&[2; 32], b"b").unwrap();
    let items = Items::Rewrap(vec![
        Ok(sealed(&old, Some(1))),
        Ok(sealed(&current, Some(2))),
    ]);
    let out = run(&key, items, 1000, &mut tally, &mut budget);
    match &out[0] {
        Ok(Recorded::Rewrapped {
            ciphertext,
            version: 2,
            rewrapped: true,
        }) => assert_eq!(
            crypto::decrypt(&[2; 32], ciphertext).unwrap().as_slice(),
            b"a"
        ),
        _ => panic!("expected a rewrapped record"),
    }
    match &out[1] {
        Ok(Recorded::Rewrapped {
            ciphertext,
            version: 2,
            rewrapped: false,
        }) => assert_eq!(ciphertext, &current),
        _ => panic!("expected the record unchanged"),
    }
    assert_eq!(budget.left, 99, "only the moved record took an encryption");
    assert_eq!(tally[&(2, RecordEvent::Rewrapped)], 1);
    assert_eq!(tally[&(1, RecordEvent::RewrappedAway)], 1);
}

#[test]
fn an_unavailable_active_version_encrypts_nothing() {
    let id = KeyId::parse("p", "DE").unwrap();
    let mut down = version(2, 2);
    down.availability = Availability::Unavailable("integrity check failed".into());
    let key = KeyState::new(id, Some(30), 0, version(1, 1)).with_version(down, Some(30));
    let (mut tally, mut budget) = (EventCounts::new(), plenty());
    let out = run(
        &key,
        Items::Encrypt(vec![Ok("x".into())]),
        1000,
        &mut tally,
        &mut budget,
    );
    assert_eq!(code(&out[0]), Code::ActiveVersionUnavailable);
    let ct = crypto::encrypt(&[1; 32], b"a").unwrap();
    let out = run(
        &key,
        Items::Rewrap(vec![Ok(sealed(&ct, Some(1)))]),
        1000,
        &mut tally,
        &mut budget,
    );
    assert_eq!(code(&out[0]), Code::ActiveVersionUnavailable);
    assert_eq!(budget.left, 100);
}
