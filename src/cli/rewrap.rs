//! `incountry-keyd rewrap`: moves a JSONL file of InCountry SDK records to the active key
//! version through the daemon's batch rewrap API.
//!
//! Each line is a record of the SDK's shape: `body` (and, when present, `precommit_body`) is
//! a record string, `version` the key version beside it; every other field, and the order of
//! fields, is passed through unchanged. Records already at the active version, blank lines
//! and records that fail are written back exactly as read, so a re-run on the output changes
//! nothing. The output is written to a temporary file in the output's directory and renamed
//! over it at the end: it is the old file or the whole new one, never half of one.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::cli::client::Client;

/// Records whose request grows past this many bytes go in the next request (the daemon's
/// default `server.max_body` is 1 MiB; a 413 splits the request anyway).
const REQUEST_BYTES: usize = 512 * 1024;
/// Lines held in memory at most before they are written out.
const MAX_PENDING_LINES: usize = 20_000;
/// Failed line numbers kept per reason for the summary.
const LINES_PER_REASON: usize = 10;

pub struct Options {
    pub env: String,
    pub country: String,
    pub input: PathBuf,
    pub output: PathBuf,
    /// Items (record strings) per request, at most 1,000.
    pub batch_size: usize,
}

#[derive(Serialize, Default)]
pub struct Failure {
    pub reason: String,
    pub count: u64,
    /// The first few line numbers (1-based).
    pub lines: Vec<u64>,
}

#[derive(Serialize, Default)]
pub struct Summary {
    pub active_version: u32,
    pub records: u64,
    pub rewrapped: u64,
    pub already_current: u64,
    pub failed: u64,
    pub failures: Vec<Failure>,
    pub requests: u64,
    pub seconds: f64,
    pub records_per_second: f64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rewrapped {}, already current {}, failed {} (active version {}; {} records in {:.2} s, {:.0} records/s)",
            self.rewrapped,
            self.already_current,
            self.failed,
            self.active_version,
            self.records,
            self.seconds,
            self.records_per_second
        )?;
        for fail in &self.failures {
            let lines: Vec<String> = fail.lines.iter().map(u64::to_string).collect();
            let more = if fail.count > fail.lines.len() as u64 {
                ", …"
            } else {
                ""
            };
            writeln!(
                f,
                "  failed {}: {} (lines {}{more})",
                fail.count,
                fail.reason,
                lines.join(", ")
            )?;
        }
        Ok(())
    }
}

/// A JSON object's fields in file order, each value as its exact text.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push((k, v));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl Fields {
    fn get(&self, name: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }
}

/// What is to be done with one line.
enum Plan {
    /// Written back as read: blank, already current, or failed before asking the daemon.
    Keep,
    Fail(String),
    /// Sent to the daemon: the record's fields and the record strings to rewrap
    /// (`body`, then `precommit_body` when it is a string).
    Rewrap {
        fields: Fields,
        items: Vec<(&'static str, String)>,
    },
}

struct Line {
    number: u64,
    text: String,
    /// "\n", "\r\n" or "" (last line without one).
    end: &'static str,
    plan: Plan,
}

/// Decides what to do with a line, without the daemon.
fn plan(text: &str, active: u32) -> Plan {
    if text.trim().is_empty() {
        return Plan::Keep;
    }
    let fields: Fields = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(_) => return Plan::Fail("not a JSON object".into()),
    };
    let version = match fields
        .get("version")
        .map(|v| serde_json::from_str::<u32>(v.get()))
    {
        Some(Ok(v)) => v,
        Some(Err(_)) => return Plan::Fail("\"version\" is not a non-negative integer".into()),
        None => return Plan::Fail("no \"version\" field".into()),
    };
    let mut items = Vec::new();
    for name in ["body", "precommit_body"] {
        match fields
            .get(name)
            .map(|v| serde_json::from_str::<Option<String>>(v.get()))
        {
            Some(Ok(Some(s))) => items.push((name, s)),
            Some(Ok(None)) | None if name == "precommit_body" => {}
            None => return Plan::Fail("no \"body\" field".into()),
            _ => return Plan::Fail(format!("\"{name}\" is not a string")),
        }
    }
    let current = version == active && items.iter().all(|(_, s)| s.starts_with("2:"));
    if current {
        Plan::Keep
    } else {
        Plan::Rewrap { fields, items }
    }
}

