//! TLS to a TCP host: the server's certificate must chain to `postgres.ca_file` and carry
//! the host's name (verify-full), through the binary's one TLS stack (rustls).

use std::path::Path;

use harness::postgres::make_ca;
use harness::Postgres;
use incountry_keyd::config::Config;
use incountry_keyd::store::Opener;

fn over_tcp(pg: &Postgres, db: &str, host: &str, ca: &Path) -> anyhow::Result<()> {
    let config = Config::parse(&format!(
        "version = 1\n[state]\nbackend = \"postgres\"\n[postgres]\nurl = \"postgresql://keyd@{host}:{}/{db}?sslmode=verify-full\"\nca_file = \"{}\"\npassword_file = \"{}\"\n",
        pg.port(),
        ca.display(),
        pg.password_file().display()
    ))?;
    let store = Opener::new(&config, None)?.open()?;
    store.load_all()?;
    Ok(())
}

#[test]
fn tls_to_a_tcp_host_verifies_the_certificate_and_its_name() {
    let mut pg = Postgres::init();
    let db = pg.database("keyd");
    let ca = pg.enable_tls();
    over_tcp(&pg, &db, "localhost", &ca).unwrap();
    // The migrations ran over TLS (the server admits TCP logins over TLS only).
    assert_eq!(pg.sql(&db, "SELECT version > 0 FROM keyd_schema"), "t");
    // A certificate from another CA is refused.
    let other = make_ca(pg.tmp.path(), "other");
    let e = format!("{:#}", over_tcp(&pg, &db, "localhost", &other).unwrap_err());
    assert!(e.contains("TLS") && e.contains("UnknownIssuer"), "{e}");
    // So is a host the certificate does not name (it names localhost, not 127.0.0.1).
    let e = format!("{:#}", over_tcp(&pg, &db, "127.0.0.1", &ca).unwrap_err());
    assert!(e.contains("TLS") && e.contains("not valid for name"), "{e}");
}
