//! Enrollment: re-enrolling with a code, the offline reset and bootstrap, the CLI's typed-back
//! code, a first enrollment vouched for by another admin, and the offline tools as root.

use std::process::{Command, Stdio};

use harness::totp::{bootstrap, bootstrap_command, oathtool, type_back};
use harness::{bin, needs_test_clock, Daemon, Options};
use incountry_keyd::domain::Code;
use serde_json::json;

use crate::{
    audit_details, create, enroll, enrolled_daemon, next_code, totp_options, with_code, wrong,
};

#[test]
fn reenrollment_needs_code_and_reset_needs_stopped_daemon() {
    needs_test_clock!();
    let (d, secret) = enrolled_daemon();

    // Replacing the secret needs a valid code from the current one.
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!((r.status, r.code()), (401, Code::VerificationRequired));
    let code = next_code(&d, &secret);
    let r = with_code(
        &d,
        "POST",
        "/v1/admin/totp/enroll",
        json!({}),
        &wrong(&code),
    );
    assert_eq!((r.status, r.code()), (401, Code::VerificationFailed));
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
        Command::new(bin())
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
        (r.status, r.code()),
        (409, Code::BootstrapRequired),
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
    let out = Command::new(bin())
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
    needs_test_clock!();
    let (d, old) = enrolled_daemon();
    let code = next_code(&d, &old);
    let child = Command::new(bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["admin", "totp-enroll", "--code", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let secret = type_back(child, |secret| oathtool(secret, d.advance(0)));
    let r = create(&d, "IT", Some(&next_code(&d, &old)));
    assert_eq!(r.code(), Code::VerificationFailed, "{}", r.text());
    let r = create(&d, "IT", Some(&next_code(&d, &secret)));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Trust on first use is gone: with no admin enrolled, only the offline bootstrap (root,
/// daemon stopped) enrolls; after that, a first enrollment online needs a code of another
/// enrolled admin, named by `X-Verification-Uid` (CLI: `--code-uid`, `--code`), checked as
/// that admin's code and audited.
#[test]
fn first_enrollment_needs_an_enrolled_admins_code_or_the_offline_bootstrap() {
    needs_test_clock!();
    const OTHER: u32 = 65534;
    let d = Daemon::start_with(Options {
        admins: vec!["uid:0".into(), format!("uid:{OTHER}")],
        ..totp_options()
    });
    let r = d.post("/v1/admin/totp/enroll", json!({}));
    assert_eq!(
        (r.status, r.code()),
        (409, Code::BootstrapRequired),
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
        |headers: &[(&str, &str)]| d.request_with("POST", "/v1/admin/totp/enroll", headers, b"{}");
    let r = enroll_with(&[]);
    assert_eq!(
        (r.status, r.code()),
        (401, Code::VerificationRequired),
        "{}",
        r.text()
    );
    assert!(r.text().contains("X-Verification-Uid"), "{}", r.text());
    let code = next_code(&d, &other);
    let other_uid = OTHER.to_string();
    for (uid, code, status, error) in [
        (
            other_uid.as_str(),
            wrong(&code),
            401,
            Code::VerificationFailed,
        ),
        ("4242", code.clone(), 401, Code::VerificationUidNotAdmin),
        ("0", code.clone(), 401, Code::TotpNotEnrolled),
        ("x", code.clone(), 400, Code::InvalidVerificationUid),
    ] {
        let r = enroll_with(&[("X-Verification-Uid", uid), ("X-Verification-Code", &code)]);
        assert_eq!(
            (r.status, r.code()),
            (status, error),
            "X-Verification-Uid {uid}: {}",
            r.text()
        );
    }

    // The enrolled admin's code vouches, from the command line.
    let child = Command::new(bin())
        .arg("--socket")
        .arg(&d.socket)
        .args(["admin", "totp-enroll", "--code-uid", &other_uid, "--code"])
        .arg(&code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mine = type_back(child, |secret| oathtool(secret, d.advance(0)));
    assert_eq!(create(&d, "SE", Some(&next_code(&d, &mine))).status, 201);

    // Now enrolled: replacing the secret takes this uid's own code, not another admin's.
    let r = enroll_with(&[
        ("X-Verification-Uid", &other_uid),
        ("X-Verification-Code", &next_code(&d, &other)),
    ]);
    assert_eq!(
        (r.status, r.code()),
        (400, Code::InvalidVerificationUid),
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
    let r = d.request_with(
        "POST",
        "/v1/admin/totp/enroll",
        &[("X-Verification-Uid", "x"), ("X-Verification-Code", "1")],
        b"{}",
    );
    assert_eq!(
        (r.status, r.code()),
        (409, Code::VerificationOff),
        "{}",
        r.text()
    );
}

/// The install's layout: the daemon runs as its own user, which owns the state directory and
/// the token; the offline tools run as root. They act as the state's owner, so what they
/// write (the state, the HSM system key) stays the daemon's.
#[test]
fn offline_tools_run_as_root_act_as_the_state_owner() {
    needs_test_clock!();
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
    let copy = d.tmp.path().join("keyd-bin");
    std::fs::copy(bin(), &copy).unwrap();
    d.prefix = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\"",
            copy.display()
        )
        .into(),
    ];
    let d = d.launch();
    let code = next_code(&d, &secret);
    let r = d.request_with(
        "POST",
        "/v1/keys/prod/DE",
        &[("X-Verification-Code", &code)],
        br#"{"type":"incountry-managed","rotation_period_days":30}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
}
