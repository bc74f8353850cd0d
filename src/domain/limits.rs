//! Rules a key and its versions must follow: rotation periods and the limits on new versions.

use crate::domain::Code;
use time::OffsetDateTime;

use super::clock::{rfc3339, seconds_to_utc_midnight};
use super::error::{Error, Result};
use super::snapshot::KeyState;
use super::version::Initiator;

pub const ROTATION_PERIODS_DAYS: [u32; 4] = [30, 60, 180, 360];

/// Checks a rotation period against the allowed values.
pub fn check_period(days: u32) -> Result<u32> {
    if ROTATION_PERIODS_DAYS.contains(&days) {
        Ok(days)
    } else {
        Err(Error::bad_input(
            Code::InvalidRotationPeriod,
            format!("rotation_period_days must be one of 30, 60, 180 or 360 (got {days})"),
        ))
    }
}

/// The limits a new version must pass on an existing key.
pub struct VersionLimits {
    pub aws: bool,
    pub origin: Initiator,
    pub versions_per_day: u32,
    pub customer_supplied_versions: u32,
}

impl VersionLimits {
    pub fn check(&self, key: &KeyState, now: OffsetDateTime) -> Result<()> {
        if let Some(problem) = &key.unavailable_reason {
            return Err(Error::unavailable(Code::RootKeyMissing, problem));
        }
        if self.aws {
            let limit = self.customer_supplied_versions;
            let used = key.customer_supplied_versions();
            if used as u64 >= limit as u64 {
                return Err(Error::conflict(
                    Code::CustomerSuppliedLimit,
                    format!(
                        "{}: the limit of {limit} customer-supplied (aws) versions per key is reached ({used} registered over the key's life); this limit does not reset",
                        key.id
                    ),
                ));
            }
        }
        if self.origin == Initiator::Admin {
            check_daily_limit(key, now, self.versions_per_day)?;
        }
        Ok(())
    }
}

fn check_daily_limit(key: &KeyState, now: OffsetDateTime, per_day: u32) -> Result<()> {
    let day_start = now.unix_timestamp() - now.unix_timestamp().rem_euclid(86_400);
    let today = key
        .versions
        .iter()
        .filter(|v| v.origin == Initiator::Admin && v.created >= day_start)
        .count();
    if today as u64 >= per_day as u64 {
        let retry_after = seconds_to_utc_midnight(now);
        return Err(Error::RateLimited {
            code: Code::DailyLimit,
            message: format!(
                "{}: the limit of {per_day} new version(s) per key per UTC day is reached; it resets at {} (in {retry_after} s)",
                key.id,
                rfc3339(day_start + 86_400)
            ),
            retry_after,
        });
    }
    Ok(())
}
