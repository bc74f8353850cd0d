//! `serve`: wires config, HSM, state, keyring and API together and runs the daemon's life
//! (ready, reload on SIGHUP, drain on SIGTERM).

mod logging;

pub use logging::{init_logging, log_filter};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

use crate::api::App;
use crate::config::{Config, VerificationMode};
use crate::domain::clock::default_clock;
use crate::domain::secret::harden_process;
use crate::hsm::HsmWorker;
use crate::keyring::{Keyring, RevalidateSettings};
use crate::kms::AwsKms;
use crate::store::{self, Store};
use crate::verify::Verifier;
use crate::{api, systemd};
use logging::LogHandle;

pub fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load_for_daemon(&config_path)?;
    let log = init_logging(&config.log.level);
    harden_process();
    ensure_fd_limit(config.server.max_connections)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyd-rt")
        .build()
        .context("cannot start the async runtime")?;
    // Take the signals first: a SIGHUP or SIGTERM while the HSM opens and the keys load must
    // not kill the process with the default action. They are acted on once serving.
    let signals = {
        let _rt = runtime.enter();
        Signals::new()?
    };
    if config.verification.mode == VerificationMode::Off {
        tracing::warn!("verification.mode = \"off\": admin changes need no verification code (development only)");
    }
    systemd::status("opening the HSM");
    let (hsm, hsm_thread) = crate::hsm::open(&config)?;
    let result = match store::open_for(&config) {
        Ok(store) => runtime.block_on(run(config_path, config, log, hsm, store, signals)),
        Err(e) => Err(e),
    };
    // Dropping the runtime drops every task, and with them the last HSM handles: the worker
    // then closes its session and finalizes the module, before the process exits.
    drop(runtime);
    hsm_thread.wait(Duration::from_secs(10));
    result
}

/// Descriptors beyond the connections: listener, SQLite (database, WAL, shared memory,
/// lock), the HSM module, KMS connections, stdio, the runtime's own.
const FD_HEADROOM: u64 = 128;

/// The daemon must never run out of descriptors before it reaches `server.max_connections`:
/// raises the soft limit to the hard one, and refuses to start if that is still too low.
fn ensure_fd_limit(max_connections: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = max_connections as u64 + FD_HEADROOM;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    if hard < need {
        bail!(
            "the open-file limit is {hard}, but server.max_connections = {max_connections} needs at least {need}: raise LimitNOFILE= (the unit sets 65536) or lower server.max_connections"
        );
    }
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        let take = |kind: SignalKind| signal(kind).context("cannot install a signal handler");
        Ok(Signals {
            term: take(SignalKind::terminate())?,
            int: take(SignalKind::interrupt())?,
            hup: take(SignalKind::hangup())?,
        })
    }
}

async fn run(
    config_path: PathBuf,
    config: Config,
    log: LogHandle,
    hsm: HsmWorker,
    store: Arc<dyn Store>,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    systemd::status("loading keys");
    let clock = default_clock();
    let verifier = Verifier::new(
        config.verification.mode,
        store.clone(),
        hsm.clone(),
        clock.clone(),
    );
    let kms = Arc::new(AwsKms::new(
        config.aws.endpoint_url.clone(),
        config.aws.request_timeout,
    ));
    let keyring = Keyring::load(store, hsm, clock, kms).await?;
    let (listener, origin) = systemd::listener(&config.server.socket, config.server.socket_mode)?;
    if matches!(origin, systemd::ListenerSource::Activated(_)) {
        tracing::debug!("socket from systemd: server.socket and server.socket_mode are not used");
    }
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let leadership = keyring.leadership(config.cluster.lease);
    let app = Arc::new(App::new(keyring, config, verifier)?.with_leadership(leadership));
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
        socket = %origin,
        startup_ms = started.elapsed().as_millis() as u64,
        "ready: {summary}"
    );
    // The HSM is open, the keys are loaded and the socket is listening (connections queue
    // in the kernel until the accept loop below takes them).
    systemd::ready(&summary);
    if let Some(interval) = systemd::watchdog_interval() {
        spawn_watchdog(app.clone(), interval);
    }
    spawn_status(app.clone());
    // A shared state: other nodes' changes (returns at once on SQLite).
    let following = app.clone();
    tokio::spawn(async move {
        let a = &following;
        let reconcile = || a.config.load().cluster.reconcile_interval;
        a.keyring.follow(reconcile, a.stopping.subscribe()).await
    });
    let rotating = app.clone();
    tokio::spawn(async move {
        let a = &rotating;
        let rotator = crate::rotation::Rotator {
            keyring: &a.keyring,
            status: &a.rotator,
            metrics: &a.metrics,
            leader: &a.leadership,
        };
        crate::rotation::run(rotator, a.clock_changed.subscribe(), a.stopping.subscribe()).await
    });

    let shutdown = {
        let app = app.clone();
        async move {
            loop {
                tokio::select! {
                    _ = signals.term.recv() => break,
                    _ = signals.int.recv() => break,
                    _ = signals.hup.recv() => on_hangup(&app, &config_path, &log).await,
                }
            }
            tracing::info!("stopping: draining in-flight requests");
            systemd::stopping();
            app.stopping.send_replace(true);
        }
    };
    api::serve(app.clone(), listener, shutdown).await;
    // Exact encryption counts replace the reserved ones (see keyring::ledger).
    if let Err(e) = app.keyring.flush_encryptions().await {
        tracing::warn!(error = %e, "cannot store the exact encryption counts; the stored ones stay ahead");
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: RELOADING=1, reload off the runtime (resolving names may block on NSS; the
/// accept loop keeps serving meanwhile), then READY=1 with a status that says whether the
/// reload took.
async fn on_hangup(app: &Arc<App>, path: &Path, log: &LogHandle) {
    systemd::reloading();
    let (a, p, l) = (app.clone(), path.to_path_buf(), log.clone());
    let outcome = tokio::task::spawn_blocking(move || reload(&a, &p, &l))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("reload task failed: {e}")));
    let status = match outcome {
        Ok(()) => status_line(app),
        Err(e) => {
            tracing::error!("reload refused, keeping the running configuration: {e:#}");
            format!(
                "{}; last reload failed, running configuration kept",
                status_line(app)
            )
        }
    };
    systemd::ready(&status);
}

