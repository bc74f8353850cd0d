//! Crash consistency: SIGKILLs at random moments under admin load, and while the daemon
//! starts. After every start the state must hold everything that was acknowledged or served
//! (the model of that is in `model`).

mod model;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use incountry_keyd::domain::Code;
use incountry_keyd::proto::{KeyDocument, VersionAdded};
use serde_json::json;

use harness::{try_request, Daemon, Options, Reply, Secrets};

use crate::support::{seed, tail, token_files, Rng};
use model::{apply_ops, check_state, Fingerprints, KeyModel, Totals};

const ENV: &str = "crash";
const COUNTRIES: [&str; 5] = ["DE", "FR", "US", "JP", "BR"];
const PERIODS: [u32; 4] = [30, 60, 180, 360];
const KILLS: usize = 200;
/// Extra kills while the daemon starts (state open, key loading), on top of `KILLS`.
const STARTUP_KILL_ONE_IN: u64 = 8;

/// The SoftHSM token's files and their sizes (a failed start after a kill: was the token
/// store left truncated?).
fn token_file_sizes(d: &Daemon) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = token_files(&d.token.dir.join("tokens"))
        .iter()
        .map(|f| {
            let len = f.metadata().map_or(0, |m| m.len());
            (f.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    files.sort();
    files
}

/// What to show when the daemon stopped on its own: whether the HSM token survived, its
/// files, and the end of the log.
fn failure_note(d: &Daemon) -> String {
    let files = token_file_sizes(d);
    let lost = files
        .iter()
        .any(|(name, len)| name == "token.object" && *len == 0);
    format!(
        "{}HSM token files (name, bytes): {files:?}\nlog tail:\n{}",
        if lost {
            "THE HSM TOKEN IS GONE: SoftHSM's token.object is empty (a kill interrupted its \
             rewrite); every root key in it is lost.\n"
        } else {
            ""
        },
        tail(&d.log_text(), 40)
    )
}

/// The daemon process of the crash test, owned here (the harness's child is private and
/// its `stop` sends SIGTERM): SIGKILL and reap on drop too.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(d: &Daemon) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&d.log)
            .unwrap();
        let child = d
            .command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        Proc { child }
    }

    /// Polls the socket until /v1/health answers 200; the daemon must not exit meanwhile.
    /// `after` says what happened before this start (shown if it fails).
    fn wait_ready(&mut self, d: &Daemon, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "daemon exited during start ({status}) after {after}\n{}",
                    failure_note(d)
                );
            }
            if let Ok(a) = try_request(
                &d.socket,
                "GET",
                "/v1/health",
                &[],
                b"",
                Duration::from_secs(10),
            ) {
                if a.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready in 30 s after {after}; log tail:\n{}",
                tail(&d.log_text(), 40)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL and reap; the daemon must still have been running (not exited on its own).
    fn kill(mut self, d: &Daemon, after: &str) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("reap daemon");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the daemon exited on its own before the kill ({status}), started after {after}\n{}",
            failure_note(d)
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Create,
    Rotate,
    Settings(u32),
    /// Not a change: a read of the secrets document while changes are under way.
    Read,
}

#[derive(Debug)]
enum Outcome {
    /// A complete 2xx answer, read as the change's answer.
    Acked(Answer),
    /// A complete non-2xx answer: its status, its error code (when it is an error
    /// document) and its body.
    Refused(u16, Option<Code>, String),
    /// No complete answer (the kill): the change may or may not have happened.
    Lost(String),
}

/// What a 2xx answer holds, by change.
#[derive(Debug)]
enum Answer {
    /// Create and rotate.
    Added(VersionAdded),
    /// Settings: the key as it is now.
    Settings(KeyDocument),
    /// A read.
    Secrets(Secrets),
}

impl Answer {
    fn read(change: Change, a: Reply) -> Answer {
        match change {
            Change::Create | Change::Rotate => Answer::Added(a.read()),
            Change::Settings(_) => Answer::Settings(a.read()),
            Change::Read => Answer::Secrets(Secrets::parse(a.body)),
        }
    }
}

struct Op {
    country: &'static str,
    change: Change,
    outcome: Outcome,
}

/// The client of one cycle: admin changes (and a few reads) until a request fails.
fn client(socket: PathBuf, mut rng: Rng) -> Vec<Op> {
    let mut ops = Vec::new();
    loop {
        let country = *rng.pick(&COUNTRIES);
        let key = format!("/v1/keys/{ENV}/{country}");
        let change = match rng.below(10) {
            0..=2 => Change::Create,
            3..=5 => Change::Rotate,
            6..=8 => Change::Settings(*rng.pick(&PERIODS)),
            _ => Change::Read,
        };
        let (method, path, body) = match change {
            Change::Create => (
                "POST",
                key,
                Some(json!({"type": "incountry-managed", "rotation_period_days": 30})),
            ),
            Change::Rotate => ("POST", format!("{key}/rotate"), None),
            Change::Settings(days) => ("PATCH", key, Some(json!({ "rotation_period_days": days }))),
            Change::Read => ("GET", format!("{key}/secrets"), None),
        };
        let body = body.map_or_else(String::new, |b| b.to_string());
        let result = try_request(
            &socket,
            method,
            &path,
            &[],
            body.as_bytes(),
            Duration::from_secs(20),
        );
        let (outcome, stop) = match result {
            Ok(a) if (200..300).contains(&a.status) => {
                (Outcome::Acked(Answer::read(change, a)), false)
            }
            Ok(a) => (Outcome::Refused(a.status, a.error_code(), a.text()), false),
            Err(e) => (Outcome::Lost(e), true),
        };
        ops.push(Op {
            country,
            change,
            outcome,
        });
        if stop {
            return ops;
        }
    }
}

