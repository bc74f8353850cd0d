//! `state migrate --to-postgres`: moves a host's SQLite state into the empty PostgreSQL
//! database `[postgres]` names, offline (as root, the daemon stopped: the SQLite state's
//! lock is held throughout), through the `Store` trait (`export`, `import`): keys,
//! versions (wrapped bytes unchanged), settings, encryption counts, aws fields, seals and
//! refusals, TOTP secrets, attempts and used steps, and the audit chain as it is (hashes
//! and MACs; entries from before MACs existed get their MAC from the HSM, which the chain
//! behind the anchor vouches for). Idempotent: a target that is already an identical
//! copy is left as it is, and said so; any other non-empty target is refused.
//!
//! Checked before: the SQLite state against the HSM anchor and the whole chain (`audit
//! verify`). Checked after: the copy is the source (a fingerprint of every stored field,
//! every audit record), `audit verify` on PostgreSQL passes, and as many versions unwrap in
//! the HSM from the copy as from the source.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::Serialize;

use super::admin::act_as_state_owner;
use crate::config::{Config, StateBackend};
use crate::domain::audit::{Actor, AuditEntry, AuditOutcome, AuditRecord};
use crate::domain::VersionType;
use crate::hsm::HsmWorker;
use crate::keyring::anchor::{self, Verdict};
use crate::store::{AuditSeal, PgConnect, PgStore, StateCopy, Store, StoredKey, DB_FILE};

/// What `state migrate` did and found (`--json`).
#[derive(Serialize)]
struct Summary {
    /// `copied`, or `already_copied` (nothing written).
    outcome: &'static str,
    source: PathBuf,
    keys: usize,
    versions: usize,
    aws_versions: usize,
    aws_refusals: usize,
    totp_secrets: usize,
    audit_entries: i64,
    /// Entries from before MACs existed, MACed by the HSM on the way.
    audit_macs_added: usize,
    /// Versions whose wrapped key (or sealed IAM secret) the HSM opens, from the copy.
    versions_unwrapped: usize,
    /// SHA-256 over every stored field of both states (they are the same).
    state_sha256: String,
    /// `audit verify` on PostgreSQL.
    audit_verify: String,
}