/// WATCHDOG=1 at half the interval, sent from a task on the async runtime and only while the
/// HSM worker thread takes jobs: a wedged runtime, a hung PKCS#11 call or a dead worker stops
/// the pings, and systemd restarts the daemon. An HSM that answers with errors is degraded,
/// not hung: the worker reconnects by itself, which a restart would not do better.
fn spawn_watchdog(app: Arc<App>, interval: Duration) {
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::debug!(
        interval_ms = interval.as_millis() as u64,
        "watchdog enabled"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let alive = app.keyring.hsm_alive();
            if tokio::time::timeout(period / 2, alive).await == Ok(true) {
                systemd::watchdog();
            } else {
                tracing::warn!(
                    "HSM worker did not answer within {} ms: withholding the watchdog ping",
                    (period / 2).as_millis()
                );
            }
        }
    });
}

/// Keeps STATUS= current when keys change (create, rotate, settings).
fn spawn_status(app: Arc<App>) {
    let mut changes = app.keyring.subscribe();
    tokio::spawn(async move {
        let mut last = status_line(&app);
        while changes.changed().await.is_ok() {
            let now = status_line(&app);
            if now != last {
                systemd::status(&now);
                last = now;
            }
        }
    });
}

/// The revalidation loop of customer-supplied keys: checks what is due, sleeps until the
/// next check is due (or the daemon stops). Reads `[aws]` timing at every pass, so a reload
/// applies it.
async fn revalidate(app: Arc<App>, first_pass: tokio::sync::oneshot::Sender<()>) {
    let mut first_pass = Some(first_pass);
    let mut stopping = app.stopping.subscribe();
    let mut clock = app.clock_changed.subscribe();
    let wake = app.keyring.aws_wake();
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
            _ = clock.changed() => {}
            // A refusal recorded in the state was cleared: check again now.
            _ = wake.notified() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

fn status_line(app: &App) -> String {
    let snap = app.keyring.snapshot();
    let bad = snap.unavailable().count();
    let mut s = format!(
        "{} keys, {} versions loaded",
        snap.keys.len(),
        snap.version_count()
    );
    if bad > 0 {
        s.push_str(&format!("; degraded: {bad} versions unavailable"));
    }
    if app.verifier.mode() == VerificationMode::Off {
        s.push_str("; verification off");
    }
    s
}

/// SIGHUP: re-read the config; apply access lists (for new connections), limits and log
/// level. An error leaves the running config in place. Settings that need a restart (socket,
/// HSM, state) are reported, not applied.
fn reload(app: &App, path: &Path, log: &LogHandle) -> anyhow::Result<()> {
    let new = Config::load(path)?;
    let access = new.access_policy()?;
    let filter = log_filter(&new.log.level)?;
    let old = app.config.load();
    if new.server.socket != old.server.socket
        || new.server.socket_mode != old.server.socket_mode
        || new.hsm.module != old.hsm.module
        || new.hsm.token_label != old.hsm.token_label
        || new.hsm.pin_file != old.hsm.pin_file
        || new.state.dir != old.state.dir
        || new.state.backend != old.state.backend
        || new.postgres != old.postgres
        || new.cluster != old.cluster
        || new.verification.mode != old.verification.mode
        || new.aws.endpoint_url != old.aws.endpoint_url
        || new.aws.request_timeout != old.aws.request_timeout
    {
        tracing::warn!("reload: server.socket, server.socket_mode, hsm.*, state.dir, state.backend, postgres.*, cluster.*, verification.mode, aws.endpoint_url and aws.request_timeout take effect only after a restart");
    }
    if let Err(e) = log.modify(|f| *f = filter) {
        tracing::warn!(error = %e, "reload: cannot change the log level");
    }
    app.access.store(Arc::new(access));
    app.config.store(Arc::new(new));
    app.access_changed.send_modify(|n| *n += 1);
    tracing::info!(
        readers = app.config.load().access.readers.len(),
        admins = app.config.load().access.admins.len(),
        "configuration reloaded"
    );
    Ok(())
}
