//! Admin changes: create, rotate, settings, verification-code enrollment, and the audit
//! log. Each change needs the admin role, then a verification code; its success is audited
//! in the change's own transaction, every refusal or failure here.

use crate::domain::Code;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::body::read_json;
use super::peer::{Peer, Role};
use super::response::{self, Body};
use super::routes::{key_document, query_param};
use crate::api::App;
use crate::domain::audit::Actor;
use crate::domain::audit::AuditOutcome;
use crate::domain::error::{Error, Result};
use crate::domain::limits::check_period;
use crate::domain::AwsKeyRef;
use crate::domain::Initiator;
use crate::domain::KeyId;
use crate::keyring::{KeySource, NewVersion};
use crate::proto::{VERIFICATION_HEADER, VOUCHER_HEADER};
use zeroize::Zeroizing;

/// No Debug: it may hold an IAM secret key, which is zeroized wherever the body is dropped
/// (every early return too).
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
    secret_access_key: Option<Zeroizing<String>>,
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
            Code::MissingField,
            format!("{name} is required for type aws (region, encrypted_key, cmk_arn, access_key_id, secret_access_key)"),
        )
    })
}

/// Checks the fields of an aws registration (shape only; KMS decides the rest).
fn aws_source(body: CreateBody) -> Result<AwsKeyRef> {
    use base64::Engine;
    let secret = body.secret_access_key;
    if body.rotation_period_days.is_some() {
        return Err(Error::bad_input(
            Code::InvalidRotationPeriod,
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
            Code::InvalidRegion,
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
            Code::InvalidCmkArn,
            "cmk_arn must be a KMS key ARN such as arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ));
    }
    if parts[3] != region {
        return Err(Error::bad_input(
            Code::InvalidCmkArn,
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
                Code::InvalidEncryptedKey,
                "encrypted_key must be the KMS ciphertext blob in standard base64 (1 to 6144 bytes)",
            )
        })?;
    let access_key_id = required(body.access_key_id, "access_key_id")?;
    let id_ok = (16..=128).contains(&access_key_id.len())
        && access_key_id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !id_ok {
        return Err(Error::bad_input(
            Code::InvalidAccessKeyId,
            "access_key_id must be an IAM access key id (16 to 128 letters and digits)",
        ));
    }
    let secret = secret.ok_or_else(|| {
        Error::bad_input(
            Code::MissingField,
            "secret_access_key is required for type aws",
        )
    })?;
    let secret_ok =
        (1..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic());
    if !secret_ok {
        return Err(Error::bad_input(
            Code::InvalidSecretAccessKey,
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
    if let Err(Error::Forbidden { .. }) = &result {
        super::refusals::refused_without_role(app, peer, action.name()).await;
    } else if let Err(e) = &result {
        let outcome = match e {
            Error::Unavailable { .. } | Error::Integrity { .. } | Error::Internal { .. } => {
                AuditOutcome::Failed
            }
            _ => AuditOutcome::Refused,
        };
        if e.code() == Code::StateUnavailable {
            tracing::error!(
                uid = peer.uid, pid = peer.pid, action = action.name(), env, country,
                error = %e, "admin action {outcome}: the state disk does not take writes"
            );
        } else {
            tracing::warn!(
                uid = peer.uid, pid = peer.pid, action = action.name(), env, country,
                error = %e, "admin action {outcome}"
            );
        }
        let entry = app
            .keyring
            .audit_entry(&Actor::of(&peer.caller()), action.name(), id.as_ref().ok())
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
    app.verifier.check(&peer.caller(), code, action).await
}

async fn create(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: CreateBody = read_json(app, req).await?.ok_or_else(|| {
        Error::bad_input(Code::MissingBody, "a JSON body with \"type\" is required")
    })?;
    let (source, period) = match body.kind.as_str() {
        "incountry-managed" => {
            if body.has_aws_fields() {
                return Err(Error::bad_input(
                    Code::InvalidRequest,
                    "region, encrypted_key, cmk_arn, access_key_id and secret_access_key apply only to type aws",
                ));
            }
            let period = body.rotation_period_days.map(check_period).transpose()?;
            (KeySource::Managed, period)
        }
        "aws" => (KeySource::Aws(aws_source(body)?), None),
        other => {
            return Err(Error::bad_input(
                Code::InvalidType,
                format!("type `{other}` is not one of incountry-managed, aws"),
            ))
        }
    };
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
        origin: Initiator::Admin,
        versions_per_day: app.config.load().limits.versions_per_day,
        customer_supplied_versions: app.config.load().limits.customer_supplied_versions,
        existing_only: matches!(action, AdminAction::Rotate),
        expect_active: None,
        actor: Actor::of(&peer.caller()),
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
            Code::MissingRotationPeriod,
            "rotation_period_days is required (30, 60, 180 or 360)",
        )
    })?;
    app.keyring
        .set_rotation_period(&id, check_period(days)?, &Actor::of(&peer.caller()))
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
                Error::bad_input(Code::MissingBody, "{\"code\": \"123456\"} is required")
            })?;
            app.verifier
                .enroll_confirm(&peer.caller(), &body.code)
                .await?;
            Ok(response::json(
                StatusCode::OK,
                &json!({ "enrolled": true, "uid": peer.uid }),
            ))
        } else {
            let code = req
                .headers()
                .get(VERIFICATION_HEADER)
                .and_then(|v| v.to_str().ok());
            let voucher = voucher(app, &req).await?;
            let enrollment = app
                .verifier
                .enroll_begin(&peer.caller(), code, voucher)
                .await?;
            Ok(response::secret_json(StatusCode::OK, &enrollment))
        }
    }
    .await;
    if let Err(Error::Forbidden { .. }) = &result {
        super::refusals::refused_without_role(app, peer, "totp-enroll").await;
    } else if let Err(e) = &result {
        tracing::warn!(uid = peer.uid, pid = peer.pid, error = %e, "TOTP enrollment refused");
        let entry = app
            .keyring
            .audit_entry(&Actor::of(&peer.caller()), "totp-enroll", None)
            .outcome(AuditOutcome::Refused, format!("{}: {e}", e.code()));
        app.keyring.audit(entry).await;
    }
    result
}

