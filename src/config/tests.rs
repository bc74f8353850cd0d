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

#[test]
fn state_backend_defaults_to_sqlite_and_cluster_settings_have_defaults() {
    let cfg = Config::parse("version = 1\n").unwrap();
    assert_eq!(cfg.state.backend, StateBackend::Sqlite);
    assert_eq!(cfg.cluster.lease, Duration::from_secs(15));
    assert_eq!(cfg.cluster.reconcile_interval, Duration::from_secs(60));
    assert!(!cfg.cluster.node_name().unwrap().is_empty());
    // A [postgres] section is not used (nor checked) with SQLite.
    Config::parse("version = 1\n[postgres]\nurl = \"postgresql://k@db/k\"\n").unwrap();
    let err = Config::parse("version = 1\n[state]\nbackend = \"mysql\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("mysql"), "{err:#}");
}

/// The error of a postgres config with these `[postgres]` lines.
fn postgres_err(lines: &str) -> String {
    let text = format!("version = 1\n[state]\nbackend = \"postgres\"\n[postgres]\n{lines}");
    format!("{:#}", Config::parse(&text).unwrap_err())
}

fn postgres_ok(lines: &str) -> PostgresTarget {
    let text = format!("version = 1\n[state]\nbackend = \"postgres\"\n[postgres]\n{lines}");
    Config::parse(&text).unwrap().postgres.target().unwrap()
}

#[test]
fn postgres_needs_a_url_without_password_and_tls_for_tcp() {
    assert!(postgres_err("").contains("postgres.url is required"));
    // A password in the URL is refused, and not repeated.
    for url in [
        "postgresql://keyd:s3cr3t-pw@db.example/keyd",
        "postgresql://keyd@db.example/keyd?password=s3cr3t-pw&sslmode=verify-full",
    ] {
        let err = postgres_err(&format!("url = \"{url}\"\nca_file = \"/etc/hostname\"\n"));
        assert!(
            err.contains("postgres.url must not hold a password"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
    }
    // A TCP host: ca_file required, sslmode verify-full or left out.
    let err = postgres_err("url = \"postgresql://keyd@db.example/keyd\"\n");
    assert!(err.contains("postgres.ca_file is required"), "{err}");
    let err = postgres_err(
        "url = \"postgresql://keyd@db.example/keyd?sslmode=require\"\nca_file = \"/etc/hostname\"\n",
    );
    assert!(err.contains("sslmode must be verify-full"), "{err}");
    let err = postgres_err(
        "url = \"postgresql://keyd@db.example/keyd\"\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    assert!(
        err.contains("postgres.ca_file /nonexistent/ca.pem"),
        "{err}"
    );
    let t = postgres_ok(
        "url = \"postgresql://keyd@db.example:6432/keyd?sslmode=verify-full&connect_timeout=3\"\nca_file = \"/etc/hostname\"\n",
    );
    assert_eq!(
        t.config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    assert_eq!(t.config.get_ports(), [6432]);
    assert_eq!(
        t.config.get_connect_timeout(),
        Some(&Duration::from_secs(3))
    );
    assert_eq!(t.ca_file.as_deref(), Some(Path::new("/etc/hostname")));
    // A socket directory: no TLS, so no CA and no sslmode but disable.
    let t = postgres_ok("url = \"postgresql://keyd@/keyd?host=/run/postgresql\"\n");
    assert_eq!(
        t.config.get_ssl_mode(),
        tokio_postgres::config::SslMode::Disable
    );
    assert_eq!(
        t.config.get_connect_timeout(),
        Some(&Duration::from_secs(5))
    );
    assert!(t.ca_file.is_none());
    let err = postgres_err(
        "url = \"postgresql://keyd@/keyd?host=/run/postgresql\"\nca_file = \"/etc/hostname\"\n",
    );
    assert!(err.contains("postgres.ca_file is for a TCP host"), "{err}");
    let err =
        postgres_err("url = \"postgresql://keyd@/keyd?host=/run/postgresql&sslmode=require\"\n");
    assert!(err.contains("leave sslmode out"), "{err}");
    let err = postgres_err("url = \"postgresql://keyd@/keyd?host=/run/pg&bogus=1\"\n");
    assert!(
        err.contains("postgres.url is not a PostgreSQL URL"),
        "{err}"
    );
    let err = postgres_err(
        "url = \"postgresql://keyd@db/keyd\"\nca_file = \"/etc/hostname\"\npassword = \"x\"\n",
    );
    assert!(err.contains("password"), "{err}");
}

#[test]
fn cluster_settings_are_checked_by_name() {
    let err = Config::parse("version = 1\n[cluster]\nnode_name = \"a b\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("cluster.node_name"), "{err:#}");
    let err = Config::parse("version = 1\n[cluster]\nlease = \"0s\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("cluster.lease"), "{err:#}");
    let err = Config::parse("version = 1\n[cluster]\nreconcile_interval = \"31d\"\n").unwrap_err();
    assert!(
        format!("{err:#}").contains("cluster.reconcile_interval"),
        "{err:#}"
    );
    let cfg = Config::parse("version = 1\n[cluster]\nnode_name = \"border-1\"\nlease = \"5s\"\n")
        .unwrap();
    assert_eq!(cfg.cluster.node_name().unwrap(), "border-1");
    assert_eq!(cfg.cluster.lease, Duration::from_secs(5));
}
