//! Starts that must fail with one clear line, a second daemon on the same state, a stale
//! socket, and `check-config`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use harness::{bin, wait_until, Daemon, Options, MODULE};

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
    let out = Command::new(bin())
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
        Command::new(bin())
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
