//! Routing and handlers: where each request goes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, ETAG, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::peer::{Peer, Role};
use super::records::{self, Op};
use super::response::{self, Body};
use crate::audit::Actor;
use crate::clock::rfc3339;
use crate::daemon::App;
use crate::error::{Error, Result};
use crate::keyring::{check_period, KeyId, KeySource, KeyState, NewVersion, RecordCounters};
use crate::store::{Origin, VersionType};

/// Header carrying the verification code of admin requests.
pub const VERIFICATION_HEADER: &str = "x-verification-code";
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
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match dispatch(&app, &peer, req).await {
        Ok(resp) => resp,
        Err(e) => {
            if matches!(e, Error::Integrity { .. } | Error::Internal { .. }) {
                tracing::error!(uid = peer.uid, %method, %path, error = %e, "request failed");
            }
            response::error(&e)
        }
    };
    let route = Route::parse(&path).map_or("unknown", |r| r.name());
    app.metrics.observe(
        route,
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

async fn dispatch(app: &App, peer: &Peer, req: Request<Incoming>) -> Result<Response<Body>> {
    let path = req.uri().path().to_string();
    let Some(route) = Route::parse(&path) else {
        return Err(Error::not_found(
            "not_found",
            format!("no such path {path}"),
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
        (Route::Health, _) => Ok(health(app).await),
        (Route::Keys, _) => Ok(list(app)),
        (Route::Key(env, country), Method::GET) => {
            let key = app.keyring.key(&KeyId::parse(env, country)?)?;
            Ok(response::json(
                StatusCode::OK,
                &key_document(&key, app.keyring.records()),
            ))
        }
        (Route::Key(env, country), Method::POST) => {
            admin(app, peer, AdminAction::Create, env, country, req).await
        }
        (Route::Key(env, country), _) => {
            admin(app, peer, AdminAction::Settings, env, country, req).await
        }
        (Route::Rotate(env, country), _) => {
            admin(app, peer, AdminAction::Rotate, env, country, req).await
        }
        (Route::Audit, _) => audit(app, peer, req.uri().query()),
        (Route::TotpEnroll, _) => enroll(app, peer, req, false).await,
        (Route::TotpConfirm, _) => enroll(app, peer, req, true).await,
        (Route::Metrics, _) => {
            let now = app.keyring.clock().now().unix_timestamp();
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
            secrets(app, id, &req).await
        }
        #[cfg(feature = "test-clock")]
        (Route::TestClock, _) => test_clock(app, peer, req).await,
    }
}

async fn health(app: &App) -> Response<Body> {
    let ping =
        tokio::time::timeout(Duration::from_secs(2), app.keyring.hsm().call(|h| h.ping())).await;
    let hsm = match ping {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "HSM did not answer within 2 s".to_string(),
    };
    let snap = app.keyring.snapshot();
    let versions: usize = snap.keys.values().map(|k| k.versions.len()).sum();
    let unavailable: Vec<String> = snap
        .keys
        .values()
        .flat_map(|k| {
            k.versions
                .iter()
                .filter(|v| v.key().is_none())
                .map(move |v| format!("{} v{}", k.id, v.version))
        })
        .collect();
    let verification = app.verifier.mode();
    let rotation = app.rotator.view();
    let degraded = hsm != "ok"
        || !unavailable.is_empty()
        || verification == "off"
        || !rotation.failing.is_empty();
    response::json(
        StatusCode::OK,
        &json!({
            "status": if degraded { "degraded" } else { "ok" },
            "hsm": hsm,
            "keys": snap.keys.len(),
            "versions": versions,
            "unavailable_versions": unavailable,
            "verification": verification,
            "rotation": rotation,
        }),
    )
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
                "problem": k.problem,
            })
        })
        .collect();
    response::json(StatusCode::OK, &json!({ "keys": keys }))
}

fn key_document(k: &KeyState, counters: &RecordCounters) -> serde_json::Value {
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
            if let crate::keyring::Material::Unavailable(why) = &v.material {
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
        "problem": k.problem,
        "versions": versions,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(rename = "type")]
    kind: String,
    rotation_period_days: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PeriodBody {
    rotation_period_days: Option<u32>,
}

#[derive(Clone, Copy)]
enum AdminAction {
    Create,
    Rotate,
    Settings,
}

impl AdminAction {
    fn name(self) -> &'static str {
        match self {
            AdminAction::Create => "create",
            AdminAction::Rotate => "rotate",
            AdminAction::Settings => "settings",
        }
    }
}