pub(super) fn migrate(
    state_dir: Option<PathBuf>,
    config_path: &Path,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("state migrate must run as root (it reads the HSM PIN and the PostgreSQL password, then acts as the state directory's owner)");
    }
    let dir = state_dir.unwrap_or_else(|| config.state.dir.clone());
    if !dir.join(DB_FILE).exists() {
        bail!("no SQLite state at {}", dir.join(DB_FILE).display());
    }
    // Secrets as root, before acting as the state's owner.
    let pin = crate::hsm::read_pin(&config.hsm.pin_path()?)?;
    let connect = PgConnect::from_config(&config).context("the target, [postgres]")?;
    act_as_state_owner(&dir)?;
    // Takes the state lock: refused while the daemon runs.
    let source = crate::store::open(&dir)?;
    let (hsm, thread) = crate::hsm::open_with(&config, pin)?;
    let summary = copy(&dir, source, connect, &hsm);
    drop(hsm);
    thread.wait(std::time::Duration::from_secs(10));
    let summary = summary?;
    if as_json {
        super::print_json(&summary)?;
    } else {
        print(&summary);
    }
    if config.state.backend == StateBackend::Sqlite {
        eprintln!(
            "next: set [state] backend = \"postgres\" in {} and start the daemon",
            config_path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn copy(
    dir: &Path,
    source: Arc<dyn Store>,
    connect: PgConnect,
    hsm: &HsmWorker,
) -> anyhow::Result<Summary> {
    // The source as the daemon would open it (its anchor checked, its seal installed),
    // then the whole chain with every MAC.
    let seal = anchor::open(source.as_ref(), hsm)?;
    if let Verdict::Broken(line) = anchor::verify(source.as_ref(), hsm)? {
        bail!("the SQLite state fails `audit verify`: {line}; nothing was copied");
    }
    let target: Arc<dyn Store> = Arc::new(PgStore::open(connect)?);
    let held = target.export()?;
    let outcome = if held.is_empty() && target.head()?.seq == 0 {
        let actor = Actor::Peer {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: Some(std::process::id() as i32),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // The move itself is in the log it moves.
        source.audit(
            &AuditEntry::new(now, &actor, "state-migrate", None).outcome(
                AuditOutcome::Ok,
                "the state copied into PostgreSQL ([postgres] of the config)",
            ),
        )?;
        let copy = source.export()?;
        let mut read = with_macs(source.as_ref(), seal.as_ref());
        target
            .import(&copy, &mut read)
            .context("copying into PostgreSQL (nothing of it was committed)")?;
        "copied"
    } else {
        "already_copied"
    };
    // Also the check that makes a second run a no-op: anything else is refused.
    let copy = source.export()?;
    let copied = target.export()?;
    let (ours, theirs) = (copy.fingerprint(), copied.fingerprint());
    let log = same_log(source.as_ref(), target.as_ref(), seal.as_ref())?;
    if ours != theirs || log.is_err() {
        let why = match log {
            _ if ours != theirs => "keys, versions, counts or TOTP rows differ".to_string(),
            Err(why) => why,
            Ok(_) => String::new(),
        };
        bail!(
            "the PostgreSQL state is not empty and is not a copy of {} ({why}: it holds {} keys, {} versions; this state {} keys, {} versions): nothing was copied; migrate into an empty database",
            dir.display(),
            copied.keys.len(),
            copied.versions(),
            copy.keys.len(),
            copy.versions()
        );
    }
    let audit_verify = match anchor::verify(target.as_ref(), hsm)? {
        Verdict::Intact(line) => line,
        Verdict::Broken(line) => bail!("`audit verify` fails on the copy: {line}"),
    };
    let (from_source, from_copy) = (unwrapped(hsm, &copy.keys)?, unwrapped(hsm, &copied.keys)?);
    if from_copy != from_source {
        bail!("{from_copy} versions unwrap from the copy, {from_source} from the source");
    }
    if from_copy < copy.versions() {
        eprintln!(
            "warning: {} of {} versions do not unwrap in this HSM (as in the source: copied as they are)",
            copy.versions() - from_copy,
            copy.versions()
        );
    }
    Ok(summarize(
        outcome,
        dir,
        &copy,
        source.head()?.seq,
        log.unwrap_or(0),
        from_copy,
        ours,
        audit_verify,
    ))
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    outcome: &'static str,
    dir: &Path,
    copy: &StateCopy,
    audit_entries: i64,
    audit_macs_added: usize,
    versions_unwrapped: usize,
    state_sha256: String,
    audit_verify: String,
) -> Summary {
    let aws = || {
        copy.keys
            .iter()
            .flat_map(|k| k.versions.iter())
            .filter_map(|v| v.aws.as_ref())
    };
    Summary {
        outcome,
        source: dir.join(DB_FILE),
        keys: copy.keys.len(),
        versions: copy.versions(),
        aws_versions: aws().count(),
        aws_refusals: aws().filter(|a| a.refusal.is_some()).count(),
        totp_secrets: copy.totp.len(),
        audit_entries,
        audit_macs_added,
        versions_unwrapped,
        state_sha256,
        audit_verify,
    }
}

fn print(s: &Summary) {
    match s.outcome {
        "copied" => println!(
            "copied {} into PostgreSQL: {} keys, {} versions ({} aws, {} refused), {} TOTP secrets, {} audit entries ({} given their MAC)",
            s.source.display(),
            s.keys,
            s.versions,
            s.aws_versions,
            s.aws_refusals,
            s.totp_secrets,
            s.audit_entries,
            s.audit_macs_added
        ),
        _ => println!(
            "already copied: the PostgreSQL state is an identical copy of {} ({} keys, {} versions, {} audit entries); nothing was written",
            s.source.display(),
            s.keys,
            s.versions,
            s.audit_entries
        ),
    }
    println!(
        "check: the copy is the source (state sha256 {}); {} of {} versions unwrap in the HSM",
        s.state_sha256, s.versions_unwrapped, s.versions
    );
    println!("check: audit verify on PostgreSQL: {}", s.audit_verify);
}

/// The source's audit pages, each entry from before MACs existed given its MAC (an HMAC
/// of its unchanged hash by the HSM: the copy must carry one on every entry).
fn with_macs<'a>(
    source: &'a dyn Store,
    seal: &'a dyn AuditSeal,
) -> impl FnMut(i64, usize) -> crate::domain::error::Result<Vec<AuditRecord>> + 'a {
    move |since, limit| {
        let mut page = source.audit_since(since, limit)?;
        for r in page.iter_mut().filter(|r| r.mac.is_none()) {
            r.mac = Some(seal.mac(&r.hash)?);
        }
        Ok(page)
    }
}

/// Whether the target's audit log is the source's, record by record (MACs added as the
/// copy adds them): `Ok(entries given a MAC)`, or what differs.
fn same_log(
    source: &dyn Store,
    target: &dyn Store,
    seal: &dyn AuditSeal,
) -> anyhow::Result<Result<usize, String>> {
    const PAGE: usize = 1000;
    let (mut since, mut added) = (0, 0);
    loop {
        let mut ours = source.audit_since(since, PAGE)?;
        for r in ours.iter_mut().filter(|r| r.mac.is_none()) {
            r.mac = Some(seal.mac(&r.hash)?);
            added += 1;
        }
        let theirs = target.audit_since(since, PAGE)?;
        if ours.len() != theirs.len() {
            return Ok(Err("the audit logs differ in length".into()));
        }
        for (a, b) in ours.iter().zip(&theirs) {
            if serde_json::to_value(a)? != serde_json::to_value(b)? {
                return Ok(Err(format!("audit entry {} differs", a.seq)));
            }
        }
        match ours.last() {
            Some(last) => since = last.seq,
            None => return Ok(Ok(added)),
        }
    }
}

/// How many versions the HSM opens: managed data keys and aws versions' sealed IAM
/// secrets, each under its key's root key and its own AAD (the bytes are dropped at once).
fn unwrapped(hsm: &HsmWorker, keys: &[StoredKey]) -> anyhow::Result<usize> {
    let mut n = 0;
    for key in keys {
        let label = key.id.root_label();
        let jobs: Vec<_> = key
            .versions
            .iter()
            .map(|v| {
                let aad = match v.kind {
                    VersionType::Managed => key.id.wrap_aad(v.version),
                    VersionType::Aws => key.id.aws_secret_aad(v.version),
                };
                (v.iv, aad, v.wrapped.clone())
            })
            .collect();
        n += hsm.call_blocking(move |h| {
            if h.ensure_root_key(&label, false).is_err() {
                return Ok(0);
            }
            Ok(jobs
                .iter()
                .filter(|(iv, aad, wrapped)| h.open(&label, iv, aad, wrapped).is_ok())
                .count())
        })?;
    }
    Ok(n)
}
