//! Security review items: changes a dropped client cannot cut short, audit flooding by
//! peers without a role, roles checked on every request, file modes, what health tells a
//! peer without a role. Each starts the real binary against a fresh SoftHSM token.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{needs_test_clock, wait_until, Daemon, Options};
use incountry_keyd::proto::{AuditEntryDocument, AuditPage, Health};

fn options() -> Options {
    Options {
        versions_per_day: 1000,
        log_level: "info",
        ..Options::default()
    }
}

/// Runs a Python snippet as uid/gid 65534 with no groups; `socket` is its first argument.
fn as_nobody(d: &Daemon, script: &str) -> std::process::Child {
    let path = d.tmp.path().join("client.py");
    std::fs::write(&path, script).unwrap();
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(&path)
        .arg(&d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A keep-alive client helper for the Python snippets.
const PY_CLIENT: &str = r#"
import socket, sys, json
def request(s, method, path, headers=""):
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{headers}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ")[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, v = line.split(b":", 1)
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        body += s.recv(65536)
    return status
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    return s
"#;

fn audit_entries(d: &Daemon) -> Vec<AuditEntryDocument> {
    d.get("/v1/audit").ok::<AuditPage>(200).entries
}

#[test]
fn a_change_whose_client_went_away_is_still_served() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    // Rotations whose clients close the connection right after sending.
    for i in 0..100 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(
            b"POST /v1/keys/prod/DE/rotate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        // Gone at varying moments of the change (HSM, commit, publish).
        std::thread::sleep(Duration::from_micros(100 * (i % 30)));
        drop(s);
    }
    // Every committed version is served, so the next rotation is next after them all.
    wait_until("the dropped rotations to settle", 10, || {
        let n = d.versions("prod", "DE").len();
        std::thread::sleep(Duration::from_millis(200));
        n == d.versions("prod", "DE").len()
    });
    let r = d.rotate("prod", "DE");
    assert_eq!(r.status, 201, "{}", r.text());
    let served = d.versions("prod", "DE").len();
    let d = d.restart();
    assert_eq!(
        d.versions("prod", "DE").len(),
        served,
        "versions in the state that were never served"
    );
}

#[test]
fn refusals_without_a_role_are_summarized_in_the_audit() {
    needs_test_clock!();
    let d = Daemon::prepare(Options {
        readers: vec!["uid:65534".into()],
        ..options()
    });
    d.open_to_others();
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let attempts = |n: u32| {
        let script = format!(
            "{PY_CLIENT}\ns = connect()\nprint(sum(request(s, 'POST', '/v1/keys/prod/DE/rotate') == 403 for _ in range({n})))\n"
        );
        let out = as_nobody(&d, &script).wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let mine = |d: &Daemon| {
        audit_entries(d)
            .into_iter()
            .filter(|e| e.uid == Some(65534))
            .collect::<Vec<_>>()
    };
    assert_eq!(attempts(200), 200);
    let entries = mine(&d);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].action, "refused-no-role");
    // A minute later the count of the rest is audited, once.
    d.advance(61);
    assert_eq!(attempts(1), 1);
    let entries = mine(&d);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let detail = &entries[1].detail;
    assert!(detail.contains("refused 200 time(s)"), "{detail}");
    // Still counted per request in /metrics.
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("route=\"rotate\",status=\"403\"} 201"),
        "{metrics}"
    );
}

fn reload_with_readers(d: &Daemon, readers: &str) {
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let start = cfg.find("readers = [").unwrap();
    let end = start + cfg[start..].find('\n').unwrap();
    let cfg = format!("{}readers = [{readers}]{}", &cfg[..start], &cfg[end..]);
    std::fs::write(&d.config, cfg).unwrap();
    d.signal("HUP");
    wait_until("the reload", 10, || {
        d.log_text().matches("configuration reloaded").count() >= 1
    });
}

