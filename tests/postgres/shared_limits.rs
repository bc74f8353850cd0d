//! What nodes share besides keys: verification codes (a code used on one node is refused
//! on another, wrong codes on any node count towards one lockout) and the daily limit
//! (counted over the versions every node made, also by a node that has not heard of them
//! yet).

use harness::totp::{bootstrap, oathtool};
use harness::{needs_test_clock, Daemon, Options, Postgres, Reply};
use incountry_keyd::domain::Code;
use serde_json::json;

use super::propagation::{cluster, options};

fn rotate(d: &Daemon, code: &str) -> Reply {
    d.request_with(
        "POST",
        "/v1/keys/prod/DE/rotate",
        &[("X-Verification-Code", code)],
        b"{}",
    )
}

fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

#[test]
fn a_code_used_on_one_node_is_refused_on_another_and_wrong_codes_lock_everywhere() {
    needs_test_clock!();
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let totp = |n: &str| Options {
        verification: "totp",
        ..options(n, "")
    };
    // The admin (uid 0) is enrolled once, offline, in the shared state.
    let first = Daemon::prepare(totp("a"));
    first.use_postgres(&pg, &db);
    let secret = bootstrap(&first, 0);
    let b = first.another_node(totp("b"), &pg, &db).launch();
    let a = first.launch();
    // Both clocks move together: a code is for the same step on both.
    let next_code = || {
        let t = a.advance(30);
        b.advance(30);
        oathtool(&secret, t)
    };

    let code = next_code();
    let create = json!({"type": "incountry-managed", "rotation_period_days": 30});
    let r = a.request_with(
        "POST",
        "/v1/keys/prod/DE",
        &[("X-Verification-Code", &code)],
        create.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The same code on B: already used.
    let r = rotate(&b, &code);
    assert_eq!(
        (r.status, r.code()),
        (401, Code::VerificationReplayed),
        "{}",
        r.text()
    );
    // A fresh one works on B (which rotates the key A made).
    let r = rotate(&b, &next_code());
    assert_eq!(r.status, 201, "{}", r.text());

    // The replay counted as a failure (on both nodes): its window passes first.
    a.advance(301);
    b.advance(301);
    // Five wrong codes, three on A and two on B: the uid is locked on both.
    let code = next_code();
    for d in [&a, &b, &a, &b, &a] {
        let r = rotate(d, &wrong(&code));
        assert_eq!(r.code(), Code::VerificationFailed, "{}", r.text());
    }
    for d in [&a, &b] {
        let r = rotate(d, &code);
        assert_eq!(
            (r.status, r.code()),
            (429, Code::VerificationLocked),
            "{}",
            r.text()
        );
        assert!(r.header("retry-after").is_some());
    }
    // Once the lock has passed, on both clocks, codes work again.
    a.advance(301);
    b.advance(301);
    let r = rotate(&a, &next_code());
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn the_daily_limit_counts_versions_made_on_every_node() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let limited = |n: &str| Options {
        versions_per_day: 2,
        ..options(n, "")
    };
    let nodes = cluster(&pg, &db, &["a", "b", "c"], limited);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // One after the other at once, on three nodes: none waits for the others' news.
    assert_eq!(a.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(b.rotate("prod", "DE").status, 201);
    let r = c.rotate("prod", "DE");
    assert_eq!(
        (r.status, r.code()),
        (429, Code::DailyLimit),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM versions"), "2");
}
