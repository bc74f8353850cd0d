//! The requests of a run: records gathered into batch rewraps within the item and byte
//! budgets (split in two when the daemon finds one too large), and every line written out
//! in order.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use anyhow::bail;
use hyper::{Method, StatusCode};

use super::plan::{render, set, Line, Plan};
use super::{Failure, Summary, LINES_PER_REASON, REQUEST_BYTES};
use crate::cli::client::Client;
use crate::proto::{BatchAnswer, BatchRequest, CipherRequest, ItemResult, Rewrapped};

/// One run over a file: the daemon, what was done so far, and the progress line.
pub(super) struct Run<'a> {
    pub(super) client: &'a Client,
    /// The key's rewrap route.
    pub(super) path: String,
    pub(super) active: u32,
    pub(super) batch_size: usize,
    pub(super) summary: Summary,
    pub(super) reasons: BTreeMap<String, Failure>,
    pub(super) progress: Option<Progress>,
    pub(super) started: Instant,
}

/// The progress line on a terminal.
pub(super) struct Progress {
    pub(super) total: u64,
    pub(super) last: Instant,
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
    pub(super) async fn flush(
        &mut self,
        lines: &mut Vec<Line>,
        out: &mut impl Write,
    ) -> anyhow::Result<()> {
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
                    out.write_all(render(&fields)?.as_bytes())?;
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
            // A number (`plan` read it as one) beside each record string.
            let version = fields
                .get("version")
                .and_then(|v| serde_json::from_str::<u32>(v.get()).ok());
            for (_, s) in items {
                batch.push(CipherRequest {
                    ciphertext: s.clone(),
                    version,
                });
            }
        }
        let body = serde_json::to_vec(&BatchRequest { batch })?;
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
        let answer: BatchAnswer<Rewrapped> = reply.read()?;
        let results = answer.results;
        let mut results = results.into_iter();
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
                match r {
                    ItemResult::Done(done) => new.push((*name, done.ciphertext, done.version)),
                    ItemResult::Failed(e) => {
                        failure.get_or_insert_with(|| {
                            format!("{name}: {} ({})", e.error.code, e.error.message)
                        });
                    }
                }
            }
            if let Some(reason) = failure {
                lines[i].plan = Plan::Fail(reason);
                continue;
            }
            for (name, ct, version) in new {
                set(fields, name, serde_json::to_string(&ct)?)?;
                set(fields, "version", version.to_string())?;
            }
        }
        if results.next().is_some() {
            bail!("the daemon's rewrap answer has too many results");
        }
        Ok(())
    }

    pub(super) fn show_progress(&mut self, last: bool) {
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