#[test]
fn a_reader_removed_by_a_reload_loses_open_connections_and_long_polls() {
    let d = Daemon::prepare(Options {
        readers: vec!["uid:65534".into()],
        ..options()
    });
    d.open_to_others();
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let etag = d
        .get("/v1/keys/prod/DE/secrets")
        .header("etag")
        .unwrap()
        .to_string();
    // One keep-alive connection and one long poll, both opened while uid 65534 reads.
    let script = format!(
        r#"{PY_CLIENT}
import threading
s = connect()
print(request(s, 'GET', '/v1/keys/prod/DE/secrets'), flush=True)
result = {{}}
def poll():
    p = connect()
    result['poll'] = request(p, 'GET', '/v1/keys/prod/DE/secrets?wait=60', 'If-None-Match: {etag}\r\n')
t = threading.Thread(target=poll)
t.start()
print('waiting', flush=True)
sys.stdin.readline()
print(request(s, 'GET', '/v1/keys/prod/DE/secrets'), flush=True)
t.join()
print(result['poll'], flush=True)
"#
    );
    let mut child = as_nobody(&d, &script);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "200");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "waiting");
    wait_until("the long poll to wait", 10, || {
        d.get("/metrics").text().contains("keyd_secrets_waiters 1")
    });
    reload_with_readers(&d, "");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let rest: Vec<String> = out.lines().map(Result::unwrap).collect();
    assert_eq!(rest, ["403", "403"], "keep-alive request, long poll");
    child.wait().unwrap();
}

#[test]
fn health_tells_a_peer_without_a_role_only_the_status() {
    let d = Daemon::prepare(options());
    d.open_to_others();
    let d = d.launch();
    let script = format!(
        "{PY_CLIENT}\ns = connect()\ns.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\ndata = b''\nwhile True:\n    c = s.recv(65536)\n    if not c: break\n    data += c\nprint(data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    );
    let out = as_nobody(&d, &script).wait_with_output().unwrap();
    // Raw on purpose: the exact field set, nothing beyond `status`.
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["status"], "{doc}");
    // A reader still gets the whole document.
    assert!(matches!(
        d.get("/v1/health").ok::<Health>(200),
        Health::Full(_)
    ));
}

#[test]
fn state_files_are_private_whatever_the_umask() {
    let mut d = Daemon::prepare(options());
    d.prefix = ["sh", "-c", "umask 000; exec \"$0\" \"$@\""]
        .map(Into::into)
        .to_vec();
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let state = d.tmp.path().join("state");
    for f in ["keyd.sqlite3", "keyd.sqlite3-wal", "keyd.sqlite3-shm"] {
        let mode = std::fs::metadata(state.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}: {mode:o}");
    }
}

fn start_error(d: &Daemon) -> String {
    let out = d.command().output().unwrap();
    assert!(!out.status.success(), "the daemon started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unsafe_state_directory_config_and_pin_file_are_refused() {
    let d = Daemon::prepare(options());
    let state = d.tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(&state, 0o777);
    let err = start_error(&d);
    assert!(
        err.contains("state directory") && err.contains("writable"),
        "{err}"
    );
    mode(&state, 0o700);

    mode(&d.config, 0o666);
    let err = start_error(&d);
    assert!(err.contains("config") && err.contains("writable"), "{err}");
    mode(&d.config, 0o644);

    // Owned by another user that is not root.
    std::os::unix::fs::chown(&d.config, Some(65534), None).unwrap();
    let err = start_error(&d);
    assert!(err.contains("owned by uid 65534"), "{err}");
    std::os::unix::fs::chown(&d.config, Some(0), None).unwrap();

    std::os::unix::fs::chown(d.token.pin_file(), Some(65534), None).unwrap();
    let err = start_error(&d);
    assert!(
        err.contains("HSM PIN file") && err.contains("owned by uid 65534"),
        "{err}"
    );
    std::os::unix::fs::chown(d.token.pin_file(), Some(0), None).unwrap();

    // Everything back in order: it starts.
    let _d = d.launch();
}
