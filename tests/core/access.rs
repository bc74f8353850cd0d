//! The reader and admin roles, by the peer credentials of each connection.

use harness::{Daemon, Options};

#[test]
fn access_by_peer_credentials() {
    let extra = "";
    let make = |readers: Vec<String>| {
        let d = Daemon::prepare(Options {
            readers,
            extra: extra.into(),
            ..Options::default()
        });
        // Let the other uid reach the socket; access is then decided by peer credentials.
        d.open_to_others();
        d.launch()
    };

    // Not listed: 403 for everything but health.
    let d = make(vec![]);
    assert_eq!(d.create_managed("prod", "IT", 30).status, 201);
    let out = d.cli_as_nobody(&["keys", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("forbidden"), "{err}");
    let out = d.cli_as_nobody(&["secrets", "prod", "IT"]);
    assert!(!out.status.success());
    drop(d);

    // A reader reads, but cannot create, rotate or change settings.
    let d = make(vec!["uid:65534".into()]);
    assert_eq!(d.create_managed("prod", "IT", 30).status, 201);
    let out = d.cli_as_nobody(&["secrets", "prod", "IT"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        vec![
            "keys",
            "create",
            "prod",
            "IT",
            "--rotation-period-days",
            "30",
        ],
        vec!["keys", "rotate", "prod", "IT"],
        vec![
            "keys",
            "settings",
            "prod",
            "IT",
            "--rotation-period-days",
            "60",
        ],
    ] {
        let out = d.cli_as_nobody(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("403"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(d.key("prod", "IT").active_version, Some(1));
}
