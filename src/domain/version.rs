//! What a version is (its type) and who made it.

use super::error::{Error, Result};

/// On the wire (the `type` of a version) and in the state, by `as_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VersionType {
    #[serde(rename = "incountry-managed")]
    Managed,
    #[serde(rename = "aws")]
    Aws,
}

impl VersionType {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionType::Managed => "incountry-managed",
            VersionType::Aws => "aws",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "incountry-managed" => Ok(VersionType::Managed),
            "aws" => Ok(VersionType::Aws),
            other => Err(Error::integrity(format!(
                "unknown version type `{other}` in state"
            ))),
        }
    }
}

/// Who made a version: an admin request (counts against the daily limit) or the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Admin,
    Timer,
}

impl Initiator {
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Admin => "admin",
            Initiator::Timer => "timer",
        }
    }
    pub fn parse(s: &str) -> Self {
        if s == "timer" {
            Initiator::Timer
        } else {
            Initiator::Admin
        }
    }
}
