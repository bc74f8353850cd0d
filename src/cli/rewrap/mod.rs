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
use std::io::{BufRead, BufReader, BufWriter, IsTerminal};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use serde::Serialize;

use crate::cli::client::Client;
use crate::proto::{KeyDocument, MAX_BATCH};

mod batch;
mod plan;

use batch::{Progress, Run};
use plan::{plan, Line, Plan};

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
    if !(1..=MAX_BATCH).contains(&opts.batch_size) {
        bail!("--batch-size must be 1 to {MAX_BATCH}");
    }
    let key_path = format!("/v1/keys/{}/{}", opts.env, opts.country);
    let reply = client.request(Method::GET, &key_path, &[], None).await?;
    if reply.status != StatusCode::OK {
        bail!("{}", reply.error_line());
    }
    let key: KeyDocument = reply.read()?;
    let Some(active) = key.active_version else {
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
