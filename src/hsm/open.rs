//! Opening the configured HSM: the PIN file (refused if others can read it) and the worker.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{Hsm, HsmThread, HsmWorker, Pkcs11Hsm};
use crate::config::Config;

/// Reads the HSM user PIN from its file; refuses a file others can read.
pub fn read_pin(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read HSM PIN file {}", path.display()))?;
    crate::config::check_not_writable_by_others(path, "HSM PIN file")?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        bail!(
            "HSM PIN file {} is accessible to others (mode {mode:04o}); chmod 0600 it",
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read HSM PIN file {}", path.display()))?,
    );
    let pin = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if pin.is_empty() {
        bail!("HSM PIN file {} is empty", path.display());
    }
    Ok(pin)
}

/// Opens the HSM on its worker thread.
pub fn open(config: &Config) -> anyhow::Result<(HsmWorker, HsmThread)> {
    open_with(config, read_pin(&config.hsm.pin_path()?)?)
}

/// Opens the HSM with a PIN read earlier (offline tools read it as root, then drop to the
/// state directory's owner).
pub fn open_with(
    config: &Config,
    pin: Zeroizing<String>,
) -> anyhow::Result<(HsmWorker, HsmThread)> {
    let module = config.hsm.module.clone();
    let label = config.hsm.token_label.clone();
    let worker = HsmWorker::start(move || {
        let pin = AuthPin::from(pin.as_str());
        Pkcs11Hsm::open(&module, &label, pin).map(|h| Box::new(h) as Box<dyn Hsm>)
    })?;
    Ok(worker)
}
