//! `POST /v1/test/clock` (builds with the `test-clock` feature only): admins move the
//! daemon's clock forward, waking whatever waits on time.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::extract::read_json;
use super::peer::Peer;
use super::response::{self, Body};
use super::App;
use crate::domain::clock::rfc3339;
use crate::domain::error::{Error, Result};
use crate::domain::Code;
use crate::proto::{ClockAnswer, ClockRequest};

pub(super) async fn advance(
    app: &App,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    peer.require_admin()?;
    let body: ClockRequest = read_json(app, req)
        .await?
        .ok_or_else(|| Error::bad_input(Code::MissingBody, "advance_seconds is required"))?;
    app.keyring.advance_clock(body.advance_seconds);
    app.on_clock_change();
    let now = app.keyring.now();
    Ok(response::json(
        StatusCode::OK,
        &ClockAnswer {
            now: rfc3339(now),
            unix: now,
        },
    ))
}
