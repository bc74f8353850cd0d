//! One rotator: three daemons on one database and one SoftHSM token, each with its own test
//! clock (moved alike). A key that falls due on all three is rotated once, by the node that
//! holds the lease; when that node is killed (-9), or frozen (SIGSTOP: its session stays
//! open and silent), another one rotates the next due key within `cluster.lease`. And the
//! lease itself on stores: one holder, let go with its session (an outage, a node dropping
//! it).

use std::time::{Duration, Instant};

use harness::{wait_until, Daemon, Options, Postgres};
use incountry_keyd::domain::audit::AuditOutcome;
use incountry_keyd::proto::NodeRole;
use incountry_keyd::store::Leadership;

/// Short, to keep the test fast: a follower tries the lock every second, and a silent
/// session ends after 3 s.
const LEASE: Duration = Duration::from_secs(5);
const DAY: i64 = 86_400;

fn options(node: &str, clock_offset: i64) -> Options {
    Options {
        versions_per_day: 10,
        log_level: "info",
        clock_offset,
        extra: format!(
            "[cluster]\nnode_name = \"{node}\"\nlease = \"{}s\"\n",
            LEASE.as_secs()
        ),
        ..Options::default()
    }
}

fn role(d: &Daemon) -> NodeRole {
    let health = d.health();
    health.cluster.expect("a cluster node shows its role").role
}

/// The one node of `alive` that leads, once exactly one does.
fn the_leader(nodes: &[Daemon], alive: &[usize]) -> usize {
    let mut leaders = Vec::new();
    wait_until("exactly one leader", 20, || {
        leaders = alive
            .iter()
            .copied()
            .filter(|&i| role(&nodes[i]) == NodeRole::Leader)
            .collect();
        leaders.len() == 1
    });
    leaders[0]
}

/// The versions of prod/`country` in the shared state.
fn versions(pg: &Postgres, db: &str, country: &str) -> u32 {
    pg.sql(
        db,
        &format!(
            "SELECT count(*) FROM versions v JOIN keys k ON k.id = v.key_id
             WHERE k.environment = 'prod' AND k.country = '{country}'"
        ),
    )
    .parse()
    .unwrap()
}

/// The timer's rotations in the shared audit log, as (country, version, outcome).
fn timer_rotations(d: &Daemon) -> Vec<(String, Option<u32>, AuditOutcome)> {
    d.audit(0)
        .entries
        .into_iter()
        .filter(|e| e.actor == "timer" && e.action == "rotate")
        .map(|e| (e.country.unwrap_or_default(), e.version, e.outcome))
        .collect()
}

fn rotations_metric(d: &Daemon) -> String {
    let metrics = d.get("/metrics").text();
    metrics
        .lines()
        .find(|l| l.starts_with("keyd_rotations_total "))
        .unwrap_or("")
        .to_string()
}

