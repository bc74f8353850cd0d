//! Test harness: starts the real daemon binary against a fresh SoftHSM token in a temp dir,
//! waits for readiness by polling the socket, and talks HTTP to it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_incountry-keyd");
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A token directory made by softhsm/make-token.sh.
pub struct Token {
    pub dir: PathBuf,
}

impl Token {
    pub fn new(root: &Path) -> Token {
        let dir = root.join("hsm");
        let out = Command::new(repo().join("softhsm/make-token.sh"))
            .arg(&dir)
            .output()
            .expect("run make-token.sh");
        assert!(
            out.status.success(),
            "make-token.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Token { dir }
    }
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }
    pub fn pin_file(&self) -> PathBuf {
        self.dir.join("user-pin")
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection (Connection: close).
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = UnixStream::connect(socket).expect("connect to daemon socket");
    s.set_read_timeout(Some(Duration::from_secs(330))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading the whole body; a write error is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

pub struct Options {
    pub readers: Vec<String>,
    pub admins: Vec<String>,
    pub versions_per_day: u32,
    pub extra: String,
    pub clock_offset: i64,
    /// verification.mode: "off" (default in tests) or "totp".
    pub verification: &'static str,
    /// log.level: "debug" in tests (every request logged); benchmarks use "warn".
    pub log_level: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            readers: vec![],
            admins: vec!["uid:0".into()],
            versions_per_day: 1,
            extra: String::new(),
            clock_offset: 0,
            verification: "off",
            log_level: "debug",
        }
    }
}

/// A running daemon with its own token, state and socket under a temp dir.
pub struct Daemon {
    pub tmp: tempfile::TempDir,
    pub token: Token,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub clock_offset: i64,
    /// Extra environment for the daemon (NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, ...).
    pub env: Vec<(String, OsString)>,
    /// A command the daemon runs under (`prlimit --nofile=...`, `setpriv ...`).
    pub prefix: Vec<OsString>,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Daemon {
        let d = Self::prepare(opts);
        d.launch()
    }

