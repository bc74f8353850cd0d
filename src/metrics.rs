//! Prometheus metrics (`GET /metrics`, OpenMetrics text). Counters are updated where things
//! happen; gauges about keys are read from the keyring snapshot at scrape time.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::domain::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub environment: String,
    pub country: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
    pub rotations: Counter,
    pub rotation_failures: Counter,
    keys: Gauge,
    versions: Gauge,
    unavailable: Gauge,
    next_rotation: Family<KeyLabels, Gauge>,
    waiters: Gauge,
    /// A shared state's (registered by `register_propagation`).
    propagation_delay: Gauge<f64, AtomicU64>,
    last_reload: Gauge,
    /// `keyd_cluster_leader{node}`, registered by `in_cluster` only (one node shows none).
    leader: Option<Gauge>,
}

/// Counts one long-polling request while it lives.
pub struct Waiting(Gauge);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

impl Metrics {
    /// `hsm_errors` is the counter the HSM worker increments.
    pub fn new(hsm_errors: Counter) -> Metrics {
        let mut registry = Registry::with_prefix("keyd");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let rotations = Counter::default();
        let rotation_failures = Counter::default();
        let keys = Gauge::default();
        let versions = Gauge::default();
        let unavailable = Gauge::default();
        let next_rotation = Family::<KeyLabels, Gauge>::default();
        let waiters = Gauge::default();
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency by route",
            latency.clone(),
        );
        registry.register("rotations", "Timer rotations done", rotations.clone());
        registry.register(
            "rotation_failures",
            "Timer rotations that failed (retried)",
            rotation_failures.clone(),
        );
        registry.register(
            "hsm_errors",
            "HSM operations that returned an error",
            hsm_errors,
        );
        registry.register("keys_loaded", "Keys in memory", keys.clone());
        registry.register(
            "versions_loaded",
            "Key versions in memory",
            versions.clone(),
        );
        registry.register(
            "versions_unavailable",
            "Versions that cannot be served",
            unavailable.clone(),
        );
        registry.register(
            "seconds_until_rotation",
            "Seconds until the next timer rotation of each managed key",
            next_rotation.clone(),
        );
        registry.register(
            "secrets_waiters",
            "Secrets requests waiting for a change (If-None-Match with wait)",
            waiters.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            rotations,
            rotation_failures,
            keys,
            versions,
            unavailable,
            next_rotation,
            waiters,
            propagation_delay: Gauge::default(),
            last_reload: Gauge::default(),
            leader: None,
        }
    }

    /// On a state other nodes write too: how their changes reach this node.
    pub fn register_propagation(&mut self) {
        self.registry.register(
            "propagation_delay_seconds",
            "From another node's commit to this node serving the change, for the last change learned from a notification",
            self.propagation_delay.clone(),
        );
        self.registry.register(
            "last_reload_timestamp_seconds",
            "When this node last read the whole shared state (Unix time)",
            self.last_reload.clone(),
        );
    }

    /// The propagation figures as the keyring has them now.
    pub fn set_propagation(&self, last_delay_ms: Option<u64>, last_reload: Option<i64>) {
        if let Some(ms) = last_delay_ms {
            self.propagation_delay.set(ms as f64 / 1000.0);
        }
        if let Some(t) = last_reload {
            self.last_reload.set(t);
        }
    }

    /// This node is `node` of a cluster: its role is shown from now on.
    pub fn in_cluster(&mut self, node: &str) {
        let family = Family::<NodeLabels, Gauge>::default();
        let gauge = family
            .get_or_create(&NodeLabels {
                node: node.to_string(),
            })
            .clone();
        self.registry.register(
            "cluster_leader",
            "1 while this node holds the rotator's lease (runs timer rotations), else 0",
            family,
        );
        self.leader = Some(gauge);
    }

    /// Whether this node leads now (a node in no cluster shows nothing).
    pub fn set_leader(&self, leader: bool) {
        if let Some(g) = &self.leader {
            g.set(i64::from(leader));
        }
    }

    /// Marks a long poll as waiting until the guard drops.
    pub fn waiting(&self) -> Waiting {
        self.waiters.inc();
        Waiting(self.waiters.clone())
    }

    pub fn observe(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    /// Encodes everything, refreshing the key gauges from `snap` first.
    pub fn render(&self, snap: &Snapshot, now: i64) -> String {
        self.keys.set(snap.keys.len() as i64);
        self.versions.set(snap.version_count() as i64);
        self.unavailable.set(snap.unavailable().count() as i64);
        for key in snap.keys.values() {
            if let Some(due) = key.next_rotation() {
                self.next_rotation
                    .get_or_create(&KeyLabels {
                        environment: key.id.env.clone(),
                        country: key.id.country.clone(),
                    })
                    .set(due - now);
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
