//! Records both ways between the daemon and the InCountry SDK: under the active and a
//! deprecated version, rewrapped, and unencrypted (`pt:`).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use incountry_keyd::proto::{Decrypted, Encrypted, Rewrapped};
use serde_json::json;

use crate::{daemon, ok, record, rotate, sdk_batch, SdkResult};

#[test]
fn sdk_interop_active_deprecated_and_rewrap() {
    let d = daemon();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let doc1 = d.secrets("prod", "DE");

    // Daemon and SDK records under version 1, which then becomes deprecated.
    let text_d1 = "daemon v1: Grüße, 東京 ✓";
    let d1: Encrypted = ok(&d, "encrypt", json!({ "plaintext": text_d1 }));
    assert_eq!(d1.version, 1);
    assert!(d1.ciphertext.starts_with("2:"));
    let s1 = sdk_batch(&doc1, &[json!(["encrypt", "sdk v1"])])[0]
        .encrypted()
        .clone();
    assert_eq!(s1.version, 1);

    assert_eq!(rotate(&d), 2);
    let doc2 = d.secrets("prod", "DE");
    let d2: Encrypted = ok(&d, "encrypt", json!({"plaintext": "daemon v2"}));
    assert_eq!(d2.version, 2);

    // The daemon decrypts the SDK's deprecated-version record.
    let r: Decrypted = ok(&d, "decrypt", record(&s1.ciphertext, 1));
    assert_eq!(*r.plaintext, "sdk v1");

    // Rewrap: a deprecated SDK record and a deprecated daemon record move to version 2; an
    // active one comes back unchanged; an unencrypted SDK record gets encrypted.
    let rw_s1: Rewrapped = ok(&d, "rewrap", record(&s1.ciphertext, 1));
    assert_eq!(rw_s1.version, 2);
    assert!(rw_s1.rewrapped);
    assert_ne!(rw_s1.ciphertext, s1.ciphertext);
    let rw_d1: Rewrapped = ok(&d, "rewrap", record(&d1.ciphertext, d1.version));
    assert_eq!(rw_d1.version, 2);
    let same: Rewrapped = ok(&d, "rewrap", record(&d2.ciphertext, d2.version));
    assert!(!same.rewrapped);
    assert_eq!(same.ciphertext, d2.ciphertext);
    let pt = format!("pt:{}", STANDARD.encode("plain record"));
    let r: Decrypted = ok(&d, "decrypt", json!({ "ciphertext": pt }));
    assert_eq!(*r.plaintext, "plain record");
    let rw_pt: Rewrapped = ok(&d, "rewrap", json!({"ciphertext": pt, "version": 0}));
    assert_eq!(rw_pt.version, 2);
    assert!(rw_pt.ciphertext.starts_with("2:"));

    // The SDK, with the current secrets document: decrypts the daemon's records under the
    // deprecated and the active version and the rewrapped ones with the new version, and
    // encrypts one under the active version.
    let res = sdk_batch(
        &doc2,
        &[
            json!(["encrypt", "sdk v2"]),
            json!(["decrypt", d1.ciphertext, 1]),
            json!(["decrypt", d2.ciphertext, 2]),
            json!(["decrypt", rw_s1.ciphertext, 2]),
            json!(["decrypt", rw_d1.ciphertext, 2]),
            json!(["decrypt", rw_pt.ciphertext, 2]),
            // And it refuses the rewrapped record under the old version.
            json!(["decrypt", rw_s1.ciphertext, 1]),
        ],
    );
    assert_eq!(res[0].encrypted().version, 2);
    assert_eq!(res[1].plaintext(), text_d1);
    assert_eq!(res[2].plaintext(), "daemon v2");
    assert_eq!(res[3].plaintext(), "sdk v1");
    assert_eq!(res[4].plaintext(), text_d1);
    assert_eq!(res[5].plaintext(), "plain record");
    assert!(
        matches!(res[6], SdkResult::Refused { .. }),
        "{}",
        res[6].describe()
    );
    // The daemon decrypts the SDK's active-version record.
    let r: Decrypted = ok(&d, "decrypt", record(&res[0].encrypted().ciphertext, 2));
    assert_eq!(*r.plaintext, "sdk v2");

    // Counters per version, since start.
    let v1 = d.version("prod", "DE", 1);
    let v2 = d.version("prod", "DE", 2);
    assert_eq!(v1.records_encrypted, 1);
    assert_eq!(v1.records_rewrapped_away, 2);
    assert_eq!(v1.records_decrypted, 1);
    assert_eq!(v2.records_encrypted, 1);
    assert_eq!(v2.records_rewrapped, 3);
    assert_eq!(v2.records_decrypted, 1);
    // Nothing of the records reached the log.
    let log = d.log_text();
    for secret in [text_d1, "sdk v1", "plain record", "daemon v2"] {
        assert!(!log.contains(secret), "plaintext in the daemon log");
    }
}
