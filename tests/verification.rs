//! Verification codes (TOTP) for admin changes, checked with an independent implementation
//! (oathtool) at the daemon's test-clock time.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

fn totp_daemon() -> Daemon {
    Daemon::start_with(Options {
        versions_per_day: 100,
        verification: "totp",
        ..Options::default()
    })
}

/// Moves the daemon clock by `seconds` and returns its time.
fn clock(d: &Daemon, seconds: i64) -> i64 {
    let r = d.post("/v1/test/clock", json!({ "advance_seconds": seconds }));
    assert_eq!(r.status, 200);
    r.json()["unix"].as_i64().unwrap()
}

/// The code oathtool computes for `secret` at `unix`.
fn oathtool(secret: &str, unix: i64) -> String {
    let out = Command::new("oathtool")
        .args(["--totp", "-b", secret, "--now", &format!("@{unix}")])
        .output()
        .expect("oathtool (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A fresh code: the clock moves to the next 30 s step first (each step is accepted once).
fn next_code(d: &Daemon, secret: &str) -> String {
    oathtool(secret, clock(d, 30))
}

fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

fn enroll(d: &Daemon) -> String {
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert!(doc["otpauth_uri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    let secret = doc["secret_base32"].as_str().unwrap().to_string();
    let code = oathtool(&secret, clock(d, 0));
    let r = d.post("/v1/admin/totp/confirm", json!({ "code": code }));
    assert_eq!(r.status, 200, "{}", r.text());
    secret
}

fn with_code(d: &Daemon, method: &str, path: &str, body: Value, code: &str) -> Reply {
    http(
        &d.socket,
        method,
        path,
        &[("X-Verification-Code", code)],
        body.to_string().as_bytes(),
    )
}

fn create(d: &Daemon, country: &str, code: Option<&str>) -> Reply {
    let body = json!({"type": "incountry-managed", "rotation_period_days": 30});
    match code {
        Some(c) => with_code(d, "POST", &format!("/v1/keys/prod/{country}"), body, c),
        None => d.post(&format!("/v1/keys/prod/{country}"), body),
    }
}

fn audit_details(d: &Daemon) -> Vec<String> {
    d.get("/v1/audit?since=0").json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
                e["detail"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn codes_from_oathtool_missing_wrong_replayed() {
    let d = totp_daemon();
    assert_eq!(d.get("/v1/health").json()["verification"], "totp");

    // Not enrolled: no change, and the error names the command to run.
    let r = create(&d, "DE", None);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_required")
    );
    let r = create(&d, "DE", Some("123456"));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "totp_not_enrolled"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("totp-enroll"));

    let secret = enroll(&d);
    let r = create(&d, "DE", Some(&next_code(&d, &secret)));
    assert_eq!(r.status, 201, "{}", r.text());

    let r = d.rotate("prod", "DE");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_required")
    );
    let code = next_code(&d, &secret);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/DE/rotate",
        json!({}),
        &wrong(&code),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_failed")
    );
    let settings = json!({"rotation_period_days": 60});
    let r = with_code(&d, "PATCH", "/v1/keys/prod/DE", settings.clone(), &code);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = with_code(&d, "PATCH", "/v1/keys/prod/DE", settings.clone(), &code);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_replayed")
    );

    // Read-only calls need no code.
    assert_eq!(d.get("/v1/keys/prod/DE/secrets").status, 200);
    assert_eq!(d.get("/v1/keys").status, 200);

    let audit = audit_details(&d).join("\n");
    for expected in [
        "create refused verification_required",
        "totp-enroll ok",
        "create ok",
        "rotate refused verification_failed",
        "settings ok",
        "settings refused verification_replayed",
    ] {
        assert!(
            audit.contains(expected),
            "{expected} missing from:\n{audit}"
        );
    }
    // Neither the secret nor any code is logged.
    let log = d.log_text();
    assert!(!log.contains(&secret));
    assert!(!log.contains(&code));
}

#[test]
fn lockout_after_five_wrong_codes() {
    let d = totp_daemon();
    let secret = enroll(&d);
    assert_eq!(create(&d, "FR", Some(&next_code(&d, &secret))).status, 201);
    let code = next_code(&d, &secret);
    for _ in 0..5 {
        let r = with_code(
            &d,
            "POST",
            "/v1/keys/prod/FR/rotate",
            json!({}),
            &wrong(&code),
        );
        assert_eq!(r.error_code(), "verification_failed");
    }
    let r = with_code(&d, "POST", "/v1/keys/prod/FR/rotate", json!({}), &code);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "verification_locked"),
        "{}",
        r.text()
    );
    let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry));
    assert!(audit_details(&d)
        .iter()
        .any(|e| e.starts_with("rotate refused verification_locked")));

    clock(&d, 301);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/FR/rotate",
        json!({}),
        &next_code(&d, &secret),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn reenrollment_needs_code_and_reset_needs_stopped_daemon() {
    let d = totp_daemon();
    let secret = enroll(&d);

    // Replacing the secret needs a valid code from the current one.
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_required")
    );
    let code = next_code(&d, &secret);
    let r = with_code(
        &d,
        "POST",
        "/v1/admin/totp/enroll",
        json!({}),
        &wrong(&code),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_failed")
    );
    let r = with_code(&d, "POST", "/v1/admin/totp/enroll", json!({}), &code);
    assert_eq!(r.status, 200, "{}", r.text());

    // No secret in plaintext in the state database (nor its WAL).
    let raw = totp_rs::Secret::try_from_base32(&secret).unwrap();
    let state = d.tmp.path().join("state");
    for f in std::fs::read_dir(&state).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(!bytes
            .windows(raw.as_bytes().len())
            .any(|w| w == raw.as_bytes()));
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }

    // Offline reset refuses while the daemon holds the state lock.
    let reset = || {
        Command::new(BIN)
            .args(["admin", "totp-reset", "--uid", "0", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap()
    };
    let out = reset();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut d = d;
    assert!(d.stop().success());
    let out = reset();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = d.launch();
    // Enrolling again needs no code now.
    enroll(&d);
    let audit = audit_details(&d).join("\n");
    assert!(audit.contains("totp-reset ok"), "{audit}");
    let out = Command::new(BIN)
        .args(["audit", "verify", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn cli_enrollment_reads_the_code_typed_back() {
    let d = totp_daemon();
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["admin", "totp-enroll"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut uri = String::new();
    while !uri.starts_with("otpauth URI: ") {
        uri.clear();
        assert!(stdout.read_line(&mut uri).unwrap() > 0, "no URI printed");
    }
    let secret = uri
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap()
        .trim()
        .to_string();
    let code = oathtool(&secret, clock(&d, 0));
    writeln!(child.stdin.take().unwrap(), "{code}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = create(&d, "IT", Some(&next_code(&d, &secret)));
    assert_eq!(r.status, 201, "{}", r.text());
}
