//! Reading keys: the list, one key with its versions and record counters, and the secrets
//! document (with ETag and the long poll).

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ETAG};
use hyper::{Request, Response, StatusCode};

use super::extract::{if_none_match, wait_param};
use super::peer::{Peer, Role};
use super::response::{self, Body};
use super::App;
use crate::domain::clock::rfc3339;
use crate::domain::error::{Error, Result};
use crate::domain::{KeyId, KeyState, VersionType};
use crate::keyring::RecordCounters;
use crate::proto::{KeyDocument, KeyList, KeySummary, VersionDocument};

/// The API shows periods in whole months of 30 days.
fn months(days: u32) -> u32 {
    days / 30
}

/// `GET /v1/keys`.
pub(super) fn list(app: &App) -> Response<Body> {
    let snap = app.keyring.snapshot();
    let keys = snap
        .keys
        .values()
        .map(|k| KeySummary {
            active_version: k.active().map(|v| v.version),
            available_versions: k.versions.iter().filter(|v| v.key().is_some()).count(),
            country: k.id.country.clone(),
            environment: k.id.env.clone(),
            problem: k.unavailable_reason.clone(),
            rotation_period_months: k.rotation_period_days.map(months),
            versions: k.versions.len(),
        })
        .collect();
    response::json(StatusCode::OK, &KeyList { keys })
}

/// `GET /v1/keys/{env}/{country}`.
pub(super) fn show(app: &App, id: &KeyId) -> Result<Response<Body>> {
    let key = app.keyring.key(id)?;
    Ok(response::json(
        StatusCode::OK,
        &key_document(&key, app.keyring.records()),
    ))
}

/// A key as the API shows it, with the record counters of each version since start (kept
/// outside the snapshot).
pub(super) fn key_document(k: &KeyState, counters: &RecordCounters) -> KeyDocument {
    let versions = k
        .versions
        .iter()
        .map(|v| {
            let c = counters.get(&k.id, v.version);
            VersionDocument {
                created: rfc3339(v.created),
                error: v.availability.unavailable_reason().map(str::to_string),
                records_decrypted: c.records_decrypted,
                records_encrypted: c.records_encrypted,
                records_rewrapped: c.records_rewrapped,
                records_rewrapped_away: c.records_rewrapped_away,
                rotation_period_months: match v.kind {
                    VersionType::Managed => k.rotation_period_days.map(months),
                    VersionType::Aws => None,
                },
                status: k.status(v),
                kind: v.kind,
                version: v.version,
            }
        })
        .collect();
    KeyDocument {
        active_version: k.active().map(|v| v.version),
        country: k.id.country.clone(),
        created: rfc3339(k.created),
        environment: k.id.env.clone(),
        next_rotation: k.next_rotation().map(rfc3339),
        problem: k.unavailable_reason.clone(),
        rotation_period_days: k.rotation_period_days,
        rotation_period_months: k.rotation_period_days.map(months),
        versions,
    }
}

/// The secrets document, with ETag; `If-None-Match` + `?wait=S` holds the request until the
/// key's versions change (woken by the keyring, no polling) or the wait runs out (304).
pub(super) async fn secrets(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: &Request<Incoming>,
) -> Result<Response<Body>> {
    let wait = wait_param(req.uri().query())?;
    let if_none_match = if_none_match(req);
    // Subscribe before reading the state so that no change can slip in between.
    let mut changes = app.keyring.subscribe();
    let mut stopping = app.stopping.subscribe();
    let mut access = app.access_changed.subscribe();
    let mut key = app.keyring.key(&id)?;
    let mut etag = key.etag();
    if let Some(tag) = &if_none_match {
        let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
        let _waiting = (wait.is_some() && etag == *tag).then(|| app.metrics.waiting());
        while etag == *tag {
            tokio::select! {
                changed = changes.changed(), if wait.is_some() => {
                    if changed.is_err() { break; }
                    key = app.keyring.key(&id)?;
                    etag = key.etag();
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(not_modified(tag)),
                _ = stopping.wait_for(|s| *s) => return Ok(not_modified(tag)),
                _ = access.changed() => {
                    if peer.role_in(&app.access.load()) < Role::Reader {
                        return Err(Error::forbidden(format!(
                            "uid {} lost its access while waiting",
                            peer.uid
                        )));
                    }
                }
            }
        }
    }
    // Written into one zeroizing buffer by the snapshot: key bytes never pass a serializer.
    let doc = key.secrets_document()?;
    let mut resp = response::secret_bytes(StatusCode::OK, doc);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(ETAG, v);
    }
    Ok(resp)
}

fn not_modified(etag: &str) -> Response<Body> {
    let mut resp = response::bytes(StatusCode::NOT_MODIFIED, Bytes::new());
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(ETAG, v);
    }
    resp
}
