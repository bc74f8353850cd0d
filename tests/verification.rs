//! Verification codes (TOTP) for admin changes, checked with an independent implementation
//! (oathtool) at the daemon's test-clock time. The first admin is enrolled by the offline
//! bootstrap (`admin totp-enroll --uid N`, daemon stopped), as in production.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use common::*;
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

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Drives an interactive `totp-enroll` (started with piped stdio): reads its output up to
/// the otpauth URI, types back the code `code_for(secret)` gives, and waits for it to
/// succeed; returns the secret.
fn type_back(mut child: Child, code_for: impl FnOnce(&str) -> String) -> String {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("otpauth URI: ") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no URI printed");
    }
    assert!(line.contains("otpauth://totp/"), "{line}");
    let secret = line
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap()
        .trim()
        .to_string();
    writeln!(child.stdin.take().unwrap(), "{}", code_for(&secret)).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rest.contains("nrolled"), "{rest}");
    secret
}

/// The offline bootstrap of `uid`'s first secret (`admin totp-enroll --uid N`, as root, with
/// the daemon stopped): types back the code at the time the daemon will have; returns the
/// secret.
fn bootstrap(d: &Daemon, uid: u32) -> String {
    let child = bootstrap_command(d, uid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    type_back(child, |secret| {
        oathtool(secret, unix_now() + d.clock_offset)
    })
}

fn bootstrap_command(d: &Daemon, uid: u32) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&d.config)
        .args(["admin", "totp-enroll", "--uid", &uid.to_string()])
        .env("SOFTHSM2_CONF", d.token.conf())
        .env(
            "INCOUNTRY_KEYD_TEST_CLOCK_OFFSET",
            d.clock_offset.to_string(),
        );
    cmd
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

