//! Three daemons on one PostgreSQL state and one SoftHSM token: a change made on one is
//! served by the others within a second (through LISTEN/NOTIFY, no restart), long polls on
//! the others wake, and two nodes rotating one key at once make every version number once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::{wait_until, Daemon, Options, Postgres};

/// Each node's options: its name, limits high enough for the tests' changes, and `extra`
/// lines of `[cluster]`.
pub fn options(node: &str, extra: &str) -> Options {
    Options {
        versions_per_day: 1000,
        log_level: "info",
        extra: format!("[cluster]\nnode_name = \"{node}\"\n{extra}"),
        ..Options::default()
    }
}

/// Nodes `a`, `b`, ... on `db`, all with `a`'s HSM token, started.
pub fn cluster(
    pg: &Postgres,
    db: &str,
    names: &[&str],
    opts: impl Fn(&str) -> Options,
) -> Vec<Daemon> {
    let first = Daemon::prepare(opts(names[0]));
    first.use_postgres(pg, db);
    let others: Vec<Daemon> = names[1..]
        .iter()
        .map(|n| first.another_node(opts(n), pg, db))
        .collect();
    std::iter::once(first)
        .chain(others)
        .map(Daemon::launch)
        .collect()
}

/// The active version `d` serves of prod/`country`, if it serves the key.
pub fn served(d: &Daemon, country: &str) -> Option<u32> {
    let r = d.get(&format!("/v1/keys/prod/{country}/secrets"));
    (r.status == 200).then(|| harness::Secrets::parse(r.body).current_version)
}

/// Polls `d` until it serves `version` of prod/`country`; the time from `since`.
fn until_served(d: &Daemon, country: &str, version: u32, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(d, country) != Some(version) {
        assert!(
            Instant::now() < deadline,
            "version {version} of prod/{country} not served within 10 s:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    since.elapsed()
}

/// The ETag of prod/DE's secrets document on `d`.
fn etag(d: &Daemon) -> String {
    let r = d.get("/v1/keys/prod/DE/secrets");
    r.assert_status(200);
    r.header("etag").unwrap().to_string()
}

/// How many long polls wait on `d`.
fn waiters(d: &Daemon) -> u32 {
    let text = d.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix("keyd_secrets_waiters "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A long poll on `d` for a document other than `tag`: the version it got, and when.
fn long_poll(d: &Daemon, tag: &str) -> (u32, Instant) {
    let r = d.request_with(
        "GET",
        "/v1/keys/prod/DE/secrets?wait=30",
        &[("If-None-Match", tag)],
        b"",
    );
    let at = Instant::now();
    r.assert_status(200);
    (harness::Secrets::parse(r.body).current_version, at)
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn a_change_on_one_node_is_served_by_the_others_within_a_second() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let nodes = cluster(&pg, &db, &["a", "b", "c"], |n| options(n, ""));
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // A create and a rotation on A: served by B and C within 1 s.
    let t = Instant::now();
    assert_eq!(a.create_key("prod", "DE", 30).version, 1);
    let created = [until_served(b, "DE", 1, t), until_served(c, "DE", 1, t)];
    let t = Instant::now();
    assert_eq!(a.rotate_key("prod", "DE").version, 2);
    let rotated = [until_served(b, "DE", 2, t), until_served(c, "DE", 2, t)];
    eprintln!("create served by B, C after {created:?}; rotation after {rotated:?}");
    for d in created.iter().chain(&rotated) {
        assert!(*d < Duration::from_secs(1), "{created:?} {rotated:?}");
    }
    assert_eq!(b.secrets("prod", "DE"), a.secrets("prod", "DE"));
    assert_eq!(c.secrets("prod", "DE"), a.secrets("prod", "DE"));
    let health = c.health();
    let propagation = health
        .propagation
        .expect("a shared state's health says how changes arrive");
    assert!(
        propagation.last_delay_ms.is_some_and(|ms| ms < 1000),
        "{propagation:?}"
    );
    assert!(propagation.last_reload.is_some());
    let metrics = c.get("/metrics").text();
    assert!(
        metrics.contains("keyd_propagation_delay_seconds "),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyd_last_reload_timestamp_seconds "),
        "{metrics}"
    );

    // Long polls on B and C, woken by rotations on A: the delay from A's answer to theirs,
    // and the delay the nodes measure themselves (from the commit, by the database's clock).
    let (mut seen, mut reported) = (Vec::new(), Vec::new());
    for version in 3..=52 {
        let (tag_b, tag_c) = (etag(b), etag(c));
        std::thread::scope(|s| {
            let on_b = s.spawn(|| long_poll(b, &tag_b));
            let on_c = s.spawn(|| long_poll(c, &tag_c));
            wait_until("both long polls waiting", 10, || {
                waiters(b) == 1 && waiters(c) == 1
            });
            assert_eq!(a.rotate_key("prod", "DE").version, version);
            let answered = Instant::now();
            for poll in [on_b, on_c] {
                let (got, at) = poll.join().unwrap();
                assert_eq!(got, version);
                seen.push(at.saturating_duration_since(answered).as_millis() as u64);
            }
        });
        for d in [b, c] {
            let p = d.health().propagation.unwrap();
            reported.extend(p.last_delay_ms);
        }
    }
    seen.sort_unstable();
    reported.sort_unstable();
    eprintln!(
        "propagation over {} long polls woken (ms after A answered): p50 {} p99 {} max {}",
        seen.len(),
        percentile(&seen, 50),
        percentile(&seen, 99),
        seen[seen.len() - 1]
    );
    eprintln!(
        "propagation as the nodes measure it ({} samples, ms from commit to served): p50 {} p99 {} max {}",
        reported.len(),
        percentile(&reported, 50),
        percentile(&reported, 99),
        reported[reported.len() - 1]
    );
    assert!(percentile(&seen, 99) < 1000, "{seen:?}");
    assert!(
        reported.len() >= 50 && percentile(&reported, 99) < 1000,
        "{reported:?}"
    );
}

#[test]
fn two_nodes_rotating_fifty_times_each_at_once_make_a_hundred_consecutive_versions() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let nodes = cluster(&pg, &db, &["a", "b", "c"], |n| options(n, ""));
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    a.create_key("prod", "DE", 30);
    until_served(b, "DE", 1, Instant::now());

    let answers: Vec<(u16, String, Option<u32>)> = std::thread::scope(|s| {
        let rotations: Vec<_> = (0..100)
            .map(|i| {
                let d = if i % 2 == 0 { a } else { b };
                s.spawn(move || {
                    let r = d.rotate("prod", "DE");
                    let version = (r.status == 201)
                        .then(|| r.read::<incountry_keyd::proto::VersionAdded>().version);
                    (r.status, r.text(), version)
                })
            })
            .collect();
        rotations.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, text, _) in &answers {
        assert_eq!(*status, 201, "{text}");
    }
    // Every number from 2 to 101 once: no gap, no duplicate.
    let versions: BTreeSet<u32> = answers.iter().filter_map(|(_, _, v)| *v).collect();
    assert_eq!(versions, (2..=101).collect::<BTreeSet<_>>());
    assert_eq!(
        pg.sql(
            &db,
            "SELECT count(*), count(DISTINCT version), max(version) FROM versions"
        ),
        "101|101|101"
    );
    // Every node serves the same 101 keys.
    for d in [a, b, c] {
        until_served(d, "DE", 101, Instant::now());
    }
    let doc = a.secrets("prod", "DE");
    assert_eq!(doc.keys().len(), 101);
    assert_eq!(b.secrets("prod", "DE"), doc);
    assert_eq!(c.secrets("prod", "DE"), doc);
}
