//! A private PostgreSQL for one test: `initdb` in a fresh temp dir, run as uid/gid 65534
//! (PostgreSQL refuses to run as root, and the tests run as root), listening only on a Unix
//! socket in that dir (no TCP), with a role `keyd` that logs in with a password
//! (SCRAM). Ready once `pg_isready` says so (polled); stopped (`pg_ctl stop -m fast`) on
//! drop, also when the test panics. `stop` and `start` make outages. `enable_tls` adds a
//! TLS listener on a loopback port, with a certificate from a CA of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::{Daemon, Options};

/// The unprivileged user the server runs as.
const PG_UID: u32 = 65534;
/// The daemon's role.
pub const ROLE: &str = "keyd";

pub struct Postgres {
    /// Data (`data/`), socket, server log (`server.log`) and the role's password file.
    pub tmp: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
    /// The port: names the socket file, and the loopback listener once TLS is on.
    port: u16,
}

/// The newest PostgreSQL's binaries (`/usr/lib/postgresql/VERSION/bin`, Debian's layout).
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (tests/run.sh installs Debian's postgresql)")
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("no /usr/lib/postgresql/*/bin/initdb").1
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// A new cluster, running, with the role `keyd` (password in `password_file`).
    pub fn init() -> Postgres {
        let tmp = tempfile::Builder::new()
            .prefix("keyd-pg")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(tmp.path(), Some(PG_UID), Some(PG_UID)).unwrap();
        let mut pg = Postgres {
            tmp,
            bin: bin_dir(),
            running: false,
            port: 5432,
        };
        let data = pg.data();
        check(
            "initdb",
            pg.as_server("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
                .output()
                .unwrap(),
        );
        // The superuser (set-up only) needs no password; every other role does.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all postgres trust\nlocal all all scram-sha-256\n",
        )
        .unwrap();
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\nmax_connections = 60\n",
            pg.socket_dir().display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        pg.start();
        let password = format!("pw-{}-{}", std::process::id(), unique());
        pg.sql(
            "postgres",
            &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'"),
        );
        let file = pg.password_file();
        std::fs::write(&file, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        pg
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// Where the server's socket is (the temp dir itself).
    pub fn socket_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The role's password, in a file only root reads (the daemon runs as root here).
    pub fn password_file(&self) -> PathBuf {
        self.tmp.path().join("keyd-password")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("server.log")).unwrap_or_default()
    }

    /// A PostgreSQL program run as the server's user.
    fn as_server(&self, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={PG_UID}"),
            format!("--regid={PG_UID}"),
            "--clear-groups".into(),
        ])
        .arg(self.bin.join(program))
        .current_dir(self.tmp.path())
        .env("LC_ALL", "C");
        cmd
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(!self.running, "PostgreSQL already running");
        check(
            "pg_ctl start",
            self.as_server("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.tmp.path().join("server.log"))
                .args(["-W", "start"])
                .output()
                .unwrap(),
        );
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-q"])
                .status()
                .unwrap()
                .success();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL not ready in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (fast: open sessions are cut, as in an outage) and waits for it.
    pub fn stop(&mut self) {
        assert!(self.running, "PostgreSQL not running");
        self.running = false;
        check("pg_ctl stop", self.pg_ctl_stop());
    }

    fn pg_ctl_stop(&self) -> Output {
        self.as_server("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output()
            .unwrap()
    }

    /// Runs SQL as the superuser in `db`; its output (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = check(
            &format!("psql {sql}"),
            Command::new(self.bin.join("psql"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", db, "-X", "-q", "-A", "-t"])
                .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .unwrap(),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new, empty database owned by the daemon's role; its name.
    pub fn database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE}"));
        name.to_string()
    }

    /// The URL of `db` for the daemon's role, over the socket.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{ROLE}@/{db}?host={}&port={}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Restarts the server with TLS on a free loopback port as well, its certificate (for
    /// the name `localhost` only, not 127.0.0.1) signed by a new CA; the CA's certificate
    /// file. Logins over TCP must use TLS.
    pub fn enable_tls(&mut self) -> PathBuf {
        let dir = self.tmp.path().to_path_buf();
        let ca = make_ca(&dir, "ca");
        let data = self.data();
        let openssl = |args: &[&str]| {
            check(
                &format!("openssl {args:?}"),
                Command::new("openssl")
                    .args(args)
                    .current_dir(&dir)
                    .output()
                    .unwrap(),
            )
        };
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        for file in ["server.crt", "server.key"] {
            std::fs::copy(dir.join(file), data.join(file)).unwrap();
            std::os::unix::fs::chown(data.join(file), Some(PG_UID), Some(PG_UID)).unwrap();
            std::fs::set_permissions(
                data.join(file),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        // A free port: bound and released (the server takes it a moment later).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        self.stop();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        let mut hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        hba.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        self.port = port;
        self.start();
        ca
    }

    /// The port (of the socket file; after `enable_tls`, of the loopback listener too).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The config lines for `db`: `[state]` (the backend) and `[postgres]`.
    pub fn config(&self, db: &str) -> String {
        format!(
            "[state]\nbackend = \"postgres\"\n[postgres]\nurl = \"{}\"\npassword_file = \"{}\"\n",
            self.url(db),
            self.password_file().display()
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let out = self.pg_ctl_stop();
            if !out.status.success() {
                eprintln!(
                    "pg_ctl stop failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// A new self-signed CA under `dir` (`NAME.key`, `NAME.crt`); its certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    check(
        "openssl req -x509",
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=keyd test {name}"),
            ])
            .args(["-keyout", &key, "-out", &crt])
            .current_dir(dir)
            .output()
            .unwrap(),
    );
    dir.join(crt)
}

/// A number no other call in this process returns.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Daemon {
    /// Points a prepared daemon's state at `db` on `pg` (`state.backend = "postgres"`).
    /// Call before launch.
    pub fn use_postgres(&self, pg: &Postgres, db: &str) {
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        // The harness writes `[state]` with the SQLite dir only: the backend joins it.
        let cfg = cfg.replacen(
            "[state]\n",
            &format!(
                "[postgres]\nurl = \"{}\"\npassword_file = \"{}\"\n[state]\nbackend = \"postgres\"\n",
                pg.url(db),
                pg.password_file().display()
            ),
            1,
        );
        std::fs::write(&self.config, cfg).unwrap();
    }

    /// Another node beside this one (prepared, not started): its own socket, config and
    /// temp dir, but this node's database and HSM token (the same key objects, as with a
    /// network HSM), as a cluster runs.
    pub fn another_node(&self, opts: Options, pg: &Postgres, db: &str) -> Daemon {
        let mut node = Daemon::prepare(opts);
        node.use_postgres(pg, db);
        let cfg = std::fs::read_to_string(&node.config).unwrap();
        let cfg = cfg.replace(
            &node.token.pin_file().display().to_string(),
            &self.token.pin_file().display().to_string(),
        );
        std::fs::write(&node.config, cfg).unwrap();
        node.env
            .push(("SOFTHSM2_CONF".into(), self.token.conf().into_os_string()));
        node
    }
}
