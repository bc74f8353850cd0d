//! Encryptions per version: counted durably (reserved ahead while running, exact after a
//! clean stop, at most a block ahead after a crash) and limited.

use harness::Daemon;
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Decrypted, Encrypted, Rewrapped};
use serde_json::json;

use crate::{batch, daemon, encrypt_all, ok, op, record, rotate};

/// The stored count of encryptions under `version` of prod/DE.
fn stored_encryptions(d: &Daemon, version: u32) -> u64 {
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.query_row(
        "SELECT encryptions FROM versions WHERE version = ?1 AND key_id = (SELECT id FROM keys WHERE environment = 'prod' AND country = 'DE')",
        [version],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

#[test]
fn encryptions_are_counted_durably_and_limited_per_version() {
    const LIMIT: u64 = 1 << 31;
    const BLOCK: u64 = 1 << 16;
    let mut d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let first: Encrypted = ok(&d, "encrypt", json!({"plaintext": "one"}));
    let first = record(&first.ciphertext, first.version);
    let texts: Vec<String> = (0..5).map(|i| format!("record {i}")).collect();
    encrypt_all(&d, &texts);
    // Reserved ahead in the state while running: never behind what was made.
    let reserved = stored_encryptions(&d, 1);
    assert!((6..=6 + BLOCK).contains(&reserved), "{reserved}");
    assert_eq!(rotate(&d), 2);
    let r: Rewrapped = ok(&d, "rewrap", first.clone());
    assert!(r.rewrapped);
    // A clean stop stores the exact counts.
    assert!(d.stop().success());
    assert_eq!(stored_encryptions(&d, 1), 6);
    assert_eq!(stored_encryptions(&d, 2), 1);

    // A crash: the stored count is ahead of what was made, by at most a block.
    let mut d = d.launch();
    ok::<Encrypted>(&d, "encrypt", json!({"plaintext": "two"}));
    d.signal("KILL");
    d.stop();
    let after_crash = stored_encryptions(&d, 2);
    assert!((2..=2 + BLOCK).contains(&after_crash), "{after_crash}");

    // Near the limit (as a long-lived version would be): the last ones, then 409.
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.execute(
        "UPDATE versions SET encryptions = ?1 WHERE version = 2",
        [(LIMIT - 2) as i64],
    )
    .unwrap();
    drop(db);
    let d = d.launch();
    let items = vec![json!({"plaintext": "a"}); 3];
    let results = batch::<Encrypted>(&d, "encrypt", items);
    assert_eq!(results[0].as_ref().map(|e| e.version), Ok(2), "{results:?}");
    assert_eq!(results[1].as_ref().map(|e| e.version), Ok(2), "{results:?}");
    let refused = results[2].as_ref().unwrap_err();
    assert_eq!(
        (refused.code, refused.status),
        (Code::EncryptionLimit, 409),
        "{results:?}"
    );
    let r = op(&d, "encrypt", json!({"plaintext": "b"}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.code(), Code::EncryptionLimit);
    let msg = r.message();
    assert!(
        msg.contains("prod/DE version 2") && msg.contains("rotate"),
        "{msg}"
    );
    // Rewrap into the spent version is refused too; decryption goes on.
    let r = op(&d, "rewrap", first.clone());
    assert_eq!(r.status, 409, "{}", r.text());
    let a = results[0].as_ref().unwrap();
    let back: Decrypted = ok(&d, "decrypt", record(&a.ciphertext, a.version));
    assert_eq!(*back.plaintext, "a");
    // A new version encrypts again.
    assert_eq!(rotate(&d), 3);
    let r: Encrypted = ok(&d, "encrypt", json!({"plaintext": "c"}));
    assert_eq!(r.version, 3);
    let mut d = d;
    assert!(d.stop().success());
    assert_eq!(stored_encryptions(&d, 2), LIMIT);
    assert_eq!(stored_encryptions(&d, 3), 1);
}
