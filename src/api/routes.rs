//! Routing: method and path become a typed `Route`, which is dispatched to its handler.
//! Handlers live in a module per resource and know nothing of this one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};

use super::changes::Change;
use super::peer::Peer;
use super::response::{self, Body};
use super::{audit, changes, extract, health, keys, records, totp, App};
use crate::domain::error::{Error, Result};
use crate::domain::{Code, KeyId};
use crate::keyring::Op;

/// A path the daemon serves, before its method is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource<'a> {
    Health,
    Metrics,
    Keys,
    Key(&'a str, &'a str),
    Secrets(&'a str, &'a str),
    Rotate(&'a str, &'a str),
    Records(&'a str, &'a str, Op),
    Audit,
    TotpEnroll,
    TotpConfirm,
    #[cfg(feature = "test-clock")]
    TestClock,
}

/// What a request asks for: a resource and a method it allows. Names and numbers in the
/// path are checked by the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Health,
    Metrics,
    ListKeys,
    ShowKey(&'a str, &'a str),
    CreateKey(&'a str, &'a str),
    ChangeSettings(&'a str, &'a str),
    Rotate(&'a str, &'a str),
    Secrets(&'a str, &'a str),
    Records(&'a str, &'a str, Op),
    ReadAudit,
    TotpEnroll,
    TotpConfirm,
    #[cfg(feature = "test-clock")]
    AdvanceClock,
}

impl<'a> Resource<'a> {
    fn parse(path: &'a str) -> Option<Resource<'a>> {
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        Some(match parts.as_slice() {
            ["", "v1", "health"] => Resource::Health,
            ["", "metrics"] => Resource::Metrics,
            ["", "v1", "keys"] => Resource::Keys,
            ["", "v1", "keys", env, country] => Resource::Key(env, country),
            ["", "v1", "keys", env, country, "secrets"] => Resource::Secrets(env, country),
            ["", "v1", "keys", env, country, "rotate"] => Resource::Rotate(env, country),
            ["", "v1", "keys", env, country, "encrypt"] => {
                Resource::Records(env, country, Op::Encrypt)
            }
            ["", "v1", "keys", env, country, "decrypt"] => {
                Resource::Records(env, country, Op::Decrypt)
            }
            ["", "v1", "keys", env, country, "rewrap"] => {
                Resource::Records(env, country, Op::Rewrap)
            }
            ["", "v1", "audit"] => Resource::Audit,
            ["", "v1", "admin", "totp", "enroll"] => Resource::TotpEnroll,
            ["", "v1", "admin", "totp", "confirm"] => Resource::TotpConfirm,
            #[cfg(feature = "test-clock")]
            ["", "v1", "test", "clock"] => Resource::TestClock,
            _ => return None,
        })
    }

    /// Name for metrics labels (never the raw path: bounded cardinality).
    fn name(&self) -> &'static str {
        match self {
            Resource::Health => "health",
            Resource::Metrics => "metrics",
            Resource::Keys => "keys",
            Resource::Key(..) => "key",
            Resource::Secrets(..) => "secrets",
            Resource::Rotate(..) => "rotate",
            Resource::Records(_, _, op) => op.name(),
            Resource::Audit => "audit",
            Resource::TotpEnroll => "totp_enroll",
            Resource::TotpConfirm => "totp_confirm",
            #[cfg(feature = "test-clock")]
            Resource::TestClock => "test_clock",
        }
    }

