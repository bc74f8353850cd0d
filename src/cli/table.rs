//! Tables for people: `keys show` as the portal shows it, and `keys list`.

use crate::proto::{KeyDocument, KeyList};

/// An optional number as a cell: empty when absent.
fn cell<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
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

pub(super) fn print_key(key: &KeyDocument) {
    println!(
        "{}/{}  rotation period: {} months",
        key.environment,
        key.country,
        cell(key.rotation_period_months)
    );
    if let Some(problem) = &key.problem {
        println!("PROBLEM: {problem}");
    }
    let rows: Vec<Vec<String>> = key
        .versions
        .iter()
        .rev()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.kind.as_str().to_string(),
                cell(v.rotation_period_months),
                v.created.clone(),
                v.status.to_string(),
            ]
        })
        .collect();
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

pub(super) fn print_key_list(list: &KeyList) {
    let rows: Vec<Vec<String>> = list
        .keys
        .iter()
        .map(|k| {
            vec![
                k.environment.clone(),
                k.country.clone(),
                cell(k.active_version),
                k.versions.to_string(),
                cell(k.rotation_period_months),
            ]
        })
        .collect();
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
