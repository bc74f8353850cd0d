//! Admin changes from the command line: verification codes (flag, or a prompt on a terminal),
//! TOTP enrollment, and the offline TOTP reset.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::{ok, Code};
use crate::client::{Client, Reply};
use crate::config::Config;

pub(super) async fn admin(
    client: &Client,
    method: Method,
    path: &str,
    mut body: Value,
    code: Code,
) -> anyhow::Result<Reply> {
    if let Some(obj) = body.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
    let body = body.to_string().into_bytes();
    let mut code = code.code;
    loop {
        let headers = code_header(code.as_deref());
        let reply = client
            .request(method.clone(), path, &headers, Some(body.clone()))
            .await?;
        if code.is_none() && wants_code(&reply) && std::io::stdin().is_terminal() {
            code = Some(prompt("Verification code: ")?);
            continue;
        }
        return ok(reply);
    }
}

/// The verification-code header, when there is a code.
fn code_header(code: Option<&str>) -> Vec<(&'static str, &str)> {
    code.map(|c| vec![(crate::api::VERIFICATION_HEADER, c)])
        .unwrap_or_default()
}

fn wants_code(reply: &Reply) -> bool {
    reply.status == StatusCode::UNAUTHORIZED
        && reply
            .json()
            .is_ok_and(|d| d["error"]["code"] == "verification_required")
}

fn prompt(text: &str) -> anyhow::Result<String> {
    eprint!("{text}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

pub(super) async fn totp_enroll(client: &Client, code: Code) -> anyhow::Result<ExitCode> {
    let headers = code_header(code.code.as_deref());
    let reply = ok(client
        .request(
            Method::POST,
            "/v1/admin/totp/enroll",
            &headers,
            Some(b"{}".to_vec()),
        )
        .await?)?;
    let doc = reply.json()?;
    let uri = doc["otpauth_uri"].as_str().unwrap_or_default();
    if std::io::stdout().is_terminal() {
        if let Ok(qr) = qrcode::QrCode::new(uri.as_bytes()) {
            println!(
                "{}",
                qr.render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build()
            );
        }
    }
    println!("otpauth URI: {uri}");
    println!("Add it to your authenticator app, then type the code it shows.");
    let code = prompt("Code: ")?;
    let body = json!({ "code": code }).to_string().into_bytes();
    ok(client
        .request(Method::POST, "/v1/admin/totp/confirm", &[], Some(body))
        .await?)?;
    println!("Enrolled: admin changes by this uid now need a code from this secret.");
    Ok(ExitCode::SUCCESS)
}

pub(super) fn totp_reset(
    uid: u32,
    state_dir: Option<PathBuf>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("totp-reset must run as root");
    }
    let dir = match state_dir {
        Some(d) => d,
        None => Config::load(config_path)?.state.dir,
    };
    // Takes the state lock: refuses while the daemon runs.
    let store = crate::store::Store::open(&dir)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let actor = crate::audit::Actor::Peer {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        pid: Some(std::process::id() as i32),
    };
    let entry = crate::audit::AuditEntry::new(now, &actor, "totp-reset", None).outcome(
        "ok",
        format!("offline reset of uid {uid}'s verification secret"),
    );
    if store.totp_delete(uid, &entry)? {
        println!("uid {uid}: verification secret removed; it can enroll again without a code");
    } else {
        println!("uid {uid} had no verification secret (the attempt is audited)");
    }
    Ok(ExitCode::SUCCESS)
}
