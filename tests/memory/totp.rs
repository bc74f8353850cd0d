//! TOTP secrets: an online enrollment (its secret, base32 and otpauth URI are in the answer),
//! its confirmation and a checked code, then the daemon's memory. Codes come from oathtool.

use harness::totp::{bootstrap, oathtool};
use harness::{needs_test_clock, Daemon, Options};
use incountry_keyd::proto::Enrollment;
use serde_json::json;

use crate::scan::{self, check, wait_connections_closed, Needle};

/// RFC 4648 base32 without padding, for the needles (20 bytes are 32 characters).
fn base32_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut bits, mut value, mut out) = (0u32, 0u64, Vec::new());
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c).expect("base32") as u64;
        value = (value << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((value >> bits) as u8);
        }
    }
    out
}

/// A secret's forms: raw, base32, and the HMAC-SHA1 key blocks made from it (the key XORed
/// with the inner and outer pads).
fn needles(name: &str, secret_b32: &str) -> Vec<Needle> {
    let raw = base32_decode(secret_b32);
    assert_eq!(raw.len(), 20);
    let pad = |p: u8| raw.iter().map(|b| b ^ p).collect::<Vec<u8>>();
    let mut out = Needle::with_halves(&format!("{name} raw"), &raw, 0);
    out.extend(Needle::with_halves(
        &format!("{name} base32"),
        secret_b32.as_bytes(),
        0,
    ));
    out.push(Needle::none(format!("{name} XOR ipad"), &pad(0x36)));
    out.push(Needle::none(format!("{name} XOR opad"), &pad(0x5c)));
    out
}

#[test]
fn a_confirmed_enrollment_leaves_no_secret_in_memory() {
    needs_test_clock!();
    if !scan::can_read_memory() {
        eprintln!("skipped: reading the daemon's memory needs root");
        return;
    }
    let d = Daemon::prepare(Options {
        versions_per_day: 100,
        verification: "totp",
        log_level: "info",
        ..Options::default()
    });
    let first = bootstrap(&d, 0);
    let d = d.launch();

    // Replacing the secret: a code of the current one, then the new one's answer.
    let code = oathtool(&first, d.advance(30));
    let r = d.request_with(
        "POST",
        "/v1/admin/totp/enroll",
        &[("X-Verification-Code", &code)],
        b"{}",
    );
    let doc: Enrollment = r.ok(200);
    let secret = doc.secret_base32.to_string();
    let uri = doc.otpauth_uri.to_string();
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    let code = oathtool(&secret, d.advance(0));
    let r = d.post("/v1/admin/totp/confirm", json!({ "code": code }));
    assert_eq!(r.status, 200, "{}", r.text());
    // A change checked with a code of the new secret (unsealed, HMAC, zeroized).
    let code = oathtool(&secret, d.advance(30));
    let r = d.request_with(
        "POST",
        "/v1/keys/prod/DE",
        &[("X-Verification-Code", &code)],
        json!({"type": "incountry-managed", "rotation_period_days": 30})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    wait_connections_closed(d.pid());

    let mut all = needles("new secret", &secret);
    all.extend(needles("first secret", &first));
    all.push(Needle::none("otpauth URI", uri.as_bytes()));
    let failures = check(d.pid(), "enrolled, confirmed, code checked", &all);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