struct Run<'a> {
    client: &'a Client,
    path: String,
    active: u32,
    batch_size: usize,
    summary: Summary,
    reasons: BTreeMap<String, Failure>,
    progress: Option<Progress>,
    started: Instant,
}

struct Progress {
    total: u64,
    last: Instant,
}

impl Run<'_> {
    fn fail(&mut self, line: u64, reason: String) {
        self.summary.failed += 1;
        let f = self
            .reasons
            .entry(reason.clone())
            .or_insert_with(|| Failure {
                reason,
                ..Failure::default()
            });
        f.count += 1;
        if f.lines.len() < LINES_PER_REASON {
            f.lines.push(line);
        }
    }

    /// Rewraps what `lines` needs, then writes every line out in order.
    async fn flush(&mut self, lines: &mut Vec<Line>, out: &mut impl Write) -> anyhow::Result<()> {
        let todo: Vec<usize> = (0..lines.len())
            .filter(|&i| matches!(lines[i].plan, Plan::Rewrap { .. }))
            .collect();
        // Requests of whole records, within the item and byte budgets.
        let mut start = 0;
        while start < todo.len() {
            let (mut items, mut bytes, mut end) = (0, 0, start);
            while end < todo.len() {
                let Plan::Rewrap { items: its, .. } = &lines[todo[end]].plan else {
                    unreachable!("only rewraps are listed")
                };
                let size: usize = its.iter().map(|(_, s)| s.len() + 32).sum();
                if end > start
                    && (items + its.len() > self.batch_size || bytes + size > REQUEST_BYTES)
                {
                    break;
                }
                items += its.len();
                bytes += size;
                end += 1;
            }
            self.rewrap(lines, &todo[start..end]).await?;
            start = end;
        }
        for line in lines.drain(..) {
            match line.plan {
                Plan::Keep => {
                    if !line.text.trim().is_empty() {
                        self.summary.records += 1;
                        self.summary.already_current += 1;
                    }
                    out.write_all(line.text.as_bytes())?;
                }
                Plan::Fail(reason) => {
                    self.summary.records += 1;
                    self.fail(line.number, reason);
                    out.write_all(line.text.as_bytes())?;
                }
                Plan::Rewrap { fields, .. } => {
                    // Rewritten in place by `rewrap`: fields hold the new values.
                    self.summary.records += 1;
                    self.summary.rewrapped += 1;
                    out.write_all(render(&fields).as_bytes())?;
                }
            }
            out.write_all(line.end.as_bytes())?;
        }
        self.show_progress(false);
        Ok(())
    }

    /// One request for the records at `idx` (splitting it when the daemon finds it too
    /// large); each record's plan becomes its rewritten fields or a failure.
    async fn rewrap(&mut self, lines: &mut [Line], idx: &[usize]) -> anyhow::Result<()> {
        let mut batch = Vec::new();
        for &i in idx {
            let Plan::Rewrap { fields, items } = &lines[i].plan else {
                unreachable!("only rewraps are listed")
            };
            let version: Value = fields
                .get("version")
                .and_then(|v| serde_json::from_str(v.get()).ok())
                .unwrap_or(Value::Null);
            for (_, s) in items {
                batch.push(json!({"ciphertext": s, "version": version}));
            }
        }
        let body = json!({ "batch": batch }).to_string().into_bytes();
        drop(batch);
        let reply = self
            .client
            .request(Method::POST, &self.path, &[], Some(body))
            .await?;
        self.summary.requests += 1;
        if reply.status == StatusCode::PAYLOAD_TOO_LARGE {
            if idx.len() > 1 {
                let (a, b) = idx.split_at(idx.len() / 2);
                Box::pin(self.rewrap(lines, a)).await?;
                return Box::pin(self.rewrap(lines, b)).await;
            }
            lines[idx[0]].plan = Plan::Fail(format!(
                "record too large for one request ({})",
                reply.error_line()
            ));
            return Ok(());
        }
        if reply.status != StatusCode::OK {
            bail!("rewrap request failed: {}", reply.error_line());
        }
        let doc = reply.json()?;
        let Some(results) = doc["results"].as_array() else {
            bail!("the daemon's rewrap answer has no results");
        };
        let mut results = results.iter();
        for &i in idx {
            let Plan::Rewrap { fields, items } = &mut lines[i].plan else {
                unreachable!("only rewraps are listed")
            };
            let mut new = Vec::with_capacity(items.len());
            let mut failure = None;
            for (name, _) in items.iter() {
                let Some(r) = results.next() else {
                    bail!("the daemon's rewrap answer has too few results");
                };
                match (r["ciphertext"].as_str(), r["version"].as_u64()) {
                    (Some(ct), Some(v)) => new.push((*name, ct.to_string(), v)),
                    _ => {
                        failure.get_or_insert_with(|| {
                            format!(
                                "{name}: {} ({})",
                                r["error"]["code"].as_str().unwrap_or("bad_answer"),
                                r["error"]["message"].as_str().unwrap_or("no ciphertext")
                            )
                        });
                    }
                }
            }
            if let Some(reason) = failure {
                lines[i].plan = Plan::Fail(reason);
                continue;
            }
            for (name, ct, version) in new {
                set(fields, name, &Value::String(ct))?;
                set(fields, "version", &json!(version))?;
            }
        }
        if results.next().is_some() {
            bail!("the daemon's rewrap answer has too many results");
        }
        Ok(())
    }

    fn show_progress(&mut self, last: bool) {
        let Some(p) = &mut self.progress else { return };
        if !last && p.last.elapsed().as_millis() < 100 {
            return;
        }
        p.last = Instant::now();
        let s = &self.summary;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = if p.total > 0 {
            s.records as f64 * 100.0 / p.total as f64
        } else {
            100.0
        };
        let width = 30usize;
        let filled = ((pct / 100.0) * width as f64)
            .round()
            .clamp(0.0, width as f64) as usize;
        eprint!(
            "\r[{}{}] {}/{} records  rewrapped {}  current {}  failed {}  {:.0}/s \x1b[K",
            "#".repeat(filled),
            "-".repeat(width - filled),
            s.records,
            p.total,
            s.rewrapped,
            s.already_current,
            s.failed,
            s.records as f64 / secs
        );
        if last {
            eprintln!();
        }
    }
}

