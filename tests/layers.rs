//! The layer rule of `src/lib.rs`: a module imports only from its own layer or below.
//! Reads every source file and fails on each `crate::<module>` that names a higher layer
//! (grouped imports `crate::{a, b}` included). Unit tests (`tests.rs`, `#[cfg(test)] mod`)
//! may reach anywhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use incountry_keyd::LAYERS;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/api/admin.rs` → `api`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    Some(name)
}

/// The source without unit tests, which may use anything.
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Every module named after `crate::` in `text`, with its line.
fn uses(text: &str) -> Vec<(usize, String)> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        if text[line_start..at].contains("//") {
            continue;
        }
        let line = text[..at].matches('\n').count() + 1;
        let rest = &text[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            // `crate::{a, b::c}`, possibly over several lines.
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                found.extend(
                    group
                        .split(',')
                        .map(ident)
                        .filter(|n| !n.is_empty())
                        .map(|n| (line, n)),
                );
            }
            None => found.push((line, ident(rest))),
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let layer: HashMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let Some(me) = module_of(&src, file) else {
            continue;
        };
        if me == "lib" || me == "main" {
            continue;
        }
        if file.file_name().is_some_and(|n| n == "tests.rs")
            || file.components().any(|c| c.as_os_str() == "tests")
        {
            continue;
        }
        let Some(&mine) = layer.get(me.as_str()) else {
            unlisted.push(me);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, other) in uses(without_tests(&text)) {
            if let Some(&theirs) = layer.get(other.as_str()) {
                if theirs > mine {
                    upward.push(format!(
                        "{}:{line}: {me} (layer {mine}) uses {other} (layer {theirs})",
                        file.strip_prefix(root).unwrap().display()
                    ));
                }
            }
        }
    }
    unlisted.sort();
    unlisted.dedup();
    assert!(
        unlisted.is_empty(),
        "modules missing from LAYERS in src/lib.rs: {unlisted:?}"
    );
    assert!(
        upward.is_empty(),
        "imports that go up a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_plain_imports() {
    let text = "use crate::{api::App,\n    store};\nlet x = crate::cli::main();\n";
    let names: Vec<String> = uses(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["api", "store", "cli"]);
}