/// Every admin change: the admin role, then the verification code, then the change. The
/// change audits its success in its own transaction; every refusal or failure is audited
/// here.
async fn admin(
    app: &App,
    peer: &Peer,
    action: AdminAction,
    env: &str,
    country: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let id = KeyId::parse(env, country);
    let result = async {
        let id = id
            .as_ref()
            .map_err(|e| Error::bad_input(e.code(), e))?
            .clone();
        authorize_admin(app, peer, &req, action.name()).await?;
        match action {
            AdminAction::Create => create(app, peer, id, req).await,
            AdminAction::Rotate => rotate(app, peer, id, req).await,
            AdminAction::Settings => settings(app, peer, id, req).await,
        }
    }
    .await;
    if let Err(e) = &result {
        let outcome = match e {
            Error::Unavailable { .. } | Error::Integrity { .. } | Error::Internal { .. } => {
                "failed"
            }
            _ => "refused",
        };
        tracing::warn!(
            uid = peer.uid, pid = peer.pid, action = action.name(), env, country,
            error = %e, "admin action {outcome}"
        );
        let entry = app
            .keyring
            .audit_entry(&Actor::of(peer), action.name(), id.as_ref().ok())
            .outcome(outcome, format!("{}: {e}", e.code()));
        app.keyring.audit(entry).await;
    }
    result
}

async fn authorize_admin(
    app: &App,
    peer: &Peer,
    req: &Request<Incoming>,
    action: &str,
) -> Result<()> {
    if peer.role < Role::Admin {
        return Err(Error::forbidden(format!(
            "uid {} is not in access.admins",
            peer.uid
        )));
    }
    let code = req
        .headers()
        .get(VERIFICATION_HEADER)
        .and_then(|v| v.to_str().ok());
    app.verifier.check(peer, code, action).await
}

async fn create(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: CreateBody = read_json(app, req)
        .await?
        .ok_or_else(|| Error::bad_input("missing_body", "a JSON body with \"type\" is required"))?;
    let source = match body.kind.as_str() {
        "incountry-managed" => KeySource::Managed,
        "aws" => {
            return Err(Error::bad_input(
                "unsupported_type",
                "customer-supplied (aws) versions are not supported by this build",
            ))
        }
        other => {
            return Err(Error::bad_input(
                "invalid_type",
                format!("type `{other}` is not one of incountry-managed, aws"),
            ))
        }
    };
    let period = body.rotation_period_days.map(check_period).transpose()?;
    add_version(app, peer, &id, source, period, AdminAction::Create).await
}

async fn rotate(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: PeriodBody = read_json(app, req).await?.unwrap_or_default();
    let period = body.rotation_period_days.map(check_period).transpose()?;
    add_version(
        app,
        peer,
        &id,
        KeySource::Managed,
        period,
        AdminAction::Rotate,
    )
    .await
}

async fn add_version(
    app: &App,
    peer: &Peer,
    id: &KeyId,
    source: KeySource,
    period: Option<u32>,
    action: AdminAction,
) -> Result<Response<Body>> {
    let req = NewVersion {
        source,
        rotation_period_days: period,
        origin: Origin::Admin,
        versions_per_day: app.config.load().limits.versions_per_day,
        existing_only: matches!(action, AdminAction::Rotate),
        expect_active: None,
        actor: Actor::of(peer),
        action: action.name(),
    };
    let made = app.keyring.add_version(id, req).await?;
    tracing::info!(
        uid = peer.uid, pid = peer.pid, action = action.name(), env = %id.env, country = %id.country,
        version = made.version, "new key version"
    );
    Ok(response::json(StatusCode::CREATED, &made))
}

async fn settings(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: PeriodBody = read_json(app, req).await?.unwrap_or_default();
    let days = body.rotation_period_days.ok_or_else(|| {
        Error::bad_input(
            "missing_rotation_period",
            "rotation_period_days is required (30, 60, 180 or 360)",
        )
    })?;
    app.keyring
        .set_rotation_period(&id, check_period(days)?, &Actor::of(peer))
        .await?;
    tracing::info!(uid = peer.uid, pid = peer.pid, action = "settings", env = %id.env, country = %id.country, rotation_period_days = days, "key settings changed");
    let key = app.keyring.key(&id)?;
    Ok(response::json(
        StatusCode::OK,
        &key_document(&key, app.keyring.records()),
    ))
}

