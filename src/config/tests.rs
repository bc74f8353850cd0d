//! Unit tests of the configuration: parsing, defaults, access lists and bounds.

use super::*;

#[test]
fn unknown_field_is_named() {
    let err = Config::parse("version = 1\n[server]\nsokcet = \"/x\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("sokcet"), "{err:#}");
}

#[test]
fn defaults_and_access() {
    let cfg = Config::parse("version = 1\n[access]\nreaders=[\"uid:5\",\"gid:7\"]\n").unwrap();
    assert_eq!(cfg.limits.versions_per_day, 1);
    assert_eq!(cfg.server.socket_mode, 0o660);
    let p = cfg.access_policy().unwrap();
    assert!(p.readers.admits(5, &[]));
    assert!(p.readers.admits(9, &[3, 7]));
    assert!(!p.readers.admits(9, &[3]));
    assert!(!p.admins.admits(0, &[0]));
}

#[test]
fn bad_values_refused() {
    assert!(Config::parse("version = 2\n").is_err());
    assert!(Config::parse("version = 1\n[access]\nadmins=[\"bob\"]\n").is_err());
    assert!(Config::parse("version = 1\n[server]\nsocket_mode=\"99\"\n").is_err());
    assert!(Config::parse("version = 1\n[aws]\nmax_stale=\"soon\"\n").is_err());
}

#[test]
fn endpoint_url_http_only_to_loopback() {
    let with =
        |url: &str| Config::parse(&format!("version = 1\n[aws]\nendpoint_url = \"{url}\"\n"));
    for ok in [
        "https://kms.eu-central-1.amazonaws.com",
        "https://10.0.0.5:8443/",
        "http://127.0.0.1:5000",
        "http://127.8.9.10",
        "http://localhost:4566",
        "http://LOCALHOST",
        "http://[::1]:5000",
    ] {
        assert!(with(ok).is_ok(), "{ok}: {:#}", with(ok).unwrap_err());
    }
    for bad in [
        "http://10.0.0.5:5000",
        "http://kms.example.com",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "http://127.0.0.1@kms.example.com",
        "http://[::2]",
        "http://0.0.0.0:5000",
        "ftp://127.0.0.1",
        "kms.example.com",
        "not a url",
    ] {
        let err = with(bad).expect_err(bad);
        assert!(
            format!("{err:#}").contains("aws.endpoint_url"),
            "{bad}: {err:#}"
        );
    }
    let err = with("http://10.0.0.5").unwrap_err();
    assert!(format!("{err:#}").contains("loopback"), "{err:#}");
}

#[test]
fn durations_are_bounded() {
    for field in ["revalidate_interval", "max_stale", "request_timeout"] {
        let err = Config::parse(&format!(
            "version = 1\n[aws]\n{field} = \"1000000000years\"\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("aws.{field}")),
            "{err:#}"
        );
        assert!(format!("{err:#}").contains("30 days"), "{err:#}");
        let err = Config::parse(&format!("version = 1\n[aws]\n{field} = \"31d\"\n")).unwrap_err();
        assert!(format!("{err:#}").contains("30 days"), "{err:#}");
        Config::parse(&format!("version = 1\n[aws]\n{field} = \"30d\"\n")).unwrap();
    }
    assert!(Config::parse("version = 1\n[server]\nrequest_timeout = \"400d\"\n").is_err());
}

#[test]
fn example_config_parses() {
    let text = include_str!("../../keyd.example.toml");
    let cfg: Config = toml::from_str(text).unwrap();
    assert_eq!(cfg.version, 1);
}
