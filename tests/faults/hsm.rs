//! HSM faults the daemon must recover from by itself, a start without the token directory,
//! and SoftHSM token files that a kill left cut short.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{copy_tree, Daemon, Reply};
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Condition, HealthStatus};

use crate::support::{
    assert_reads_served, health, options, rotate_until_ok, token_dir, token_files,
};

fn assert_hsm_refusal(r: &Reply) {
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), Code::HsmUnavailable, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");
}

/// Runs one HSM fault: `break_it` takes the token away, `mend` gives it back. During the
/// fault reads are served, health is degraded with `hsm: unavailable`, changes get 503
/// `hsm_unavailable`; after it, the next change succeeds with no restart.
fn hsm_fault(name: &str, d: Daemon, break_it: impl FnOnce(&Daemon), mend: impl FnOnce(&Daemon)) {
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert_eq!(health(&d).hsm, Condition::Ok);
    let pid = d.pid();

    break_it(&d);
    assert_hsm_refusal(&d.rotate("prod", "DE"));
    let h = health(&d);
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert_eq!(h.hsm, Condition::Unavailable, "{h:?}");
    assert!(
        h.hsm_error.as_deref().is_some_and(|e| !e.is_empty()),
        "{h:?}"
    );
    assert_reads_served(&d, 1);
    assert_hsm_refusal(&d.rotate("prod", "DE"));

    mend(&d);
    let took = rotate_until_ok(&d, Duration::from_secs(10));
    assert_eq!(d.pid(), pid, "no restart");
    assert_reads_served(&d, 2);
    assert_eq!(health(&d).hsm, Condition::Ok);
    assert!(!d.log_text().contains("root_key_missing"));
    println!("{name}: first successful change {took:?} after the HSM came back");
}

#[test]
fn hsm_token_directory_moved_away_and_back() {
    let d = Daemon::start_with(options());
    let tokens = d.token.dir.join("tokens");
    let away = d.token.dir.join("tokens.away");
    hsm_fault(
        "token directory moved",
        d,
        |_| std::fs::rename(&tokens, &away).unwrap(),
        |_| std::fs::rename(&away, &tokens).unwrap(),
    );
}

#[test]
fn hsm_token_directory_unreadable_and_back() {
    // As root the daemon would read a mode-000 directory anyway: run it without
    // capabilities, so the file modes apply to it as to any other user.
    let mut d = Daemon::prepare(options());
    d.prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
        .map(Into::into)
        .to_vec();
    let d = d.launch();
    let tokens = d.token.dir.join("tokens");
    let mode = |m: u32| std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(m));
    hsm_fault(
        "token directory chmod 000",
        d,
        |_| mode(0o000).unwrap(),
        |_| mode(0o700).unwrap(),
    );
}

fn prlimit(pid: u32, nofile: &str) {
    let ok = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={nofile}"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "prlimit --nofile={nofile}");
}

