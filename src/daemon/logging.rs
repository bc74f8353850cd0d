//! Logging: the `log.level` filter (noisy crates capped at info) and the stderr format.

use anyhow::Context;
use tracing_subscriber::{reload, EnvFilter};

use crate::systemd;

pub(super) type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Crates whose debug and trace output is wire-level detail (signing, connections, HTTP
/// bodies). Capped at info unless the configured filter names them explicitly.
const NOISY_CRATES: &[&str] = &[
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_smithy_http",
    "aws_sigv4",
    "aws_runtime",
    "aws_sdk_kms",
    "aws_credential_types",
    "hyper_util",
    "rustls",
];

/// The tracing filter for a configured `log.level`.
pub fn log_filter(level: &str) -> anyhow::Result<EnvFilter> {
    let directives = capped_directives(level);
    EnvFilter::try_new(&directives).with_context(|| format!("log.level `{level}`"))
}

/// `level` with an `info` cap added for each noisy crate that no directive of it names.
fn capped_directives(level: &str) -> String {
    let mut directives = level.to_string();
    for krate in NOISY_CRATES {
        if !names_crate(level, krate) {
            directives.push_str(&format!(",{krate}=info"));
        }
    }
    directives
}

/// Whether a directive of `level` targets `krate` itself or one of its modules: the target
/// (before `[` or `=`) is `krate` or starts with `krate::`. A mere substring does not count
/// (`aws_smithy_runtime_api` names not `aws_smithy_runtime`).
fn names_crate(level: &str, krate: &str) -> bool {
    level.split(',').any(|directive| {
        let target = directive.split(['[', '=']).next().unwrap_or("").trim();
        target == krate
            || target
                .strip_prefix(krate)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// Logs to stderr, one line per event with level and key=value fields, colours only on a
/// terminal. When stderr is the journal (JOURNAL_STREAM), each line starts with a `<N>`
/// syslog priority, so journald keeps the level, and the timestamp (journald has its own) is
/// left out.
pub fn init_logging(level: &str) -> LogHandle {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = log_filter(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = systemd::stderr_is_journal();
    let plain = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    let prefixed = journal.then(|| {
        let format = tracing_subscriber::fmt::format()
            .with_target(false)
            .with_ansi(false)
            .without_time();
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JournalPriority(format))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(prefixed)
        .init();
    handle
}

/// Prefixes each event with its syslog priority (`<3>` error … `<7>` debug), which journald
/// reads from a service's stderr (SyslogLevelPrefix=, on by default).
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(level: &str) -> Vec<String> {
        let directives = capped_directives(level);
        directives
            .split(',')
            .skip(level.split(',').count())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_directive_lifts_the_cap_of_its_own_crate_only() {
        // Naming aws_smithy_runtime_api leaves aws_smithy_runtime capped (and vice versa).
        let c = capped("debug,aws_smithy_runtime_api=debug");
        assert!(c.contains(&"aws_smithy_runtime=info".to_string()), "{c:?}");
        assert!(
            !c.iter().any(|d| d.starts_with("aws_smithy_runtime_api=")),
            "{c:?}"
        );
        let c = capped("aws_smithy_runtime=trace");
        assert!(
            c.contains(&"aws_smithy_runtime_api=info".to_string()),
            "{c:?}"
        );
        assert!(
            !c.iter().any(|d| d.starts_with("aws_smithy_runtime=")),
            "{c:?}"
        );
        // A module of the crate, or a span filter on it, names it; so does a bare target.
        let c = capped("aws_smithy_http::body=trace,rustls[handshake]=debug,hyper_util");
        for lifted in ["aws_smithy_http=", "rustls=", "hyper_util="] {
            assert!(!c.iter().any(|d| d.starts_with(lifted)), "{lifted}: {c:?}");
        }
        assert!(
            c.contains(&"aws_smithy_http_client=info".to_string()),
            "{c:?}"
        );
        // A crate that merely starts like another is not it.
        let c = capped("aws_sdk_kms_extra=debug,info");
        assert!(c.contains(&"aws_sdk_kms=info".to_string()), "{c:?}");
        assert_eq!(capped("info").len(), NOISY_CRATES.len());
        log_filter("debug,aws_smithy_runtime_api=debug").unwrap();
    }
}
