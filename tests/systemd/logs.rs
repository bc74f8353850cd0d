//! Logs: plain lines when stderr is a file, `<N>` priorities when it is the journal.

use std::os::unix::fs::MetadataExt;

use harness::{Daemon, MODULE};

#[test]
fn logs_plain_on_files_and_with_priorities_on_the_journal() {
    // stderr is a file: no colours, level and fields kept.
    let mut d = Daemon::start();
    assert_eq!(d.create_managed("prod", "NO", 30).status, 201);
    assert!(d.stop().success());
    let text = d.log_text();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a non-TTY log:\n{text}"
    );
    let ready = text
        .lines()
        .find(|l| l.contains("ready:"))
        .expect("a ready line");
    assert!(ready.contains(" INFO "), "{ready}");
    assert!(ready.contains("startup_ms="), "{ready}");

    // stderr is the journal (JOURNAL_STREAM names it): `<N>` priorities, no timestamps.
    std::fs::write(&d.log, "").unwrap();
    let meta = std::fs::metadata(&d.log).unwrap();
    d.env.push((
        "JOURNAL_STREAM".into(),
        format!("{}:{}", meta.dev(), meta.ino()).into(),
    ));
    let mut d = d.launch();
    assert!(d.stop().success());
    let text = d.log_text();
    assert!(!text.contains('\u{1b}'), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "no priority prefix: {l}"
        );
        assert!(!l.as_bytes()[3..].starts_with(b"20"), "timestamp: {l}");
    }
    let ready = lines
        .iter()
        .find(|l| l.contains("ready:"))
        .expect("a ready line");
    assert!(ready.starts_with("<6> INFO "), "{ready}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("<4>") && l.contains("WARN")));

    // A fatal start error is an "err" line.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, cfg.replace(MODULE, "/nonexistent/pkcs11.so")).unwrap();
    let log = std::fs::File::create(&d.log).unwrap();
    let meta = log.metadata().unwrap();
    let out = d
        .command()
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .status()
        .unwrap();
    assert!(!out.success());
    let text = d.log_text();
    let fatal = text
        .lines()
        .find(|l| l.contains("incountry-keyd: error:"))
        .unwrap_or_else(|| panic!("no fatal line:\n{text}"));
    assert!(fatal.starts_with("<3>"), "{fatal}");
    assert!(fatal.contains("/nonexistent/pkcs11.so"), "{fatal}");
}
