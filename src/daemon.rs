//! `serve`: wires config, HSM, state, keyring and API together and runs the daemon's life
//! (ready, reload on SIGHUP, drain on SIGTERM).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use cryptoki::types::AuthPin;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::{reload, EnvFilter};
use zeroize::Zeroizing;

use crate::clock::default_clock;
use crate::config::{AccessPolicy, Config, VerificationMode};
use crate::hsm::{Hsm, HsmWorker, Pkcs11Hsm};
use crate::keyring::{harden_process, Keyring, RevalidateSettings};
use crate::kms::AwsKms;
use crate::store::Store;
use crate::verify::Verifier;
use crate::{api, systemd};

/// What every request handler shares.
pub struct App {
    pub keyring: Keyring,
    pub config: ArcSwap<Config>,
    pub access: ArcSwap<AccessPolicy>,
    pub verifier: Verifier,
    /// Flips to true when shutdown starts, ending long polls.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl App {
    /// The test clock moved: wake whatever waits on time.
    pub fn on_clock_change(&self) {}
}

type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

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
pub fn log_filter(level: &str) -> EnvFilter {
    let mut directives = level.to_string();
    for krate in NOISY_CRATES {
        if !level.contains(krate) {
            directives.push_str(&format!(",{krate}=info"));
        }
    }
    EnvFilter::try_new(&directives)
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr, one line per event, with colours only on a terminal (journald shows
/// levels from the priority, and fields stay as key=value).
pub fn init_logging(level: &str) -> LogHandle {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let (filter, handle) = reload::Layer::new(log_filter(level));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    tracing_subscriber::registry().with(filter).with(fmt).init();
    handle
}

/// Reads the HSM user PIN from its file; refuses a file others can read.
pub fn read_pin(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read HSM PIN file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        bail!(
            "HSM PIN file {} is accessible to others (mode {mode:04o}); chmod 0600 it",
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read HSM PIN file {}", path.display()))?,
    );
    let pin = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if pin.is_empty() {
        bail!("HSM PIN file {} is empty", path.display());
    }
    Ok(pin)
}

/// Opens the HSM on its worker thread.
pub fn open_hsm(config: &Config) -> anyhow::Result<HsmWorker> {
    let pin = read_pin(&config.hsm.pin_path()?)?;
    let module = config.hsm.module.clone();
    let label = config.hsm.token_label.clone();
    let worker = HsmWorker::start(move || {
        let pin = AuthPin::from(pin.as_str());
        Pkcs11Hsm::open(&module, &label, pin).map(|h| Box::new(h) as Box<dyn Hsm>)
    })?;
    Ok(worker)
}

pub fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let log = init_logging(&config.log.level);
    harden_process();
    let verifier = Verifier::new(config.verification.mode)?;
    if config.verification.mode == VerificationMode::Off {
        tracing::warn!("verification.mode = \"off\": admin changes need no verification code (development only)");
    }
    let hsm = open_hsm(&config)?;
    let store = Arc::new(Store::open(&config.state.dir)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyd-rt")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config_path, config, log, verifier, hsm, store))
}

async fn run(
    config_path: PathBuf,
    config: Config,
    log: LogHandle,
    verifier: Verifier,
    hsm: HsmWorker,
    store: Arc<Store>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let kms = Arc::new(AwsKms::new(
        config.aws.endpoint_url.clone(),
        config.aws.request_timeout,
    ));
    let keyring = Keyring::load(store, hsm, default_clock(), kms).await?;
    let (listener, activated) =
        systemd::listener(&config.server.socket, config.server.socket_mode)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let access = config.access_policy()?;
    let app = Arc::new(App {
        keyring,
        access: ArcSwap::from_pointee(access),
        config: ArcSwap::from_pointee(config),
        verifier,
        stopping: tokio::sync::watch::channel(false).0,
    });
    // Customer-supplied keys: checked with KMS now (bounded, so an unreachable KMS does not
    // hold up the keys that need no KMS), then on a schedule.
    let (first_pass_tx, first_pass) = tokio::sync::oneshot::channel();
    tokio::spawn(revalidate(app.clone(), first_pass_tx));
    let first_pass_limit = app.config.load().aws.request_timeout + Duration::from_secs(2);
    if tokio::time::timeout(first_pass_limit, first_pass)
        .await
        .is_err()
    {
        tracing::warn!("KMS checks of customer-supplied keys still running; ready without them");
    }
    let summary = status_line(&app);
    tracing::info!(
        socket = %app.config.load().server.socket.display(),
        socket_activated = activated,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready: {summary}"
    );
    systemd::ready(&summary);
    systemd::spawn_watchdog();

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let shutdown = {
        let app = app.clone();
        async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => reload(&app, &config_path, &log),
                }
            }
            tracing::info!("stopping: draining in-flight requests");
            systemd::stopping();
            app.stopping.send_replace(true);
        }
    };
    api::serve(app, listener, shutdown).await;
    tracing::info!("stopped");
    Ok(())
}

/// The revalidation loop of customer-supplied keys: checks what is due, sleeps until the
/// next check is due (or the daemon stops). Reads `[aws]` timing at every pass, so a reload
/// applies it.
async fn revalidate(app: Arc<App>, first_pass: tokio::sync::oneshot::Sender<()>) {
    let mut first_pass = Some(first_pass);
    let mut stopping = app.stopping.subscribe();
    loop {
        let settings = {
            let aws = &app.config.load().aws;
            RevalidateSettings {
                interval: aws.revalidate_interval,
                max_stale: aws.max_stale,
            }
        };
        let next = app.keyring.revalidate_due(settings).await;
        if let Some(tx) = first_pass.take() {
            let _ = tx.send(());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

fn status_line(app: &App) -> String {
    let snap = app.keyring.snapshot();
    let versions: usize = snap.keys.values().map(|k| k.versions.len()).sum();
    let bad = snap
        .keys
        .values()
        .flat_map(|k| k.versions.iter())
        .filter(|v| v.key().is_none())
        .count();
    let mut s = format!("{} keys, {versions} versions loaded", snap.keys.len());
    if bad > 0 {
        s.push_str(&format!("; degraded: {bad} versions unavailable"));
    }
    if app.verifier.mode() == "off" {
        s.push_str("; verification off");
    }
    s
}

/// SIGHUP: re-read the config; apply access lists, limits and log level. A bad config is
/// logged and the running one stays. Settings that need a restart (socket, HSM, state) are
/// reported, not applied.
fn reload(app: &App, path: &Path, log: &LogHandle) {
    systemd::reloading();
    match Config::load(path).and_then(|c| c.access_policy().map(|a| (c, a))) {
        Ok((new, access)) => {
            let old = app.config.load();
            if new.server.socket != old.server.socket
                || new.hsm.module != old.hsm.module
                || new.hsm.token_label != old.hsm.token_label
                || new.state.dir != old.state.dir
                || new.verification.mode != old.verification.mode
                || new.aws.endpoint_url != old.aws.endpoint_url
                || new.aws.request_timeout != old.aws.request_timeout
            {
                tracing::warn!("reload: server.socket, hsm.*, state.dir, verification.mode, aws.endpoint_url and aws.request_timeout take effect only after a restart");
            }
            if let Err(e) = log.modify(|f| *f = log_filter(&new.log.level)) {
                tracing::warn!(error = %e, "reload: cannot change log level");
            }
            app.access.store(Arc::new(access));
            app.config.store(Arc::new(new));
            tracing::info!("configuration reloaded");
        }
        Err(e) => tracing::error!("reload refused, keeping the running configuration: {e:#}"),
    }
    systemd::ready(&status_line(app));
}
