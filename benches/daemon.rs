//! Daemon benchmark: start-up to socket ready with 50 keys × 10 versions, secrets latency,
//! and memory, each as a ratio against a baseline measured in the same run (an empty daemon;
//! a request that does no work). Run: `cargo bench --bench daemon`.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use harness::{Daemon, Options};

const KEYS: usize = 50;
const VERSIONS: usize = 10;
const STARTS: usize = 5;
const REQUESTS: usize = 2000;

const COUNTRIES: [&str; KEYS] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR",
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

/// Spawn → first successful connect + health, polled every millisecond.
fn time_start(d: &mut Daemon) -> Duration {
    if d.running() {
        let _ = d.stop();
    }
    let t = Instant::now();
    let mut child = d.command().spawn().expect("spawn");
    loop {
        if UnixStream::connect(&d.socket).is_ok() && d.get("/v1/health").status == 200 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = t.elapsed();
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    took
}

fn latencies(d: &Daemon, path: &str) -> Vec<Duration> {
    (0..REQUESTS)
        .map(|_| {
            let t = Instant::now();
            let r = d.get(path);
            assert!(r.status == 200 || r.status == 404);
            t.elapsed()
        })
        .collect()
}

fn daemon() -> Daemon {
    Daemon::start_with(Options {
        versions_per_day: 1000,
        log_level: "warn",
        ..Options::default()
    })
}

fn main() {
    let mut empty = daemon();
    let empty_rss = empty.rss_kib();
    let empty_start = median((0..STARTS).map(|_| time_start(&mut empty)).collect());
    drop(empty);

    let d = daemon();
    for c in COUNTRIES {
        assert_eq!(d.create_managed("bench", c, 30).status, 201);
        for _ in 1..VERSIONS {
            assert_eq!(d.rotate("bench", c).status, 201);
        }
    }
    let mut d = d;
    let loaded_start = median((0..STARTS).map(|_| time_start(&mut d)).collect());
    let d = d.launch();
    let loaded_rss = d.rss_kib();

    let base = latencies(&d, "/v1/nothing");
    let secrets = latencies(&d, &format!("/v1/keys/bench/{}/secrets", COUNTRIES[7]));
    let show = latencies(&d, &format!("/v1/keys/bench/{}", COUNTRIES[7]));

    println!("start-up to ready, median of {STARTS}:");
    println!(
        "  empty state             {:>8.1} ms (baseline)",
        empty_start.as_secs_f64() * 1e3
    );
    println!(
        "  {KEYS} keys x {VERSIONS} versions   {:>8.1} ms  ratio {:.2}",
        loaded_start.as_secs_f64() * 1e3,
        loaded_start.as_secs_f64() / empty_start.as_secs_f64()
    );
    println!("request latency over {REQUESTS} requests, new connection each (median / p99):");
    let row = |name: &str, v: &Vec<Duration>| {
        println!(
            "  {name:<22} {:>7.1} µs / {:>7.1} µs  ratio {:.2} / {:.2}",
            median(v.clone()).as_secs_f64() * 1e6,
            percentile(v.clone(), 0.99).as_secs_f64() * 1e6,
            median(v.clone()).as_secs_f64() / median(base.clone()).as_secs_f64(),
            percentile(v.clone(), 0.99).as_secs_f64()
                / percentile(base.clone(), 0.99).as_secs_f64(),
        )
    };
    row("404 (baseline)", &base);
    row("secrets (10 versions)", &secrets);
    row("key show", &show);
    println!(
        "resident memory: empty {empty_rss} KiB (baseline), loaded {loaded_rss} KiB  ratio {:.2}",
        loaded_rss as f64 / empty_rss.max(1) as f64
    );
}
