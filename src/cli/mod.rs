//! Command line: `serve` runs the daemon; every other command is a client of its socket
//! (or, for `check-config`, a look at files only; for `audit verify` and the offline admin
//! tools, the state and the HSM opened directly).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};
use hyper::StatusCode;
use serde::Serialize;

mod admin;
mod audit;
pub mod client;
mod data;
mod keys;
pub mod rewrap;
mod state;
mod table;

use admin::{totp_bootstrap, totp_enroll, totp_reset};
use data::{decrypt, encrypt, secrets};
use keys::keys;

use crate::cli::client::{Client, Reply};
use crate::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "incountry-keyd",
    version,
    about = "HSM-backed key daemon for InCountry Border"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "INCOUNTRY_KEYD_CONFIG")]
    config: Option<PathBuf>,
    /// The daemon's socket (default: server.socket from the config).
    #[arg(long, global = true, env = "INCOUNTRY_KEYD_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve,
    /// Validate the configuration and the PIN file without starting.
    CheckConfig,
    /// Manage keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Admin identity: verification codes.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// The state itself, offline.
    State {
        #[command(subcommand)]
        cmd: StateCmd,
    },
    /// Print a key's InCountry SDK secrets document.
    Secrets {
        env: String,
        country: String,
        /// Keep running and print each new document when the key's versions change.
        #[arg(long)]
        watch: bool,
    },
    /// Encrypt stdin as one record (InCountry SDK format) with the key's active version;
    /// prints the record on stdout and its version on stderr (--json: both on stdout).
    Encrypt { env: String, country: String },
    /// Decrypt one record read from stdin; prints the plaintext on stdout.
    Decrypt {
        env: String,
        country: String,
        /// The key version beside the record (not needed for "pt:" records).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Rewrap a JSONL file of SDK records (`body`, `version`, other fields passed through)
    /// to the active version. Exit status 2 when some records failed (they are written
    /// back unchanged).
    Rewrap {
        env: String,
        country: String,
        #[arg(long)]
        input: PathBuf,
        /// Written atomically (a temporary file renamed over it); may be the input.
        #[arg(long)]
        output: PathBuf,
        /// Record strings per request (1 to 1000).
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Enroll (or replace) your TOTP secret: prints an otpauth:// URI and a QR code, then
    /// activates the secret once you type a code from your authenticator. Replacing needs
    /// --code from your current secret; a first enrollment needs --code-uid and --code of
    /// another enrolled admin, or, as root with the daemon stopped, --uid (offline bootstrap:
    /// the only way while no admin is enrolled).
    TotpEnroll {
        #[command(flatten)]
        code: Code,
        /// The enrolled admin whose code --code is, vouching for your first enrollment.
        #[arg(long, value_name = "UID")]
        code_uid: Option<u32>,
        /// Offline bootstrap, as root with the daemon stopped: enroll this uid directly in
        /// the state (sealed by the HSM; audited).
        #[arg(long, conflicts_with_all = ["code", "code_uid"])]
        uid: Option<u32>,
        /// State directory, with --uid (default: state.dir from the config).
        #[arg(long, requires = "uid")]
        state_dir: Option<PathBuf>,
    },
    /// Offline, as root, with the daemon stopped: remove a uid's TOTP secret (audited;
    /// opens the HSM from the config, which MACs the entry).
    TotpReset {
        #[arg(long)]
        uid: u32,
        /// State directory (default: state.dir from the config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the audit log, reading the state database directly (read-only): the hash
    /// chain, each entry's MAC and the state against the HSM anchor (opens the HSM as the
    /// daemon does, from the config). With --state-dir and no --config: the chain only.
    Verify {
        /// State directory (default: state.dir from the config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StateCmd {
    /// Offline, as root, with the daemon stopped: copy this host's SQLite state (keys,
    /// versions, settings, TOTP state, the audit chain) into the empty PostgreSQL database
    /// [postgres] names, and check the copy (audit verify, every version unwraps). A second
    /// run finds the identical copy and changes nothing.
    Migrate {
        /// Copy into PostgreSQL (`[postgres]` of the config).
        #[arg(long, required = true)]
        to_postgres: bool,
        /// SQLite state directory (default: state.dir from the config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// All keys.
    List,
    /// One key and its versions.
    Show { env: String, country: String },
    /// Create a key, or add a version of the given type to an existing one.
    Create {
        env: String,
        country: String,
        /// incountry-managed, or aws (customer-supplied: the customer's data key encrypted
        /// under their AWS KMS CMK).
        #[arg(long = "type", default_value = "incountry-managed")]
        kind: String,
        /// 30, 60, 180 or 360 (managed keys).
        #[arg(long)]
        rotation_period_days: Option<u32>,
        #[command(flatten)]
        aws: AwsArgs,
        #[command(flatten)]
        code: Code,
    },
    /// Make a new managed version active now.
    Rotate {
        env: String,
        country: String,
        #[arg(long)]
        rotation_period_days: Option<u32>,
        #[command(flatten)]
        code: Code,
    },
    /// Change a key's rotation period.
    Settings {
        env: String,
        country: String,
        #[arg(long)]
        rotation_period_days: u32,
        #[command(flatten)]
        code: Code,
    },
}

/// A customer-supplied (aws) version. The IAM secret key is read from a file, never taken
/// on the command line (where other users could see it).
#[derive(clap::Args)]
struct AwsArgs {
    /// AWS region of the CMK, e.g. eu-central-1.
    #[arg(long)]
    region: Option<String>,
    /// The data key encrypted under the CMK (KMS ciphertext blob, base64).
    #[arg(long)]
    encrypted_key: Option<String>,
    /// ARN of the customer's KMS key.
    #[arg(long)]
    cmk_arn: Option<String>,
    /// IAM access key id allowed to kms:Decrypt with the CMK.
    #[arg(long)]
    access_key_id: Option<String>,
    /// File holding the IAM secret access key ("-" for standard input).
    #[arg(long)]
    secret_key_file: Option<PathBuf>,
}

impl AwsArgs {
    fn given(&self) -> bool {
        self.region.is_some()
            || self.encrypted_key.is_some()
            || self.cmk_arn.is_some()
            || self.access_key_id.is_some()
            || self.secret_key_file.is_some()
    }
}

#[derive(clap::Args)]
pub(super) struct Code {
    /// Verification code (TOTP) for admin changes.
    #[arg(long)]
    code: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // `<3>`: journald files the line at priority "err".
            let prefix = if crate::systemd::stderr_is_journal() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{prefix}incountry-keyd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    match cli.cmd {
        Cmd::Serve => crate::daemon::serve(config_path).map(|_| ExitCode::SUCCESS),
        Cmd::CheckConfig => check_config(&config_path),
        Cmd::Audit {
            cmd: AuditCmd::Verify { state_dir },
        } => audit::verify(state_dir, &config_path, cli.config.is_some()),
        Cmd::Admin {
            cmd: AdminCmd::TotpReset { uid, state_dir },
        } => totp_reset(uid, state_dir, &config_path),
        Cmd::State {
            cmd: StateCmd::Migrate { state_dir, .. },
        } => state::migrate(state_dir, &config_path, cli.json),
        Cmd::Admin {
            cmd:
                AdminCmd::TotpEnroll {
                    uid: Some(uid),
                    state_dir,
                    ..
                },
        } => totp_bootstrap(uid, state_dir, &config_path),
        cmd => {
            let socket = socket_path(cli.socket.as_deref(), &config_path);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(client_command(Client::new(&socket), cmd, cli.json))
        }
    }
}

fn socket_path(flag: Option<&Path>, config_path: &Path) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    Config::load(config_path)
        .map(|c| c.server.socket)
        .unwrap_or_else(|_| PathBuf::from(config::DEFAULT_SOCKET))
}

fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    let pin = cfg.hsm.pin_path()?;
    crate::hsm::read_pin(&pin)?;
    if !cfg.hsm.module.exists() {
        bail!("hsm.module {} does not exist", cfg.hsm.module.display());
    }
    println!(
        "{}: OK (token `{}`, PIN file {}, state {}, socket {}, verification {:?})",
        path.display(),
        cfg.hsm.token_label,
        pin.display(),
        cfg.state.dir.display(),
        cfg.server.socket.display(),
        cfg.verification.mode
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn key_path(env: &str, country: &str) -> String {
    format!("/v1/keys/{env}/{country}")
}

async fn client_command(client: Client, cmd: Cmd, as_json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Keys { cmd } => keys(&client, cmd, as_json).await,
        Cmd::Admin {
            cmd: AdminCmd::TotpEnroll { code, code_uid, .. },
        } => totp_enroll(&client, code, code_uid).await,
        Cmd::Secrets {
            env,
            country,
            watch,
        } => secrets(&client, &env, &country, watch).await,
        Cmd::Encrypt { env, country } => encrypt(&client, &env, &country, as_json).await,
        Cmd::Decrypt {
            env,
            country,
            version,
        } => decrypt(&client, &env, &country, version).await,
        Cmd::Rewrap {
            env,
            country,
            input,
            output,
            batch_size,
        } => {
            let opts = crate::cli::rewrap::Options {
                env,
                country,
                input,
                output,
                batch_size,
            };
            let summary = crate::cli::rewrap::run(&client, opts).await?;
            if as_json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{summary}");
            }
            Ok(if summary.failed > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Serve
        | Cmd::CheckConfig
        | Cmd::Audit { .. }
        | Cmd::State { .. }
        | Cmd::Admin {
            cmd: AdminCmd::TotpReset { .. },
        } => {
            unreachable!("handled before connecting")
        }
    }
}

/// `--json` output: one line, keys in alphabetical order (as this CLI has always printed
/// them, whatever order the daemon's answer has).
pub(super) fn print_json<T: Serialize>(doc: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_value(doc)?);
    Ok(())
}

pub(super) fn ok(reply: Reply) -> anyhow::Result<Reply> {
    if reply.status.is_success() || reply.status == StatusCode::NOT_MODIFIED {
        Ok(reply)
    } else {
        bail!("{}", reply.error_line())
    }
}
