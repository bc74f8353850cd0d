//! Propagation benchmark: N clients long-poll a key's secrets document (If-None-Match +
//! wait), then one rotation. Reports how long from the rotation request until the last client
//! had the new document (the rotation itself included: HSM, fsync), and the daemon's memory
//! while N wait, as ratios against one waiter and an idle daemon measured in the same run. Run: `cargo bench --bench longpoll`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::{Daemon, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAITERS: [usize; 4] = [1, 100, 1000, 5000];

async fn long_poll(socket: PathBuf, etag: String) -> (u16, Instant) {
    let mut s = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    let req = format!(
        "GET /v1/keys/bench/DE/secrets?wait=120 HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("read");
    let done = Instant::now();
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, done)
}

fn waiting(d: &Daemon) -> i64 {
    d.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("keyd_secrets_waiters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

fn main() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Each waiter is a socket here and one in the daemon (which inherits this limit).
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let d = Daemon::start_with(Options {
        versions_per_day: 1000,
        log_level: "warn",
        ..Options::default()
    });
    assert_eq!(d.create_managed("bench", "DE", 30).status, 201);
    let idle_rss = d.rss_kib();
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!(
        "{:>7}  {:>10}  {:>16}  {:>10}  {:>9}",
        "waiters", "rotate ms", "all woken in ms", "ratio to 1", "RSS ratio"
    );
    let mut baseline = None;
    for n in WAITERS {
        let etag = d
            .get("/v1/keys/bench/DE/secrets")
            .header("etag")
            .unwrap()
            .to_string();
        let tasks: Vec<_> = (0..n)
            .map(|_| rt.spawn(long_poll(d.socket.clone(), etag.clone())))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while waiting(&d) < n as i64 {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} waiters parked",
                waiting(&d)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rss = d.rss_kib();
        let t0 = Instant::now();
        assert_eq!(d.rotate("bench", "DE").status, 201);
        let answered = Instant::now();
        let results: Vec<(u16, Instant)> = rt.block_on(async {
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert!(
            results.iter().all(|(s, _)| *s == 200),
            "a waiter did not get 200"
        );
        let last = results.iter().map(|(_, t)| *t).max().unwrap();
        let wake = last.saturating_duration_since(t0);
        let base = *baseline.get_or_insert(wake);
        println!(
            "{n:>7}  {:>10.2}  {:>16.2}  {:>10.2}  {:>9.2}",
            (answered - t0).as_secs_f64() * 1e3,
            wake.as_secs_f64() * 1e3,
            wake.as_secs_f64() / base.as_secs_f64(),
            rss as f64 / idle_rss.max(1) as f64
        );
    }
    println!("idle daemon RSS {idle_rss} KiB (baseline for the RSS ratio)");
}
