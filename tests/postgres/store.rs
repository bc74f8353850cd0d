//! The `Store` contract on PostgreSQL: each case on a fresh database of its own cluster.

use std::sync::Arc;

use harness::Postgres;
use incountry_keyd::store::conformance::{self, Backend};
use incountry_keyd::store::{Opener, Store};

struct Pg {
    server: Postgres,
    db: String,
}

impl Backend for Pg {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        super::open(&self.server, &self.db, "node-a")
    }
    fn open_read_only(&self) -> anyhow::Result<Arc<dyn Store>> {
        Opener::new(&super::config(&self.server, &self.db, "node-r"), None)?.open_read_only()
    }
}

fn fresh() -> Pg {
    let server = Postgres::init();
    let db = server.database("keyd");
    Pg { server, db }
}

macro_rules! on_postgres {
    ($($case:ident),* $(,)?) => {$(
        #[test]
        fn $case() {
            conformance::$case(&fresh());
        }
    )*};
}

on_postgres!(
    versions_follow_on_and_a_conflicting_insert_is_refused_whole,
    aws_versions_keep_their_kms_details_and_seals,
    the_audit_chain_holds_across_a_reopen,
    a_read_only_store_reads_beside_the_daemon_and_refuses_writes,
    counts_before_the_check_locks_at_five_and_survives_a_reopen,
    abandoned_checks_count_and_withdrawn_ones_do_not,
    secrets_used_steps_and_failures_persist_until_a_reset,
    aws_refusals_are_recorded_kept_and_cleared,
);

/// A SQLite state in a temp dir (the source of a migration).
struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        incountry_keyd::store::open(self.0.path())
    }
    fn open_read_only(&self) -> anyhow::Result<Arc<dyn Store>> {
        incountry_keyd::store::open_read_only(self.0.path())
    }
}

#[test]
fn a_sqlite_state_copies_whole_into_an_empty_postgres_one() {
    let from = Sqlite(tempfile::tempdir().unwrap());
    conformance::a_state_copies_whole_into_an_empty_one(&from, &fresh());
}
