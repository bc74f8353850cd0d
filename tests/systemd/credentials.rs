//! The HSM PIN from systemd's credentials directory (LoadCredential=).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use harness::{bin, Daemon, Options};
use incountry_keyd::proto::Condition;

/// Copies the token's user PIN into a credentials directory as systemd's LoadCredential=
/// does (file `hsm-pin`, mode 0400), and drops `pin_file` from the config.
fn use_credentials(d: &mut Daemon) -> PathBuf {
    let creds = d.tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();
    let pin = creds.join("hsm-pin");
    std::fs::copy(d.token.pin_file(), &pin).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o400)).unwrap();
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let line = format!("pin_file = \"{}\"\n", d.token.pin_file().display());
    assert!(cfg.contains(&line));
    std::fs::write(&d.config, cfg.replace(&line, "")).unwrap();
    creds
}

#[test]
fn pin_from_credentials_directory() {
    let mut d = Daemon::prepare(Options::default());
    let creds = use_credentials(&mut d);
    // The token's own PIN file is gone: only the credential can open the HSM.
    std::fs::remove_file(d.token.pin_file()).unwrap();

    // Without CREDENTIALS_DIRECTORY (and no pin_file) the start fails, saying where the PIN
    // is expected.
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LoadCredential=hsm-pin"), "{err}");

    d.env
        .push(("CREDENTIALS_DIRECTORY".into(), creds.clone().into()));
    let out = Command::new(bin())
        .arg("--config")
        .arg(&d.config)
        .arg("check-config")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("PIN file {}", creds.join("hsm-pin").display())),
        "{said}"
    );
    let d = d.launch();
    let h = d.health();
    assert_eq!(h.hsm, Condition::Ok, "{h:?}");
    assert_eq!(d.create_managed("prod", "SE", 30).status, 201);
    let pin = std::fs::read_to_string(creds.join("hsm-pin")).unwrap();
    assert!(!d.log_text().contains(pin.trim()), "the PIN is in the log");
}
