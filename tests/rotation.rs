//! Timer rotation, change propagation and the audit log, with the daemon's test clock.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use harness::{bin, needs_test_clock, wait_until, Daemon, Options, Secrets};
use incountry_keyd::domain::audit::AuditOutcome;
use incountry_keyd::domain::VersionStatus;
use incountry_keyd::proto::KeyDocument;
use serde_json::json;

const DAY: i64 = 86_400;

#[test]
fn thirty_day_key_rotates_exactly_once() {
    needs_test_clock!();
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert!(d.key("prod", "DE").next_rotation.is_some());
    let etag1 = d
        .get("/v1/keys/prod/DE/secrets")
        .header("etag")
        .unwrap()
        .to_string();

    d.advance_and_settle(29 * DAY);
    assert_eq!(d.versions("prod", "DE").len(), 1);

    d.advance_and_settle(DAY);
    wait_until("the timer rotation", 10, || {
        d.versions("prod", "DE").len() == 2
    });
    // Another pass later still makes nothing new.
    d.advance_and_settle(60);
    let versions = d.versions("prod", "DE");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].status, VersionStatus::Deprecated);
    assert_eq!(versions[1].status, VersionStatus::Active);
    let secrets = d.get("/v1/keys/prod/DE/secrets");
    assert_eq!(Secrets::parse(secrets.body.clone()).current_version, 2);
    assert_ne!(secrets.header("etag").unwrap(), etag1);

    let audit = d.audit(0);
    let timer: Vec<_> = audit
        .entries
        .iter()
        .filter(|e| e.actor == "timer" && e.action == "rotate" && e.outcome == AuditOutcome::Ok)
        .collect();
    assert_eq!(timer.len(), 1, "{audit:?}");
    assert_eq!(timer[0].version, Some(2));

    let metrics = d.get("/metrics").text();
    assert!(metrics.contains("keyd_rotations_total 1"), "{metrics}");
    assert!(
        metrics.contains("keyd_seconds_until_rotation{"),
        "{metrics}"
    );
}

#[test]
fn down_for_100_days_rotates_once_at_start() {
    needs_test_clock!();
    let mut d = Daemon::start();
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    assert!(d.stop().success());
    d.clock_offset = 100 * DAY;
    let d = d.launch();
    wait_until("the catch-up rotation", 10, || {
        d.versions("prod", "FR").len() == 2
    });
    d.advance_and_settle(60);
    assert_eq!(d.versions("prod", "FR").len(), 2);
    // And a restart does not rotate again.
    let d = d.restart();
    d.advance_and_settle(60);
    assert_eq!(d.versions("prod", "FR").len(), 2);
}

#[test]
fn shorter_period_rotates_promptly() {
    needs_test_clock!();
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "IT", 360).status, 201);
    d.advance_and_settle(40 * DAY);
    assert_eq!(d.versions("prod", "IT").len(), 1);
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/IT",
        &json!({"rotation_period_days": 30}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("rotation after the period change", 10, || {
        d.versions("prod", "IT").len() == 2
    });
}

#[test]
fn long_poll_wakes_on_rotation_and_times_out_without_change() {
    let d = Arc::new(Daemon::start_with(Options {
        versions_per_day: 10,
        ..Options::default()
    }));
    assert_eq!(d.create_managed("prod", "ES", 30).status, 201);
    let etag = d
        .get("/v1/keys/prod/ES/secrets")
        .header("etag")
        .unwrap()
        .to_string();

    // No change: 304 after the wait.
    let r = d.request_with(
        "GET",
        "/v1/keys/prod/ES/secrets?wait=1",
        &[("If-None-Match", &etag)],
        b"",
    );
    assert_eq!(r.status, 304);
    // Without wait: 304 at once.
    let r = d.request_with(
        "GET",
        "/v1/keys/prod/ES/secrets",
        &[("If-None-Match", &etag)],
        b"",
    );
    assert_eq!(r.status, 304);

    let waiter = {
        let d = d.clone();
        let etag = etag.clone();
        std::thread::spawn(move || {
            let r = d.request_with(
                "GET",
                "/v1/keys/prod/ES/secrets?wait=60",
                &[("If-None-Match", &etag)],
                b"",
            );
            (r.status, r.body, Instant::now())
        })
    };
    // If the waiter is not parked yet when the rotation lands, it sees the change at once.
    let rotated_at = Instant::now();
    assert_eq!(d.rotate("prod", "ES").status, 201);
    let (status, body, got_at) = waiter.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(Secrets::parse(body).current_version, 2);
    let latency = got_at.saturating_duration_since(rotated_at);
    assert!(
        latency.as_secs_f64() < 1.0,
        "new document after {latency:?}"
    );
}

