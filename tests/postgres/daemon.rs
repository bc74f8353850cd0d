//! The real daemon on PostgreSQL: keys made and rotated survive a restart, `audit verify`
//! passes, and a second node on the same database and HSM token serves the same keys.

use incountry_keyd::domain::Code;
use incountry_keyd::proto::Condition;
use std::process::Command;

use harness::{bin, Daemon, Options, Postgres};

fn options() -> Options {
    Options {
        versions_per_day: 10,
        log_level: "info",
        ..Options::default()
    }
}

/// `audit verify` with the daemon's config and token: (passed, output).
fn verify(d: &Daemon) -> (bool, String) {
    let out = Command::new(bin())
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
fn the_daemon_on_postgres_keeps_its_keys_across_a_restart_and_verifies() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let d = Daemon::prepare(options());
    d.use_postgres(&pg, &db);
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    let before = d.secrets("prod", "DE");
    let health = d.health();
    assert_eq!(health.state, Condition::Ok, "{:?}", health.state_error);

    let d = d.restart();
    assert_eq!(d.secrets("prod", "DE"), before);
    assert_eq!(d.versions("prod", "DE").len(), 2);
    // The state is in PostgreSQL: no SQLite state was made.
    assert!(!d.tmp.path().join("state").exists());
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM versions"), "2");
    let (ok, text) = verify(&d);
    assert!(ok, "{text}");
    assert!(text.contains("chain and 2 MACs intact"), "{text}");
    assert!(text.contains("no HSM anchor"), "{text}");

    // A second node: the same database and the same HSM token (its own socket and config).
    let second = d.another_node(options(), &pg, &db);
    let second = second.launch();
    assert_eq!(second.secrets("prod", "DE"), before);
    // Both nodes create the same key at once: one wins, the other gets version_conflict,
    // and the HSM holds one root key for it (both unwrap it after a restart).
    let statuses = std::thread::scope(|s| {
        let a = s.spawn(|| d.create_managed("prod", "FR", 30));
        let b = s.spawn(|| second.create_managed("prod", "FR", 30));
        [a.join().unwrap(), b.join().unwrap()]
    });
    let mut codes: Vec<(u16, Option<Code>)> = statuses
        .iter()
        .map(|r| (r.status, r.error_code()))
        .collect();
    codes.sort_by_key(|(status, _)| *status);
    assert_eq!(codes, [(201, None), (409, Some(Code::VersionConflict))]);
    // A change on the second node is in the shared state, and stays there across restarts
    // (how it reaches the first node at once: `propagation`).
    assert_eq!(second.rotate("prod", "DE").status, 201);
    let d = d.restart();
    let second = second.restart();
    assert_eq!(d.versions("prod", "DE").len(), 3);
    assert_eq!(d.secrets("prod", "FR"), second.secrets("prod", "FR"));
    assert_eq!(d.secrets("prod", "DE"), second.secrets("prod", "DE"));
    let (ok, text) = verify(&d);
    assert!(ok, "{text}");
}