/// TOTP enrollment of the calling admin: `enroll` makes a pending secret, `confirm` activates
/// it with a code from it. Refusals are audited.
async fn enroll(
    app: &App,
    peer: &Peer,
    req: Request<Incoming>,
    confirm: bool,
) -> Result<Response<Body>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ConfirmBody {
        code: String,
    }
    let result = async {
        if peer.role < Role::Admin {
            return Err(Error::forbidden(format!(
                "uid {} is not in access.admins",
                peer.uid
            )));
        }
        if confirm {
            let body: ConfirmBody = read_json(app, req).await?.ok_or_else(|| {
                Error::bad_input("missing_body", "{\"code\": \"123456\"} is required")
            })?;
            app.verifier.enroll_confirm(peer, &body.code).await?;
            Ok(response::json(
                StatusCode::OK,
                &json!({ "enrolled": true, "uid": peer.uid }),
            ))
        } else {
            let code = req
                .headers()
                .get(VERIFICATION_HEADER)
                .and_then(|v| v.to_str().ok());
            let enrollment = app.verifier.enroll_begin(peer, code).await?;
            Ok(response::json(StatusCode::OK, &enrollment))
        }
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(uid = peer.uid, pid = peer.pid, error = %e, "TOTP enrollment refused");
        let entry = app
            .keyring
            .audit_entry(&Actor::of(peer), "totp-enroll", None)
            .outcome("refused", format!("{}: {e}", e.code()));
        app.keyring.audit(entry).await;
    }
    result
}

/// `GET /v1/audit?since=SEQ`: admins only; up to 1000 entries after SEQ.
fn audit(app: &App, peer: &Peer, query: Option<&str>) -> Result<Response<Body>> {
    if peer.role < Role::Admin {
        return Err(Error::forbidden(format!(
            "uid {} is not in access.admins",
            peer.uid
        )));
    }
    let since = match query_param(query, "since") {
        Some(v) => v.parse::<i64>().ok().filter(|s| *s >= 0).ok_or_else(|| {
            Error::bad_input("invalid_since", "since must be a sequence number >= 0")
        })?,
        None => 0,
    };
    let entries = app.keyring.store().audit_since(since, 1000)?;
    let next = entries.last().map_or(since, |e| e.seq);
    Ok(response::json(
        StatusCode::OK,
        &json!({ "entries": entries, "next": next }),
    ))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The secrets document, with ETag; `If-None-Match` + `?wait=S` holds the request until the
/// key's versions change (woken by the keyring, no polling) or the wait runs out (304).
async fn secrets(app: &App, id: KeyId, req: &Request<Incoming>) -> Result<Response<Body>> {
    let wait = wait_param(req.uri().query())?;
    let if_none_match = req
        .headers()
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Subscribe before reading the state so that no change can slip in between.
    let mut changes = app.keyring.subscribe();
    let mut stopping = app.stopping.subscribe();
    let mut key = app.keyring.key(&id)?;
    if let Some(tag) = &if_none_match {
        let deadline = tokio::time::Instant::now() + wait.unwrap_or_default();
        while key.etag() == *tag {
            tokio::select! {
                changed = changes.changed(), if wait.is_some() => {
                    if changed.is_err() { break; }
                    key = app.keyring.key(&id)?;
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(not_modified(tag)),
                _ = stopping.wait_for(|s| *s) => return Ok(not_modified(tag)),
            }
        }
    }
    let doc = key.secrets_document()?;
    let mut resp = response::bytes(StatusCode::OK, Bytes::copy_from_slice(doc.as_bytes()));
    if let Ok(v) = HeaderValue::from_str(&key.etag()) {
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
                        "invalid_wait",
                        "wait must be a whole number of seconds from 1 to 300",
                    )
                })?;
            return Ok(Some(Duration::from_secs(secs)));
        }
    }
    Ok(None)
}

/// Reads a JSON body of at most `server.max_body` bytes. `None` for an empty body.
async fn read_json<T: DeserializeOwned>(app: &App, req: Request<Incoming>) -> Result<Option<T>> {
    let max = app.config.load().server.max_body;
    let too_large = || Error::TooLarge {
        message: format!("request body is larger than server.max_body ({max} bytes)"),
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                Error::bad_input("bad_body", "cannot read the request body")
            }
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(json_error)
}

fn json_error(e: serde_json::Error) -> Error {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => Error::bad_input(
            "malformed_json",
            format!("request body is not valid JSON: {e}"),
        ),
        Category::Data if e.to_string().starts_with("unknown field") => {
            Error::bad_input("unknown_field", e)
        }
        Category::Data => Error::bad_input("invalid_request", e),
    }
}

#[cfg(feature = "test-clock")]
async fn test_clock(app: &App, peer: &Peer, req: Request<Incoming>) -> Result<Response<Body>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Advance {
        advance_seconds: i64,
    }
    if peer.role < Role::Admin {
        return Err(Error::forbidden("test clock: admins only"));
    }
    let body: Advance = read_json(app, req)
        .await?
        .ok_or_else(|| Error::bad_input("missing_body", "advance_seconds is required"))?;
    app.keyring.clock().advance(body.advance_seconds);
    app.on_clock_change();
    let now = app.keyring.clock().now().unix_timestamp();
    Ok(response::json(
        StatusCode::OK,
        &json!({ "now": rfc3339(now), "unix": now }),
    ))
}
