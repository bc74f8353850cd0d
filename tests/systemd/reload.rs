//! SIGHUP: a new config applies (readers, limits, log level) to new connections; a broken
//! one is refused and the running one kept.

use harness::{Daemon, Options};

use crate::{notify_value, NotifySocket};

/// SIGHUP and wait for the reload to finish (RELOADING=1 then READY=1); returns STATUS=.
fn reload(d: &Daemon, notify: &NotifySocket) -> String {
    d.signal("HUP");
    notify.wait_for("RELOADING=1", None);
    let ready = notify.wait_for("READY=1", None);
    notify_value(&ready, "STATUS").unwrap_or("").to_string()
}

fn nobody_can_list(d: &Daemon) -> bool {
    let out = d.cli_as_nobody(&["keys", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("403"),
        "neither allowed nor forbidden: {err}"
    );
    out.status.success()
}

#[test]
fn reload_applies_readers_and_keeps_old_config_on_error() {
    let mut d = Daemon::prepare(Options {
        readers: vec!["uid:65534".into()],
        ..Options::default()
    });
    d.open_to_others();
    let notify = NotifySocket::bind(d.tmp.path());
    d.env
        .push(("NOTIFY_SOCKET".into(), notify.path.clone().into()));
    let d = d.launch();
    notify.wait_for("READY=1", None);
    assert_eq!(d.create_managed("prod", "FR", 30).status, 201);
    assert!(nobody_can_list(&d));
    let good = std::fs::read_to_string(&d.config).unwrap();

    // Broken configs: a TOML error, an unknown group. The old config stays, serving goes on.
    for (broken, why) in [
        (good.replace("[access]", "[access"), "TOML syntax"),
        (
            good.replace("\"uid:65534\"", "\"group:no-such-group-keyd\""),
            "unknown group",
        ),
        (good.replace("version = 1", "version = 7"), "version"),
    ] {
        std::fs::write(&d.config, broken).unwrap();
        let status = reload(&d, &notify);
        assert!(
            status.contains("last reload failed, running configuration kept"),
            "{why}: {status}"
        );
        assert!(nobody_can_list(&d), "{why}: old reader list lost");
        assert_eq!(d.get("/v1/health").status, 200);
        assert_eq!(d.secrets("prod", "FR").current_version, 1);
    }
    let log = d.log_text();
    assert!(log.contains("reload refused, keeping the running configuration"));
    assert!(log.contains("no-such-group-keyd"), "{log}");

    // A changed reader list applies to new connections.
    std::fs::write(&d.config, good.replace("\"uid:65534\"", "")).unwrap();
    let status = reload(&d, &notify);
    assert!(!status.contains("failed"), "{status}");
    assert!(!nobody_can_list(&d), "nobody still reads after removal");
    std::fs::write(&d.config, &good).unwrap();
    reload(&d, &notify);
    assert!(
        nobody_can_list(&d),
        "nobody cannot read after being added back"
    );

    // Limits and log level apply too. (Requests are logged at debug.)
    assert_eq!(d.rotate("prod", "FR").status, 429);
    assert_eq!(d.get("/v1/before-level-change").status, 404);
    assert!(d.log_text().contains("/v1/before-level-change"));
    std::fs::write(
        &d.config,
        good.replace("versions_per_day = 1", "versions_per_day = 2")
            .replace("level = \"debug\"", "level = \"info\""),
    )
    .unwrap();
    reload(&d, &notify);
    assert_eq!(d.rotate("prod", "FR").status, 201);
    assert_eq!(d.get("/v1/after-level-change").status, 404);
    assert!(!d.log_text().contains("/v1/after-level-change"));
}

#[test]
fn reload_names_cluster_settings_as_needing_a_restart() {
    let mut d = Daemon::prepare(Options::default());
    let notify = NotifySocket::bind(d.tmp.path());
    d.env
        .push(("NOTIFY_SOCKET".into(), notify.path.clone().into()));
    let d = d.launch();
    notify.wait_for("READY=1", None);
    let mut config = std::fs::read_to_string(&d.config).unwrap();
    config.push_str("\n[cluster]\nlease = \"20s\"\n");
    std::fs::write(&d.config, config).unwrap();
    let status = reload(&d, &notify);
    assert!(!status.contains("last reload failed"), "{status}");
    let log = d.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("take effect only after a restart"))
        .unwrap_or_else(|| panic!("no restart warning in\n{log}"));
    assert!(warning.contains("cluster.*"), "{warning}");
}
