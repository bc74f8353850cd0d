//! Time as the daemon sees it. Everything time-driven (daily limits, rotation, TOTP) asks a
//! `Clock`, so tests can move time instead of waiting for it.

use std::sync::Arc;
use time::OffsetDateTime;

#[cfg(any(test, feature = "test-clock"))]
mod manual;
#[cfg(any(test, feature = "test-clock"))]
pub use manual::ManualClock;

pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;

    /// Move the clock forward (test clock only). Returns false where time cannot be moved.
    fn advance(&self, _seconds: i64) -> bool {
        false
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Wall clock plus an offset that tests set at start (`INCOUNTRY_KEYD_TEST_CLOCK_OFFSET`,
/// seconds) and move with `POST /v1/test/clock`. Compiled only with the `test-clock` feature.
#[cfg(feature = "test-clock")]
pub struct TestClock {
    offset: std::sync::atomic::AtomicI64,
}

#[cfg(feature = "test-clock")]
impl TestClock {
    pub fn from_env() -> Self {
        let offset = std::env::var("INCOUNTRY_KEYD_TEST_CLOCK_OFFSET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        TestClock {
            offset: std::sync::atomic::AtomicI64::new(offset),
        }
    }
}

#[cfg(feature = "test-clock")]
impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        let offset = self.offset.load(std::sync::atomic::Ordering::SeqCst);
        OffsetDateTime::now_utc() + time::Duration::seconds(offset)
    }

    fn advance(&self, seconds: i64) -> bool {
        self.offset
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst);
        true
    }
}

/// The clock the daemon runs on: the test clock where compiled in, else the wall clock.
pub fn default_clock() -> SharedClock {
    #[cfg(feature = "test-clock")]
    {
        Arc::new(TestClock::from_env())
    }
    #[cfg(not(feature = "test-clock"))]
    {
        Arc::new(SystemClock)
    }
}

/// RFC 3339 in UTC with whole seconds, as the API and the portal show times.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Seconds from `now` until the next UTC midnight (when daily limits reset).
pub fn seconds_to_utc_midnight(now: OffsetDateTime) -> u64 {
    let day = now.unix_timestamp().div_euclid(86_400);
    ((day + 1) * 86_400 - now.unix_timestamp()).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_midnight() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        let t = OffsetDateTime::from_unix_timestamp(86_400 * 3 + 3600).unwrap();
        assert_eq!(seconds_to_utc_midnight(t), 23 * 3600);
    }
}