/// Online enrollment of this process's uid; `headers` carry the proof it needs.
fn enroll(d: &Daemon, headers: &[(&str, &str)]) -> String {
    let r = http(&d.socket, "POST", "/v1/admin/totp/enroll", headers, b"{}");
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

    let mut d = d;
    assert!(d.stop().success());
    let secret = bootstrap(&d, 0);
    let d = d.launch();
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
    let (d, secret) = enrolled_daemon();

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
    let (config, token_conf) = (d.config.clone(), d.token.conf());
    let reset = || {
        // The reset's audit entry is MACed in the HSM: the config names it.
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["admin", "totp-reset", "--uid", "0", "--state-dir"])
            .arg(&state)
            .env("SOFTHSM2_CONF", &token_conf)
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
    // With no admin enrolled any more, enrolling again online is refused: only the offline
    // bootstrap enrolls the first admin.
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (409, "bootstrap_required"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("totp-enroll --uid 0"), "{}", r.text());
    let mut d = d;
    assert!(d.stop().success());
    let secret = bootstrap(&d, 0);
    let d = d.launch();
    assert_eq!(create(&d, "PL", Some(&next_code(&d, &secret))).status, 201);
    let audit = audit_details(&d).join("\n");
    assert!(audit.contains("totp-reset ok"), "{audit}");
    assert!(
        audit.contains("totp-enroll refused bootstrap_required"),
        "{audit}"
    );
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

/// Re-enrollment from the command line: `--code` from the current secret, then the code of
/// the new secret typed back; afterwards only the new secret's codes pass.
#[test]
fn cli_enrollment_reads_the_code_typed_back() {
    let (d, old) = enrolled_daemon();
    let code = next_code(&d, &old);
    let child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["admin", "totp-enroll", "--code", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let secret = type_back(child, |secret| oathtool(secret, clock(&d, 0)));
    let r = create(&d, "IT", Some(&next_code(&d, &old)));
    assert_eq!(r.error_code(), "verification_failed", "{}", r.text());
    let r = create(&d, "IT", Some(&next_code(&d, &secret)));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// The daemon's clock minus the wall clock, in seconds: the offset a restarted daemon needs
/// to go on at the same time.
fn clock_offset(d: &Daemon) -> i64 {
    clock(d, 0) - unix_now()
}

#[test]
fn parallel_wrong_codes_are_checked_five_times_and_the_lock_survives_a_restart() {
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
                let r = http(
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
    let answers: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failed = answers
        .iter()
        .filter(|a| *a == &(401, "verification_failed".to_string()))
        .count();
    let locked = answers
        .iter()
        .filter(|a| *a == &(429, "verification_locked".to_string()))
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
            (r.status, r.error_code().as_str()),
            (429, "verification_locked"),
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
    let code = oathtool(&secret, clock(&d, 0));
    locked_out(&d, &code);

    // Once the lock time has passed, the right code works.
    clock(&d, 301);
    let r = with_code(
        &d,
        "POST",
        "/v1/keys/prod/NL/rotate",
        json!({}),
        &next_code(&d, &secret),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Trust on first use is gone: with no admin enrolled, only the offline bootstrap (root,
/// daemon stopped) enrolls; after that, a first enrollment online needs a code of another
/// enrolled admin, named by `X-Verification-Uid` (CLI: `--code-uid`, `--code`), checked as
/// that admin's code and audited.
#[test]
fn first_enrollment_needs_an_enrolled_admins_code_or_the_offline_bootstrap() {
    const OTHER: u32 = 65534;
    let d = Daemon::start_with(Options {
        admins: vec!["uid:0".into(), format!("uid:{OTHER}")],
        ..totp_options()
    });
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (409, "bootstrap_required"),
        "{}",
        r.text()
    );

    // The offline bootstrap refuses while the daemon holds the state lock.
    let out = bootstrap_command(&d, OTHER)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = d;
    assert!(d.stop().success());
    let other = bootstrap(&d, OTHER);
    let d = d.launch();

    // This process (uid 0, an admin) is not enrolled; uid OTHER is.
    let enroll_with =
        |headers: &[(&str, &str)]| http(&d.socket, "POST", "/v1/admin/totp/enroll", headers, b"{}");
    let r = enroll_with(&[]);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "verification_required"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("X-Verification-Uid"), "{}", r.text());
    let code = next_code(&d, &other);
    let other_uid = OTHER.to_string();
    for (uid, code, status, error) in [
        (other_uid.as_str(), wrong(&code), 401, "verification_failed"),
        ("4242", code.clone(), 401, "verification_uid_not_admin"),
        ("0", code.clone(), 401, "totp_not_enrolled"),
        ("x", code.clone(), 400, "invalid_verification_uid"),
    ] {
        let r = enroll_with(&[("X-Verification-Uid", uid), ("X-Verification-Code", &code)]);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, error),
            "X-Verification-Uid {uid}: {}",
            r.text()
        );
    }

    // The enrolled admin's code vouches, from the command line.
    let child = Command::new(BIN)
        .arg("--socket")
        .arg(&d.socket)
        .args(["admin", "totp-enroll", "--code-uid", &other_uid, "--code"])
        .arg(&code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mine = type_back(child, |secret| oathtool(secret, clock(&d, 0)));
    assert_eq!(create(&d, "SE", Some(&next_code(&d, &mine))).status, 201);

    // Now enrolled: replacing the secret takes this uid's own code, not another admin's.
    let r = enroll_with(&[
        ("X-Verification-Uid", &other_uid),
        ("X-Verification-Code", &next_code(&d, &other)),
    ]);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_verification_uid"),
        "{}",
        r.text()
    );
    let again = enroll(&d, &[("X-Verification-Code", &next_code(&d, &mine))]);
    assert_ne!(again, mine);

    let audit = audit_details(&d).join("\n");
    for expected in [
        "totp-enroll refused bootstrap_required",
        &format!("totp-enroll ok verification secret of uid {OTHER} enrolled offline"),
        "totp-enroll refused verification_required",
        &format!("totp-enroll refused verification_failed: the verification code is wrong (the code of uid {OTHER}"),
        "totp-enroll refused verification_uid_not_admin",
        &format!("totp-vouch ok uid {OTHER}'s verification code vouched for the first enrollment of uid 0"),
        &format!("totp-enroll ok verification secret enrolled (first enrollment, vouched for by uid {OTHER}'s code)"),
        "totp-enroll ok verification secret replaced",
    ] {
        assert!(audit.contains(expected), "{expected} missing from:\n{audit}");
    }
    let log = d.log_text();
    for secret in [&other, &mine, &again] {
        assert!(!log.contains(secret.as_str()));
    }
    assert!(!log.contains(&code));
}

/// `verification.mode = "off"`: nothing to enroll, whatever the headers say.
#[test]
fn verification_off_enrolls_nothing() {
    let d = Daemon::start();
    let r = http(
        &d.socket,
        "POST",
        "/v1/admin/totp/enroll",
        &[("X-Verification-Uid", "x"), ("X-Verification-Code", "1")],
        b"{}",
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (409, "verification_off"),
        "{}",
        r.text()
    );
}

/// The install's layout: the daemon runs as its own user, which owns the state directory and
/// the token; the offline tools run as root. They act as the state's owner, so what they
/// write (the state, the HSM system key) stays the daemon's.
#[test]
fn offline_tools_run_as_root_act_as_the_state_owner() {
    use std::os::unix::fs::MetadataExt;
    let mut d = Daemon::prepare(Options {
        verification: "totp",
        admins: vec!["uid:0".into()],
        ..Options::default()
    });
    d.open_to_others();
    let state = d.tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let chown = |p: &std::path::Path| {
        let ok = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let run = d.tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let socket = run.join("keyd.sock");
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cfg = cfg.replace(
        &d.socket.display().to_string(),
        &socket.display().to_string(),
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.socket = socket;
    chown(&run);
    chown(&state);
    chown(&d.token.dir);
    // The PIN as a credential would be: root's, readable by the daemon's group.
    let pin = d.token.pin_file();
    std::os::unix::fs::chown(&pin, Some(0), Some(65534)).unwrap();
    std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let secret = bootstrap(&d, 0);
    for f in ["keyd.sqlite3", "keyd.lock"] {
        assert_eq!(
            std::fs::metadata(state.join(f)).unwrap().uid(),
            65534,
            "{f}"
        );
    }
    // The daemon, as that user, reads what the tool wrote, and takes its codes.
    let bin = d.tmp.path().join("keyd-bin");
    std::fs::copy(BIN, &bin).unwrap();
    d.prefix = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\"",
            bin.display()
        )
        .into(),
    ];
    let d = d.launch();
    let code = next_code(&d, &secret);
    let r = http(
        &d.socket,
        "POST",
        "/v1/keys/prod/DE",
        &[("X-Verification-Code", &code)],
        br#"{"type":"incountry-managed","rotation_period_days":30}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
}
