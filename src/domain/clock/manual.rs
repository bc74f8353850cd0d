//! A clock that moves only when a test moves it: limits, rotation and TOTP steps are then
//! exact, whatever the machine's load.

// A test double (unit tests, test-clock builds): a broken test setup may panic.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicI64, Ordering};

use time::OffsetDateTime;

use super::Clock;

pub struct ManualClock {
    unix: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `unix` seconds.
    pub fn at(unix: i64) -> ManualClock {
        ManualClock {
            unix: AtomicI64::new(unix),
        }
    }

    pub fn unix(&self) -> i64 {
        self.unix.load(Ordering::SeqCst)
    }

    pub fn set(&self, unix: i64) {
        self.unix.store(unix, Ordering::SeqCst);
    }

    pub fn advance(&self, seconds: i64) {
        self.unix.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.unix()).expect("a test time within range")
    }

    fn advance(&self, seconds: i64) -> bool {
        ManualClock::advance(self, seconds);
        true
    }
}
