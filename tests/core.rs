//! Core behaviour of the real daemon against a fresh SoftHSM token per test.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn secrets_of(doc: &Value) -> Vec<String> {
    doc["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["secret"].as_str().unwrap().to_string())
        .collect()
}

fn assert_no_key_in(text: &str, keys: &[String]) {
    for k in keys {
        assert!(
            !text.contains(k.as_str()),
            "a served key appears in the output"
        );
        let hex = hex::encode(base64_decode(k));
        assert!(
            !text.contains(&hex),
            "a served key appears (hex) in the output"
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn create_show_rotate_restart_and_sdk_interop() {
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

#[test]
fn access_by_peer_credentials() {
    let extra = "";
    let make = |readers: Vec<String>| {
        let d = Daemon::prepare(Options {
            readers,
            extra: extra.into(),
            ..Options::default()
        });
        // Let the other uid reach the socket; access is then decided by peer credentials.
        d.open_to_others();
        d.launch()
    };

    // Not listed: 403 for everything but health.
    let d = make(vec![]);
    assert_eq!(d.create_managed("prod", "IT", 30).status, 201);
    let out = cli_as_nobody(&d, &["keys", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("forbidden"), "{err}");
    let out = cli_as_nobody(&d, &["secrets", "prod", "IT"]);
    assert!(!out.status.success());
    drop(d);

    // A reader reads, but cannot create, rotate or change settings.
    let d = make(vec!["uid:65534".into()]);
    assert_eq!(d.create_managed("prod", "IT", 30).status, 201);
    let out = cli_as_nobody(&d, &["secrets", "prod", "IT"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        vec![
            "keys",
            "create",
            "prod",
            "IT",
            "--rotation-period-days",
            "30",
        ],
        vec!["keys", "rotate", "prod", "IT"],
        vec![
            "keys",
            "settings",
            "prod",
            "IT",
            "--rotation-period-days",
            "60",
        ],
    ] {
        let out = cli_as_nobody(&d, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("403"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(d.get("/v1/keys/prod/IT").json()["active_version"], 1);
}

#[test]
fn bad_input_table() {
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let big = format!(
        "{{\"type\":\"incountry-managed\",\"pad\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/v1/keys/bad$env/DE".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            "invalid_environment",
        ),
        (
            "GET",
            format!("/v1/keys/{}/DE", "e".repeat(65)),
            String::new(),
            400,
            "invalid_environment",
        ),
        (
            "POST",
            "/v1/keys/prod/XX".into(),
            json!({"type":"incountry-managed","rotation_period_days":30}).to_string(),
            400,
            "invalid_country",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":45}).to_string(),
            400,
            "invalid_rotation_period",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"incountry-managed","rotation_period_days":30,"colour":"red"})
                .to_string(),
            400,
            "unknown_field",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            "{\"type\":\"incountry-man".into(),
            400,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            json!({"type":"rot13","rotation_period_days":30}).to_string(),
            400,
            "invalid_type",
        ),
        (
            "POST",
            "/v1/keys/prod/ES".into(),
            big,
            413,
            "body_too_large",
        ),
        (
            "DELETE",
            "/v1/keys/prod/DE".into(),
            String::new(),
            405,
            "method_not_allowed",
        ),
        (
            "GET",
            "/v1/keys/prod/PL".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        (
            "POST",
            "/v1/keys/prod/PL/rotate".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        (
            "GET",
            "/v1/keys/prod/PL/secrets".into(),
            String::new(),
            404,
            "key_not_found",
        ),
        ("GET", "/v1/nothing".into(), String::new(), 404, "not_found"),
        (
            "PATCH",
            "/v1/keys/prod/DE".into(),
            json!({"rotation_period_days":7}).to_string(),
            400,
            "invalid_rotation_period",
        ),
        (
            "GET",
            "/v1/keys/prod/DE/secrets?wait=0".into(),
            String::new(),
            400,
            "invalid_wait",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = d.request(method, &path, &body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(r.error_code(), code, "{method} {path}");
        assert!(r.json()["error"]["message"].is_string());
    }
    let r = d.request("DELETE", "/v1/keys/prod/DE", "");
    assert_eq!(r.header("allow"), Some("GET, POST, PATCH"));
    // The unknown field is named.
    let r = d.post(
        "/v1/keys/prod/ES",
        json!({"type":"incountry-managed","colour":"red"}),
    );
    assert!(r.text().contains("colour"), "{}", r.text());
    // Nothing was made by the bad requests; the daemon is healthy.
    assert_eq!(
        d.get("/v1/keys").json()["keys"].as_array().unwrap().len(),
        1
    );
    let h = d.get("/v1/health").json();
    assert_eq!(h["hsm"], "ok");
    // Settings work and are shown.
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/DE",
        &json!({"rotation_period_days":180}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["rotation_period_months"], 6);
}

fn failed_start(d: &Daemon) -> String {
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    lines[0].to_string()
}

#[test]
fn start_failures_are_one_clear_line() {
    let d = Daemon::prepare(Options::default());
    let pin = std::fs::read_to_string(d.token.pin_file()).unwrap();
    std::fs::write(d.token.pin_file(), "0000").unwrap();
    let line = failed_start(&d);
    assert!(line.contains("wrong PIN"), "{line}");
    assert!(!line.contains(pin.trim()));

    std::fs::write(d.token.pin_file(), &pin).unwrap();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace(MODULE, "/nonexistent/libpkcs11.so")).unwrap();
    let line = failed_start(&d);
    assert!(line.contains("/nonexistent/libpkcs11.so"), "{line}");

    std::fs::write(
        &d.config,
        cfg.replace("[hsm]\n", "[hsm]\ntoken_label = \"no-such-token\"\n"),
    )
    .unwrap();
    let line = failed_start(&d);
    assert!(line.contains("no-such-token"), "{line}");

    std::fs::write(&d.config, &cfg).unwrap();
    std::fs::set_permissions(d.token.pin_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = failed_start(&d);
    assert!(line.contains("chmod"), "{line}");
}

#[test]
fn tampered_blob_and_missing_root_key() {
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
    let show = d.get("/v1/keys/prod/DE").json();
    assert_eq!(show["versions"][0]["status"], "unavailable");
    assert!(show["versions"][0]["error"]
        .as_str()
        .unwrap()
        .contains("integrity check failed for prod/DE version 1"));
    assert_eq!(show["versions"][1]["status"], "active");
    let de = d.secrets("prod", "DE");
    assert_eq!(de["currentVersion"], 2);
    assert_eq!(de["secrets"].as_array().unwrap().len(), 1);
    assert_eq!(d.secrets("prod", "US"), us);
    let h = d.get("/v1/health").json();
    assert_eq!(h["status"], "degraded");
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
    assert_eq!(r.error_code(), "root_key_missing");
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
        d.get("/v1/keys/prod/US").json()["versions"][0]["status"],
        "unavailable"
    );
}

#[test]
fn second_daemon_on_same_state_refuses() {
    let d = Daemon::start();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let other_sock = d.tmp.path().join("other.sock");
    let other_cfg = d.tmp.path().join("other.toml");
    std::fs::write(
        &other_cfg,
        cfg.replace(d.socket.to_str().unwrap(), other_sock.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&other_cfg)
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {}", d.pid())), "{err}");
    assert_eq!(d.get("/v1/health").status, 200);
}

#[test]
fn stale_socket_is_replaced_and_mode_is_0660() {
    let mut d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    d.signal("KILL");
    wait_until("the daemon to die", 10, || {
        std::os::unix::net::UnixStream::connect(&d.socket).is_err()
    });
    assert!(d.socket.exists(), "a crash leaves the socket file behind");
    let _ = d.stop();
    let d = d.launch();
    assert_eq!(d.get("/v1/health").status, 200);
}

#[test]
fn check_config_validates_without_starting() {
    let d = Daemon::prepare(Options::default());
    let run = |cfg: &std::path::Path| {
        Command::new(BIN)
            .arg("--config")
            .arg(cfg)
            .arg("check-config")
            .output()
            .unwrap()
    };
    let out = run(&d.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.socket.exists(), "check-config must not start the daemon");

    let text = std::fs::read_to_string(&d.config).unwrap();
    let bad = d.tmp.path().join("bad.toml");
    std::fs::write(&bad, text.replace("[state]\n", "[state]\nretention = 5\n")).unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("retention"));

    std::fs::set_permissions(d.token.pin_file(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run(&d.config);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hsm-pin")
            || String::from_utf8_lossy(&out.stderr).contains("user-pin")
    );
}
