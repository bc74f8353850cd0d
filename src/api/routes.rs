//! Routing and handlers: where each request goes.

use crate::domain::Code;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ETAG, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::admin::{admin, audit, enroll, AdminAction};
use super::body::read_json;
use super::health::health;
use super::peer::{Peer, Role};
use super::records::{self, Op};
use super::response::{self, Body};
use crate::api::App;
use crate::domain::clock::rfc3339;
use crate::domain::error::{Error, Result};
use crate::domain::KeyId;
use crate::domain::KeyState;
use crate::domain::VersionType;
use crate::keyring::RecordCounters;

const MAX_WAIT_SECONDS: u64 = 300;

enum Route<'a> {
    Health,
    Keys,
    Key(&'a str, &'a str),
    Secrets(&'a str, &'a str),
    Rotate(&'a str, &'a str),
    Audit,
    Metrics,
    TotpEnroll,
    TotpConfirm,
    Records(&'a str, &'a str, Op),
    #[cfg(feature = "test-clock")]
    TestClock,
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        Some(match parts.as_slice() {
            ["", "v1", "health"] => Route::Health,
            ["", "v1", "keys"] => Route::Keys,
            ["", "v1", "keys", env, country] => Route::Key(env, country),
            ["", "v1", "keys", env, country, "secrets"] => Route::Secrets(env, country),
            ["", "v1", "keys", env, country, "rotate"] => Route::Rotate(env, country),
            ["", "v1", "audit"] => Route::Audit,
            ["", "v1", "admin", "totp", "enroll"] => Route::TotpEnroll,
            ["", "v1", "admin", "totp", "confirm"] => Route::TotpConfirm,
            ["", "metrics"] => Route::Metrics,
            ["", "v1", "keys", env, country, "encrypt"] => {
                Route::Records(env, country, Op::Encrypt)
            }
            ["", "v1", "keys", env, country, "decrypt"] => {
                Route::Records(env, country, Op::Decrypt)
            }
            ["", "v1", "keys", env, country, "rewrap"] => Route::Records(env, country, Op::Rewrap),
            #[cfg(feature = "test-clock")]
            ["", "v1", "test", "clock"] => Route::TestClock,
            _ => return None,
        })
    }

    /// Route name for metrics labels (never the raw path: bounded cardinality).
    fn name(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Keys => "keys",
            Route::Key(..) => "key",
            Route::Secrets(..) => "secrets",
            Route::Rotate(..) => "rotate",
            Route::Audit => "audit",
            Route::Metrics => "metrics",
            Route::TotpEnroll => "totp_enroll",
            Route::TotpConfirm => "totp_confirm",
            Route::Records(_, _, op) => op.name(),
            #[cfg(feature = "test-clock")]
            Route::TestClock => "test_clock",
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Health | Route::Keys | Route::Secrets(..) | Route::Audit | Route::Metrics => {
                "GET"
            }
            Route::Key(..) => "GET, POST, PATCH",
            Route::Rotate(..) | Route::TotpEnroll | Route::TotpConfirm | Route::Records(..) => {
                "POST"
            }
            #[cfg(feature = "test-clock")]
            Route::TestClock => "POST",
        }
    }
}

