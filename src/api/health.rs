//! `GET /v1/health`: HSM ping, state, keys and KMS; the bare status for peers without a role.

use std::time::Duration;

use hyper::{Response, StatusCode};
use serde_json::json;

use super::peer::Role;
use super::response::{self, Body};
use crate::api::App;

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
    let versions = snap.version_count();
    let unavailable: Vec<String> = snap
        .unavailable()
        .map(|(k, v)| format!("{} v{}", k.id, v.version))
        .collect();
    let verification = app.verifier.mode();
    let rotation = app.rotator.view();
    let aws = app.keyring.aws_health();
    let degraded = hsm_error.is_some()
        || state_error.is_some()
        || !unavailable.is_empty()
        || verification == crate::config::VerificationMode::Off
        || !rotation.failing.is_empty()
        || aws.status == crate::keyring::AwsStatus::Degraded;
    let mut doc = json!({
        "status": if degraded { "degraded" } else { "ok" },
        "hsm": if hsm_error.is_some() { "unavailable" } else { "ok" },
        "hsm_reconnects": app.keyring.hsm_status().reconnects,
        "state": if state_error.is_some() { "unavailable" } else { "ok" },
        "keys": snap.keys.len(),
        "versions": versions,
        "unavailable_versions": unavailable,
        "verification": verification,
        "rotation": rotation,
        "aws": aws,
    });
    if let Some(e) = hsm_error {
        doc["hsm_error"] = json!(e);
    }
    if let Some(e) = state_error {
        doc["state_error"] = json!(e);
    }
    if role == Role::None {
        // Key names, versions and KMS errors (account ids, ARNs) are for readers only.
        doc = json!({ "status": doc["status"] });
    }
    response::json(StatusCode::OK, &doc)
}