/// `KILLS` cycles of: start (sometimes SIGKILLed while starting first), check everything,
/// a client making admin changes, SIGKILL after 0 to 40 ms. After every start: the state
/// opens, `audit verify` passes, every acknowledged or served version is present with the
/// same key material as ever (SHA-256 fingerprints, never the keys), versions are 1..=n,
/// and the rotation period is one the requests made possible.
#[test]
fn crash_consistency() {
    let started = Instant::now();
    let mut rng = Rng(seed("crash_consistency"));
    let d = Daemon::prepare(Options {
        verification: "off",
        versions_per_day: 1000,
        ..Options::default()
    });
    let mut keys: BTreeMap<&'static str, KeyModel> = BTreeMap::new();
    let mut fps = Fingerprints::new();
    let mut totals = Totals::default();
    let mut startup_kills = 0;
    let mut ops_per_cycle = Vec::with_capacity(KILLS);

    // What happened before the next start, for the message if that start fails.
    let mut after = "the first start".to_string();
    for cycle in 0..KILLS {
        // Sometimes kill while the daemon opens its state and loads keys.
        if rng.below(STARTUP_KILL_ONE_IN) == 0 {
            let p = Proc::spawn(&d);
            let delay = rng.below(30_000);
            std::thread::sleep(Duration::from_micros(delay));
            p.kill(&d, &after);
            startup_kills += 1;
            after = format!("{after}, then a SIGKILL {delay} µs into a start (cycle {cycle})");
        }
        let mut p = Proc::spawn(&d);
        p.wait_ready(&d, &after);
        check_state(&d, &mut keys, &mut fps, &mut totals);

        let client_rng = Rng(rng.next());
        let socket = d.socket.clone();
        let worker = std::thread::spawn(move || client(socket, client_rng));
        let delay = rng.below(40_001);
        std::thread::sleep(Duration::from_micros(delay));
        p.kill(&d, &after);
        let ops = worker.join().expect("client thread");
        ops_per_cycle.push(ops.len());
        apply_ops(&ops, &mut keys, &mut fps, &mut totals);
        let last: Vec<String> = ops[ops.len().saturating_sub(3)..]
            .iter()
            .map(|op| {
                let outcome = match &op.outcome {
                    Outcome::Acked(_) => "acknowledged".to_string(),
                    Outcome::Refused(status, _, _) => format!("refused {status}"),
                    Outcome::Lost(why) => format!("in flight ({why})"),
                };
                format!("{:?} {ENV}/{}: {outcome}", op.change, op.country)
            })
            .collect();
        after = format!(
            "a SIGKILL {delay} µs into cycle {cycle}'s client load ({} requests; the last: {})",
            ops.len(),
            last.join("; ")
        );
    }
    // The state after the last kill.
    let mut p = Proc::spawn(&d);
    p.wait_ready(&d, &after);
    check_state(&d, &mut keys, &mut fps, &mut totals);
    drop(p);

    let log = d.log_text();
    assert!(
        !log.contains("panicked"),
        "the daemon panicked; log tail:\n{}",
        tail(&log, 80)
    );
    let mean = ops_per_cycle.iter().sum::<usize>() as f64 / ops_per_cycle.len() as f64;
    println!(
        "crash_consistency: {} kills under load + {startup_kills} during start; \
         {} acknowledged changes checked (+{} reads), {} lost in flight ({:?}), of which {} \
         versions turned out committed; {} refused (404 before the key existed); {} versions checked over {} restarts, {} fingerprints, \
         {} audit entries; HSM anchor caught up at {} starts (a kill between a commit and \
         its anchor update); {mean:.1} requests per cycle; error lines in log: {}; took {:.1} s",
        KILLS,
        totals.acked_changes,
        totals.acked_reads,
        totals.lost,
        totals.lost_by,
        totals.unacked_applied,
        totals.refused_404,
        totals.versions_checked,
        KILLS + 1,
        fps.len(),
        totals.audit_entries,
        log.matches("state is ahead of the HSM anchor").count(),
        log.lines().filter(|l| l.contains("ERROR")).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        totals.acked_changes > 0,
        "no change was acknowledged in {KILLS} cycles"
    );
}
