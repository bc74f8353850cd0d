//! `App`: the handles a request needs, shared by every handler.

use arc_swap::ArcSwap;

use crate::config::{AccessPolicy, Config};
use crate::keyring::Keyring;
use crate::metrics::Metrics;
use crate::rotation::RotatorStatus;
use crate::store::Leadership;
use crate::verify::Verifier;

/// What every request handler shares.
pub struct App {
    pub keyring: Keyring,
    pub config: ArcSwap<Config>,
    pub access: ArcSwap<AccessPolicy>,
    pub verifier: Verifier,
    /// Flips to true when shutdown starts, ending long polls.
    pub stopping: tokio::sync::watch::Sender<bool>,
    pub metrics: Metrics,
    pub rotator: RotatorStatus,
    /// Whether this node runs timer rotations (one node always does).
    pub leadership: Leadership,
    /// Bumped when the (test) clock moves: wakes the rotator and the KMS revalidation.
    pub clock_changed: tokio::sync::watch::Sender<u64>,
    /// Bumped when a reload changes the access lists: long polls check their peer again.
    pub access_changed: tokio::sync::watch::Sender<u64>,
    /// Refusals of peers without a role, summarized for the audit log.
    pub refusals: super::Refusals,
}

impl App {
    pub fn new(keyring: Keyring, config: Config, verifier: Verifier) -> anyhow::Result<App> {
        let mut metrics = Metrics::new(keyring.hsm_error_counter());
        if keyring.shared() {
            metrics.register_propagation();
        }
        Ok(App {
            metrics,
            keyring,
            access: ArcSwap::from_pointee(config.access_policy()?),
            config: ArcSwap::from_pointee(config),
            verifier,
            stopping: tokio::sync::watch::channel(false).0,
            rotator: RotatorStatus::default(),
            leadership: Leadership::single(),
            clock_changed: tokio::sync::watch::channel(0).0,
            access_changed: tokio::sync::watch::channel(0).0,
            refusals: super::Refusals::default(),
        })
    }

    /// A node of a cluster: timer rotations follow its lease, health and metrics show it.
    pub fn with_leadership(mut self, leadership: Leadership) -> App {
        if let Some(node) = leadership.node() {
            self.metrics.in_cluster(node);
        }
        self.leadership = leadership;
        self
    }

    /// The test clock moved: wake whatever waits on time.
    pub fn on_clock_change(&self) {
        self.clock_changed.send_modify(|n| *n += 1);
    }
}
