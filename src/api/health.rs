//! What monitoring reads: `GET /v1/health` (HSM ping, state, keys, rotation and KMS; the
//! bare status for peers without a role) and `GET /metrics` (OpenMetrics).

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::peer::Role;
use super::response::{self, Body};
use super::App;
use crate::domain::clock::rfc3339;
use crate::domain::{AwsStatus, VerificationMode};
use crate::proto::{
    BareHealth, ClusterHealth, Condition, Health, HealthDocument, HealthStatus, NodeRole,
    PropagationHealth, RotationFailure, RotationHealth,
};
use crate::rotation::StatusView;
use crate::store::Leadership;

pub(super) async fn health(app: &App, role: Role) -> Response<Body> {
    // The ping proves the session against the token; a failure makes the worker reconnect.
    let ping = tokio::time::timeout(Duration::from_secs(2), app.keyring.hsm_ping()).await;
    let hsm_error = match ping {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("HSM did not answer within 2 s".to_string()),
    };
    let state_error = app.keyring.state_unavailable();
    let snap = app.keyring.snapshot();
    let unavailable: Vec<String> = snap
        .unavailable()
        .map(|(k, v)| format!("{} v{}", k.id, v.version))
        .collect();
    let verification = app.verifier.mode();
    let view = app.rotator.view();
    let rotation_failing = !view.failing.is_empty();
    let rotation = rotation_health(view);
    let aws = app.keyring.aws_health();
    let degraded = hsm_error.is_some()
        || state_error.is_some()
        || !unavailable.is_empty()
        || verification == VerificationMode::Off
        || rotation_failing
        || aws.status == AwsStatus::Degraded;
    let status = if degraded {
        HealthStatus::Degraded
    } else {
        HealthStatus::Ok
    };
    let doc = if role == Role::None {
        // Key names, versions and KMS errors (account ids, ARNs) are for readers only.
        Health::Bare(BareHealth { status })
    } else {
        Health::Full(Box::new(HealthDocument {
            aws,
            cluster: cluster_health(&app.leadership),
            hsm: condition(&hsm_error),
            hsm_error,
            hsm_reconnects: app.keyring.hsm_status().reconnects,
            keys: snap.keys.len(),
            propagation: app.keyring.propagation().map(|p| PropagationHealth {
                last_delay_ms: p.last_delay_ms,
                last_reload: p.last_reload.map(rfc3339),
            }),
            rotation,
            state: condition(&state_error),
            state_error,
            status,
            unavailable_versions: unavailable,
            verification,
            versions: snap.version_count(),
        }))
    };
    response::json(StatusCode::OK, &doc)
}

fn condition(error: &Option<String>) -> Condition {
    match error {
        Some(_) => Condition::Unavailable,
        None => Condition::Ok,
    }
}

/// This node's name and role; nothing for a node in no cluster (SQLite).
fn cluster_health(leadership: &Leadership) -> Option<ClusterHealth> {
    let node = leadership.node()?.to_string();
    let role = match leadership.is_leader() {
        true => NodeRole::Leader,
        false => NodeRole::Follower,
    };
    Some(ClusterHealth { node, role })
}

/// The rotator's view in wire types.
fn rotation_health(view: StatusView) -> RotationHealth {
    let failing = view
        .failing
        .into_iter()
        .map(|f| RotationFailure {
            attempts: f.attempts,
            error: f.error,
            key: f.key.to_string(),
            retry_in_seconds: f.retry_in_seconds,
        })
        .collect();
    RotationHealth {
        checks: view.checks,
        failing,
        last_check: view.last_check,
    }
}

/// `GET /metrics`.
pub(super) fn metrics(app: &App) -> Response<Body> {
    let now = app.keyring.now();
    if let Some(p) = app.keyring.propagation() {
        app.metrics.set_propagation(p.last_delay_ms, p.last_reload);
    }
    app.metrics.set_leader(app.leadership.is_leader());
    let text = app.metrics.render(&app.keyring.snapshot(), now);
    let mut resp = response::bytes(StatusCode::OK, Bytes::from(text));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
