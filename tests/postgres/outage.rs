//! PostgreSQL out of reach: every node serves what it has (secrets, records), refuses
//! changes with 503 `state_unavailable` and `Retry-After`, says `degraded` with the state
//! unavailable without any request needing it; when PostgreSQL is back every node reads
//! the whole state again and changes work. A periodic reload finds a change no notification
//! told of; a node does not start without PostgreSQL.

use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::{wait_until, Daemon, Postgres};
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Condition, Decrypted, Encrypted, HealthStatus};
use serde_json::json;

use super::propagation::{cluster, options, served};

fn encrypt(d: &Daemon, plaintext: &str) -> Encrypted {
    d.post(
        "/v1/keys/prod/DE/encrypt",
        json!({ "plaintext": plaintext }),
    )
    .ok(200)
}

fn decrypt(d: &Daemon, sealed: &Encrypted) -> String {
    let r = d.post(
        "/v1/keys/prod/DE/decrypt",
        json!({ "ciphertext": sealed.ciphertext, "version": sealed.version }),
    );
    r.ok::<Decrypted>(200).plaintext.to_string()
}

/// `audit verify` with the node's config and token: (passed, output).
fn verify(d: &Daemon) -> (bool, String) {
    let out = std::process::Command::new(harness::bin())
        .arg("--config")
        .arg(&d.config)
        .args(["audit", "verify"])
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn nodes_serve_through_a_postgres_outage_and_catch_up_after_it() {
    let mut pg = Postgres::init();
    let db = pg.database("keyd");
    let nodes = cluster(&pg, &db, &["a", "b", "c"], |n| {
        options(n, "reconcile_interval = \"2s\"\n")
    });
    let a = &nodes[0];
    a.create_key("prod", "DE", 30);
    a.rotate_key("prod", "DE");
    for d in &nodes {
        wait_until("version 2 served", 5, || served(d, "DE") == Some(2));
    }
    // Each node encrypts once: its count is reserved, so it goes on encrypting.
    let sealed: Vec<Encrypted> = nodes.iter().map(|d| encrypt(d, "before")).collect();

    // A change no notification tells of (made behind the nodes' back) is found by the
    // periodic reload.
    pg.sql(&db, "UPDATE keys SET rotation_period_days = 60");
    for d in &nodes {
        wait_until("the reconcile's reload", 10, || {
            d.key("prod", "DE").rotation_period_days == Some(60)
        });
    }

    let before = a.secrets("prod", "DE");
    let reloaded: Vec<String> = nodes
        .iter()
        .map(|d| d.health().propagation.unwrap().last_reload.unwrap())
        .collect();
    pg.stop();
    for d in &nodes {
        // No request needs the state: the listener tells.
        // (Degraded anyway with verification off, as in these tests: the state says why.)
        wait_until("health degraded by the outage", 10, || {
            let h = d.health();
            h.status == HealthStatus::Degraded && h.state == Condition::Unavailable
        });
        assert_eq!(d.secrets("prod", "DE"), before);
        for s in &sealed {
            assert_eq!(decrypt(d, s), "before");
        }
        let more = encrypt(d, "during");
        assert_eq!(decrypt(d, &more), "during");
        let r = d.rotate("prod", "DE");
        assert_eq!(
            (r.status, r.code()),
            (503, Code::StateUnavailable),
            "{}",
            r.text()
        );
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry >= 1);
        assert!(d.health().state_error.is_some());
    }

    pg.start();
    let back = Instant::now();
    for (d, before) in nodes.iter().zip(&reloaded) {
        wait_until("every node reads the whole state again", 30, || {
            let h = d.health();
            let last = h.propagation.unwrap().last_reload.unwrap();
            // The state answers again once an operation succeeded: with no request, that is
            // the reload.
            h.state == Condition::Ok && last.as_str() >= before.as_str()
        });
    }
    eprintln!(
        "all nodes caught up {:?} after PostgreSQL was back",
        back.elapsed()
    );
    let t = Instant::now();
    assert_eq!(a.rotate_key("prod", "DE").version, 3);
    for d in &nodes[1..] {
        wait_until("version 3 served", 5, || served(d, "DE") == Some(3));
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    let doc = a.secrets("prod", "DE");
    for d in &nodes {
        assert_eq!(d.secrets("prod", "DE"), doc);
        assert_eq!(d.health().state, Condition::Ok);
    }
    let (ok, text) = verify(a);
    assert!(ok, "{text}");

    // A node cannot start without PostgreSQL: without the state it has no keys to serve.
    pg.stop();
    let late = a.another_node(options("d", ""), &pg, &db);
    let mut child = late
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a node started without PostgreSQL");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!status.success());
    assert!(text.contains("cannot open the PostgreSQL state"), "{text}");
}