#[test]
fn rotations_under_read_load_are_consistent() {
    let d = Arc::new(Daemon::start_with(Options {
        versions_per_day: 100,
        ..Options::default()
    }));
    assert_eq!(d.create_managed("prod", "NL", 30).status, 201);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let (d, stop, ok) = (d.clone(), stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                // Bounded: stops with the flag, or after 20,000 requests.
                for n in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = if (n + i) % 2 == 0 {
                        "/v1/keys/prod/NL/secrets"
                    } else {
                        "/v1/keys/prod/NL"
                    };
                    let r = d.get(path);
                    if r.status != 200 {
                        failures.push(format!("{path}: {}", r.status));
                        continue;
                    }
                    if path.ends_with("secrets") {
                        let doc = Secrets::parse(r.body);
                        if !doc.secrets.iter().any(|s| s.version == doc.current_version) {
                            failures.push(format!("inconsistent document {doc:?}"));
                        }
                    } else {
                        let doc: KeyDocument = r.read();
                        if doc.versions.last().unwrap().status != VersionStatus::Active {
                            failures.push(format!("inconsistent key {doc:?}"));
                        }
                    }
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    for _ in 0..20 {
        let r = d.rotate("prod", "NL");
        assert_eq!(r.status, 201, "{}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = readers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(d.versions("prod", "NL").len(), 21);
}

fn audit_verify(d: &Daemon) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify", "--state-dir"])
        .arg(d.tmp.path().join("state"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn audit_chain_verifies_and_detects_edits_and_deletions() {
    needs_test_clock!();
    let d = Daemon::start();
    assert_eq!(d.create_managed("prod", "SE", 30).status, 201);
    assert_eq!(d.rotate("prod", "SE").status, 429); // refused: audited
    d.advance(DAY);
    assert_eq!(d.rotate("prod", "SE").status, 201);
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/SE",
        &json!({"rotation_period_days": 60}).to_string(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(d.create_managed("prod", "NO", 45).status, 400); // refused: audited

    let entries = d.audit(0).entries;
    let summary: Vec<(&str, AuditOutcome)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.outcome))
        .collect();
    let expect = [
        ("create", AuditOutcome::Ok),
        ("rotate", AuditOutcome::Refused),
        ("rotate", AuditOutcome::Ok),
        ("settings", AuditOutcome::Ok),
        ("create", AuditOutcome::Refused),
    ];
    for e in expect {
        assert!(summary.contains(&e), "{summary:?}");
    }
    assert_eq!(entries[0].uid, Some(0));
    assert!(entries[0].pid.is_some());
    assert_eq!(d.audit(3).entries[0].seq, 4);

    let (ok, out) = audit_verify(&d);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("OK: {} audit entries", entries.len())),
        "{out}"
    );

    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 2", [])
        .unwrap();
    let (ok, out) = audit_verify(&d);
    assert!(!ok && out.contains("sequence 2"), "{out}");
    db.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 2", [])
        .unwrap();
    assert!(audit_verify(&d).0);
    db.execute("DELETE FROM audit WHERE seq = 3", []).unwrap();
    let (ok, out) = audit_verify(&d);
    assert!(!ok && out.contains("sequence 3"), "{out}");
}

#[test]
fn secrets_watch_prints_each_new_document() {
    use std::io::{BufRead, BufReader};
    let d = Daemon::start_with(Options {
        versions_per_day: 10,
        ..Options::default()
    });
    assert_eq!(d.create_managed("prod", "PT", 30).status, 201);
    let mut child = Command::new(bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["secrets", "prod", "PT", "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || Secrets::parse(lines.next().unwrap().unwrap().into_bytes());
    assert_eq!(next().current_version, 1);
    for expected in 2..=3 {
        assert_eq!(d.rotate("prod", "PT").status, 201);
        assert_eq!(next().current_version, expected);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn timer_rotations_do_not_count_against_the_daily_limit() {
    needs_test_clock!();
    let d = Daemon::start(); // versions_per_day = 1
    assert_eq!(d.create_managed("prod", "AT", 30).status, 201);
    d.advance_and_settle(30 * DAY);
    wait_until("the timer rotation", 10, || {
        d.versions("prod", "AT").len() == 2
    });
    // Same UTC day as the timer's version: the admin's one version of the day is still free.
    let r = d.rotate("prod", "AT");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(d.rotate("prod", "AT").status, 429);
}
