//! The `Store` contract (`conformance`) on SQLite, each case in a fresh state directory.

use std::sync::Arc;

use super::conformance::{self, Backend};
use super::Store;

struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        super::open(self.0.path())
    }
    fn open_read_only(&self) -> anyhow::Result<Arc<dyn Store>> {
        super::open_read_only(self.0.path())
    }
}

macro_rules! on_sqlite {
    ($($case:ident),* $(,)?) => {$(
        #[test]
        fn $case() {
            conformance::$case(&Sqlite(tempfile::tempdir().unwrap()));
        }
    )*};
}

on_sqlite!(
    versions_follow_on_and_a_conflicting_insert_is_refused_whole,
    aws_versions_keep_their_kms_details_and_seals,
    the_audit_chain_holds_across_a_reopen,
    a_read_only_store_reads_beside_the_daemon_and_refuses_writes,
    counts_before_the_check_locks_at_five_and_survives_a_reopen,
    abandoned_checks_count_and_withdrawn_ones_do_not,
    secrets_used_steps_and_failures_persist_until_a_reset,
    aws_refusals_are_recorded_kept_and_cleared,
);

#[test]
fn a_state_copies_whole_into_an_empty_one() {
    let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    conformance::a_state_copies_whole_into_an_empty_one(&Sqlite(from), &Sqlite(to));
}
