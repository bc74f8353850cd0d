//! `audit verify`: the audit log and the state against the HSM anchor, read-only (with a
//! shared PostgreSQL state: the chain and every MAC, no anchor).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::keyring::anchor::Verdict;

/// With the HSM (a config, given or the default one): the chain, every MAC and the anchor.
/// With `--state-dir` alone: the chain only, and it says so.
pub(super) fn verify(
    state_dir: Option<PathBuf>,
    config_path: &Path,
    config_given: bool,
) -> anyhow::Result<ExitCode> {
    if let (Some(dir), false) = (&state_dir, config_given) {
        let store = crate::store::open_read_only(dir)?;
        let mut read = |since, limit| store.audit_since(since, limit);
        return Ok(
            match crate::domain::audit::walk(
                &mut read,
                crate::domain::audit::Start::genesis(),
                None,
            )? {
                Ok(w) => {
                    println!(
                        "OK: {} audit entries, chain intact (MACs and the HSM anchor not checked: give --config to check them)",
                        w.entries
                    );
                    ExitCode::SUCCESS
                }
                Err((seq, why)) => {
                    println!("BROKEN at sequence {seq}: {why}");
                    ExitCode::FAILURE
                }
            },
        );
    }
    let config = Config::load(config_path)?;
    let store = crate::store::Opener::new(&config, state_dir)?.open_read_only()?;
    let (hsm, hsm_thread) = crate::hsm::open(&config)?;
    let verdict = crate::keyring::anchor::verify(store.as_ref(), &hsm);
    // Let the worker log out and finalize the module before the process exits.
    drop(hsm);
    hsm_thread.wait(std::time::Duration::from_secs(10));
    Ok(match verdict? {
        Verdict::Intact(line) => {
            println!("OK: {line}");
            ExitCode::SUCCESS
        }
        Verdict::Broken(line) => {
            println!("{line}");
            ExitCode::FAILURE
        }
    })
}
