//! Verification codes (TOTP) for admin changes, checked with an independent implementation
//! (oathtool) at the daemon's test-clock time. The first admin is enrolled by the offline
//! bootstrap (`admin totp-enroll --uid N`, daemon stopped), as in production.
//!
//! - `codes`: missing, wrong and replayed codes, the lockout after wrong ones;
//! - `enrollment`: enrolling and re-enrolling, online and offline, and the offline tools.

mod codes;
mod enrollment;

use harness::totp::{bootstrap, oathtool};
use harness::{Daemon, Options, Reply};
use incountry_keyd::proto::Enrollment;
use serde_json::{json, Value};

fn totp_options() -> Options {
    Options {
        versions_per_day: 100,
        verification: "totp",
        ..Options::default()
    }
}

fn totp_daemon() -> Daemon {
    Daemon::start_with(totp_options())
}

/// A daemon whose admin (this process, uid 0) was enrolled by the offline bootstrap before
/// it started; returns the secret too.
fn enrolled_daemon() -> (Daemon, String) {
    let d = Daemon::prepare(totp_options());
    let secret = bootstrap(&d, 0);
    (d.launch(), secret)
}

/// A fresh code: the clock moves to the next 30 s step first (each step is accepted once).
fn next_code(d: &Daemon, secret: &str) -> String {
    oathtool(secret, d.advance(30))
}

fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

/// Online enrollment of this process's uid; `headers` carry the proof it needs.
fn enroll(d: &Daemon, headers: &[(&str, &str)]) -> String {
    let r = d.request_with("POST", "/v1/admin/totp/enroll", headers, b"{}");
    let doc: Enrollment = r.ok(200);
    assert!(doc.otpauth_uri.starts_with("otpauth://totp/"));
    let secret = doc.secret_base32.to_string();
    let code = oathtool(&secret, d.advance(0));
    let r = d.post("/v1/admin/totp/confirm", json!({ "code": code }));
    assert_eq!(r.status, 200, "{}", r.text());
    secret
}

fn with_code(d: &Daemon, method: &str, path: &str, body: Value, code: &str) -> Reply {
    d.request_with(
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

/// Each audit entry as `ACTION OUTCOME DETAIL`.
fn audit_details(d: &Daemon) -> Vec<String> {
    d.audit(0)
        .entries
        .iter()
        .map(|e| format!("{} {} {}", e.action, e.outcome.as_str(), e.detail))
        .collect()
}
