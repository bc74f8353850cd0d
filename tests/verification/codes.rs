//! Codes: missing, wrong, replayed; the lockout after five wrong ones, also under a burst
//! of parallel guesses and across a restart.

use harness::totp::{bootstrap, oathtool, unix_now};
use harness::{needs_test_clock, request, Daemon};
use incountry_keyd::domain::{Code, VerificationMode};
use serde_json::json;

use crate::{audit_details, create, enrolled_daemon, next_code, totp_daemon, with_code, wrong};

#[test]
fn codes_from_oathtool_missing_wrong_replayed() {
    needs_test_clock!();
    let d = totp_daemon();
    assert_eq!(d.health().verification, VerificationMode::Totp);

    // Not enrolled: no change, and the error names the command to run.
    let r = create(&d, "DE", None);
    assert_eq!((r.status, r.code()), (401, Code::VerificationRequired));
    let r = create(&d, "DE", Some("123456"));
    assert_eq!(
        (r.status, r.code()),
        (401, Code::TotpNotEnrolled),
        "{}",
        r.text()
    );
    assert!(r.text().contains("totp-enroll"));

    let mut d = d;
    assert!(d.stop().success());
    let secret = bootstrap(&d, 0);
    let d = d.launch();
    let r = create(&d, "DE", Some(&next_code(&d, &secret)));
    assert_eq!(r.status, 201, "{}", r.text());

    let r = d.rotate("prod", "DE");
    assert_eq!((r.status, r.code()), (401, Code::VerificationRequired));
    let code = next_code(&d, &secret);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/DE/rotate",
        json!({}),
        &wrong(&code),
    );
    assert_eq!((r.status, r.code()), (401, Code::VerificationFailed));
    let settings = json!({"rotation_period_days": 60});
    let r = with_code(&d, "PATCH", "/v1/keys/prod/DE", settings.clone(), &code);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = with_code(&d, "PATCH", "/v1/keys/prod/DE", settings.clone(), &code);
    assert_eq!((r.status, r.code()), (401, Code::VerificationReplayed));

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
    needs_test_clock!();
    let (d, secret) = enrolled_daemon();
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
        assert_eq!(r.code(), Code::VerificationFailed);
    }
    let r = with_code(&d, "POST", "/v1/keys/prod/FR/rotate", json!({}), &code);
    assert_eq!(
        (r.status, r.code()),
        (429, Code::VerificationLocked),
        "{}",
        r.text()
    );
    let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry));
    assert!(audit_details(&d)
        .iter()
        .any(|e| e.starts_with("rotate refused verification_locked")));

    d.advance(301);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/FR/rotate",
        json!({}),
        &next_code(&d, &secret),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// The daemon's clock minus the wall clock, in seconds: the offset a restarted daemon needs
/// to go on at the same time.
fn clock_offset(d: &Daemon) -> i64 {
    d.advance(0) - unix_now()
}

#[test]
fn parallel_wrong_codes_are_checked_five_times_and_the_lock_survives_a_restart() {
    needs_test_clock!();
    let (d, secret) = enrolled_daemon();
    assert_eq!(create(&d, "NL", Some(&next_code(&d, &secret))).status, 201);
    let code = next_code(&d, &secret);
    let bad = wrong(&code);

    // 100 wrong codes at once, one connection each.
    const GUESSES: usize = 100;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(GUESSES));
    let threads: Vec<_> = (0..GUESSES)
        .map(|_| {
            let socket = d.socket.clone();
            let barrier = barrier.clone();
            let bad = bad.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = request(
                    &socket,
                    "POST",
                    "/v1/keys/prod/NL/rotate",
                    &[("X-Verification-Code", &bad)],
                    b"{}",
                );
                (r.status, r.error_code())
            })
        })
        .collect();
    let answers: Vec<(u16, Option<Code>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed = answers
        .iter()
        .filter(|a| **a == (401, Some(Code::VerificationFailed)))
        .count();
    let locked = answers
        .iter()
        .filter(|a| **a == (429, Some(Code::VerificationLocked)))
        .count();
    assert_eq!(failed + locked, GUESSES, "{answers:?}");
    assert!(
        failed <= 5,
        "{failed} of {GUESSES} wrong codes were checked"
    );

    // The right code is refused while the lock holds.
    let locked_out = |d: &Daemon, code: &str| {
        let r = with_code(d, "POST", "/v1/keys/prod/NL/rotate", json!({}), code);
        assert_eq!(
            (r.status, r.code()),
            (429, Code::VerificationLocked),
            "{}",
            r.text()
        );
        let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=300).contains(&retry), "Retry-After {retry}");
    };
    locked_out(&d, &code);

    // The audit shows at most 5 checked codes for the burst; the rest were refused unchecked.
    let audit = audit_details(&d);
    let checked = audit
        .iter()
        .filter(|e| e.starts_with("rotate refused verification_failed"))
        .count();
    assert!(checked <= 5, "{checked} checked attempts audited");
    assert_eq!(checked, failed);
    let refused = audit
        .iter()
        .filter(|e| e.starts_with("rotate refused verification_locked"))
        .count();
    assert_eq!(refused, locked + 1);

    // A restart keeps the lock.
    let offset = clock_offset(&d);
    let mut d = d;
    assert!(d.stop().success());
    d.clock_offset = offset;
    let d = d.launch();
    let code = oathtool(&secret, d.advance(0));
    locked_out(&d, &code);

    // Once the lock time has passed, the right code works.
    d.advance(301);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/NL/rotate",
        json!({}),
        &next_code(&d, &secret),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}
