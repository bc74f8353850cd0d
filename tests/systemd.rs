//! systemd integration: the units (verify, security exposure, sysusers, tmpfiles), socket
//! activation, sd_notify lifecycle (READY, WATCHDOG, RELOADING, STOPPING), reload, the PIN
//! from systemd credentials, and logs. The real binary, a fresh SoftHSM token per test.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
        service.replace("/usr/bin/incountry-keyd", BIN),
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

/// A child process killed when the test ends, whatever happens.
struct Guard(Option<Child>);

impl Guard {
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn socket_activation_serves_health_on_the_passed_socket() {
    let d = Daemon::prepare(Options::default());
    let notify = NotifySocket::bind(d.tmp.path());
    let activated = d.tmp.path().join("activated.sock");
    let log = std::fs::File::create(&d.log).unwrap();
    // systemd-socket-activate gives the child a fresh environment: -E passes variables on.
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activated)
        .args([
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "WATCHDOG_USEC",
            "-E",
            "SOFTHSM2_CONF",
        ])
        .args(["-E", "INCOUNTRY_KEYD_TEST_CLOCK_OFFSET"])
        .arg(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&d.config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "2000000")
        .env("SOFTHSM2_CONF", d.token.conf())
        .env("INCOUNTRY_KEYD_TEST_CLOCK_OFFSET", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn systemd-socket-activate");
    let mut child = Guard(Some(child));
    let pid = child.0.as_ref().unwrap().id();

    // The socket exists before the daemon runs; the first connection starts it and is
    // answered by it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !activated.exists() {
        assert!(
            Instant::now() < deadline,
            "socket not made by systemd-socket-activate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = http(&activated, "GET", "/v1/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["hsm"], "ok");
    let ready = notify.wait_for("READY=1", None);
    assert!(notify_value(&ready, "STATUS").is_some(), "{ready:?}");
    notify.wait_for("WATCHDOG=1", None);

    // The daemon used the passed socket and bound nothing of its own.
    assert!(!d.socket.exists(), "the daemon bound server.socket too");
    let text = std::fs::read_to_string(&d.log).unwrap();
    assert!(text.contains("(from systemd)"), "{text}");
    let r = http(&activated, "GET", "/v1/keys", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());

    kill(pid, "TERM");
    notify.wait_for("STOPPING=1", None);
    let status = child.wait();
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[test]
fn sd_notify_ready_watchdog_reload_stopping() {
    let mut d = Daemon::prepare(Options::default());
    let notify = NotifySocket::bind(d.tmp.path());
    d.env
        .push(("NOTIFY_SOCKET".into(), notify.path.clone().into()));
    d.env.push(("WATCHDOG_USEC".into(), "1000000".into()));
    let mut d = d.spawn();

    // READY=1 comes once the socket answers: one request, no retry.
    let mut before = Vec::new();
    let ready = notify.wait_for("READY=1", Some(&mut before));
    let r = d.get("/v1/health");
    assert_eq!(r.status, 200, "{}", r.text());
    let status = notify_value(&ready, "STATUS").expect("STATUS= with READY=1");
    assert!(status.contains("0 keys, 0 versions loaded"), "{status}");
    assert!(status.contains("verification off"), "{status}");
    assert!(
        before.iter().flatten().all(|l| l != "WATCHDOG=1"),
        "watchdog pings before READY: {before:?}"
    );

    // The watchdog pings, repeatedly.
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1", None);
    }

    // STATUS= follows key changes.
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    loop {
        let msg = notify.recv();
        if notify_value(&msg, "STATUS").is_some_and(|s| s.starts_with("1 keys, 1 versions")) {
            break;
        }
    }

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, taken after the signal),
    // then READY=1.
    let t0 = monotonic_usec();
    d.signal("HUP");
    let reloading = notify.wait_for("RELOADING=1", None);
    let usec: u64 = notify_value(&reloading, "MONOTONIC_USEC")
        .expect("MONOTONIC_USEC= with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec >= t0, "MONOTONIC_USEC {usec} before the signal ({t0})");
    assert!(usec <= monotonic_usec());
    let ready = notify.wait_for("READY=1", None);
    assert!(
        notify_value(&ready, "STATUS").is_some_and(|s| s.starts_with("1 keys")),
        "{ready:?}"
    );
    assert_eq!(d.get("/v1/health").status, 200);

    // SIGTERM: STOPPING=1, exit 0.
    let status = d.stop();
    notify.wait_for("STOPPING=1", None);
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let log = d.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

fn monotonic_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) },
        0
    );
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// SIGHUP and wait for the reload to finish (RELOADING=1 then READY=1); returns STATUS=.
fn reload(d: &Daemon, notify: &NotifySocket) -> String {
    d.signal("HUP");
    notify.wait_for("RELOADING=1", None);
    let ready = notify.wait_for("READY=1", None);
    notify_value(&ready, "STATUS").unwrap_or("").to_string()
}

