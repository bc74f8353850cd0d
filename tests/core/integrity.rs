//! A wrapped key with a flipped bit, and a state whose root key the token lacks.

use std::process::Command;

use harness::{needs_test_clock, Daemon, Options};
use incountry_keyd::domain::{Code, VersionStatus};
use incountry_keyd::proto::HealthStatus;

use crate::{assert_no_key_in, secrets_of};

#[test]
fn tampered_blob_and_missing_root_key() {
    needs_test_clock!();
    let d = Daemon::start_with(Options {
        versions_per_day: 5,
        ..Options::default()
    });
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    // The token as it is before prod/US has a root key (for the end of this test).
    let mut d = d;
    assert!(d.stop().success());
    let tokens = d.token.dir.join("tokens");
    let before_us = d.tmp.path().join("tokens.before-us");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&tokens)
        .arg(&before_us)
        .status()
        .unwrap()
        .success());
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "US", 60).status, 201);
    let us = d.secrets("prod", "US");
    let mut d = d;
    assert!(d.stop().success());

    // Flip one bit of version 1's wrapped key.
    let conn = rusqlite::Connection::open(d.state_db()).unwrap();
    let mut blob: Vec<u8> = conn
        .query_row("SELECT wrapped FROM versions v JOIN keys k ON k.id = v.key_id WHERE k.country = 'DE' AND v.version = 1", [], |r| r.get(0))
        .unwrap();
    blob[3] ^= 0x10;
    conn.execute(
        "UPDATE versions SET wrapped = ?1 WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE country = 'DE')",
        [blob],
    )
    .unwrap();
    drop(conn);

    let d = d.launch();
    let show = d.key("prod", "DE");
    assert_eq!(show.versions[0].status, VersionStatus::Unavailable);
    assert!(show.versions[0]
        .error
        .as_deref()
        .unwrap()
        .contains("integrity check failed for prod/DE version 1"));
    assert_eq!(show.versions[1].status, VersionStatus::Active);
    let de = d.secrets("prod", "DE");
    assert_eq!(de.current_version, 2);
    assert_eq!(de.secrets.len(), 1);
    assert_eq!(d.secrets("prod", "US"), us);
    assert_eq!(d.health().status, HealthStatus::Degraded);
    assert!(d
        .log_text()
        .contains("integrity check failed for prod/DE version 1"));
    assert_no_key_in(&d.log_text(), &secrets_of(&de));

    // Same state against its token as it was before prod/US's root key was made (another
    // token altogether is refused at start: tests/anchor.rs): loud error for prod/US, no new
    // root key.
    let mut d = d;
    assert!(d.stop().success());
    std::fs::remove_dir_all(&tokens).unwrap();
    std::fs::rename(&before_us, &tokens).unwrap();
    let d = d.launch();
    let r = d.get("/v1/keys/prod/US/secrets");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), Code::RootKeyMissing);
    d.advance(86_400);
    let r = d.rotate("prod", "US");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        d.log_text()
            .contains("root key `keyd-root/prod/US` is missing"),
        "{}",
        d.log_text()
    );
    assert_eq!(
        d.versions("prod", "US")[0].status,
        VersionStatus::Unavailable
    );
}