pub async fn handle(
    app: Arc<App>,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // The role under the access lists in force now: a reload reaches open connections.
    let role = peer.role_in(&app.access.load());
    let peer = if role == peer.role {
        peer
    } else {
        Arc::new(Peer {
            role,
            ..(*peer).clone()
        })
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = Route::parse(&path);
    let name = route.as_ref().map_or("unknown", Route::name);
    let resp = match dispatch(&app, &peer, route, req).await {
        Ok(resp) => resp,
        Err(e) => {
            if matches!(e, Error::Integrity { .. } | Error::Internal { .. }) {
                tracing::error!(uid = peer.uid, %method, %path, error = %e, "request failed");
            }
            response::error(&e)
        }
    };
    app.metrics.observe(
        name,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    tracing::debug!(
        uid = peer.uid,
        pid = peer.pid,
        %method,
        %path,
        status = resp.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    Ok(resp)
}

async fn dispatch(
    app: &Arc<App>,
    peer: &Arc<Peer>,
    route: Option<Route<'_>>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let Some(route) = route else {
        return Err(Error::not_found(
            Code::NotFound,
            format!("no such path {}", req.uri().path()),
        ));
    };
    let method = req.method().clone();
    let allowed = route.allow().split(", ").any(|m| m == method.as_str());
    if !allowed {
        return Ok(response::method_not_allowed(route.allow()));
    }
    // Everything but health needs at least the reader role.
    if !matches!(route, Route::Health) && peer.role < Role::Reader {
        return Err(Error::forbidden(format!(
            "uid {} is not in access.readers or access.admins",
            peer.uid
        )));
    }
    match (route, method) {
        (Route::Health, _) => Ok(health(app, peer.role).await),
        (Route::Keys, _) => Ok(list(app)),
        (Route::Key(env, country), Method::GET) => {
            let key = app.keyring.key(&KeyId::parse(env, country)?)?;
            Ok(response::json(
                StatusCode::OK,
                &key_document(&key, app.keyring.records()),
            ))
        }
        (Route::Key(env, country), Method::POST) => {
            detached_admin(app, peer, AdminAction::Create, env, country, req).await
        }
        (Route::Key(env, country), _) => {
            detached_admin(app, peer, AdminAction::Settings, env, country, req).await
        }
        (Route::Rotate(env, country), _) => {
            detached_admin(app, peer, AdminAction::Rotate, env, country, req).await
        }
        (Route::Audit, _) => audit(app, peer, req.uri().query()),
        (Route::TotpEnroll, _) => {
            detached(app, peer, move |app, peer| async move {
                enroll(&app, &peer, req, false).await
            })
            .await
        }
        (Route::TotpConfirm, _) => {
            detached(app, peer, move |app, peer| async move {
                enroll(&app, &peer, req, true).await
            })
            .await
        }
        (Route::Metrics, _) => {
            let now = app.keyring.now();
            let text = app.metrics.render(&app.keyring.snapshot(), now);
            let mut resp = response::bytes(StatusCode::OK, Bytes::from(text));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(resp)
        }
        (Route::Records(env, country, op), _) => {
            let id = KeyId::parse(env, country)?;
            let body = read_json(app, req).await?;
            records::handle(app, id, op, body).await
        }
        (Route::Secrets(env, country), _) => {
            let id = KeyId::parse(env, country)?;
            secrets(app, peer, id, &req).await
        }
        #[cfg(feature = "test-clock")]
        (Route::TestClock, _) => test_clock(app, peer, req).await,
    }
}

/// Runs a change on a task of its own: a client that goes away cancels its request, never
/// a change half made (HSM, commit, publish run to their end).
async fn detached<F, Fut>(app: &Arc<App>, peer: &Arc<Peer>, change: F) -> Result<Response<Body>>
where
    F: FnOnce(Arc<App>, Arc<Peer>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Body>>> + Send + 'static,
{
    tokio::spawn(change(app.clone(), peer.clone()))
        .await
        .map_err(|e| Error::internal(format!("change task failed: {e}")))?
}

async fn detached_admin(
    app: &Arc<App>,
    peer: &Arc<Peer>,
    action: AdminAction,
    env: &str,
    country: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let (env, country) = (env.to_string(), country.to_string());
    detached(app, peer, move |app, peer| async move {
        admin(&app, &peer, action, &env, &country, req).await
    })
    .await
}

fn months(days: u32) -> u32 {
    days / 30
}

fn list(app: &App) -> Response<Body> {
    let snap = app.keyring.snapshot();
    let keys: Vec<_> = snap
        .keys
        .values()
        .map(|k| {
            json!({
                "environment": k.id.env,
                "country": k.id.country,
                "active_version": k.active().map(|v| v.version),
                "versions": k.versions.len(),
                "available_versions": k.versions.iter().filter(|v| v.key().is_some()).count(),
                "rotation_period_months": k.rotation_period_days.map(months),
                "problem": k.unavailable_reason,
            })
        })
        .collect();
    response::json(StatusCode::OK, &json!({ "keys": keys }))
}

pub(super) fn key_document(k: &KeyState, counters: &RecordCounters) -> serde_json::Value {
    let versions: Vec<_> = k
        .versions
        .iter()
        .map(|v| {
            let mut doc = json!({
                "version": v.version,
                "type": v.kind.as_str(),
                "rotation_period_months": match v.kind {
                    VersionType::Managed => k.rotation_period_days.map(months),
                    VersionType::Aws => None,
                },
                "created": rfc3339(v.created),
                "status": k.status(v),
            });
            // Records through the daemon since start, per version (not in the snapshot).
            let c = counters.get(&k.id, v.version);
            doc["records_encrypted"] = json!(c.records_encrypted);
            doc["records_rewrapped"] = json!(c.records_rewrapped);
            doc["records_decrypted"] = json!(c.records_decrypted);
            doc["records_rewrapped_away"] = json!(c.records_rewrapped_away);
            if let Some(why) = v.availability.unavailable_reason() {
                doc["error"] = json!(why);
            }
            doc
        })
        .collect();
    json!({
        "environment": k.id.env,
        "country": k.id.country,
        "created": rfc3339(k.created),
        "rotation_period_days": k.rotation_period_days,
        "rotation_period_months": k.rotation_period_days.map(months),
        "active_version": k.active().map(|v| v.version),
        "next_rotation": k.next_rotation().map(rfc3339),
        "problem": k.unavailable_reason,
        "versions": versions,
    })
}

pub(super) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The secrets document, with ETag; `If-None-Match` + `?wait=S` holds the request until the
/// key's versions change (woken by the keyring, no polling) or the wait runs out (304).
async fn secrets(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: &Request<Incoming>,
) -> Result<Response<Body>> {
    let wait = wait_param(req.uri().query())?;
    let if_none_match = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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

fn wait_param(query: Option<&str>) -> Result<Option<Duration>> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("wait=") {
            let secs: u64 = value
                .parse()
                .ok()
                .filter(|s| (1..=MAX_WAIT_SECONDS).contains(s))
                .ok_or_else(|| {
                    Error::bad_input(
                        Code::InvalidWait,
                        "wait must be a whole number of seconds from 1 to 300",
                    )
                })?;
            return Ok(Some(Duration::from_secs(secs)));
        }
    }
    Ok(None)
}

#[cfg(feature = "test-clock")]
async fn test_clock(app: &App, peer: &Peer, req: Request<Incoming>) -> Result<Response<Body>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Advance {
        advance_seconds: i64,
    }
    if peer.role < Role::Admin {
        return Err(Error::forbidden("test clock: admins only"));
    }
    let body: Advance = read_json(app, req)
        .await?
        .ok_or_else(|| Error::bad_input(Code::MissingBody, "advance_seconds is required"))?;
    app.keyring.advance_clock(body.advance_seconds);
    app.on_clock_change();
    let now = app.keyring.now();
    Ok(response::json(
        StatusCode::OK,
        &json!({ "now": rfc3339(now), "unix": now }),
    ))
}
