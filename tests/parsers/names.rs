//! Environment and country names (`KeyId::parse`).

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use incountry_keyd::domain::KeyId;

use crate::strategies::{config, is_bad_input};

/// ISO 3166-1 alpha-2, officially assigned: the oracle, kept apart from the daemon's copy.
const ISO_3166: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

fn iso_codes() -> Vec<&'static str> {
    ISO_3166.split(' ').collect()
}

fn env_valid(env: &str) -> bool {
    (1..=64).contains(&env.len())
        && env
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn country_valid(country: &str) -> bool {
    // Case-insensitive on ASCII letters only: "ß" or a Kelvin sign never make a code.
    country.len() == 2
        && country.bytes().all(|b| b.is_ascii_alphabetic())
        && ISO_3166
            .split(' ')
            .any(|c| c == country.to_ascii_uppercase())
}

/// Environment names: valid ones, near misses (a bad character, 0 or 65 characters,
/// non-ASCII look-alikes) and anything at all.
fn arb_env() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,64}",
        "[A-Za-z0-9_-]{0,70}",
        "[A-Za-z0-9_-]{0,8}[^A-Za-z0-9_-][A-Za-z0-9_-]{0,8}",
        any::<String>(),
    ]
}

/// Country codes: assigned ones in any case, two letters that may not be assigned,
/// anything at all.
fn arb_country() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            prop::sample::select(iso_codes()),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(c, lo0, lo1)| {
                let b = c.as_bytes();
                let f = |ch: u8, lo: bool| {
                    if lo {
                        ch.to_ascii_lowercase() as char
                    } else {
                        ch as char
                    }
                };
                format!("{}{}", f(b[0], lo0), f(b[1], lo1))
            }),
        "[A-Za-z]{2}",
        "[A-Za-z]{0,3}",
        ".{0,3}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Guards `KeyId::parse` against panics on any pair of strings, and states its whole
    /// contract: accepted exactly when the environment is 1-64 of [A-Za-z0-9_-] and the
    /// country an assigned ISO 3166-1 alpha-2 code in any case; then the environment comes
    /// back as written and the country in upper case. Anything else is a BadInput (400)
    /// naming the first bad part (environment first). Fails if a rule is loosened (e.g. a
    /// '.' or '/' let into environments, a length off by one, an unassigned or non-ASCII
    /// country accepted) or tightened (a valid name refused).
    #[test]
    fn key_id_parse_contract(env in arb_env(), country in arb_country()) {
        let parsed = KeyId::parse(&env, &country);
        match (env_valid(&env), country_valid(&country)) {
            (true, true) => {
                let id = parsed.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
                prop_assert_eq!(&id.env, &env);
                prop_assert_eq!(&id.country, &country.to_ascii_uppercase());
                // Round trip: what it prints parses back to itself.
                prop_assert_eq!(id.to_string(), format!("{}/{}", env, id.country));
                prop_assert_eq!(KeyId::parse(&id.env, &id.country).unwrap(), id);
            }
            (false, _) => {
                let e = parsed.expect_err("invalid environment accepted");
                prop_assert!(is_bad_input(&e, "invalid_environment"), "{:?}", e.code());
            }
            (true, false) => {
                let e = parsed.expect_err("invalid country accepted");
                prop_assert!(is_bad_input(&e, "invalid_country"), "{:?}", e.code());
            }
        }
    }
}