fn nobody_can_list(d: &Daemon) -> bool {
    let out = cli_as_nobody(d, &["keys", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("403"),
        "neither allowed nor forbidden: {err}"
    );
    out.status.success()
}

#[test]
fn reload_applies_readers_and_keeps_old_config_on_error() {
    let mut d = Daemon::prepare(Options {
        readers: vec!["uid:65534".into()],
        ..Options::default()
    });
    d.open_to_others();
    let notify = NotifySocket::bind(d.tmp.path());
    d.env
        .push(("NOTIFY_SOCKET".into(), notify.path.clone().into()));
    let d = d.launch();
    notify.wait_for("READY=1", None);
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    assert!(nobody_can_list(&d));
    let good = std::fs::read_to_string(&d.config).unwrap();

    // Broken configs: a TOML error, an unknown group. The old config stays, serving goes on.
    for (broken, why) in [
        (good.replace("[access]", "[access"), "TOML syntax"),
        (
            good.replace("\"uid:65534\"", "\"group:no-such-group-keyd\""),
            "unknown group",
        ),
        (good.replace("version = 1", "version = 7"), "version"),
    ] {
        std::fs::write(&d.config, broken).unwrap();
        let status = reload(&d, &notify);
        assert!(
            status.contains("last reload failed, running configuration kept"),
            "{why}: {status}"
        );
        assert!(nobody_can_list(&d), "{why}: old reader list lost");
        assert_eq!(d.get("/v1/health").status, 200);
        assert_eq!(d.secrets("prod", "FR")["currentVersion"], 1);
    }
    let log = d.log_text();
    assert!(log.contains("reload refused, keeping the running configuration"));
    assert!(log.contains("no-such-group-keyd"), "{log}");

    // A changed reader list applies to new connections.
    std::fs::write(&d.config, good.replace("\"uid:65534\"", "")).unwrap();
    let status = reload(&d, &notify);
    assert!(!status.contains("failed"), "{status}");
    assert!(!nobody_can_list(&d), "nobody still reads after removal");
    std::fs::write(&d.config, &good).unwrap();
    reload(&d, &notify);
    assert!(
        nobody_can_list(&d),
        "nobody cannot read after being added back"
    );

    // Limits and log level apply too. (Requests are logged at debug.)
    assert_eq!(d.rotate("prod", "FR").status, 429);
    assert_eq!(d.get("/v1/before-level-change").status, 404);
    assert!(d.log_text().contains("/v1/before-level-change"));
    std::fs::write(
        &d.config,
        good.replace("versions_per_day = 1", "versions_per_day = 2")
            .replace("level = \"debug\"", "level = \"info\""),
    )
    .unwrap();
    reload(&d, &notify);
    assert_eq!(d.rotate("prod", "FR").status, 201);
    assert_eq!(d.get("/v1/after-level-change").status, 404);
    assert!(!d.log_text().contains("/v1/after-level-change"));
}

/// Copies the token's user PIN into a credentials directory as systemd's LoadCredential=
/// does (file `hsm-pin`, mode 0400), and drops `pin_file` from the config.
fn use_credentials(d: &mut Daemon) -> PathBuf {
    let creds = d.tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();
    let pin = creds.join("hsm-pin");
    std::fs::copy(d.token.pin_file(), &pin).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o400)).unwrap();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let line = format!("pin_file = \"{}\"\n", d.token.pin_file().display());
    assert!(cfg.contains(&line));
    std::fs::write(&d.config, cfg.replace(&line, "")).unwrap();
    creds
}

