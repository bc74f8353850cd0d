//! The Python tools the tests drive: the InCountry SDK (tests/sdk) and moto (tests/aws),
//! each in a venv tests/run.sh makes.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::repo;

/// A venv's Python: `$var` when set, else `default` under the package's directory.
fn venv_python(var: &str, default: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(default));
    assert!(
        p.exists(),
        "{} missing: run tests through tests/run.sh, which makes the {what} venv",
        p.display()
    );
    p
}

/// The Python with the InCountry SDK.
pub fn sdk_python() -> PathBuf {
    venv_python("KEYD_TEST_PYTHON", ".venv/bin/python", "SDK")
}

/// The Python with moto's server and boto3 (a venv of its own: moto needs pydantic 2, the
/// SDK pydantic 1).
pub fn moto_python() -> PathBuf {
    venv_python("KEYD_TEST_MOTO_PYTHON", ".venv-moto/bin/python", "moto")
}

/// Runs tests/sdk/sdk_tool.py with a secrets document.
pub fn sdk(doc: &Value, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("doc.json");
    std::fs::write(&doc_file, doc.to_string()).unwrap();
    let out = Command::new(sdk_python())
        .arg(repo().join("tests/sdk/sdk_tool.py"))
        .arg(args[0])
        .arg(&doc_file)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
