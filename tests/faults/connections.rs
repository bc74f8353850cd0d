//! Connections: descriptor exhaustion by a hostile local uid, requests sent while the daemon
//! was stopped, request deadlines, and the memory of a connection burst.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::raw::read_response;
use harness::{wait_until, Daemon};

use crate::support::{assert_reads_served, options, server_settings};

/// A hostile uid that opens connections and holds them with unfinished requests, as a
/// separate process.
const HOLDER: &str = r#"
import socket, sys, time
path, total, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns, failed = [], 0
for i in range(total):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        # A head that never ends: held until server.request_timeout.
        s.sendall(b"POST /v1/keys/prod/DE/encrypt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n")
        conns.append(s)
    except OSError:
        failed += 1
        s.close()
time.sleep(0.3)
refused = closed = still_open = 0
for s in conns:
    s.setblocking(False)
    try:
        data = s.recv(4096)
        if b"too_many_connections" in data:
            refused += 1
        else:
            closed += 1
    except BlockingIOError:
        still_open += 1
    except OSError:
        closed += 1
time.sleep(hold)
print(len(conns) + failed, refused, closed + failed, still_open)
"#;

#[test]
fn one_uid_cannot_exhaust_descriptors() {
    let mut d = Daemon::prepare(options());
    d.open_to_others();
    server_settings(
        &d,
        "max_connections = 250\nmax_connections_per_uid = 100\nrequest_timeout = \"30s\"",
    );
    d.prefix = ["prlimit", "--nofile=400:400", "--"]
        .map(Into::into)
        .to_vec();
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let script = d.tmp.path().join("holder.py");
    std::fs::write(&script, HOLDER).unwrap();
    // Two hostile processes of the same uid, 600 connections in all: past both its share
    // and the daemon's descriptor limit.
    let attackers: Vec<_> = (0..2)
        .map(|_| {
            Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "/usr/bin/python3",
                ])
                .arg(&script)
                .arg(&d.socket)
                .args(["300", "4"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut served = 0;
    while start.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        assert_reads_served(&d, 1);
        worst = worst.max(t.elapsed());
        served += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    // Attempts, refused with a 503, otherwise closed, still open.
    let mut counts = [0u64; 4];
    for a in attackers {
        let out = a.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for (c, n) in counts.iter_mut().zip(text.split_whitespace()) {
            *c += n.parse::<u64>().unwrap();
        }
    }
    let [attempts, refused, closed, open] = counts;
    let log = d.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(!log.contains("accept failed"), "{log}");
    assert_eq!(attempts, 600);
    assert!(open <= 100, "one uid held {open} connections");
    assert!(open >= 50, "the uid's share was not held: {open}");
    assert_eq!(refused + closed + open, 600);
    assert!(refused > 0, "no 503 too_many_connections was read");
    assert!(log.contains("connection refused: this uid has 100 connections open"));
    println!(
        "fd exhaustion: {attempts} hostile connections, {open} held, {refused} refused with a 503 read, {closed} closed otherwise; {served} reads by another uid, slowest {worst:?}"
    );
    // A liveness bound, not a speed target: the other uid was never left waiting.
    assert!(worst < Duration::from_secs(1), "slowest read {worst:?}");
}

#[test]
fn requests_sent_while_the_daemon_was_stopped_are_answered() {
    let d = Daemon::prepare(options());
    server_settings(&d, "request_timeout = \"1s\"");
    let d = d.launch();
    let req = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut conns: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(&d.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(req).unwrap();
            assert!(read_response(&mut s).unwrap().starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    d.signal("STOP");
    for s in &mut conns {
        s.write_all(req).unwrap();
    }
    // Past request_timeout by the clock, with the requests waiting in the sockets.
    std::thread::sleep(Duration::from_secs(3));
    d.signal("CONT");
    let answered = conns
        .iter_mut()
        .map(read_response)
        .filter(|r| r.as_ref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")))
        .count();
    assert_eq!(answered, 20, "requests answered after SIGCONT");
    // Idle keep-alive connections still end after request_timeout.
    let mut s = conns.pop().unwrap();
    let mut buf = [0u8; 16];
    let t = Instant::now();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed when idle");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn slow_bodies_get_408_and_headers_are_bounded() {
    let d = Daemon::prepare(options());
    server_settings(&d, "request_timeout = \"1s\"");
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    // Headers complete, body partial: answered 408 once the timeout has passed.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST /v1/keys/prod/DE/encrypt HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pla",
    )
    .unwrap();
    let t = Instant::now();
    let r = read_response(&mut s).unwrap();
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.contains("request_timeout"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Headers never finished: closed.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // A long poll is not cut by the request timeout.
    let etag = d
        .get("/v1/keys/prod/DE/secrets")
        .header("etag")
        .unwrap()
        .to_string();
    let t = Instant::now();
    let r = d.request_with(
        "GET",
        "/v1/keys/prod/DE/secrets?wait=2",
        &[("If-None-Match", &etag)],
        b"",
    );
    assert_eq!(r.status, 304);
    assert!(t.elapsed() >= Duration::from_secs(2));
}

#[test]
fn memory_of_a_connection_burst_is_given_back() {
    let d = Daemon::prepare(options());
    server_settings(
        &d,
        "max_connections = 4000\nmax_connections_per_uid = 4000\nrequest_timeout = \"60s\"",
    );
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let idle = d.rss_kib();
    // 3,000 connections, each inside a handler reading a body that never completes.
    let head = b"POST /v1/keys/prod/DE/encrypt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"plaintext\": \"";
    let filler = vec![b'a'; 16 * 1024];
    let mut conns = Vec::new();
    for _ in 0..3000 {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(head).unwrap();
        s.write_all(&filler).unwrap();
        conns.push(s);
    }
    wait_until("the burst read", 30, || d.rss_kib() > idle + 10_000);
    assert_reads_served(&d, 1);
    let peak = d.rss_kib();
    drop(conns);
    // Trimmed within one tick (5 s) of the burst's end.
    let mut after = peak;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        after = d.rss_kib();
        if after < idle + (peak - idle) / 4 {
            break;
        }
    }
    println!(
        "connection burst: RSS idle {idle} KiB, 3,000 partial bodies {peak} KiB, after {after} KiB"
    );
    assert!(
        after < idle + (peak - idle) / 4,
        "memory kept after the burst: idle {idle} KiB, peak {peak} KiB, after {after} KiB"
    );
    assert_reads_served(&d, 1);
}