    /// Makes the token and config without starting the daemon.
    pub fn prepare(opts: Options) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("keyd-test")
            .tempdir()
            .unwrap();
        let token = Token::new(tmp.path());
        let socket = tmp.path().join("keyd.sock");
        let config = tmp.path().join("keyd.toml");
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        std::fs::write(
            &config,
            format!(
                "version = 1\n[server]\nsocket = \"{}\"\n[hsm]\nmodule = \"{MODULE}\"\npin_file = \"{}\"\n[state]\ndir = \"{}\"\n[access]\nreaders = [{}]\nadmins = [{}]\n[limits]\nversions_per_day = {}\n[verification]\nmode = \"{}\"\n[log]\nlevel = \"{}\"\n{}",
                socket.display(),
                token.pin_file().display(),
                tmp.path().join("state").display(),
                list(&opts.readers),
                list(&opts.admins),
                opts.versions_per_day,
                opts.verification,
                opts.log_level,
                opts.extra,
            ),
        )
        .unwrap();
        let log = tmp.path().join("daemon.log");
        Daemon {
            tmp,
            token,
            socket,
            config,
            log,
            clock_offset: opts.clock_offset,
            env: Vec::new(),
            prefix: Vec::new(),
            child: None,
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("SOFTHSM2_CONF", self.token.conf())
            .env(
                "INCOUNTRY_KEYD_TEST_CLOCK_OFFSET",
                self.clock_offset.to_string(),
            )
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the daemon (appending to its log) and waits until /v1/health answers.
    pub fn launch(mut self) -> Daemon {
        self = self.spawn();
        self.wait_ready();
        self
    }

    /// Starts the daemon (appending to its log) without waiting for it.
    pub fn spawn(mut self) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        self
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                let r = self.get("/v1/health");
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's resident memory in KiB (benchmarks).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if !status.success() {
                    // Shown only when the test fails.
                    eprintln!("daemon exit: {status}; its log:\n{}", self.log_text());
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop within 40 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(mut self) -> Daemon {
        assert!(self.stop().success(), "daemon exit status");
        self.launch()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        http(&self.socket, method, path, &[], body.as_bytes())
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, "")
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> Reply {
        self.request("POST", path, &body.to_string())
    }

    pub fn create_managed(&self, env: &str, country: &str, days: u32) -> Reply {
        self.post(
            &format!("/v1/keys/{env}/{country}"),
            serde_json::json!({"type": "incountry-managed", "rotation_period_days": days}),
        )
    }

    pub fn rotate(&self, env: &str, country: &str) -> Reply {
        self.request("POST", &format!("/v1/keys/{env}/{country}/rotate"), "")
    }

    pub fn secrets(&self, env: &str, country: &str) -> serde_json::Value {
        let r = self.get(&format!("/v1/keys/{env}/{country}/secrets"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Moves the daemon's (test) clock forward.
    pub fn advance(&self, seconds: i64) {
        let r = self.post(
            "/v1/test/clock",
            serde_json::json!({ "advance_seconds": seconds }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn state_db(&self) -> PathBuf {
        self.tmp.path().join("state").join("keyd.sqlite3")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Python with the InCountry SDK, from tests/run.sh's venv.
pub fn sdk_python() -> PathBuf {
    let p = std::env::var_os("KEYD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run tests through tests/run.sh, which makes the SDK venv",
        p.display()
    );
    p
}

/// The Python with moto's server and boto3 (a venv of its own: moto needs pydantic 2, the
/// SDK pydantic 1).
pub fn moto_python() -> PathBuf {
    let p = std::env::var_os("KEYD_TEST_MOTO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-moto/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run tests through tests/run.sh, which makes the moto venv",
        p.display()
    );
    p
}

/// Runs tests/sdk/sdk_tool.py with a secrets document.
pub fn sdk(doc: &serde_json::Value, args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("doc.json");
    std::fs::write(&doc_file, doc.to_string()).unwrap();
    let out = Command::new(sdk_python())
        .arg(repo().join("tests/sdk/sdk_tool.py"))
        .arg(args[0])
        .arg(&doc_file)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `f` until it returns true, failing after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Daemon {
    /// Moves the clock and waits until the rotator has run a pass at the new time.
    pub fn advance_and_settle(&self, seconds: i64) {
        let r = self.post(
            "/v1/test/clock",
            serde_json::json!({ "advance_seconds": seconds }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let now = r.json()["now"].as_str().unwrap().to_string();
        wait_until("a rotator pass after the clock moved", 10, || {
            let h = self.get("/v1/health").json();
            h["rotation"]["last_check"]
                .as_str()
                .is_some_and(|t| t >= now.as_str())
        });
    }

    pub fn versions(&self, env: &str, country: &str) -> Vec<serde_json::Value> {
        self.get(&format!("/v1/keys/{env}/{country}")).json()["versions"]
            .as_array()
            .unwrap()
            .clone()
    }
}
/// Runs the CLI against `d` as uid/gid 65534 with no supplementary groups (the daemon's
/// socket and its directory must let others in: see `Daemon::open_to_others`).
pub fn cli_as_nobody(d: &Daemon, args: &[&str]) -> std::process::Output {
    // A copy nobody can execute (the build tree may not be reachable for it).
    let bin = d.tmp.path().join("keyd-cli");
    if !bin.exists() {
        std::fs::copy(BIN, &bin).unwrap();
    }
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

impl Daemon {
    /// Lets other uids reach the socket (temp dir 0755, socket 0666); access is then decided
    /// by peer credentials alone. Call before launch.
    pub fn open_to_others(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            cfg.replacen("[server]\n", "[server]\nsocket_mode = \"0666\"\n", 1),
        )
        .unwrap();
    }
}

/// A NOTIFY_SOCKET owned by the test: the daemon's sd_notify datagrams arrive here, in order.
pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        // Not a speed check: only keeps a broken daemon from hanging the test forever.
        sock.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        NotifySocket { path, sock }
    }

    /// The next datagram, as its `KEY=value` lines.
    pub fn recv(&self) -> Vec<String> {
        let mut buf = vec![0u8; 65536];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("no sd_notify message from the daemon within 60 s");
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Reads datagrams until one contains the line `line`; returns that datagram. The ones
    /// read before it are appended to `skipped` when given.
    pub fn wait_for(&self, line: &str, mut skipped: Option<&mut Vec<Vec<String>>>) -> Vec<String> {
        loop {
            let msg = self.recv();
            if msg.iter().any(|l| l == line) {
                return msg;
            }
            if let Some(s) = skipped.as_deref_mut() {
                s.push(msg);
            }
        }
    }
}

/// The value of `KEY=` in a datagram.
pub fn notify_value<'a>(msg: &'a [String], key: &str) -> Option<&'a str> {
    msg.iter()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
