//! Admin changes: create, rotate, settings, verification-code enrollment, and the audit
//! log. Each change needs the admin role, then a verification code; its success is audited
//! in the change's own transaction, every refusal or failure here.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::peer::{Peer, Role};
use super::response::{self, Body};
use super::routes::{key_document, query_param, read_json, VERIFICATION_HEADER};
use crate::audit::Actor;
use crate::daemon::App;
use crate::error::{Error, Result};
use crate::keyring::{check_period, KeyId, KeySource, NewVersion};
use crate::store::Origin;

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
pub enum AdminAction {
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
pub async fn admin(
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
pub async fn enroll(
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
pub fn audit(app: &App, peer: &Peer, query: Option<&str>) -> Result<Response<Body>> {
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
