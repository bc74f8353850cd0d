//! Verification codes from an independent implementation (oathtool), and the offline
//! enrollment of an admin (`admin totp-enroll --uid N`, daemon stopped), as in production.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

use crate::{bin, Daemon};

/// The wall clock, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The code oathtool computes for `secret` (base32) at `unix`.
pub fn oathtool(secret: &str, unix: i64) -> String {
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

/// Drives an interactive `totp-enroll` (started with piped stdio): reads its output up to
/// the otpauth URI, types back the code `code_for(secret)` gives, and waits for it to
/// succeed; returns the secret.
pub fn type_back(mut child: Child, code_for: impl FnOnce(&str) -> String) -> String {
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

/// `admin totp-enroll --uid N` on the daemon's config and token, at the daemon's clock
/// offset; not started.
pub fn bootstrap_command(d: &Daemon, uid: u32) -> Command {
    let mut cmd = Command::new(bin());
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

/// The offline bootstrap of `uid`'s first secret (as root, with the daemon stopped): types
/// back the code at the time the daemon will have; returns the secret.
pub fn bootstrap(d: &Daemon, uid: u32) -> String {
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
