//! Admin changes from the command line: verification codes (flag, or a prompt on a terminal),
//! TOTP enrollment, and the offline TOTP reset.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use hyper::{Method, StatusCode};
use serde::Serialize;

use super::{ok, Code};
use crate::cli::client::{Client, Reply};
use crate::config::Config;
use crate::proto::{ConfirmRequest, Enrollment, VERIFICATION_HEADER, VOUCHER_HEADER};

/// Sends an admin change, asking for a verification code on a terminal when the daemon
/// wants one and none was given.
pub(super) async fn admin(
    client: &Client,
    method: Method,
    path: &str,
    body: &impl Serialize,
    code: Code,
) -> anyhow::Result<Reply> {
    let body = serde_json::to_vec(body)?;
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
    code.map(|c| vec![(VERIFICATION_HEADER, c)])
        .unwrap_or_default()
}

fn wants_code(reply: &Reply) -> bool {
    reply.status == StatusCode::UNAUTHORIZED
        && reply
            .error()
            .is_some_and(|d| d.error.code == crate::domain::Code::VerificationRequired)
}

fn prompt(text: &str) -> anyhow::Result<String> {
    eprint!("{text}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

pub(super) async fn totp_enroll(
    client: &Client,
    code: Code,
    code_uid: Option<u32>,
) -> anyhow::Result<ExitCode> {
    let mut code = code.code;
    if code_uid.is_some() && code.is_none() {
        if !std::io::stdin().is_terminal() {
            bail!("--code-uid needs --code (a code of that admin's authenticator)");
        }
        code = Some(prompt("Verification code of the vouching admin: ")?);
    }
    let code_uid = code_uid.map(|u| u.to_string());
    let mut headers = code_header(code.as_deref());
    if let Some(uid) = &code_uid {
        headers.push((VOUCHER_HEADER, uid));
    }
    let reply = ok(client
        .request(
            Method::POST,
            "/v1/admin/totp/enroll",
            &headers,
            Some(b"{}".to_vec()),
        )
        .await?)?;
    let enrollment: Enrollment = reply.read()?;
    show_enrollment(&enrollment.otpauth_uri);
    drop(enrollment);
    let code = prompt("Code: ")?;
    let body = serde_json::to_vec(&ConfirmRequest { code })?;
    ok(client
        .request(Method::POST, "/v1/admin/totp/confirm", &[], Some(body))
        .await?)?;
    println!("Enrolled: admin changes by this uid now need a code from this secret.");
    Ok(ExitCode::SUCCESS)
}

/// Prints the otpauth URI (and its QR code on a terminal) and what to do with it.
fn show_enrollment(uri: &str) {
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
}

/// The offline bootstrap of a uid's first TOTP secret, as root with the daemon stopped:
/// takes the state lock, opens the HSM as the daemon does, makes and shows the secret, and
/// stores it sealed by the HSM system key once a code from it is typed back (audited).
pub(super) fn totp_bootstrap(
    uid: u32,
    state_dir: Option<PathBuf>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    // Takes the state lock (refuses while the daemon runs) and checks the HSM anchor: its
    // audit entry is MACed and anchored, as the daemon's are.
    let Offline {
        store,
        hsm,
        thread: hsm_thread,
        actor,
    } = Offline::open(&config, state_dir, "totp-enroll --uid")?;
    if config.verification.mode == crate::config::VerificationMode::Off {
        eprintln!(
            "note: verification.mode is \"off\": the daemon asks for no codes until it is \"totp\""
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let verifier = crate::verify::Verifier::new(
            crate::config::VerificationMode::Totp,
            store,
            hsm,
            crate::domain::clock::default_clock(),
        );
        let enrollment = verifier.offline_enroll_begin(uid).await?;
        show_enrollment(&enrollment.otpauth_uri);
        drop(enrollment);
        const TRIES: u32 = 3;
        for attempt in 1..=TRIES {
            let code = prompt("Code: ")?;
            if code.is_empty() {
                bail!("no code typed: nothing enrolled");
            }
            match verifier.offline_enroll_confirm(uid, &code, &actor).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.code() == crate::domain::Code::VerificationFailed && attempt < TRIES =>
                {
                    eprintln!("That code does not match the new secret; type the current one.");
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last try returns")
    });
    // Every HSM handle is gone with the runtime's task: let the worker log out and finalize
    // the module before the process exits.
    drop(runtime);
    hsm_thread.wait(std::time::Duration::from_secs(10));
    result?;
    println!("uid {uid} enrolled: its admin changes now need a code from this secret.");
    Ok(ExitCode::SUCCESS)
}

pub(super) fn totp_reset(
    uid: u32,
    state_dir: Option<PathBuf>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let Offline {
        store,
        hsm,
        thread,
        actor,
    } = Offline::open(&config, state_dir, "totp-reset")?;
    let result = totp_delete(store.as_ref(), &actor, uid);
    drop(store);
    drop(hsm);
    thread.wait(std::time::Duration::from_secs(10));
    result
}

/// What an offline admin tool works with: the state (its lock held) and the HSM, opened
/// as the state directory's owner, and the root process it acts for (the audit actor).
struct Offline {
    store: std::sync::Arc<dyn crate::store::Store>,
    hsm: crate::hsm::HsmWorker,
    thread: crate::hsm::HsmThread,
    actor: crate::domain::audit::Actor,
}

impl Offline {
    /// Runs as root, reads the PIN, then becomes the state directory's owner (the daemon's
    /// user under the unit): the files it writes in the state and the token stay the
    /// daemon's, and the state is checked as the daemon checks it.
    fn open(config: &Config, state_dir: Option<PathBuf>, what: &str) -> anyhow::Result<Offline> {
        if !nix::unistd::geteuid().is_root() {
            bail!("{what} must run as root");
        }
        let dir = state_dir
            .clone()
            .unwrap_or_else(|| config.state.dir.clone());
        let actor = crate::domain::audit::Actor::Peer {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: Some(std::process::id() as i32),
        };
        let pin = crate::hsm::read_pin(&config.hsm.pin_path()?)?;
        // The PostgreSQL password too is read as root.
        let opener = crate::store::Opener::new(config, state_dir)?;
        act_as_state_owner(&dir)?;
        let store = opener.open()?;
        let (hsm, thread) = crate::hsm::open_with(config, pin)?;
        crate::keyring::anchor::open(store.as_ref(), &hsm)?;
        Ok(Offline {
            store,
            hsm,
            thread,
            actor,
        })
    }
}

/// From root to the state directory's owner (the daemon's user under the unit), so that
/// what an offline tool writes there and in the token stays the daemon's, and the state is
/// checked as the daemon checks it; then hardened (secrets pass through the process). A
/// state directory not made yet (no daemon has run) is made by `store::open` as root.
pub(super) fn act_as_state_owner(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = match std::fs::metadata(dir) {
        Ok(meta) => Some((meta.uid(), meta.gid())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("cannot read state directory {}: {e}", dir.display()),
    };
    if let Some((uid, gid)) = owner.filter(|(uid, _)| *uid != 0) {
        use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
        setgroups(&[])?;
        setgid(Gid::from_raw(gid))?;
        setuid(Uid::from_raw(uid))?;
    }
    // Secrets pass through this process: no core dumps, no ptrace by others.
    crate::domain::secret::harden_process();
    Ok(())
}

fn totp_delete(
    store: &dyn crate::store::Store,
    actor: &crate::domain::audit::Actor,
    uid: u32,
) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let entry = crate::domain::audit::AuditEntry::new(now, actor, "totp-reset", None).outcome(
        crate::domain::audit::AuditOutcome::Ok,
        format!("offline reset of uid {uid}'s verification secret"),
    );
    if store.totp_delete(uid, &entry)? {
        println!("uid {uid}: verification secret removed; it can enroll again without a code");
    } else {
        println!("uid {uid} had no verification secret (the attempt is audited)");
    }
    Ok(ExitCode::SUCCESS)
}