/// The descriptors a process has open: number and what it points to.
fn open_fds(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((
                e.file_name().to_str()?.parse().ok()?,
                target.to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// The sockets a process has open (accepted connections among them).
fn sockets(pid: u32) -> std::collections::HashSet<String> {
    open_fds(pid)
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| t.starts_with("socket:"))
        .collect()
}

#[test]
fn hsm_fd_shortage_during_a_change() {
    let d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let pid = d.pid();
    let before = Command::new("prlimit")
        .args(["--nofile", "--output", "SOFT,HARD", "--noheadings", "--pid"])
        .arg(pid.to_string())
        .output()
        .unwrap();
    let before = String::from_utf8_lossy(&before.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(":");
    // Only the soft limit drops: without CAP_SYS_RESOURCE a hard limit cannot come back.
    let hard = before.split(':').nth(1).unwrap().to_string();
    // Connected before the shortage: accept() needs a descriptor too.
    let sockets_before = sockets(pid);
    let mut conn = UnixStream::connect(&d.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = std::time::Instant::now();
    while sockets(pid).is_subset(&sockets_before) {
        assert!(start.elapsed() < Duration::from_secs(10), "never accepted");
        std::thread::yield_now();
    }
    // A fixed number (16 once) depends on how many descriptors the daemon happens to
    // hold on this machine; the lowest free number makes the very next open fail.
    let fds: Vec<u32> = open_fds(pid).into_iter().map(|(n, _)| n).collect();
    let lowest_free = (0..).find(|n| !fds.contains(n)).unwrap();
    prlimit(pid, &format!("{lowest_free}:{hard}"));
    conn.write_all(b"POST /v1/keys/prod/DE/rotate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = conn.read_to_end(&mut raw);
    prlimit(pid, &before);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("hsm_unavailable"), "{text}");

    let took = rotate_until_ok(&d, Duration::from_secs(10));
    assert_eq!(d.pid(), pid, "no restart");
    assert_reads_served(&d, 2);
    let h = health(&d);
    assert_eq!(h.hsm, Condition::Ok, "{h:?}");
    assert!(h.hsm_reconnects >= 1, "{h:?}");
    println!("fd shortage: first successful change {took:?} after the limit was restored");
}

#[test]
fn startup_with_the_token_directory_missing_names_it() {
    let d = Daemon::prepare(options());
    let tokens = d.token.dir.join("tokens");
    std::fs::remove_dir_all(&tokens).unwrap();
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("C_Initialize"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&tokens.display().to_string()), "{line}");
    assert!(line.contains("SOFTHSM2_CONF"), "{line}");
}

/// The object files of a token directory, other than the token's own.
fn object_files(tokens: &Path) -> Vec<std::path::PathBuf> {
    token_files(tokens)
        .into_iter()
        .map(|f| f.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".object") && name != "token.object"
        })
        .collect()
}

/// Whether a SoftHSM object file holds an AES key: its attributes are stored as
/// (type, kind, value) in big-endian u64s, unencrypted for CKA_KEY_TYPE (0x100, a ULONG,
/// kind 2), which is CKK_AES (0x1f).
fn is_aes_key(file: &[u8]) -> bool {
    let pattern: Vec<u8> = [0x100u64, 2, 0x1f]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    file.windows(pattern.len()).any(|w| w == pattern)
}

#[test]
fn an_incomplete_root_key_object_does_not_block_the_first_create() {
    // A root key object cut short, as a kill during its creation leaves it: planted into a
    // copy of the token taken before the key existed (the same token key decrypts it).
    let d = Daemon::prepare(options());
    let tokens = d.token.dir.join("tokens");
    let pristine = d.tmp.path().join("pristine");
    copy_tree(&tokens, &pristine);
    let mut d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert!(d.stop().success());
    // The root key among the token's objects (the audit MAC key and the anchors too).
    let objects: Vec<_> = object_files(&tokens)
        .into_iter()
        .filter(|p| is_aes_key(&std::fs::read(p).unwrap()))
        .collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    let whole = std::fs::read(&objects[0]).unwrap();
    // Every length a kill can leave, in steps (each cut breaks a different attribute).
    for cut in (9..whole.len()).step_by(24) {
        std::fs::remove_dir_all(&tokens).unwrap();
        copy_tree(&pristine, &tokens);
        let token = token_dir(&tokens);
        std::fs::write(token.join(objects[0].file_name().unwrap()), &whole[..cut]).unwrap();
        std::fs::remove_dir_all(d.tmp.path().join("state")).unwrap();
        d = d.launch();
        let r = d.create_managed("prod", "DE", 30);
        assert_eq!(r.status, 201, "cut at {cut}: {}", r.text());
        assert_eq!(d.rotate("prod", "DE").status, 201, "cut at {cut}");
        assert!(d.stop().success());
    }
}

#[test]
fn a_token_file_emptied_by_a_killed_login_is_put_back() {
    let mut d = Daemon::start_with(options());
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    assert!(d.stop().success());
    // What SoftHSM leaves when it is killed between truncating and rewriting token.object.
    let tokens = d.token.dir.join("tokens");
    let token = token_dir(&tokens);
    std::fs::write(token.join("token.object"), b"").unwrap();
    let d = d.launch();
    assert_eq!(d.secrets("prod", "DE").secrets.len(), 1);
    assert_eq!(d.rotate("prod", "DE").status, 201);
    assert!(d.log_text().contains("token.object was cut short"));
}