#[test]
fn one_rotator_among_three_nodes_and_another_takes_over_within_the_lease() {
    let pg = Postgres::init();
    let db = pg.database("keyd");
    let a = Daemon::prepare(options("a", 0));
    a.use_postgres(&pg, &db);
    let a = a.launch();
    // Due at 30, 40 and 50 days: one key per phase.
    a.create_key("prod", "DE", 30);
    a.advance(10 * DAY);
    a.create_key("prod", "FR", 30);
    a.advance(10 * DAY);
    a.create_key("prod", "GB", 30);
    // The others load the keys at start, their clocks at a's (20 days on).
    let b = a.another_node(options("b", 20 * DAY), &pg, &db).launch();
    let c = a.another_node(options("c", 20 * DAY), &pg, &db).launch();
    let nodes = [a, b, c];
    let first = the_leader(&nodes, &[0, 1, 2]);
    let metrics = nodes[first].get("/metrics").text();
    assert!(metrics.contains("keyd_cluster_leader{node=\""), "{metrics}");

    // 30 days: DE falls due on all three nodes; the leader rotates it, once.
    for d in &nodes {
        d.advance(10 * DAY);
    }
    wait_until("DE's timer rotation", 20, || versions(&pg, &db, "DE") == 2);
    for d in &nodes {
        d.advance(60);
    }
    nodes[first].advance_and_settle(60);
    assert_eq!(versions(&pg, &db, "DE"), 2);
    for (i, d) in nodes.iter().enumerate() {
        let want = if i == first { 1 } else { 0 };
        assert_eq!(rotations_metric(d), format!("keyd_rotations_total {want}"));
    }

    // kill -9 the leader; at 40 days FR falls due on the others.
    let started = Instant::now();
    nodes[first].signal("KILL");
    let alive: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    for &i in &alive {
        nodes[i].advance(10 * DAY);
    }
    wait_until("FR's rotation by another node", 30, || {
        versions(&pg, &db, "FR") == 2
    });
    let killed = started.elapsed();
    eprintln!("take-over after kill -9: FR rotated {killed:?} after the kill (lease {LEASE:?})");
    assert!(killed < LEASE, "{killed:?}");
    let second = the_leader(&nodes, &alive);
    assert_eq!(rotations_metric(&nodes[second]), "keyd_rotations_total 1");

    // Freeze the new leader: its session stays open, silent; the server ends it after the
    // idle timeout, and the last node takes over.
    let last = alive.iter().copied().find(|&i| i != second).unwrap();
    let started = Instant::now();
    nodes[second].signal("STOP");
    wait_until("the last node to lead", 30, || {
        role(&nodes[last]) == NodeRole::Leader
    });
    let frozen = started.elapsed();
    eprintln!("take-over from a frozen leader: {frozen:?} (lease {LEASE:?})");
    assert!(frozen < LEASE, "{frozen:?}");
    assert!(
        pg.log_text().contains("idle-session timeout"),
        "{}",
        pg.log_text()
    );
    nodes[last].advance(10 * DAY);
    wait_until("GB's rotation", 20, || versions(&pg, &db, "GB") == 2);
    // Thawed, the old leader knows it lost the lease, and rotates nothing more.
    nodes[second].signal("CONT");
    wait_until("the thawed node to follow", 20, || {
        role(&nodes[second]) == NodeRole::Follower
    });
    nodes[second].advance(10 * DAY + 60);
    nodes[last].advance_and_settle(60);
    assert_eq!(the_leader(&nodes, &alive), last);
    assert_eq!(rotations_metric(&nodes[second]), "keyd_rotations_total 1");

    // Each due key rotated once, by the timer, with nothing failed.
    for country in ["DE", "FR", "GB"] {
        assert_eq!(versions(&pg, &db, country), 2, "{country}");
    }
    let mut done = timer_rotations(&nodes[last]);
    done.sort_by(|x, y| x.0.cmp(&y.0));
    let ok = |country: &str| (country.to_string(), Some(2), AuditOutcome::Ok);
    assert_eq!(done, [ok("DE"), ok("FR"), ok("GB")]);
}

#[test]
fn the_lease_has_one_holder_and_goes_with_its_session() {
    let mut pg = Postgres::init();
    let db = pg.database("keyd");
    let stores = ["a", "b", "c"].map(|node| super::open(&pg, &db, node).unwrap());
    let mut leads: Vec<Leadership> = stores
        .iter()
        .map(|s| s.leadership(Duration::from_secs(2)))
        .collect();
    let leaders = |leads: &[Leadership]| -> Vec<String> {
        leads
            .iter()
            .filter(|l| l.is_leader())
            .map(|l| l.node().unwrap().to_string())
            .collect()
    };
    wait_until("one leader", 10, || leaders(&leads).len() == 1);
    // The server shows who holds it.
    let holder = pg.sql(
        &db,
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted",
    );
    assert_eq!(
        holder,
        format!("incountry-keyd {} lease", leaders(&leads)[0])
    );
    // The database gone: no node leads (at once: the session's end is seen as it comes),
    // and one does again once it is back.
    pg.stop();
    wait_until("no leader", 1, || leaders(&leads).is_empty());
    pg.start();
    wait_until("a leader again", 10, || leaders(&leads).len() == 1);
    // A node that drops its lease frees it for another.
    let first = leaders(&leads)[0].clone();
    leads.retain(|l| l.node() != Some(first.as_str()));
    wait_until("another leader", 10, || leaders(&leads).len() == 1);
    assert_ne!(leaders(&leads), [first]);
}
