//! What the state keeps of an aws version (never the IAM secret or the data key), and what
//! binds it to its key and KMS fields.

use harness::moto::Moto;
use harness::Daemon;
use incountry_keyd::domain::audit::AuditOutcome;
use incountry_keyd::domain::{AwsState, Code, VersionStatus};
use incountry_keyd::proto::{CreateKeyRequest, HealthStatus};
use serde_json::json;
use zeroize::Zeroizing;

use crate::{b64, body_of, contains, register, start, status_of, wait_for, Kms};

#[test]
fn iam_secret_is_not_in_state_or_logs() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let d = start(&moto, "1s", "24h", 1);
    let r = register(&d, "DE", kms.body(&kms.key32_blob, &kms.cmk_a));
    assert_eq!(r.status, 201, "{}", r.text());
    let wrong = "WrongSecretKeyWrongSecretKeyWrongSecret0";
    let bad = CreateKeyRequest {
        secret_access_key: Some(Zeroizing::new(wrong.into())),
        ..kms.request(&kms.key32_blob, &kms.cmk_a)
    };
    assert_eq!(register(&d, "FR", body_of(&bad)).status, 400);
    // A few revalidations, then a restart (which opens the sealed secret and uses it).
    wait_for(20, "two revalidations", &d, || {
        d.log_text().matches("KMS revalidation pass").count() >= 2
    });
    let mut d = d.restart();
    assert_eq!(
        d.secrets("prod", "DE").keys(),
        vec![(1, kms.key32_plain.clone())]
    );
    d.stop();

    let data_key = b64(&kms.key32_plain);
    let state = d.tmp.path().join("state");
    let mut files = vec![d.log.clone()];
    for e in std::fs::read_dir(&state).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut db_seen = false;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        db_seen |= f.ends_with("keyd.sqlite3") && !bytes.is_empty();
        for (what, needle) in [
            ("the IAM secret", kms.secret.as_bytes()),
            ("the refused IAM secret", wrong.as_bytes()),
            ("the data key", data_key.as_slice()),
            ("the data key (base64)", kms.key32_plain.as_bytes()),
        ] {
            assert!(!contains(&bytes, needle), "{what} is in {}", f.display());
        }
    }
    assert!(db_seen, "no state database in {}", state.display());
    // What the state does keep: the encrypted key, the ARN and the access key id.
    let db = std::fs::read(state.join("keyd.sqlite3")).unwrap();
    assert!(contains(&db, kms.cmk_a.as_bytes()));
    assert!(contains(&db, kms.access_key_id.as_bytes()));
    assert!(contains(&db, &b64(&kms.key32_blob)));
}

/// Runs one statement on the state of a stopped daemon.
fn edit_state(d: &Daemon, sql: &str, params: &[&dyn rusqlite::ToSql]) {
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    let n = db.execute(sql, params).unwrap();
    assert_eq!(n, 1, "{sql}");
}

const ROW: &str =
    "WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE environment = 'prod' AND country = ?1)";

#[test]
fn versions_are_bound_to_their_key_and_kms_fields() {
    let moto = Moto::start();
    let kms = Kms::setup(&moto);
    let mut d = start(&moto, "15m", "24h", 1);
    let keys = kms.data_keys(&kms.cmk_a, 4);
    // DE: its encrypted key is swapped for another valid one under the same CMK.
    // FR: its sealed key check is removed. AT: its CMK ARN is changed. IT: left alone.
    for (country, blob) in [
        ("DE", &kms.key32_blob),
        ("FR", &keys[1].0),
        ("AT", &keys[2].0),
        ("IT", &keys[3].0),
    ] {
        let r = register(&d, country, kms.body(blob, &kms.cmk_a));
        assert_eq!(r.status, 201, "{country}: {}", r.text());
    }
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    let checks: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM versions WHERE aws_check IS NOT NULL AND length(aws_check_iv) = 12",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(checks, 4, "every registration stores a sealed key check");
    drop(db);

    d.stop();
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_encrypted_key = ?2 {ROW}"),
        &[&"DE", &b64(&keys[0].0)],
    );
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_check = NULL, aws_check_iv = NULL {ROW}"),
        &[&"FR"],
    );
    edit_state(
        &d,
        &format!("UPDATE versions SET aws_cmk_arn = ?2 {ROW}"),
        &[&"AT", &kms.cmk_b],
    );
    let d = d.launch();

    for country in ["DE", "FR", "AT"] {
        wait_for(20, "the altered versions unavailable", &d, || {
            status_of(&d, country, 1) == VersionStatus::Unavailable
        });
        let why = d.versions("prod", country)[0].error.clone().unwrap();
        assert!(why.contains("aws_key_mismatch"), "{country}: {why}");
        let r = d.get(&format!("/v1/keys/prod/{country}/secrets"));
        assert_eq!(r.status, 503, "{country}: {}", r.text());
        assert_eq!(r.code(), Code::ActiveVersionUnavailable);
        let r = d.post(
            &format!("/v1/keys/prod/{country}/encrypt"),
            json!({"plaintext": "x"}),
        );
        assert_eq!(r.status, 503, "{country}: {}", r.text());
    }
    let why = |c: &str| d.versions("prod", c)[0].error.clone().unwrap();
    assert!(why("FR").contains("removed"), "{}", why("FR"));
    assert!(why("AT").contains("CMK ARN"), "{}", why("AT"));
    // The untouched version serves its own key.
    assert_eq!(status_of(&d, "IT", 1), VersionStatus::Active);
    assert_eq!(d.secrets("prod", "IT").keys(), vec![(1, keys[3].1.clone())]);

    let health = d.health();
    assert_eq!(health.status, HealthStatus::Degraded, "{health:?}");
    let problems = &health.aws.problems;
    assert_eq!(problems.len(), 3, "{health:?}");
    for p in problems {
        assert_eq!(p.state, AwsState::Mismatch, "{health:?}");
        assert_eq!(p.code, Code::AwsKeyMismatch, "{health:?}");
    }
    // Audited like any other aws unavailability, once each.
    let failed: Vec<_> = d
        .audit(0)
        .entries
        .into_iter()
        .filter(|e| e.action == "kms-revalidate" && e.outcome == AuditOutcome::Failed)
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed.iter().all(|e| e.detail.contains("aws_key_mismatch")));
    // Never a key in the log.
    let log = d.log_text();
    assert!(log.contains("fails its key check"), "{log}");
    for (_, plain) in &keys {
        assert!(!log.contains(plain.as_str()));
    }
    assert!(!log.contains(&kms.key32_plain));
    drop(moto);
}
