//! What the integration tests and benchmarks share: the real daemon binary against a fresh
//! SoftHSM token in a temp dir (`Daemon`), HTTP to it through the crate's own client
//! (`request`), raw sockets for the tests that send malformed or partial requests on purpose
//! (`raw`), the InCountry SDK and TOTP tools (`sdk`, `totp`), moto's KMS (`moto`), and a
//! private PostgreSQL (`postgres`).

mod daemon;
mod http;
pub mod moto;
pub mod postgres;
pub mod raw;
mod sdk;
pub mod totp;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use daemon::{Daemon, Options, Token};
pub use http::{request, try_request, Reply, TIMEOUT};
pub use postgres::Postgres;
pub use sdk::{moto_python, sdk, sdk_python, Secrets};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Why a test that moves the daemon's clock cannot run.
pub const NEEDS_TEST_CLOCK: &str = "this test needs the daemon built with the test-clock \
     feature: run tests/run.sh or cargo test --features test-clock";

/// Fails the calling test at once, with `NEEDS_TEST_CLOCK`, when its test binary (and so the
/// daemon binary built with it) lacks the `test-clock` feature. A macro: `cfg!` has to be
/// read in the test binary, which is compiled with the package's features.
#[macro_export]
macro_rules! needs_test_clock {
    () => {
        if !cfg!(feature = "test-clock") {
            panic!("{}", $crate::NEEDS_TEST_CLOCK);
        }
    };
}

/// The package's directory.
pub fn repo() -> PathBuf {
    // This crate lives in tests/harness.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The daemon binary cargo built for the running test or benchmark.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Set by cargo when it runs an integration test or a benchmark.
        let path = std::env::var_os("CARGO_BIN_EXE_incountry-keyd")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // Run by hand: this executable is target/PROFILE/deps/NAME-HASH.
                let exe = std::env::current_exe().expect("the test executable's path");
                exe.parent()
                    .and_then(Path::parent)
                    .expect("target/PROFILE/deps")
                    .join("incountry-keyd")
            });
        assert!(
            path.exists(),
            "{} missing: run the tests with cargo test, which builds it",
            path.display()
        );
        path
    })
}

/// Polls `f` until it returns true, failing after `secs` seconds.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cp -a from to`.
pub fn copy_tree(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}
