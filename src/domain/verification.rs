//! Whether admin changes need a verification code: read from the config, shown by health.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerificationMode {
    Totp,
    Off,
}

impl VerificationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationMode::Totp => "totp",
            VerificationMode::Off => "off",
        }
    }
}
