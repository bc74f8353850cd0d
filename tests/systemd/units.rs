//! The unit files, checked by systemd's own tools: `systemd-analyze verify` and
//! `security`, `systemd-sysusers`, `systemd-tmpfiles`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use harness::{bin, repo};

const SERVICE: &str = "incountry-keyd.service";

const SOCKET: &str = "incountry-keyd.socket";

fn unit(name: &str) -> PathBuf {
    repo().join("systemd").join(name)
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn units_verify_without_warnings() {
    // Verify copies whose ExecStart= names the binary just built (the installed path does
    // not exist here); nothing else changes.
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(unit(SERVICE)).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/incountry-keyd serve"));
    std::fs::write(
        dir.path().join(SERVICE),
        service.replace("/usr/bin/incountry-keyd", bin().to_str().unwrap()),
    )
    .unwrap();
    std::fs::copy(unit(SOCKET), dir.path().join(SOCKET)).unwrap();
    let (ok, stdout, stderr) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(SERVICE))
        .arg(dir.path().join(SOCKET)));
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    assert_eq!(stderr.trim(), "", "systemd-analyze verify warned");
    assert_eq!(stdout.trim(), "", "systemd-analyze verify printed");

    // What the daemon relies on is in the units.
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "LoadCredential=hsm-pin:/etc/incountry-keyd/hsm-pin",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=incountry-keyd",
        "User=incountry-keyd",
        "UMask=0077",
    ] {
        assert!(service.lines().any(|l| l == line), "{SERVICE} lacks {line}");
    }
    assert!(service.lines().any(|l| l.starts_with("WatchdogSec=")));
    let socket = std::fs::read_to_string(unit(SOCKET)).unwrap();
    for line in [
        "ListenStream=/run/incountry-keyd/keyd.sock",
        "SocketMode=0660",
        "SocketGroup=incountry-border",
    ] {
        assert!(socket.lines().any(|l| l == line), "{SOCKET} lacks {line}");
    }
    // Every relaxation says why, on the line above it.
    let lines: Vec<&str> = service.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let relaxed = line.starts_with("PrivateUsers=no")
            || line.starts_with("RestrictAddressFamilies=")
            || line.starts_with("IPAddressDeny=")
            || line.starts_with("PrivateDevices=")
            || line.starts_with("LimitMEMLOCK=");
        if relaxed {
            assert!(
                i > 0 && lines[i - 1].starts_with('#'),
                "{line}: no comment above it"
            );
        }
    }
}

#[test]
fn security_exposure_at_most_1_5() {
    let (ok, stdout, stderr) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit(SERVICE)));
    assert!(ok, "systemd-analyze security failed:\n{stdout}{stderr}");
    let text = format!("{stdout}{stderr}");
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure in `{line}`"));
    eprintln!("{line}");
    assert!(
        score <= 1.5,
        "exposure {score} is above 1.5:\n{}",
        text.lines()
            .filter(|l| l.starts_with('✗'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn sysusers_and_tmpfiles_apply() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let (ok, stdout, stderr) = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(unit("incountry-keyd.sysusers")));
    assert!(ok, "systemd-sysusers failed:\n{stdout}{stderr}");
    for l in stderr.lines() {
        assert!(l.starts_with("Creating "), "systemd-sysusers: {l}");
    }
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("incountry-keyd:"))
        .expect("user incountry-keyd");
    assert!(
        user.ends_with(":/var/lib/incountry-keyd:/usr/sbin/nologin"),
        "{user}"
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("incountry-border:")));
    assert!(group.lines().any(|l| l.starts_with("incountry-keyd:")));

    let (ok, stdout, stderr) = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(unit("incountry-keyd.tmpfiles")));
    assert!(ok, "systemd-tmpfiles failed:\n{stdout}{stderr}");
    assert_eq!(stderr.trim(), "");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    let state = std::fs::metadata(root.path().join("var/lib/incountry-keyd")).unwrap();
    assert_eq!(
        (state.mode() & 0o7777, state.uid()),
        (0o700, uid),
        "state directory"
    );
    let etc = std::fs::metadata(root.path().join("etc/incountry-keyd")).unwrap();
    assert_eq!(
        (etc.mode() & 0o7777, etc.uid(), etc.gid()),
        (0o750, 0, uid),
        "config directory"
    );
}
