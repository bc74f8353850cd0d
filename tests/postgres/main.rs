//! The PostgreSQL backend against a real PostgreSQL (`harness::Postgres`: a private cluster
//! per test, on a Unix socket in a temp dir, stopped at the end):
//!
//! - `store`: the `Store` contract (`store::conformance`), as SQLite passes it;
//! - `nodes`: what several nodes on one database rely on: two writers racing for a version
//!   number (one wins), audit entries appended from two nodes at once (one chain), TOTP
//!   failures, locks and used steps shared, nodes starting at once, an outage;
//! - `tls`: verify-full over TCP (rustls), against a CA of the test's own;
//! - `daemon`: the real daemon with `state.backend = "postgres"`;
//! - `propagation`: three daemons: a change on one served by the others within a second,
//!   long polls woken, two nodes racing 50 rotations each;
//! - `outage`: PostgreSQL stopped and started under three daemons; the periodic reload;
//! - `shared_limits`: verification codes and the daily limit across nodes.
//! - `leader`: one rotator among three daemons (the lease), and its take-over.
//! - `migrate`: `state migrate --to-postgres`, a SQLite host's state moved over;
//! - `aws`: a customer-supplied key refused by KMS on one node is withdrawn on every node
//!   (moto's KMS, `harness::moto`).
//!
//! `store` and `nodes` use the crate's test doubles, built with the test-clock feature.

#[cfg(feature = "test-clock")]
mod leader;
#[cfg(feature = "test-clock")]
mod nodes;
#[cfg(feature = "test-clock")]
mod store;

mod aws;
mod daemon;
mod migrate;
mod outage;
mod propagation;
mod shared_limits;
mod tls;

#[cfg(not(feature = "test-clock"))]
#[test]
fn needs_test_clock() {
    panic!("{}", harness::NEEDS_TEST_CLOCK);
}

use std::sync::Arc;

use harness::Postgres;
use incountry_keyd::config::Config;
use incountry_keyd::store::{Opener, Store};

/// The config of a node named `node` whose state is `db` on `pg`.
pub fn config(pg: &Postgres, db: &str, node: &str) -> Config {
    Config::parse(&format!(
        "version = 1\n{}[cluster]\nnode_name = \"{node}\"\n",
        pg.config(db)
    ))
    .unwrap()
}

/// A store on `db`, as node `node` opens it (migrations applied).
pub fn open(pg: &Postgres, db: &str, node: &str) -> anyhow::Result<Arc<dyn Store>> {
    Opener::new(&config(pg, db, node), None)?.open()
}
