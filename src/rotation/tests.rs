//! Unit tests of the rotator's passes over a real keyring (fake HSM, manual clock), with the
//! monotonic time of retries moved by the test too.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{pass, run, Rotator, RotatorStatus, MAX_SLEEP};
use crate::domain::audit::{AuditEntry, AuditOutcome};
use crate::domain::{KeyId, VersionType};
use crate::keyring::fixture::{admin, id, Fixture, DAY};
use crate::keyring::{KeySource, Keyring};
use crate::metrics::Metrics;
use crate::store::{Leadership, Lease};

/// The retries' clock: stands still unless moved.
struct Mono {
    base: Instant,
    offset: Mutex<Duration>,
}

impl Mono {
    fn new() -> Mono {
        Mono {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
    fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}

struct Timer {
    status: RotatorStatus,
    metrics: Metrics,
    mono: Mono,
    leader: Leadership,
}

impl Timer {
    /// The rotator of the only node (always the leader).
    fn new(fx: &Fixture) -> Timer {
        Timer::with(fx, Leadership::single())
    }

    fn with(fx: &Fixture, leader: Leadership) -> Timer {
        Timer {
            status: RotatorStatus::default(),
            metrics: Metrics::new(fx.keyring.hsm_error_counter()),
            mono: Mono::new(),
            leader,
        }
    }

    fn rotator<'a>(&'a self, keyring: &'a Keyring) -> Rotator<'a> {
        Rotator {
            keyring,
            status: &self.status,
            metrics: &self.metrics,
            leader: &self.leader,
        }
    }

    async fn pass(&self, fx: &Fixture) -> Duration {
        pass(&self.rotator(&fx.keyring), &|| self.mono.now()).await
    }

    fn rotations(&self) -> u64 {
        self.metrics.rotations.get()
    }

    fn failures(&self) -> u64 {
        self.metrics.rotation_failures.get()
    }

    /// `(attempts, retry in)` of a failing key.
    fn failing(&self, id: &KeyId) -> Option<(u32, Duration)> {
        self.status.with(|s| {
            s.failing
                .get(id)
                .map(|f| (f.attempts, f.retry_at - self.mono.now()))
        })
    }
}

fn last_version(fx: &Fixture, id: &KeyId) -> u32 {
    fx.keyring.key(id).unwrap().last_version()
}

fn timer_entries(fx: &Fixture, outcome: AuditOutcome) -> Vec<AuditEntry> {
    fx.audit()
        .into_iter()
        .filter(|e| e.actor == "timer" && e.action == "rotate" && e.outcome == outcome)
        .collect()
}

#[tokio::test]
async fn a_key_rotates_when_its_period_has_run_out() {
    let fx = Fixture::new().await;
    let t = Timer::new(&fx);
    let (de, fr) = (id("prod", "DE"), id("prod", "FR"));
    let created = fx.now();
    fx.managed(&de, Some(30)).await.unwrap();
    fx.clock.advance(1000);
    fx.managed(&fr, Some(30)).await.unwrap();
    // Not due: sleep until the earliest due time, at most an hour.
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    fx.clock.set(created + 30 * DAY - 100);
    assert_eq!(t.pass(&fx).await, Duration::from_secs(100));
    assert_eq!((last_version(&fx, &de), t.rotations()), (1, 0));
    // Due: one new managed version, made now by the timer.
    fx.clock.set(created + 30 * DAY);
    assert_eq!(t.pass(&fx).await, Duration::from_secs(1000));
    let key = fx.keyring.key(&de).unwrap();
    let v2 = key.version(2).unwrap();
    assert_eq!((v2.created, v2.kind), (fx.now(), VersionType::Managed));
    assert_eq!(key.next_rotation(), Some(created + 60 * DAY));
    assert_eq!((last_version(&fx, &fr), t.rotations()), (1, 1));
    let done = timer_entries(&fx, AuditOutcome::Ok);
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].country.as_deref(), done[0].version),
        (Some("DE"), Some(2))
    );
    // Nothing more until the next period.
    t.pass(&fx).await;
    assert_eq!((last_version(&fx, &de), t.rotations()), (2, 1));
    t.status.with(|s| assert_eq!(s.checks, 4));
}

#[tokio::test]
async fn a_key_that_fell_due_while_the_daemon_was_down_rotates_once() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    // Three periods pass while the daemon is stopped.
    fx.clock.advance(95 * DAY);
    let fx = fx.restart().await;
    let t = Timer::new(&fx);
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    assert_eq!((last_version(&fx, &de), t.rotations()), (2, 1));
    let key = fx.keyring.key(&de).unwrap();
    assert_eq!(key.next_rotation(), Some(fx.now() + 30 * DAY));
    t.pass(&fx).await;
    // A restart right after does not repeat it either.
    let fx = fx.restart().await;
    Timer::new(&fx).pass(&fx).await;
    assert_eq!(last_version(&fx, &de), 2);
}

