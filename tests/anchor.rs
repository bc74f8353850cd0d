//! The audit log's MACs and the HSM anchor, against the real binary and SoftHSM: a state
//! cut short or restored from an older copy is refused at start and by `audit verify`; a
//! rewritten audit log fails its MACs; a state ahead of the anchor (a crash between a
//! commit and the anchor's update) is accepted and the anchor caught up.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{bin, copy_tree, Daemon, Options, Token};
use sha2::{Digest, Sha256};

fn options() -> Options {
    Options {
        versions_per_day: 100,
        log_level: "info",
        ..Options::default()
    }
}

/// `audit verify` with the HSM (`--config`): (passed, stdout).
fn verify(d: &Daemon) -> (bool, String) {
    let out = Command::new(bin())
        .arg("--config")
        .arg(&d.config)
        .args(["audit", "verify"])
        .env("SOFTHSM2_CONF", d.token.conf())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `audit verify --state-dir` alone: the chain only.
fn verify_chain_only(d: &Daemon) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify", "--state-dir"])
        .arg(d.tmp.path().join("state"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Starts the daemon expecting it to refuse; returns the line of stderr it died with.
fn refused_start(d: &Daemon) -> String {
    let mut child = d
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon started (or hung) instead of refusing the state");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out: Output = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    err.lines()
        .find(|l| l.contains("incountry-keyd: error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"))
        .to_string()
}

fn sql(d: &Daemon, statement: &str) {
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.execute_batch(statement).unwrap();
}

#[test]
fn deleted_newest_audit_entries_are_refused_at_start_and_by_verify() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert_eq!(d.create_managed("prod", "NL", 60).status, 201);
    let (ok, out) = verify(&d);
    assert!(ok && out.contains("OK: 4 audit entries"), "{out}");
    assert!(out.contains("matches the HSM anchor"), "{out}");
    let mut d = d;
    assert!(d.stop().success());

    sql(&d, "DELETE FROM audit WHERE seq >= 3");
    let line = refused_start(&d);
    assert!(
        line.contains("state is behind the HSM anchor: audit entries 3..4 missing"),
        "{line}"
    );
    assert!(line.contains("truncated"), "{line}");
    let (ok, out) = verify(&d);
    assert!(!ok, "{out}");
    assert!(out.contains("audit entries 3..4 missing"), "{out}");
    // The chain alone cannot see a cut at its end, and says what it did not check.
    let (ok, out) = verify_chain_only(&d);
    assert!(
        ok && out.contains("MACs and the HSM anchor not checked"),
        "{out}"
    );
}

#[test]
fn an_older_copy_of_the_state_is_refused_at_start_and_by_verify() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    // A backup taken while the daemon runs.
    let copy = d.tmp.path().join("backup.sqlite3");
    let db = rusqlite::Connection::open(d.state_db()).unwrap();
    db.execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
        .unwrap();
    drop(db);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert_eq!(d.create_managed("prod", "PL", 30).status, 201);
    let mut d = d;
    assert!(d.stop().success());

    let state = d.tmp.path().join("state");
    for f in ["keyd.sqlite3-wal", "keyd.sqlite3-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    std::fs::copy(&copy, d.state_db()).unwrap();
    let line = refused_start(&d);
    assert!(line.contains("state is behind the HSM anchor"), "{line}");
    for missing in [
        "audit entries 3..5 missing",
        "prod/DE last version 1 < 3",
        "prod/PL missing (last version 1)",
        "restored from an older backup",
    ] {
        assert!(line.contains(missing), "{missing}: {line}");
    }
    let (ok, out) = verify(&d);
    assert!(!ok, "{out}");
    assert!(out.contains("prod/DE last version 1 < 3"), "{out}");
}

/// The hash of an audit row, as the daemon chains them (length-prefixed fields).
fn entry_hash(row: &[Option<String>; 13]) -> String {
    let mut h = Sha256::new();
    for f in row {
        let f = f.clone().unwrap_or_else(|| "-".into());
        h.update((f.len() as u64).to_be_bytes());
        h.update(f.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Changes the detail of entry `seq` and recomputes the SHA-256 chain from there on: what
/// whoever can write the database (but not use the HSM) can do.
fn rewrite_entry(db: &Path, seq: i64, detail: &str) {
    let db = rusqlite::Connection::open(db).unwrap();
    db.execute(
        "UPDATE audit SET detail = ?2 WHERE seq = ?1",
        rusqlite::params![seq, detail],
    )
    .unwrap();
    let mut prev: String = db
        .query_row("SELECT prev_hash FROM audit WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap();
    let rows: Vec<(i64, [Option<String>; 12])> = {
        let mut stmt = db
            .prepare(
                "SELECT seq, time, actor, uid, gid, pid, action, environment, country, version, outcome, detail
                 FROM audit WHERE seq >= ?1 ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([seq], |r| {
            let text = |i: usize| -> rusqlite::Result<Option<String>> {
                Ok(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => None,
                    rusqlite::types::ValueRef::Integer(n) => Some(n.to_string()),
                    v => Some(v.as_str().unwrap().to_string()),
                })
            };
            Ok((r.get(0)?, std::array::from_fn(|i| text(i).unwrap())))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    };
    for (s, fields) in rows {
        let mut row: [Option<String>; 13] = Default::default();
        row[..12].clone_from_slice(&fields);
        row[12] = Some(prev.clone());
        let hash = entry_hash(&row);
        db.execute(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE seq = ?1",
            rusqlite::params![s, prev, hash],
        )
        .unwrap();
        prev = hash;
    }
}

#[test]
fn a_rewritten_audit_log_fails_its_macs() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    let r = d.request(
        "PATCH",
        "/v1/keys/prod/DE",
        &serde_json::json!({"rotation_period_days": 60}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut d = d;
    assert!(d.stop().success());

    rewrite_entry(&d.state_db(), 2, "new managed version (nothing to see)");
    // The chain alone is fooled...
    let (ok, out) = verify_chain_only(&d);
    assert!(ok, "{out}");
    // ...the MACs are not.
    let (ok, out) = verify(&d);
    assert!(!ok, "{out}");
    assert!(
        out.contains("BROKEN at sequence 2: its MAC does not match"),
        "{out}"
    );
    // Nor is the start: the anchored entry is not the one the log ends with now.
    let line = refused_start(&d);
    assert!(
        line.contains("audit entry 3 is not the one anchored"),
        "{line}"
    );
}

/// The token as it was before the last change: an anchor that lags the state by that
/// change, as a crash between its commit and the anchor's update leaves it.
fn lagging_anchor(d: Daemon, change: impl FnOnce(&Daemon)) -> Daemon {
    let tokens = d.token.dir.join("tokens");
    let before = d.tmp.path().join("tokens.before");
    let mut d = d;
    assert!(d.stop().success());
    copy_tree(&tokens, &before);
    let mut d = d.launch();
    change(&d);
    assert!(d.stop().success());
    std::fs::remove_dir_all(&tokens).unwrap();
    std::fs::rename(&before, &tokens).unwrap();
    d
}

#[test]
fn a_state_ahead_of_the_anchor_is_accepted_and_the_anchor_caught_up() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let d = lagging_anchor(d, |d| assert_eq!(d.rotate("prod", "DE").status, 201));
    let (ok, out) = verify(&d);
    assert!(ok && out.contains("ahead of the HSM anchor"), "{out}");

    let mut d = d.launch();
    assert!(
        d.log_text().contains("state is ahead of the HSM anchor"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.secrets("prod", "DE").current_version, 2);
    let (ok, out) = verify(&d);
    assert!(ok && out.contains("matches the HSM anchor"), "{out}");
    // Caught up: cutting the entry that was ahead is now seen.
    assert!(d.stop().success());
    sql(&d, "DELETE FROM audit WHERE seq = 2");
    let line = refused_start(&d);
    assert!(line.contains("audit entry 2 missing"), "{line}");
}

#[test]
fn entries_ahead_of_the_anchor_must_pass_their_macs() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let d = lagging_anchor(d, |d| assert_eq!(d.rotate("prod", "DE").status, 201));
    // An entry past the anchor, rewritten with its chain: not the daemon's.
    rewrite_entry(&d.state_db(), 2, "forged");
    let line = refused_start(&d);
    assert!(
        line.contains("audit log entry 2 fails its check: its MAC does not match"),
        "{line}"
    );
}

#[test]
fn another_token_is_refused_at_start() {
    let mut d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert!(d.stop().success());
    // The config names the PIN of a new token, without the audit MAC key or the anchors.
    let other = d.tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let own = std::mem::replace(&mut d.token, Token::new(&other));
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let pin = |t: &Token| t.pin_file().to_str().unwrap().to_string();
    std::fs::write(&d.config, cfg.replace(&pin(&own), &pin(&d.token))).unwrap();
    let line = refused_start(&d);
    assert!(
        line.contains("not the token the state was written with"),
        "{line}"
    );
    let (ok, out) = verify(&d);
    assert!(!ok && out.contains("not the token"), "{out}");
}

/// Whether a SoftHSM object file holds `attribute` = `value` (ULONG attributes are stored
/// unencrypted as big-endian (type, kind 2, value) u64s).
fn has_ulong(file: &[u8], attribute: u64, value: u64) -> bool {
    let pattern: Vec<u8> = [attribute, 2, value]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    file.windows(pattern.len()).any(|w| w == pattern)
}

#[test]
fn an_upgraded_state_is_anchored_and_its_older_entries_accepted() {
    let mut d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert!(d.stop().success());
    // As a version before MACs left it: entries without MACs, and a token with root keys
    // but no audit MAC key (CKK_GENERIC_SECRET) and no anchors (CKO_DATA).
    sql(&d, "UPDATE audit SET mac = NULL");
    let tokens = d.token.dir.join("tokens");
    let token = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    for f in std::fs::read_dir(&token).unwrap() {
        let path = f.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".object") || name == "token.object" {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        // CKA_CLASS (0) = CKO_DATA (0); CKA_KEY_TYPE (0x100) = CKK_GENERIC_SECRET (0x10).
        if has_ulong(&bytes, 0, 0) || has_ulong(&bytes, 0x100, 0x10) {
            std::fs::remove_file(&path).unwrap();
            let _ = std::fs::remove_file(path.with_extension("lock"));
        }
    }
    let (ok, out) = verify(&d);
    assert!(ok && out.contains("no MACs and no HSM anchor yet"), "{out}");

    let d = d.launch();
    assert!(
        d.log_text().contains("no HSM anchor yet"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    let (ok, out) = verify(&d);
    assert!(ok, "{out}");
    let expect = "OK: 4 audit entries, chain and 2 MACs intact (2 older entries from before MACs)";
    assert!(out.contains(expect), "{out}");
    // Older entries pass only before the first MACed one.
    let mut d = d;
    assert!(d.stop().success());
    sql(&d, "UPDATE audit SET mac = NULL WHERE seq = 4");
    let (ok, out) = verify(&d);
    let expect = "BROKEN at sequence 4: it has no MAC, though an entry before it has one";
    assert!(!ok && out.contains(expect), "{out}");
}