fn set(fields: &mut Fields, name: &str, value: &Value) -> anyhow::Result<()> {
    let raw = RawValue::from_string(value.to_string())?;
    match fields.0.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = raw,
        None => fields.0.push((name.to_string(), raw)),
    }
    Ok(())
}

fn render(fields: &Fields) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.0.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&Value::String(k.clone()).to_string());
        s.push(':');
        s.push_str(v.get());
    }
    s.push('}');
    s
}

/// A temporary file beside `output`, removed unless it is renamed over `output`.
struct TempOut {
    path: PathBuf,
    done: bool,
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn count_lines(path: &Path) -> anyhow::Result<u64> {
    let mut r = BufReader::new(File::open(path)?);
    let (mut n, mut last) = (0u64, b'\n');
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[buf.len() - 1];
        let len = buf.len();
        r.consume(len);
    }
    Ok(n + u64::from(last != b'\n'))
}

pub async fn run(client: &Client, opts: Options) -> anyhow::Result<Summary> {
    if !(1..=1000).contains(&opts.batch_size) {
        bail!("--batch-size must be 1 to 1000");
    }
    let key_path = format!("/v1/keys/{}/{}", opts.env, opts.country);
    let reply = client.request(Method::GET, &key_path, &[], None).await?;
    if reply.status != StatusCode::OK {
        bail!("{}", reply.error_line());
    }
    let Some(active) = reply.json()?["active_version"]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
    else {
        bail!("{}/{} has no active version", opts.env, opts.country);
    };

    let input =
        File::open(&opts.input).with_context(|| format!("cannot open {}", opts.input.display()))?;
    let mode = input.metadata()?.permissions().mode() & 0o777;
    let dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = opts
        .output
        .file_name()
        .with_context(|| format!("{} is not a file name", opts.output.display()))?;
    let mut tmp = TempOut {
        path: dir.join(format!(
            ".{}.rewrap-{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        )),
        done: false,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp.path)
        .with_context(|| format!("cannot create {}", tmp.path.display()))?;
    let mut out = BufWriter::new(file);

    let progress = if std::io::stderr().is_terminal() {
        Some(Progress {
            total: count_lines(&opts.input)?,
            last: Instant::now(),
        })
    } else {
        None
    };
    let mut run = Run {
        client,
        path: format!("{key_path}/rewrap"),
        active,
        batch_size: opts.batch_size,
        summary: Summary {
            active_version: active,
            ..Summary::default()
        },
        reasons: BTreeMap::new(),
        progress,
        started: Instant::now(),
    };

    let mut reader = BufReader::new(input);
    let mut pending: Vec<Line> = Vec::new();
    let mut pending_items = 0usize;
    let mut number = 0u64;
    let mut buf = String::new();
    loop {
        buf.clear();
        if reader
            .read_line(&mut buf)
            .with_context(|| format!("cannot read {} (is it UTF-8?)", opts.input.display()))?
            == 0
        {
            break;
        }
        number += 1;
        let (text, end) = if let Some(t) = buf.strip_suffix("\r\n") {
            (t, "\r\n")
        } else if let Some(t) = buf.strip_suffix('\n') {
            (t, "\n")
        } else {
            (buf.as_str(), "")
        };
        let plan = plan(text, run.active);
        if let Plan::Rewrap { items, .. } = &plan {
            pending_items += items.len();
        }
        pending.push(Line {
            number,
            text: text.to_string(),
            end,
            plan,
        });
        // Enough for several full requests, or too many lines held.
        if pending_items >= 4 * run.batch_size || pending.len() >= MAX_PENDING_LINES {
            run.flush(&mut pending, &mut out).await?;
            pending_items = 0;
        }
    }
    run.flush(&mut pending, &mut out).await?;
    run.show_progress(true);

    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp.path, &opts.output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            tmp.path.display(),
            opts.output.display()
        )
    })?;
    tmp.done = true;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }

    let mut summary = run.summary;
    summary.failures = run.reasons.into_values().collect();
    summary.failures.sort_by_key(|f| std::cmp::Reverse(f.count));
    summary.seconds = run.started.elapsed().as_secs_f64();
    summary.records_per_second = summary.records as f64 / summary.seconds.max(1e-6);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_lines() {
        assert!(matches!(plan("   ", 3), Plan::Keep));
        assert!(matches!(
            plan(r#"{"body":"2:x","version":3}"#, 3),
            Plan::Keep
        ));
        assert!(matches!(
            plan(r#"{"body":"2:x","version":2}"#, 3),
            Plan::Rewrap { .. }
        ));
        // An unencrypted record at the active version still gets encrypted.
        assert!(matches!(
            plan(r#"{"body":"pt:eA==","version":3}"#, 3),
            Plan::Rewrap { .. }
        ));
        match plan(r#"{"body":"2:x","precommit_body":"2:y","version":1}"#, 3) {
            Plan::Rewrap { items, .. } => assert_eq!(items.len(), 2),
            _ => panic!("expected a rewrap"),
        }
        match plan(r#"{"body":"2:x","precommit_body":null,"version":1}"#, 3) {
            Plan::Rewrap { items, .. } => assert_eq!(items.len(), 1),
            _ => panic!("expected a rewrap"),
        }
        for (bad, why) in [
            ("nope", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"body":"2:x"}"#, "no \"version\" field"),
            (
                r#"{"body":"2:x","version":-1}"#,
                "not a non-negative integer",
            ),
            (r#"{"version":1}"#, "no \"body\" field"),
            (r#"{"body":5,"version":1}"#, "\"body\" is not a string"),
        ] {
            match plan(bad, 3) {
                Plan::Fail(reason) => assert!(reason.contains(why), "{bad}: {reason}"),
                _ => panic!("{bad} should fail"),
            }
        }
    }

    #[test]
    fn renders_fields_in_order_with_exact_values() {
        let text =
            r#"{"record_key":"k1","body":"2:old","n":1.50,"nested":{"b":1,"a":[1,2]},"version":1}"#;
        let mut f: Fields = serde_json::from_str(text).unwrap();
        assert_eq!(render(&f), text);
        set(&mut f, "body", &Value::String("2:new".into())).unwrap();
        set(&mut f, "version", &json!(4)).unwrap();
        assert_eq!(
            render(&f),
            r#"{"record_key":"k1","body":"2:new","n":1.50,"nested":{"b":1,"a":[1,2]},"version":4}"#
        );
    }
}
