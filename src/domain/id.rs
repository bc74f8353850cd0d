//! Key identity: (environment, country), validated as the API contract says.

use crate::domain::Code;
use std::fmt;

use crate::domain::error::{Error, Result};

/// ISO 3166-1 alpha-2, officially assigned codes.
const ISO_3166_ALPHA2: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    pub env: String,
    /// Upper case.
    pub country: String,
}

impl KeyId {
    pub fn parse(env: &str, country: &str) -> Result<KeyId> {
        let env_ok = (1..=64).contains(&env.len())
            && env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !env_ok {
            return Err(Error::bad_input(
                Code::InvalidEnvironment,
                "environment must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'",
            ));
        }
        let country = country.to_ascii_uppercase();
        let known = country.len() == 2
            && country.is_ascii()
            && ISO_3166_ALPHA2.split(' ').any(|c| c == country);
        if !known {
            return Err(Error::bad_input(
                Code::InvalidCountry,
                "country must be an ISO 3166-1 alpha-2 code such as DE or us",
            ));
        }
        Ok(KeyId {
            env: env.to_string(),
            country,
        })
    }

    /// Label of this key's root key in the HSM.
    pub fn root_label(&self) -> String {
        format!("keyd-root/{}/{}", self.env, self.country)
    }

    /// Additional data binding a wrapped data key to its slot: a blob moved to another
    /// environment, country or version fails its tag check.
    pub fn wrap_aad(&self, version: u32) -> Vec<u8> {
        format!(
            "incountry-keyd/v1\0{}\0{}\0{}",
            self.env, self.country, version
        )
        .into_bytes()
    }

    /// Additional data binding a sealed IAM secret key (of an aws version) to its slot; it
    /// differs from every data-key AAD, so neither blob can stand in for the other.
    pub fn aws_secret_aad(&self, version: u32) -> Vec<u8> {
        format!(
            "incountry-keyd/v1/aws-iam-secret\0{}\0{}\0{}",
            self.env, self.country, version
        )
        .into_bytes()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.env, self.country)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert_eq!(KeyId::parse("prod-1", "de").unwrap().country, "DE");
        assert!(KeyId::parse("", "DE").is_err());
        assert!(KeyId::parse("a/b", "DE").is_err());
        assert!(KeyId::parse(&"x".repeat(65), "DE").is_err());
        assert!(KeyId::parse("prod", "XX").is_err());
        assert!(KeyId::parse("prod", "D").is_err());
        assert_eq!(ISO_3166_ALPHA2.split(' ').count(), 249);
    }

    #[test]
    fn aad_differs_by_slot() {
        let a = KeyId::parse("p", "DE").unwrap();
        let b = KeyId::parse("p", "FR").unwrap();
        assert_ne!(a.wrap_aad(1), b.wrap_aad(1));
        assert_ne!(a.wrap_aad(1), a.wrap_aad(2));
        assert_ne!(a.wrap_aad(1), a.aws_secret_aad(1));
        assert_ne!(a.aws_secret_aad(1), b.aws_secret_aad(1));
    }
}