#[test]
fn pin_from_credentials_directory() {
    let mut d = Daemon::prepare(Options::default());
    let creds = use_credentials(&mut d);
    // The token's own PIN file is gone: only the credential can open the HSM.
    std::fs::remove_file(d.token.pin_file()).unwrap();

    // Without CREDENTIALS_DIRECTORY (and no pin_file) the start fails, saying where the PIN
    // is expected.
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LoadCredential=hsm-pin"), "{err}");

    d.env
        .push(("CREDENTIALS_DIRECTORY".into(), creds.clone().into()));
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&d.config)
        .arg("check-config")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("PIN file {}", creds.join("hsm-pin").display())),
        "{said}"
    );
    let d = d.launch();
    let h = d.get("/v1/health").json();
    assert_eq!(h["hsm"], "ok", "{h}");
    assert_eq!(d.create_managed("prod", "SE", 30).status, 201);
    let pin = std::fs::read_to_string(creds.join("hsm-pin")).unwrap();
    assert!(!d.log_text().contains(pin.trim()), "the PIN is in the log");
}

#[test]
fn logs_plain_on_files_and_with_priorities_on_the_journal() {
    // stderr is a file: no colours, level and fields kept.
    let mut d = Daemon::start();
    assert_eq!(d.create_managed("prod", "NO", 30).status, 201);
    assert!(d.stop().success());
    let text = d.log_text();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a non-TTY log:\n{text}"
    );
    let ready = text
        .lines()
        .find(|l| l.contains("ready:"))
        .expect("a ready line");
    assert!(ready.contains(" INFO "), "{ready}");
    assert!(ready.contains("startup_ms="), "{ready}");

    // stderr is the journal (JOURNAL_STREAM names it): `<N>` priorities, no timestamps.
    std::fs::write(&d.log, "").unwrap();
    let meta = std::fs::metadata(&d.log).unwrap();
    d.env.push((
        "JOURNAL_STREAM".into(),
        format!("{}:{}", meta.dev(), meta.ino()).into(),
    ));
    let mut d = d.launch();
    assert!(d.stop().success());
    let text = d.log_text();
    assert!(!text.contains('\u{1b}'), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "no priority prefix: {l}"
        );
        assert!(!l.as_bytes()[3..].starts_with(b"20"), "timestamp: {l}");
    }
    let ready = lines
        .iter()
        .find(|l| l.contains("ready:"))
        .expect("a ready line");
    assert!(ready.starts_with("<6> INFO "), "{ready}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("<4>") && l.contains("WARN")));

    // A fatal start error is an "err" line.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace(MODULE, "/nonexistent/pkcs11.so")).unwrap();
    let log = std::fs::File::create(&d.log).unwrap();
    let meta = log.metadata().unwrap();
    let out = d
        .command()
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .status()
        .unwrap();
    assert!(!out.success());
    let text = d.log_text();
    let fatal = text
        .lines()
        .find(|l| l.contains("incountry-keyd: error:"))
        .unwrap_or_else(|| panic!("no fatal line:\n{text}"));
    assert!(fatal.starts_with("<3>"), "{fatal}");
    assert!(fatal.contains("/nonexistent/pkcs11.so"), "{fatal}");
}
