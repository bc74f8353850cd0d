//! The query parameters: `?wait=` of the secrets document and `?since=` of the audit log.

use proptest::prelude::*;

use incountry_keyd::domain::Code;

use crate::daemon::open_daemon;
use crate::record_bodies::record_key;
use crate::strategies::config;

proptest! {
    #![proptest_config(config(128))]

    /// Guards the query parsers, `?wait=` of the secrets document and `?since=` of the
    /// audit log, on arbitrary query text: always an answer; `wait` is refused (400
    /// invalid_wait) unless it is a whole number 1..=300, `since` (400 invalid_since) unless
    /// a number >= 0, both as Rust's integer parse reads them (so a leading '+' passes).
    /// Without If-None-Match, a valid wait answers at once.
    #[test]
    fn query_parameters(
        value in prop_oneof![
            "[0-9]{1,4}",
            prop::sample::select(vec!["", "0", "1", "300", "301", "-1", "+5", "1.5", "18446744073709551616", "9223372036854775808", "1%20", "%31"]).prop_map(str::to_string),
            "[A-Za-z0-9._~!$'()*+,;=:@/?-]{0,8}",
        ],
    ) {
        let d = open_daemon();
        record_key();
        let r = d.request("GET", &format!("/v1/keys/records/DE/secrets?wait={value}"), b"");
        let wait_ok = value.parse::<u64>().is_ok_and(|s| (1..=300).contains(&s));
        if wait_ok {
            prop_assert_eq!(r.status, 200, "wait={}", value);
        } else {
            prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::InvalidWait)), "wait={}", value);
        }
        let r = d.request("GET", &format!("/v1/audit?since={value}"), b"");
        let since_ok = value.parse::<i64>().is_ok_and(|s| s >= 0);
        if since_ok {
            prop_assert_eq!(r.status, 200, "since={}", value);
        } else {
            prop_assert_eq!((r.status, r.error_code()), (400, Some(Code::InvalidSince)), "since={}", value);
        }
    }
}
