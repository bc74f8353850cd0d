//! `state migrate --to-postgres`: a SQLite host with keys, a rotation, an enrolled admin,
//! encryption counts and audit entries, moved into an empty PostgreSQL database; the
//! daemon on PostgreSQL then serves the same keys, the admin's codes still work, and
//! `audit verify` passes. A second run changes nothing; a run while the daemon holds the
//! SQLite state, or into a database that went its own way, is refused.

use std::process::{Command, Output};

use harness::totp::{bootstrap, oathtool, unix_now};
use harness::{bin, needs_test_clock, Daemon, Options, Postgres, Reply};
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Decrypted, Encrypted};
use incountry_keyd::store::Store;
use serde_json::{json, Value};

fn options() -> Options {
    Options {
        versions_per_day: 10,
        verification: "totp",
        log_level: "info",
        ..Options::default()
    }
}

/// `state migrate --to-postgres --json` with the daemon's config and token.
fn migrate(d: &Daemon) -> Output {
    Command::new(bin())
        .arg("--config")
        .arg(&d.config)
        .args(["--json", "state", "migrate", "--to-postgres"])
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap()
}

/// The JSON summary of a run that must succeed.
fn summary(out: Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An admin change with the next code of `secret` (the clock moves a step first).
fn with_code(d: &Daemon, secret: &str, path: &str, body: Value) -> Reply {
    let code = oathtool(secret, d.advance(30));
    d.request_with(
        "POST",
        path,
        &[("X-Verification-Code", &code)],
        body.to_string().as_bytes(),
    )
}

/// Every stored field of the state, as a fingerprint.
fn fingerprint(store: &dyn Store) -> String {
    store.export().unwrap().fingerprint()
}

#[test]
fn a_sqlite_host_moves_to_postgres_with_its_keys_admins_and_audit_log() {
    needs_test_clock!();
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let d = Daemon::prepare(options());
    let secret = bootstrap(&d, 0);
    let d = d.launch();
    let managed = json!({"type": "incountry-managed", "rotation_period_days": 30});
    for (path, body) in [
        ("/v1/keys/prod/DE", managed.clone()),
        ("/v1/keys/prod/DE/rotate", json!({})),
        ("/v1/keys/prod/FR", managed),
    ] {
        let r = with_code(&d, &secret, path, body);
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // A wrong code: a failure counted in the state (it moves too).
    let r = d.request_with(
        "POST",
        "/v1/keys/prod/FR/rotate",
        &[("X-Verification-Code", "000000")],
        b"",
    );
    assert_eq!(r.code(), Code::VerificationFailed);
    let record: Encrypted = d
        .post("/v1/keys/prod/DE/encrypt", json!({"plaintext": "moved"}))
        .ok(200);
    let (de, fr) = (d.secrets("prod", "DE"), d.secrets("prod", "FR"));
    let entries = d.audit(0).entries.len();
    let offset = d.advance(0) - unix_now();

    // The config names the database (the daemon reads it only at start). The daemon holds
    // the state: refused, and nothing reaches PostgreSQL.
    d.use_postgres(&pg, &db);
    let out = migrate(&d);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    assert_eq!(pg.sql(&db, "SELECT to_regclass('versions') IS NULL"), "t");

    let mut d = d;
    assert!(d.stop().success());
    // The first entry as a version before MACs wrote it: the copy gets its MAC from the HSM.
    let sqlite = rusqlite::Connection::open(d.state_db()).unwrap();
    sqlite
        .execute("UPDATE audit SET mac = NULL WHERE seq = 1", [])
        .unwrap();
    drop(sqlite);
    let first = summary(migrate(&d));
    assert_eq!(first["outcome"], "copied", "{first}");
    assert_eq!(
        (&first["keys"], &first["versions"], &first["totp_secrets"]),
        (&json!(2), &json!(3), &json!(1)),
        "{first}"
    );
    assert_eq!(first["versions_unwrapped"], 3, "{first}");
    assert_eq!(first["audit_macs_added"], 1, "{first}");
    // Every entry, and the migration's own.
    assert_eq!(first["audit_entries"], entries as i64 + 1, "{first}");
    let verified = first["audit_verify"].as_str().unwrap();
    assert!(
        verified.contains(&format!("chain and {} MACs intact", entries + 1)),
        "{first}"
    );
    // The copy is the source, field for field (wrapped bytes, counts, TOTP rows).
    let source = incountry_keyd::store::open_read_only(&d.tmp.path().join("state")).unwrap();
    let target = crate::open(&pg, &db, "check").unwrap();
    assert_eq!(fingerprint(source.as_ref()), fingerprint(target.as_ref()));
    assert_eq!(pg.sql(&db, "SELECT failures FROM totp_attempts"), "1");
    drop(target);

    // Again: the identical copy is found, nothing is written.
    let again = summary(migrate(&d));
    assert_eq!(again["outcome"], "already_copied", "{again}");
    assert_eq!(again["state_sha256"], first["state_sha256"]);
    assert_eq!(again["audit_entries"], first["audit_entries"]);

    // The daemon on PostgreSQL: the same keys, the record decrypts, the admin's secret
    // (sealed by the same HSM) still gives codes (its clock a step past the last used one).
    d.clock_offset = offset + 30;
    let d = d.launch();
    assert_eq!(d.secrets("prod", "DE"), de);
    assert_eq!(d.secrets("prod", "FR"), fr);
    let plain: Decrypted = d
        .post(
            "/v1/keys/prod/DE/decrypt",
            json!({"ciphertext": record.ciphertext, "version": record.version}),
        )
        .ok(200);
    assert_eq!(plain.plaintext.as_str(), "moved");
    let r = with_code(&d, &secret, "/v1/keys/prod/FR/rotate", json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM versions"), "4");
    assert!(d
        .audit(0)
        .entries
        .iter()
        .any(|e| e.action == "state-migrate"));
    let out = Command::new(bin())
        .arg("--config")
        .arg(&d.config)
        .args(["audit", "verify"])
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", stderr(&out));

    // The database went its own way: migrating into it again is refused, and changes
    // neither state.
    let before = pg.sql(&db, "SELECT seq FROM audit_head");
    let out = migrate(&d);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a copy") && stderr(&out).contains("nothing was copied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pg.sql(&db, "SELECT seq FROM audit_head"), before);
    assert_eq!(
        fingerprint(source.as_ref()),
        again["state_sha256"].as_str().unwrap()
    );
}
