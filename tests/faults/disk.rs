//! A full state disk: changes are refused as retryable, reads are served, and the daemon
//! recovers by itself once there is room again.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use harness::Daemon;
use incountry_keyd::domain::Code;
use incountry_keyd::proto::{Condition, HealthStatus};

use crate::support::{assert_reads_served, audit_verify, health, options};

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xA5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    // The last partial blocks.
    while f.write_all(&block[..512]).is_ok() {}
    path
}

#[test]
fn full_state_disk_is_retryable_and_recovers() {
    let d = Daemon::prepare(options());
    let state = d.tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&state)
        .output()
        .unwrap();
    if !mounted.status.success() {
        println!(
            "SKIPPED full_state_disk: cannot mount a tmpfs here: {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        return;
    }
    let _mount = Mount(state.clone());
    let d = d.launch();
    assert_eq!(d.create_managed("prod", "DE", 30).status, 201);
    let filler = fill(&state);

    let r = d.rotate("prod", "DE");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), Code::StateUnavailable, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let h = health(&d);
    assert_eq!(h.state, Condition::Unavailable, "{h:?}");
    assert_eq!(h.status, HealthStatus::Degraded, "{h:?}");
    assert_reads_served(&d, 1);
    let log = d.log_text();
    assert!(
        log.contains("ERROR") && log.contains("state disk does not take writes"),
        "{log}"
    );

    std::fs::remove_file(filler).unwrap();
    let r = d.rotate("prod", "DE");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(health(&d).state, Condition::Ok);
    assert_reads_served(&d, 2);
    audit_verify(&d);
}
