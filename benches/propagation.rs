//! Propagation benchmark: three nodes on one private PostgreSQL and one SoftHSM token; node A
//! rotates a key CHANGES times while B and C long-poll its secrets document. Reports the
//! delay from a change's commit on A to the new document on B and C, p50 and p99:
//! - as the nodes measure it (`propagation.last_delay_ms` in their health: from just before
//!   the commit, by the database's clock, to the new snapshot);
//! - as a client sees it (from A's answer to the long poll's, the answer's own time
//!   included: an upper bound of what follows the commit).
//!
//!
//! First, secrets throughput on node A (postgres-backed) against a sqlite-backed daemon
//! started in the same run, same key (VERSIONS versions), same client load: REQUESTS
//! requests over 1 and 8 keep-alive connections, req/s for both and the ratio
//! postgres/sqlite (equal within noise: reads never touch the database).
//!
//! Run: `cargo bench --features test-clock --bench propagation` (needs PostgreSQL:
//! tests/run.sh installs it).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use harness::{raw, Daemon, Options, Postgres, Secrets};

const CHANGES: u32 = 200;
const VERSIONS: u32 = 10;
const REQUESTS: usize = 20_000;
const ROUNDS: usize = 4;

fn options(node: &str) -> Options {
    Options {
        versions_per_day: 1000,
        log_level: "warn",
        extra: format!("[cluster]\nnode_name = \"{node}\"\n"),
        ..Options::default()
    }
}

fn etag(d: &Daemon) -> String {
    let r = d.get("/v1/keys/bench/DE/secrets");
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("etag").expect("an ETag").to_string()
}

fn waiters(d: &Daemon) -> i64 {
    d.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("keyd_secrets_waiters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Long-polls `d` past `tag`: the version it got, and when.
fn long_poll(d: &Daemon, tag: &str) -> (u32, Instant) {
    let r = d.request_with(
        "GET",
        "/v1/keys/bench/DE/secrets?wait=60",
        &[("If-None-Match", tag)],
        b"",
    );
    let at = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());
    (Secrets::parse(r.body).current_version, at)
}

/// `REQUESTS` secrets reads over `conns` keep-alive connections in parallel: req/s.
fn throughput(d: &Daemon, conns: usize) -> f64 {
    let each = REQUESTS / conns;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conns {
            s.spawn(|| {
                let mut c = UnixStream::connect(&d.socket).expect("connect");
                let req = b"GET /v1/keys/bench/DE/secrets HTTP/1.1\r\nhost: localhost\r\n\r\n";
                for _ in 0..each {
                    c.write_all(req).expect("write");
                    let r = raw::read_response(&mut c).expect("answer");
                    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                }
            });
        }
    });
    (each * conns) as f64 / start.elapsed().as_secs_f64()
}

/// Secrets throughput, sqlite against postgres, rounds interleaved; the best round of each.
fn compare(sqlite: &Daemon, postgres: &Daemon) {
    let size = |d: &Daemon| d.get("/v1/keys/bench/DE/secrets").body.len();
    println!(
        "secrets throughput, {REQUESTS} requests, key with {VERSIONS} versions ({} / {} bytes), best of {ROUNDS}:",
        size(sqlite),
        size(postgres)
    );
    for conns in [1, 8] {
        let (mut sq, mut pg) = (0f64, 0f64);
        for round in 0..ROUNDS {
            // Each goes first every other round.
            if round % 2 == 0 {
                sq = sq.max(throughput(sqlite, conns));
                pg = pg.max(throughput(postgres, conns));
            } else {
                pg = pg.max(throughput(postgres, conns));
                sq = sq.max(throughput(sqlite, conns));
            }
        }
        println!(
            "  {conns} connection(s): sqlite {sq:>8.0} req/s, postgres {pg:>8.0} req/s, ratio postgres/sqlite {:.2}",
            pg / sq
        );
    }
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p) as usize];
    println!(
        "{what}: {} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

fn main() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let first = Daemon::prepare(options("a"));
    first.use_postgres(&pg, &db);
    let b = first.another_node(options("b"), &pg, &db).launch();
    let c = first.another_node(options("c"), &pg, &db).launch();
    let a = first.launch();
    let sqlite = Daemon::start_with(Options {
        extra: String::new(),
        ..options("sqlite")
    });
    for d in [&a, &sqlite] {
        assert_eq!(d.create_managed("bench", "DE", 30).status, 201);
        for _ in 1..VERSIONS {
            assert_eq!(d.rotate("bench", "DE").status, 201);
        }
    }
    compare(&sqlite, &a);
    drop(sqlite);
    let deadline = Instant::now() + Duration::from_secs(10);
    while [&b, &c]
        .iter()
        .any(|d| d.get("/v1/keys/bench/DE/secrets").status != 200)
    {
        assert!(Instant::now() < deadline, "the key never reached B and C");
        std::thread::sleep(Duration::from_millis(5));
    }

    let (mut nodes, mut client) = (Vec::new(), Vec::new());
    for version in VERSIONS + 1..VERSIONS + CHANGES + 1 {
        let (tag_b, tag_c) = (etag(&b), etag(&c));
        std::thread::scope(|s| {
            let polls = [
                s.spawn(|| long_poll(&b, &tag_b)),
                s.spawn(|| long_poll(&c, &tag_c)),
            ];
            while waiters(&b) < 1 || waiters(&c) < 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let r = a.rotate("bench", "DE");
            let answered = Instant::now();
            assert_eq!(r.status, 201, "{}", r.text());
            for poll in polls {
                let (got, at) = poll.join().expect("long poll");
                assert_eq!(got, version);
                client.push(at.saturating_duration_since(answered).as_secs_f64() * 1000.0);
            }
        });
        for d in [&b, &c] {
            let delay = d.health().propagation.and_then(|p| p.last_delay_ms);
            nodes.extend(delay.map(|ms| ms as f64));
        }
    }
    println!("propagation: {CHANGES} rotations on node A, long polls on B and C");
    report(
        "commit on A to served on B/C (the nodes' own measure)",
        nodes,
    );
    report("A's answer to B/C's long-poll answer (client)", client);
}
