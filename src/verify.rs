//! The admin-authorization hook: every change to a key passes `Verifier::check` after the
//! admin role is confirmed.

use crate::api::Peer;
use crate::config::VerificationMode;
use crate::error::Result;

pub enum Verifier {
    /// Development only: no code is asked for (warned at start, shown in health).
    Off,
}

impl Verifier {
    pub fn new(mode: VerificationMode) -> anyhow::Result<Verifier> {
        match mode {
            VerificationMode::Off => Ok(Verifier::Off),
            VerificationMode::Totp => anyhow::bail!(
                "verification.mode = \"totp\" is not available in this build yet; set \"off\" for development"
            ),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Verifier::Off => "off",
        }
    }

    pub async fn check(&self, _peer: &Peer, _code: Option<&str>, _action: &str) -> Result<()> {
        match self {
            Verifier::Off => Ok(()),
        }
    }
}
