//! Tables for people: `keys show` as the portal shows it, and `keys list`.

use serde_json::Value;

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub(super) fn print_key(doc: &Value) {
    println!(
        "{}/{}  rotation period: {} months",
        text(&doc["environment"]),
        text(&doc["country"]),
        text(&doc["rotation_period_months"])
    );
    if let Some(problem) = doc["problem"].as_str() {
        println!("PROBLEM: {problem}");
    }
    let rows: Vec<Vec<String>> = doc["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .rev()
                .map(|v| {
                    vec![
                        text(&v["version"]),
                        text(&v["type"]),
                        text(&v["rotation_period_months"]),
                        text(&v["created"]),
                        text(&v["status"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(
        &[
            "VERSION",
            "TYPE",
            "ROTATION PERIOD (MONTHS)",
            "CREATED",
            "STATUS",
        ],
        &rows,
    );
}

pub(super) fn print_key_list(doc: &Value) {
    let rows: Vec<Vec<String>> = doc["keys"]
        .as_array()
        .map(|ks| {
            ks.iter()
                .map(|k| {
                    vec![
                        text(&k["environment"]),
                        text(&k["country"]),
                        text(&k["active_version"]),
                        text(&k["versions"]),
                        text(&k["rotation_period_months"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(
        &[
            "ENVIRONMENT",
            "COUNTRY",
            "ACTIVE",
            "VERSIONS",
            "ROTATION PERIOD (MONTHS)",
        ],
        &rows,
    );
}
