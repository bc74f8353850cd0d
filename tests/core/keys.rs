//! Create, show, rotate and restart, with the InCountry SDK; the daily limit.

use harness::{needs_test_clock, sdk, Daemon, Options};

use crate::{assert_no_key_in, base64_decode, secrets_of};

#[test]
fn create_show_rotate_restart_and_sdk_interop() {
    needs_test_clock!();
    let d = Daemon::start();
    let r = d.create_managed("prod", "de", 30);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 1);
    assert_eq!(r.json()["country"], "DE");

    let show = d.get("/v1/keys/prod/DE").json();
    assert_eq!(show["versions"][0]["status"], "active");
    assert_eq!(show["versions"][0]["type"], "incountry-managed");
    assert_eq!(show["versions"][0]["rotation_period_months"], 1);
    let created = show["versions"][0]["created"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");

    // A record the SDK encrypts under version 1.
    let doc1 = d.secrets("prod", "DE");
    assert_eq!(doc1["currentVersion"], 1);
    let rec1 = sdk(&doc1, &["encrypt", "record under v1"]);
    assert_eq!(rec1["version"], 1);

    // Default limit: the rotation must wait for the next UTC day.
    d.advance(86_400);
    let r = d.rotate("prod", "DE");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 2);
    let show = d.get("/v1/keys/prod/de").json();
    assert_eq!(show["active_version"], 2);
    assert_eq!(show["versions"][0]["status"], "deprecated");
    assert_eq!(show["versions"][1]["status"], "active");
    assert_ne!(
        show["versions"][0]["created"],
        show["versions"][1]["created"]
    );

    let doc2 = d.secrets("prod", "DE");
    assert_eq!(doc2["currentVersion"], 2);
    assert_eq!(doc2["secrets"].as_array().unwrap().len(), 2);
    assert_eq!(secrets_of(&doc2)[0], secrets_of(&doc1)[0]);
    for s in secrets_of(&doc2) {
        assert_eq!(base64_decode(&s).len(), 32);
    }

    // The SDK accepts the document, still decrypts v1 records, and encrypts under v2.
    let back = sdk(
        &doc2,
        &["decrypt", rec1["ciphertext"].as_str().unwrap(), "1"],
    );
    assert_eq!(back["plaintext"], "record under v1");
    let rec2 = sdk(&doc2, &["encrypt", "record under v2"]);
    assert_eq!(rec2["version"], 2);

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
    let back = sdk(
        &doc3,
        &["decrypt", rec2["ciphertext"].as_str().unwrap(), "2"],
    );
    assert_eq!(back["plaintext"], "record under v2");

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
    assert_eq!(r.error_code(), "daily_limit");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("resets at"));
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
    assert_eq!(d.get("/v1/keys/prod/FR").json()["active_version"], 4);
}
