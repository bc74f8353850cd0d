//! Create, show, rotate and restart, with the InCountry SDK; the daily limit.

use harness::{needs_test_clock, sdk, Daemon, Options};
use incountry_keyd::domain::{Code, VersionStatus, VersionType};
use incountry_keyd::proto::{Decrypted, Encrypted};

use crate::{assert_no_key_in, base64_decode, secrets_of};

#[test]
fn create_show_rotate_restart_and_sdk_interop() {
    needs_test_clock!();
    let d = Daemon::start();
    let added = d.create_key("prod", "de", 30);
    assert_eq!(added.version, 1);
    assert_eq!(added.country, "DE");

    let show = d.key("prod", "DE");
    assert_eq!(show.versions[0].status, VersionStatus::Active);
    assert_eq!(show.versions[0].kind, VersionType::Managed);
    assert_eq!(show.versions[0].rotation_period_months, Some(1));
    let created = &show.versions[0].created;
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");

    // A record the SDK encrypts under version 1.
    let doc1 = d.secrets("prod", "DE");
    assert_eq!(doc1.current_version, 1);
    let rec1: Encrypted = sdk(&doc1, &["encrypt", "record under v1"]);
    assert_eq!(rec1.version, 1);

    // Default limit: the rotation must wait for the next UTC day.
    d.advance(86_400);
    assert_eq!(d.rotate_key("prod", "DE").version, 2);
    let show = d.key("prod", "de");
    assert_eq!(show.active_version, Some(2));
    assert_eq!(show.versions[0].status, VersionStatus::Deprecated);
    assert_eq!(show.versions[1].status, VersionStatus::Active);
    assert_ne!(show.versions[0].created, show.versions[1].created);

    let doc2 = d.secrets("prod", "DE");
    assert_eq!(doc2.current_version, 2);
    assert_eq!(doc2.secrets.len(), 2);
    assert_eq!(secrets_of(&doc2)[0], secrets_of(&doc1)[0]);
    for s in secrets_of(&doc2) {
        assert_eq!(base64_decode(&s).len(), 32);
    }

    // The SDK accepts the document, still decrypts v1 records, and encrypts under v2.
    let back: Decrypted = sdk(&doc2, &["decrypt", &rec1.ciphertext, "1"]);
    assert_eq!(*back.plaintext, "record under v1");
    let rec2: Encrypted = sdk(&doc2, &["encrypt", "record under v2"]);
    assert_eq!(rec2.version, 2);

    // The CLI shows the portal's table.
    let out = d.cli(&["keys", "show", "prod", "DE"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("VERSION  TYPE               ROTATION PERIOD (MONTHS)  CREATED"),
        "{table}"
    );
    assert!(
        table.contains("deprecated") && table.contains("active"),
        "{table}"
    );

    // Restart: same versions, same key bytes.
    let d = d.restart();
    let doc3 = d.secrets("prod", "DE");
    assert_eq!(doc3, doc2);
    let back: Decrypted = sdk(&doc3, &["decrypt", &rec2.ciphertext, "2"]);
    assert_eq!(*back.plaintext, "record under v2");

    assert_no_key_in(&d.log_text(), &secrets_of(&doc3));
    let pin = std::fs::read_to_string(d.token.pin_file()).unwrap();
    assert!(
        !d.log_text().contains(pin.trim()),
        "the PIN appears in the log"
    );
    let db = std::fs::read(d.state_db()).unwrap();
    for k in secrets_of(&doc3) {
        let raw = base64_decode(&k);
        assert!(
            !db.windows(32).any(|w| w == raw.as_slice()),
            "a data key is in the state file"
        );
    }
}

#[test]
fn daily_limit_default_and_relaxed() {
    needs_test_clock!();
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    let r = d.rotate("prod", "FR");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), Code::DailyLimit);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert!(r.message().contains("resets at"), "{}", r.text());
    drop(d);

    let d = Daemon::start_with(Options {
        versions_per_day: 3,
        ..Options::default()
    });
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    assert_eq!(d.rotate("prod", "FR").status, 201);
    assert_eq!(d.rotate("prod", "FR").status, 201);
    let r = d.rotate("prod", "FR");
    assert_eq!(r.status, 429, "{}", r.text());
    // The next UTC day the limit has reset.
    d.advance(86_400);
    assert_eq!(d.rotate("prod", "FR").status, 201);
    assert_eq!(d.key("prod", "FR").active_version, Some(4));
}
