//! `GET /v1/audit?since=SEQ`: admins only; up to 1000 entries after SEQ.

use hyper::{Response, StatusCode};

use super::extract::since_param;
use super::peer::Peer;
use super::response::{self, Body};
use super::App;
use crate::domain::audit::AuditRecord;
use crate::domain::error::Result;
use crate::proto::{AuditEntryDocument, AuditPage};

/// Most entries in one answer.
const PAGE: usize = 1000;

pub(super) async fn read(app: &App, peer: &Peer, query: Option<&str>) -> Result<Response<Body>> {
    peer.require_admin()?;
    let since = since_param(query)?;
    let entries = app.keyring.audit_page(since, PAGE).await?;
    let next = entries.last().map_or(since, |e| e.seq);
    let entries = entries.into_iter().map(document).collect();
    Ok(response::json(StatusCode::OK, &AuditPage { entries, next }))
}

fn document(r: AuditRecord) -> AuditEntryDocument {
    let e = r.entry;
    AuditEntryDocument {
        action: e.action,
        actor: e.actor,
        country: e.country,
        detail: e.detail,
        environment: e.environment,
        gid: e.gid,
        hash: r.hash,
        mac: r.mac,
        outcome: e.outcome,
        pid: e.pid,
        prev_hash: r.prev_hash,
        seq: r.seq,
        time: e.time,
        uid: e.uid,
        version: e.version,
    }
}
