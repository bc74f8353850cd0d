//! Admin changes: create, rotate and settings. Each needs the admin role, then a
//! verification code; its success is audited in the change's own transaction (by the
//! keyring), every refusal or failure here.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::extract::{read_json, verification_code};
use super::keys::key_document;
use super::peer::Peer;
use super::response::{self, Body};
use super::App;
use crate::domain::audit::{Actor, AuditOutcome};
use crate::domain::error::{Error, Result};
use crate::domain::limits::check_period;
use crate::domain::{AwsKeyRef, Code, Initiator, KeyId};
use crate::keyring::{AddedVersion, KeySource, NewVersion};
use crate::proto::{CreateKeyRequest, PeriodRequest, VersionAdded};

fn has_aws_fields(body: &CreateKeyRequest) -> bool {
    body.region.is_some()
        || body.encrypted_key.is_some()
        || body.cmk_arn.is_some()
        || body.access_key_id.is_some()
        || body.secret_access_key.is_some()
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
fn aws_source(body: CreateKeyRequest) -> Result<AwsKeyRef> {
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

/// An admin change to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Create,
    Rotate,
    Settings,
}

impl Change {
    /// The action's name in the audit log, the log and the verification check.
    pub fn name(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Rotate => "rotate",
            Change::Settings => "settings",
        }
    }
}

/// Every admin change: the admin role, then the verification code, then the change. The
/// change audits its success in its own transaction; every refusal or failure is audited
/// here.
pub(super) async fn change(
    app: &App,
    peer: &Peer,
    action: Change,
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
        peer.require_admin()?;
        app.verifier
            .check(&peer.caller(), verification_code(&req), action.name())
            .await?;
        match action {
            Change::Create => create(app, peer, id, req).await,
            Change::Rotate => rotate(app, peer, id, req).await,
            Change::Settings => settings(app, peer, id, req).await,
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

async fn create(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: CreateKeyRequest = read_json(app, req).await?.ok_or_else(|| {
        Error::bad_input(Code::MissingBody, "a JSON body with \"type\" is required")
    })?;
    let (source, period) = match body.kind.as_str() {
        "incountry-managed" => {
            if has_aws_fields(&body) {
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
    add_version(app, peer, &id, source, period, Change::Create).await
}

async fn rotate(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: PeriodRequest = read_json(app, req).await?.unwrap_or_default();
    let period = body.rotation_period_days.map(check_period).transpose()?;
    add_version(app, peer, &id, KeySource::Managed, period, Change::Rotate).await
}

async fn add_version(
    app: &App,
    peer: &Peer,
    id: &KeyId,
    source: KeySource,
    period: Option<u32>,
    action: Change,
) -> Result<Response<Body>> {
    let req = NewVersion {
        source,
        rotation_period_days: period,
        origin: Initiator::Admin,
        versions_per_day: app.config.load().limits.versions_per_day,
        customer_supplied_versions: app.config.load().limits.customer_supplied_versions,
        existing_only: matches!(action, Change::Rotate),
        expect_active: None,
        actor: Actor::of(&peer.caller()),
        action: action.name(),
    };
    let made = app.keyring.add_version(id, req).await?;
    tracing::info!(
        uid = peer.uid, pid = peer.pid, action = action.name(), env = %id.env, country = %id.country,
        version = made.version, "new key version"
    );
    Ok(response::json(StatusCode::CREATED, &version_added(made)))
}

async fn settings(
    app: &App,
    peer: &Peer,
    id: KeyId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body: PeriodRequest = read_json(app, req).await?.unwrap_or_default();
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

fn version_added(made: AddedVersion) -> VersionAdded {
    VersionAdded {
        environment: made.environment,
        country: made.country,
        version: made.version,
        kind: made.kind,
        created: made.created,
        key_created: made.key_created,
    }
}
