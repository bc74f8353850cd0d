//! Propagation benchmark: three nodes on one private PostgreSQL and one SoftHSM token; node A
//! rotates a key CHANGES times while B and C long-poll its secrets document. Reports the
//! delay from a change's commit on A to the new document on B and C, p50 and p99:
//! - as the nodes measure it (`propagation.last_delay_ms` in their health: from just before
//!   the commit, by the database's clock, to the new snapshot);
//! - as a client sees it (from A's answer to the long poll's, the answer's own time
//!   included: an upper bound of what follows the commit).
//!
//! Run: `cargo bench --bench propagation` (needs PostgreSQL: tests/run.sh installs it).

use std::time::{Duration, Instant};

use harness::{Daemon, Options, Postgres, Secrets};

const CHANGES: u32 = 200;

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
    assert_eq!(a.create_managed("bench", "DE", 30).status, 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    while [&b, &c]
        .iter()
        .any(|d| d.get("/v1/keys/bench/DE/secrets").status != 200)
    {
        assert!(Instant::now() < deadline, "the key never reached B and C");
        std::thread::sleep(Duration::from_millis(5));
    }

    let (mut nodes, mut client) = (Vec::new(), Vec::new());
    for version in 2..CHANGES + 2 {
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
