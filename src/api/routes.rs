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
use super::response::{self, Body};
use crate::clock::rfc3339;
use crate::daemon::App;
use crate::error::{Error, Result};
use crate::keyring::{check_period, KeyId, KeySource, KeyState, NewVersion};
use crate::kms::AwsKeyRef;
use crate::store::{Origin, VersionType};
use zeroize::Zeroizing;

/// Header carrying the verification code of admin requests.
pub const VERIFICATION_HEADER: &str = "x-verification-code";
const MAX_WAIT_SECONDS: u64 = 300;

enum Route<'a> {
    Health,
    Keys,
    Key(&'a str, &'a str),
    Secrets(&'a str, &'a str),
    Rotate(&'a str, &'a str),
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
            #[cfg(feature = "test-clock")]
            ["", "v1", "test", "clock"] => Route::TestClock,
            _ => return None,
        })
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Health | Route::Keys | Route::Secrets(..) => "GET",
            Route::Key(..) => "GET, POST, PATCH",
            Route::Rotate(..) => "POST",
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
            Ok(response::json(StatusCode::OK, &key_document(&key)))
        }
        (Route::Key(env, country), Method::POST) => {
            let id = KeyId::parse(env, country)?;
            create(app, peer, id, req).await
        }
        (Route::Key(env, country), _) => {
            let id = KeyId::parse(env, country)?;
            settings(app, peer, id, req).await
        }
        (Route::Rotate(env, country), _) => {
            let id = KeyId::parse(env, country)?;
            rotate(app, peer, id, req).await
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
    let aws = app.keyring.aws_health();
    let degraded =
        hsm != "ok" || !unavailable.is_empty() || verification == "off" || aws.status == "degraded";
    response::json(
        StatusCode::OK,
        &json!({
            "status": if degraded { "degraded" } else { "ok" },
            "hsm": hsm,
            "keys": snap.keys.len(),
            "versions": versions,
            "unavailable_versions": unavailable,
            "verification": verification,
            "aws": aws,
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

fn key_document(k: &KeyState) -> serde_json::Value {
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
        "problem": k.problem,
        "versions": versions,
    })
}

/// No Debug: it may hold an IAM secret key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(rename = "type")]
    kind: String,
    rotation_period_days: Option<u32>,
    // Customer-supplied (aws) versions only.
    region: Option<String>,
    encrypted_key: Option<String>,
    cmk_arn: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

impl CreateBody {
    fn has_aws_fields(&self) -> bool {
        self.region.is_some()
            || self.encrypted_key.is_some()
            || self.cmk_arn.is_some()
            || self.access_key_id.is_some()
            || self.secret_access_key.is_some()
    }
}

fn required(field: Option<String>, name: &str) -> Result<String> {
    field.ok_or_else(|| {
        Error::bad_input(
            "missing_field",
            format!("{name} is required for type aws (region, encrypted_key, cmk_arn, access_key_id, secret_access_key)"),
        )
    })
}

/// Checks the fields of an aws registration (shape only; KMS decides the rest).
fn aws_source(body: CreateBody) -> Result<AwsKeyRef> {
    use base64::Engine;
    // Taken first, so the secret is zeroized on every return path.
    let secret = body.secret_access_key.map(Zeroizing::new);
    if body.rotation_period_days.is_some() {
        return Err(Error::bad_input(
            "invalid_rotation_period",
            "rotation_period_days does not apply to aws versions (the customer rotates their own key)",
        ));
    }
    let region = required(body.region, "region")?;
    let region_ok = (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        return Err(Error::bad_input(
            "invalid_region",
            "region must be an AWS region name such as eu-central-1",
        ));
    }
    let cmk_arn = required(body.cmk_arn, "cmk_arn")?;
    let parts: Vec<&str> = cmk_arn.splitn(6, ':').collect();
    let arn_ok = cmk_arn.len() <= 2048
        && parts.len() == 6
        && parts[0] == "arn"
        && parts[2] == "kms"
        && (parts[5].starts_with("key/") || parts[5].starts_with("alias/"))
        && cmk_arn.bytes().all(|b| b.is_ascii_graphic());
    if !arn_ok {
        return Err(Error::bad_input(
            "invalid_cmk_arn",
            "cmk_arn must be a KMS key ARN such as arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ));
    }
    if parts[3] != region {
        return Err(Error::bad_input(
            "invalid_cmk_arn",
            format!("cmk_arn is in region {} but region is {region}", parts[3]),
        ));
    }
    let encrypted_key = required(body.encrypted_key, "encrypted_key")?;
    let encrypted_key = base64::engine::general_purpose::STANDARD
        .decode(encrypted_key.trim())
        .ok()
        .filter(|b| (1..=6144).contains(&b.len()))
        .ok_or_else(|| {
            Error::bad_input(
                "invalid_encrypted_key",
                "encrypted_key must be the KMS ciphertext blob in standard base64 (1 to 6144 bytes)",
            )
        })?;
    let access_key_id = required(body.access_key_id, "access_key_id")?;
    let id_ok = (16..=128).contains(&access_key_id.len())
        && access_key_id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !id_ok {
        return Err(Error::bad_input(
            "invalid_access_key_id",
            "access_key_id must be an IAM access key id (16 to 128 letters and digits)",
        ));
    }
    let secret = secret.ok_or_else(|| {
        Error::bad_input(
            "missing_field",
            "secret_access_key is required for type aws",
        )
    })?;
    let secret_ok =
        (1..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic());
    if !secret_ok {
        return Err(Error::bad_input(
            "invalid_secret_access_key",
            "secret_access_key must be 1 to 256 printable ASCII characters without spaces",
        ));
    }
    Ok(AwsKeyRef {
        region,
        encrypted_key,
        cmk_arn,
        access_key_id,
        secret_access_key: secret,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PeriodBody {
    rotation_period_days: Option<u32>,
}

/// Admin requests: the admin role, then the verification code.
async fn authorize_admin(
    app: &App,
    peer: &Peer,
    req: &Request<Incoming>,
    action: &str,
) -> Result<()> {
    if peer.role < Role::Admin {
        tracing::warn!(
            uid = peer.uid,
            pid = peer.pid,
            action,
            "admin action refused: not an admin"
        );
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
    authorize_admin(app, peer, &req, "create").await?;
    let body: CreateBody = read_json(app, req)
        .await?
        .ok_or_else(|| Error::bad_input("missing_body", "a JSON body with \"type\" is required"))?;
    let (source, period) = match body.kind.as_str() {
        "incountry-managed" => {
            if body.has_aws_fields() {
                return Err(Error::bad_input(
                    "invalid_request",
                    "region, encrypted_key, cmk_arn, access_key_id and secret_access_key apply only to type aws",
                ));
            }
            let period = body.rotation_period_days.map(check_period).transpose()?;
            (KeySource::Managed, period)
        }
        "aws" => (KeySource::Aws(aws_source(body)?), None),
        other => {
            return Err(Error::bad_input(
                "invalid_type",
                format!("type `{other}` is not one of incountry-managed, aws"),
            ))
        }
    };
    add_version(app, peer, &id, source, period, false, "create").await
}

async fn rotate(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    authorize_admin(app, peer, &req, "rotate").await?;
    let body: PeriodBody = read_json(app, req).await?.unwrap_or_default();
    let period = body.rotation_period_days.map(check_period).transpose()?;
    add_version(app, peer, &id, KeySource::Managed, period, true, "rotate").await
}

async fn add_version(
    app: &App,
    peer: &Peer,
    id: &KeyId,
    source: KeySource,
    period: Option<u32>,
    existing_only: bool,
    action: &str,
) -> Result<Response<Body>> {
    let req = NewVersion {
        source,
        rotation_period_days: period,
        origin: Origin::Admin,
        versions_per_day: app.config.load().limits.versions_per_day,
        customer_supplied_versions: app.config.load().limits.customer_supplied_versions,
        existing_only,
    };
    match app.keyring.add_version(id, req).await {
        Ok(made) => {
            tracing::info!(
                uid = peer.uid, pid = peer.pid, action, env = %id.env, country = %id.country,
                version = made.version, "new key version"
            );
            Ok(response::json(StatusCode::CREATED, &made))
        }
        Err(e) => {
            tracing::warn!(
                uid = peer.uid, pid = peer.pid, action, env = %id.env, country = %id.country,
                error = %e, "admin action refused"
            );
            Err(e)
        }
    }
}

async fn settings(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    authorize_admin(app, peer, &req, "settings").await?;
    let body: PeriodBody = read_json(app, req).await?.unwrap_or_default();
    let days = body.rotation_period_days.ok_or_else(|| {
        Error::bad_input(
            "missing_rotation_period",
            "rotation_period_days is required (30, 60, 180 or 360)",
        )
    })?;
    app.keyring
        .set_rotation_period(&id, check_period(days)?)
        .await?;
    tracing::info!(uid = peer.uid, pid = peer.pid, action = "settings", env = %id.env, country = %id.country, rotation_period_days = days, "key settings changed");
    let key = app.keyring.key(&id)?;
    Ok(response::json(StatusCode::OK, &key_document(&key)))
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