#[tokio::test]
async fn failures_back_off_from_5s_doubling_to_600s_and_clear_on_success() {
    let fx = Fixture::new().await;
    let t = Timer::new(&fx);
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    fx.clock.advance(30 * DAY);
    fx.hsm.hide_root(&de.root_label(), true);
    let backoffs = [5, 10, 20, 40, 80, 160, 320, 600, 600];
    for (n, secs) in backoffs.into_iter().enumerate() {
        let backoff = Duration::from_secs(secs);
        assert_eq!(t.pass(&fx).await, backoff);
        let attempts = n as u32 + 1;
        assert_eq!(t.failing(&de), Some((attempts, backoff)));
        assert_eq!(t.failures(), u64::from(attempts));
        // Not retried before its time.
        t.mono.advance(backoff - Duration::from_secs(1));
        assert_eq!(t.pass(&fx).await, Duration::from_secs(1));
        assert_eq!(t.failures(), u64::from(attempts));
        t.mono.advance(Duration::from_secs(1));
    }
    let failed = timer_entries(&fx, AuditOutcome::Failed);
    assert_eq!(failed.len(), backoffs.len());
    assert!(
        failed[0].detail.contains("root key"),
        "{}",
        failed[0].detail
    );
    // The root key back: the next retry rotates and forgets the failures.
    fx.hsm.hide_root(&de.root_label(), false);
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    assert_eq!((last_version(&fx, &de), t.rotations()), (2, 1));
    assert_eq!(t.failing(&de), None);
    // A later failure starts from 5 s again.
    fx.clock.advance(30 * DAY);
    fx.hsm.hide_root(&de.root_label(), true);
    assert_eq!(t.pass(&fx).await, Duration::from_secs(5));
    assert_eq!(t.failing(&de), Some((1, Duration::from_secs(5))));
}

