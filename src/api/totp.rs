//! TOTP enrollment of the calling admin: `begin` makes a pending secret, `confirm` activates
//! it with a code from it. Refusals are audited.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::extract::{read_json, verification_code, voucher_header, voucher_uid};
use super::peer::Peer;
use super::response::{self, Body};
use super::App;
use crate::domain::audit::{Actor, AuditOutcome};
use crate::domain::error::{Error, Result};
use crate::domain::{Code, VerificationMode};
use crate::proto::{ConfirmRequest, Enrolled, Enrollment};

/// `POST /v1/admin/totp/enroll`: a pending secret, shown once (a replacement needs a code
/// from the current secret; a first enrollment, one vouched for by another admin).
pub(super) async fn begin(
    app: &App,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    audited(app, peer, async {
        peer.require_admin()?;
        let voucher = voucher(app, &req).await?;
        let enrollment = app
            .verifier
            .enroll_begin(&peer.caller(), verification_code(&req), voucher)
            .await?;
        // Moved, not copied: the strings zeroize themselves, the body zeroizes its buffer.
        let doc = Enrollment {
            otpauth_uri: enrollment.otpauth_uri,
            secret_base32: enrollment.secret_base32,
            expires_in_seconds: enrollment.expires_in_seconds,
        };
        Ok(response::secret_json(StatusCode::OK, &doc))
    })
    .await
}

/// `POST /v1/admin/totp/confirm`: activates the pending secret with a code from it.
pub(super) async fn confirm(
    app: &App,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    audited(app, peer, async {
        peer.require_admin()?;
        let body: ConfirmRequest = read_json(app, req).await?.ok_or_else(|| {
            Error::bad_input(Code::MissingBody, "{\"code\": \"123456\"} is required")
        })?;
        app.verifier
            .enroll_confirm(&peer.caller(), &body.code)
            .await?;
        Ok(response::json(
            StatusCode::OK,
            &Enrolled {
                enrolled: true,
                uid: peer.uid,
            },
        ))
    })
    .await
}

/// Audits a refused enrollment: a peer without the role in the refusal summaries, an
/// admin's refusal one by one.
async fn audited(
    app: &App,
    peer: &Peer,
    work: impl std::future::Future<Output = Result<Response<Body>>>,
) -> Result<Response<Body>> {
    let result = work.await;
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
    let Some(value) = voucher_header(req) else {
        return Ok(None);
    };
    if app.verifier.mode() == VerificationMode::Off {
        return Ok(None);
    }
    let uid = voucher_uid(value)?;
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