    /// The `Allow` header of a 405.
    fn allow(&self) -> &'static str {
        match self {
            Resource::Health
            | Resource::Metrics
            | Resource::Keys
            | Resource::Secrets(..)
            | Resource::Audit => "GET",
            Resource::Key(..) => "GET, POST, PATCH",
            Resource::Rotate(..)
            | Resource::Records(..)
            | Resource::TotpEnroll
            | Resource::TotpConfirm => "POST",
            #[cfg(feature = "test-clock")]
            Resource::TestClock => "POST",
        }
    }

    /// The route of `method` here; `None` for a method it does not allow.
    fn route(self, method: &Method) -> Option<Route<'a>> {
        let get = *method == Method::GET;
        let post = *method == Method::POST;
        Some(match self {
            Resource::Health if get => Route::Health,
            Resource::Metrics if get => Route::Metrics,
            Resource::Keys if get => Route::ListKeys,
            Resource::Key(e, c) if get => Route::ShowKey(e, c),
            Resource::Key(e, c) if post => Route::CreateKey(e, c),
            Resource::Key(e, c) if *method == Method::PATCH => Route::ChangeSettings(e, c),
            Resource::Secrets(e, c) if get => Route::Secrets(e, c),
            Resource::Rotate(e, c) if post => Route::Rotate(e, c),
            Resource::Records(e, c, op) if post => Route::Records(e, c, op),
            Resource::Audit if get => Route::ReadAudit,
            Resource::TotpEnroll if post => Route::TotpEnroll,
            Resource::TotpConfirm if post => Route::TotpConfirm,
            #[cfg(feature = "test-clock")]
            Resource::TestClock if post => Route::AdvanceClock,
            _ => return None,
        })
    }
}

/// Why a request has no route.
#[derive(Debug, PartialEq, Eq)]
enum Miss {
    /// 404.
    NoSuchPath,
    /// 405, with the `Allow` header.
    MethodNotAllowed(&'static str),
}

/// The route of a request, or why there is none.
fn resolve<'a>(method: &Method, path: &'a str) -> std::result::Result<Route<'a>, Miss> {
    let resource = Resource::parse(path).ok_or(Miss::NoSuchPath)?;
    resource
        .route(method)
        .ok_or(Miss::MethodNotAllowed(resource.allow()))
}

/// Answers one request: routes it, runs its handler, turns an error into its status, and
/// counts and logs it.
pub(super) async fn answer(
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
    let name = Resource::parse(&path).map_or("unknown", |r| r.name());
    let resp = match resolve(&method, &path) {
        Err(Miss::NoSuchPath) => response::error(&Error::not_found(
            Code::NotFound,
            format!("no such path {path}"),
        )),
        Err(Miss::MethodNotAllowed(allow)) => response::method_not_allowed(allow),
        Ok(route) => match dispatch(&app, &peer, route, req).await {
            Ok(resp) => resp,
            Err(e) => {
                if matches!(e, Error::Integrity { .. } | Error::Internal { .. }) {
                    tracing::error!(uid = peer.uid, %method, %path, error = %e, "request failed");
                }
                response::error(&e)
            }
        },
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
    route: Route<'_>,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    // Everything but health needs at least the reader role.
    if route != Route::Health {
        peer.require_reader()?;
    }
    match route {
        Route::Health => Ok(health::health(app, peer.role).await),
        Route::Metrics => Ok(health::metrics(app)),
        Route::ListKeys => Ok(keys::list(app)),
        Route::ShowKey(env, country) => keys::show(app, &KeyId::parse(env, country)?),
        Route::Secrets(env, country) => {
            keys::secrets(app, peer, KeyId::parse(env, country)?, &req).await
        }
        Route::CreateKey(env, country) => {
            detached_change(app, peer, Change::Create, env, country, req).await
        }
        Route::ChangeSettings(env, country) => {
            detached_change(app, peer, Change::Settings, env, country, req).await
        }
        Route::Rotate(env, country) => {
            detached_change(app, peer, Change::Rotate, env, country, req).await
        }
        Route::Records(env, country, op) => {
            let id = KeyId::parse(env, country)?;
            let body = extract::read_json(app, req).await?;
            records::answer(app, id, op, body).await
        }
        Route::ReadAudit => audit::read(app, peer, req.uri().query()).await,
        Route::TotpEnroll => {
            detached(app, peer, move |app, peer| async move {
                totp::begin(&app, &peer, req).await
            })
            .await
        }
        Route::TotpConfirm => {
            detached(app, peer, move |app, peer| async move {
                totp::confirm(&app, &peer, req).await
            })
            .await
        }
        #[cfg(feature = "test-clock")]
        Route::AdvanceClock => super::test_clock::advance(app, peer, req).await,
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

async fn detached_change(
    app: &Arc<App>,
    peer: &Arc<Peer>,
    action: Change,
    env: &str,
    country: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let (env, country) = (env.to_string(), country.to_string());
    detached(app, peer, move |app, peer| async move {
        changes::change(&app, &peer, action, &env, &country, req).await
    })
    .await
}

#[cfg(test)]
mod tests;