#[tokio::test]
async fn an_admin_rotation_meanwhile_is_not_a_failure() {
    let fx = Fixture::new().await;
    let t = Timer::new(&fx);
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    fx.clock.advance(30 * DAY);
    // An admin rotation holds the writer lock, half-way through its HSM job...
    fx.hsm.hold();
    let keyring = fx.keyring.clone();
    let (key, req) = (de.clone(), admin(KeySource::Managed, None, 10, 10));
    let admin = tokio::spawn(async move { keyring.add_version(&key, req).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.hsm.waiting() == 0 {
        assert!(
            Instant::now() < deadline,
            "the admin rotation never reached the HSM"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // ...while the timer plans from the version before it, and waits for the lock.
    let release = async {
        tokio::task::yield_now().await;
        fx.hsm.release();
    };
    let both = async { tokio::join!(t.pass(&fx), release) };
    let (sleep, ()) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("the pass ends");
    assert_eq!(admin.await.unwrap().unwrap().version, 2);
    // Planned on a stale version: no rotation, no failure, no retry.
    assert_eq!(last_version(&fx, &de), 2);
    assert_eq!((t.rotations(), t.failures()), (0, 0));
    assert_eq!(t.failing(&de), None);
    assert!(timer_entries(&fx, AuditOutcome::Failed).is_empty());
    assert_eq!(sleep, MAX_SLEEP);
    // The admin's version restarts the period.
    t.pass(&fx).await;
    assert_eq!(last_version(&fx, &de), 2);
}

#[tokio::test]
async fn keys_with_an_active_aws_version_do_not_rotate() {
    let fx = Fixture::new().await;
    let t = Timer::new(&fx);
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    fx.aws(&de, b"customer", [9; 32]).await.unwrap();
    fx.clock.advance(100 * DAY);
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    assert_eq!((last_version(&fx, &de), t.rotations()), (2, 0));
    // A managed version active again: its period runs from its creation.
    fx.managed(&de, None).await.unwrap();
    fx.clock.advance(30 * DAY);
    t.pass(&fx).await;
    assert_eq!((last_version(&fx, &de), t.rotations()), (4, 1));
}

/// A lease that holds for the next hour.
fn leading() -> Lease {
    Lease::Leader(Some(Instant::now() + Duration::from_secs(3600)))
}

/// Polls `what` (the rotator runs beside the test, on its thread) for up to 10 s.
async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

#[tokio::test]
async fn a_follower_or_a_lapsed_lease_never_rotates() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    fx.clock.advance(31 * DAY);
    let (lease, leadership) = Leadership::cluster("a");
    let t = Timer::with(&fx, leadership);
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    // A leader whose claim lapsed (frozen past its last heartbeat) is not one either.
    lease.send_replace(Lease::Leader(Some(
        Instant::now() - Duration::from_millis(1),
    )));
    assert_eq!(t.pass(&fx).await, MAX_SLEEP);
    // Nothing rotated, nothing failed, and no pass counted.
    assert_eq!(
        (last_version(&fx, &de), t.rotations(), t.failures()),
        (1, 0, 0)
    );
    t.status
        .with(|s| assert_eq!((s.checks, s.last_check), (0, None)));
    assert!(fx.audit().iter().all(|e| e.actor != "timer"));
    // Leading again: the due key rotates.
    lease.send_replace(leading());
    t.pass(&fx).await;
    assert_eq!((last_version(&fx, &de), t.rotations()), (2, 1));
}

#[tokio::test]
async fn a_node_that_becomes_leader_rotates_what_fell_due_once() {
    let fx = Fixture::new().await;
    let (de, fr) = (id("prod", "DE"), id("prod", "FR"));
    fx.managed(&de, Some(30)).await.unwrap();
    fx.managed(&fr, Some(60)).await.unwrap();
    let (lease, leadership) = Leadership::cluster("a");
    let t = Timer::with(&fx, leadership);
    let (clock, clock_rx) = tokio::sync::watch::channel(0u64);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let tick = || clock.send_modify(|n| *n += 1);
    let checks = || t.status.with(|s| s.checks);
    let test = async {
        // DE falls due while no node leads: this follower wakes with the clock, plans nothing.
        fx.clock.advance(30 * DAY);
        tick();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!((checks(), t.rotations(), last_version(&fx, &de)), (0, 0, 1));
        // Leading: a pass at once, which rotates DE; later passes do not again.
        lease.send_replace(leading());
        wait_for("the new leader's rotation", || t.rotations() == 1).await;
        let done = checks();
        fx.clock.advance(60);
        tick();
        wait_for("a later pass", || checks() > done).await;
        assert_eq!((t.rotations(), last_version(&fx, &de)), (1, 2));
        // Deposed: both keys fall due, and nothing rotates...
        lease.send_replace(Lease::Follower);
        fx.clock.advance(30 * DAY);
        tick();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let passes = checks();
        assert_eq!(t.rotations(), 1);
        // ...until it leads again: each due key once.
        lease.send_replace(leading());
        wait_for("both rotations", || t.rotations() == 3).await;
        let done = checks();
        tick();
        wait_for("a later pass", || checks() > done).await;
        assert!(done > passes);
        assert_eq!((last_version(&fx, &de), last_version(&fx, &fr)), (3, 2));
        assert_eq!((t.rotations(), t.failures()), (3, 0));
        assert_eq!(timer_entries(&fx, AuditOutcome::Ok).len(), 3);
        stop.send_replace(true);
    };
    let rotating = run(t.rotator(&fx.keyring), clock_rx, stop_rx);
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(rotating, test)
    })
    .await
    .expect("the rotator stops");
}

#[tokio::test]
async fn a_deposed_leader_that_planned_on_an_old_version_does_not_rotate_again() {
    let fx = Fixture::new().await;
    let de = id("prod", "DE");
    fx.managed(&de, Some(30)).await.unwrap();
    fx.clock.advance(30 * DAY);
    // Another node on the same state, which loaded it before the leader rotated and has
    // not seen the rotation since (as a node whose change notice is still on its way).
    let other = Keyring::load(
        fx.store.clone(),
        fx.worker.clone(),
        fx.clock.clone(),
        fx.kms.clone(),
    )
    .await
    .unwrap();
    let leader = Timer::new(&fx);
    leader.pass(&fx).await;
    assert_eq!((last_version(&fx, &de), leader.rotations()), (2, 1));
    // The old leader still believes it leads, and DE is due by what it knows: the state
    // refuses the rotation it planned on version 1; no failure, no retry, no entry.
    let deposed = Timer::new(&fx);
    assert_eq!(other.key(&de).unwrap().last_version(), 1);
    pass(&deposed.rotator(&other), &|| deposed.mono.now()).await;
    assert_eq!((deposed.rotations(), deposed.failures()), (0, 0));
    assert_eq!(deposed.failing(&de), None);
    let versions: Vec<u32> = fx
        .store
        .load_key(&de)
        .unwrap()
        .unwrap()
        .versions
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(timer_entries(&fx, AuditOutcome::Ok).len(), 1);
    assert!(timer_entries(&fx, AuditOutcome::Failed).is_empty());
}
