//! The rotator: a task that rotates each managed key when its period since the active
//! version's creation has run out. Due times are derived from state on every pass, so a
//! restart neither repeats nor skips a rotation, and a key that fell due while the daemon
//! was down rotates once at start. It sleeps until the earliest due time (at most an hour,
//! for wall-clock jumps and suspend) and wakes early on any key change or clock change.
//!
//! Only the leader rotates (`store::Leadership`: one SQLite node always is; on PostgreSQL,
//! the node holding the lease): followers run no passes, a node that becomes leader runs one
//! at once (so a key that fell due while no node led rotates then, once), and a pass stops
//! when the lease is lost. A deposed leader that still rotates meets the store's guard: the
//! rotation names the version it replaces (`expect_active`), checked in its transaction.

use crate::domain::Code;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::audit::Actor;
use crate::domain::audit::AuditOutcome;
use crate::domain::clock::rfc3339;
use crate::domain::Initiator;
use crate::domain::KeyId;
use crate::keyring::{KeySource, Keyring, NewVersion};
use crate::metrics::Metrics;
use crate::store::Leadership;

const MAX_SLEEP: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(600);

struct Failure {
    attempts: u32,
    error: String,
    retry_at: Instant,
}

#[derive(Default)]
struct State {
    checks: u64,
    last_check: Option<i64>,
    failing: BTreeMap<KeyId, Failure>,
}

/// What health reports about the rotator.
#[derive(Default)]
pub struct RotatorStatus {
    state: Mutex<State>,
}

pub struct StatusView {
    pub checks: u64,
    pub last_check: Option<String>,
    pub failing: Vec<FailingKey>,
}

/// A key whose timer rotation failed, and when the timer tries it again.
pub struct FailingKey {
    pub key: KeyId,
    pub attempts: u32,
    pub error: String,
    pub retry_in_seconds: u64,
}

impl RotatorStatus {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn view(&self) -> StatusView {
        self.with(|s| StatusView {
            checks: s.checks,
            last_check: s.last_check.map(rfc3339),
            failing: s
                .failing
                .iter()
                .map(|(id, f)| FailingKey {
                    key: id.clone(),
                    attempts: f.attempts,
                    error: f.error.clone(),
                    retry_in_seconds: f
                        .retry_at
                        .saturating_duration_since(Instant::now())
                        .as_secs(),
                })
                .collect(),
        })
    }
}

/// What the rotator works with: the keys, its own status (for health), its counters, and
/// whether this node leads.
pub struct Rotator<'a> {
    pub keyring: &'a Keyring,
    pub status: &'a RotatorStatus,
    pub metrics: &'a Metrics,
    pub leader: &'a Leadership,
}

/// Runs until `stopping` turns true; wakes early when a key or the clock (`clock`) changes.
pub async fn run(
    r: Rotator<'_>,
    mut clock: tokio::sync::watch::Receiver<u64>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = r.keyring.subscribe();
    let mut leader = r.leader.clone();
    loop {
        if !leader.is_leader() {
            tokio::select! {
                () = leader.became_leader() => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            continue;
        }
        let wake_in = pass(&r, &Instant::now).await;
        tokio::select! {
            _ = tokio::time::sleep(wake_in) => {}
            _ = clock.changed() => {}
            changed = changes.changed() => if changed.is_err() { return },
            () = leader.lost() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Rotates every due key once; returns how long to sleep before the next pass. Retries are
/// timed by `instant` (`Instant::now`; tests pass their own). Does nothing on a follower, and
/// stops (uncounted) when the lease is lost on the way.
async fn pass(r: &Rotator<'_>, instant: &(dyn Fn() -> Instant + Sync)) -> Duration {
    if !r.leader.is_leader() {
        return MAX_SLEEP;
    }
    let now = r.keyring.now();
    let mut sleep = MAX_SLEEP;
    for key in r.keyring.snapshot().keys.values() {
        let Some(due) = key.next_rotation() else {
            continue;
        };
        if due > now {
            sleep = sleep.min(Duration::from_secs((due - now) as u64));
            continue;
        }
        let retry_at = r
            .status
            .with(|s| s.failing.get(&key.id).map(|f| f.retry_at));
        if let Some(at) = retry_at.filter(|at| *at > instant()) {
            sleep = sleep.min(at - instant());
            continue;
        }
        if !r.leader.is_leader() {
            return sleep;
        }
        let req = NewVersion {
            source: KeySource::Managed,
            rotation_period_days: None,
            origin: Initiator::Timer,
            versions_per_day: u32::MAX,
            customer_supplied_versions: u32::MAX,
            existing_only: true,
            expect_active: Some(key.last_version()),
            actor: Actor::Timer,
            action: "rotate",
        };
        match r.keyring.add_version(&key.id, req).await {
            Ok(made) => {
                r.metrics.rotations.inc();
                r.status.with(|s| s.failing.remove(&key.id));
                tracing::info!(
                    env = %key.id.env, country = %key.id.country, version = made.version,
                    overdue_seconds = now - due, "timer rotation"
                );
            }
            // Someone else changed the key first: the next pass re-plans from the new state.
            Err(crate::domain::error::Error::Conflict {
                code: Code::StaleRotation,
                ..
            }) => {}
            Err(e) => {
                r.metrics.rotation_failures.inc();
                let attempts = r
                    .status
                    .with(|s| s.failing.get(&key.id).map_or(0, |f| f.attempts))
                    + 1;
                let backoff =
                    (FIRST_RETRY * 2u32.saturating_pow(attempts.min(16) - 1)).min(MAX_RETRY);
                tracing::error!(
                    env = %key.id.env, country = %key.id.country, attempts,
                    retry_in_seconds = backoff.as_secs(), error = %e, "timer rotation failed"
                );
                let entry = r
                    .keyring
                    .audit_entry(&Actor::Timer, "rotate", Some(&key.id))
                    .outcome(AuditOutcome::Failed, e.to_string());
                r.keyring.audit(entry).await;
                r.status.with(|s| {
                    s.failing.insert(
                        key.id.clone(),
                        Failure {
                            attempts,
                            error: e.to_string(),
                            retry_at: instant() + backoff,
                        },
                    )
                });
                sleep = sleep.min(backoff);
            }
        }
    }
    r.status.with(|s| {
        s.checks += 1;
        s.last_check = Some(now);
    });
    sleep
}

#[cfg(test)]
mod tests;
