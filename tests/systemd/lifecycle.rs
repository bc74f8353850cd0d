//! Socket activation, and the sd_notify messages of a start, a reload and a stop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{bin, request, Daemon, Options};
use incountry_keyd::proto::{Condition, HealthDocument};

use crate::{notify_value, NotifySocket};

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
        .arg(bin())
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

    // The socket exists before the daemon runs; the first connection starts it. Wait until
    // it accepts connections, not merely until its file exists: systemd-socket-activate
    // binds (the file appears) before it listens, and a connect in between is refused (seen
    // once under load). The probe is that first connection; the daemon answers the next.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&activated).is_err() {
        assert!(
            Instant::now() < deadline,
            "socket not made by systemd-socket-activate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = request(&activated, "GET", "/v1/health", &[], b"");
    assert_eq!(r.ok::<HealthDocument>(200).hsm, Condition::Ok);
    let ready = notify.wait_for("READY=1", None);
    assert!(notify_value(&ready, "STATUS").is_some(), "{ready:?}");
    notify.wait_for("WATCHDOG=1", None);

    // The daemon used the passed socket and bound nothing of its own.
    assert!(!d.socket.exists(), "the daemon bound server.socket too");
    let text = std::fs::read_to_string(&d.log).unwrap();
    assert!(text.contains("(from systemd)"), "{text}");
    let r = request(&activated, "GET", "/v1/keys", &[], b"");
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
