//! The real daemon binary against a fresh SoftHSM token, with its state, config, socket and
//! log in a temp dir; ready once its socket answers /v1/health (polled, never slept on).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use incountry_keyd::proto::{
    AuditPage, ClockAnswer, HealthDocument, KeyDocument, KeyList, VersionAdded, VersionDocument,
};
use serde_json::{json, Value};

use crate::{
    bin, repo, request, try_request, wait_until, Reply, Secrets, MODULE, NEEDS_TEST_CLOCK,
};

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

/// A daemon with its own token, state and socket under a temp dir; killed on drop.
pub struct Daemon {
    pub tmp: tempfile::TempDir,
    pub token: Token,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The test clock's offset at start, in seconds (`INCOUNTRY_KEYD_TEST_CLOCK_OFFSET`).
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
        Self::prepare(opts).launch()
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

    /// `incountry-keyd serve` with this daemon's config and environment, not started.
    pub fn command(&self) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
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
    pub fn launch(self) -> Daemon {
        let mut d = self.spawn();
        d.wait_ready();
        d
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
            let health = try_request(
                &self.socket,
                "GET",
                "/v1/health",
                &[],
                b"",
                Duration::from_secs(10),
            );
            if health.is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The daemon's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
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

    pub fn state_db(&self) -> PathBuf {
        self.tmp.path().join("state").join("keyd.sqlite3")
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI (`--json`) as uid/gid 65534 with no supplementary groups (the socket and
    /// its directory must let others in: `open_to_others`).
    pub fn cli_as_nobody(&self, args: &[&str]) -> Output {
        // A copy nobody can execute (the build tree may not be reachable for it).
        let copy = self.tmp.path().join("keyd-cli");
        if !copy.exists() {
            std::fs::copy(bin(), &copy).unwrap();
        }
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .output()
            .unwrap()
    }

    /// A request with a body as it is (`""`: none on a GET).
    pub fn request(&self, method: &str, path: &str, body: &str) -> Reply {
        request(&self.socket, method, path, &[], body.as_bytes())
    }

    /// A request with extra headers (`X-Verification-Code`, `If-None-Match`, ...).
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        request(&self.socket, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, "")
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, &body.to_string())
    }

    pub fn create_managed(&self, env: &str, country: &str, days: u32) -> Reply {
        self.post(
            &format!("/v1/keys/{env}/{country}"),
            json!({"type": "incountry-managed", "rotation_period_days": days}),
        )
    }

    pub fn rotate(&self, env: &str, country: &str) -> Reply {
        self.request("POST", &format!("/v1/keys/{env}/{country}/rotate"), "")
    }

    /// Creates a managed key (or adds a managed version to it), which must succeed.
    pub fn create_key(&self, env: &str, country: &str, days: u32) -> VersionAdded {
        self.create_managed(env, country, days).ok(201)
    }

    /// Rotates a key, which must succeed.
    pub fn rotate_key(&self, env: &str, country: &str) -> VersionAdded {
        self.rotate(env, country).ok(201)
    }

    /// `GET /v1/keys`.
    pub fn keys(&self) -> KeyList {
        self.get("/v1/keys").ok(200)
    }

    /// `GET /v1/keys/{env}/{country}` (the key must exist).
    pub fn key(&self, env: &str, country: &str) -> KeyDocument {
        self.get(&format!("/v1/keys/{env}/{country}")).ok(200)
    }

    /// The key's versions, oldest first.
    pub fn versions(&self, env: &str, country: &str) -> Vec<VersionDocument> {
        self.key(env, country).versions
    }

    /// One version of the key (it must have it).
    pub fn version(&self, env: &str, country: &str, version: u32) -> VersionDocument {
        let key = self.key(env, country);
        key.versions
            .into_iter()
            .find(|v| v.version == version)
            .unwrap_or_else(|| panic!("{env}/{country} has no version {version}"))
    }

    /// The key's secrets document (must be served).
    pub fn secrets(&self, env: &str, country: &str) -> Secrets {
        let r = self.get(&format!("/v1/keys/{env}/{country}/secrets"));
        r.assert_status(200);
        Secrets::parse(r.body)
    }

    /// `GET /v1/health` as a reader (the tests run as root, an admin): the whole document.
    pub fn health(&self) -> HealthDocument {
        self.get("/v1/health").ok(200)
    }

    /// `GET /v1/audit?since=SEQ` (as an admin).
    pub fn audit(&self, since: i64) -> AuditPage {
        self.get(&format!("/v1/audit?since={since}")).ok(200)
    }

    /// Moves the daemon's test clock forward by `seconds` (0: only reads it); returns the
    /// daemon's time, in Unix seconds.
    pub fn advance(&self, seconds: i64) -> i64 {
        let r = self.post("/v1/test/clock", json!({ "advance_seconds": seconds }));
        assert_ne!(r.status, 404, "{NEEDS_TEST_CLOCK}");
        r.ok::<ClockAnswer>(200).unix
    }

    /// Moves the clock and waits until the rotator has run a pass at the new time.
    pub fn advance_and_settle(&self, seconds: i64) {
        let now = incountry_keyd::domain::clock::rfc3339(self.advance(seconds));
        wait_until("a rotator pass after the clock moved", 10, || {
            self.health()
                .rotation
                .last_check
                .is_some_and(|t| t.as_str() >= now.as_str())
        });
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