/// The enrolled admin named by `X-Verification-Uid`, whose code vouches for a first
/// enrollment: it must be in access.admins now (its uid, primary group and supplementary
/// groups from the user database). Not read when verification is off.
async fn voucher(app: &App, req: &Request<Incoming>) -> Result<Option<u32>> {
    let Some(value) = req.headers().get(VOUCHER_HEADER) else {
        return Ok(None);
    };
    if app.verifier.mode() == crate::config::VerificationMode::Off {
        return Ok(None);
    }
    let uid = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::bad_input(
                Code::InvalidVerificationUid,
                "X-Verification-Uid must be the uid (a number) of the enrolled admin whose code X-Verification-Code carries",
            )
        })?;
    let groups = tokio::task::spawn_blocking(move || groups_of(uid))
        .await
        .unwrap_or_default();
    if !app.access.load().admins.admits(uid, &groups) {
        return Err(Error::unauthorized(
            Code::VerificationUidNotAdmin,
            format!("uid {uid} is not in access.admins: only an enrolled admin's code vouches for a first enrollment"),
        ));
    }
    Ok(Some(uid))
}

/// A uid's primary and supplementary groups from the user database (none if it has no
/// entry there).
fn groups_of(uid: u32) -> Vec<u32> {
    use nix::unistd::{getgrouplist, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let mut groups = vec![user.gid.as_raw()];
    if let Ok(name) = std::ffi::CString::new(user.name) {
        if let Ok(list) = getgrouplist(&name, user.gid) {
            groups.extend(list.into_iter().map(|g| g.as_raw()));
        }
    }
    groups
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
            Error::bad_input(Code::InvalidSince, "since must be a sequence number >= 0")
        })?,
        None => 0,
    };
    let entries = app.keyring.audit_since(since, 1000)?;
    let next = entries.last().map_or(since, |e| e.seq);
    Ok(response::json(
        StatusCode::OK,
        &json!({ "entries": entries, "next": next }),
    ))
}
