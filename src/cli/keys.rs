//! `keys`: list, show, and the admin changes (create, rotate, settings).

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use hyper::Method;
use zeroize::Zeroizing;

use super::admin::admin;
use super::table::{print_key, print_key_list};
use super::{key_path, ok, print_json, KeysCmd};
use crate::cli::client::Client;
use crate::proto::{CreateKeyRequest, KeyDocument, KeyList, PeriodRequest, VersionAdded};

pub(super) async fn keys(client: &Client, cmd: KeysCmd, as_json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::List => {
            let reply = ok(client.request(Method::GET, "/v1/keys", &[], None).await?)?;
            let list: KeyList = reply.read()?;
            if as_json {
                print_json(&list)?;
            } else {
                print_key_list(&list);
            }
        }
        KeysCmd::Show { env, country } => {
            let reply = ok(client
                .request(Method::GET, &key_path(&env, &country), &[], None)
                .await?)?;
            let key: KeyDocument = reply.read()?;
            if as_json {
                print_json(&key)?;
            } else {
                print_key(&key);
            }
        }
        KeysCmd::Create {
            env,
            country,
            kind,
            rotation_period_days,
            aws,
            code,
        } => {
            let body = if kind == "aws" {
                let Some(secret_file) = &aws.secret_key_file else {
                    bail!("--type aws needs --secret-key-file (the secret key is never taken on the command line)");
                };
                CreateKeyRequest {
                    kind,
                    rotation_period_days,
                    region: aws.region,
                    encrypted_key: aws.encrypted_key,
                    cmk_arn: aws.cmk_arn,
                    access_key_id: aws.access_key_id,
                    secret_access_key: Some(read_secret_file(secret_file)?),
                }
            } else {
                if aws.given() {
                    bail!("--region, --encrypted-key, --cmk-arn, --access-key-id and --secret-key-file apply only to --type aws");
                }
                CreateKeyRequest {
                    kind,
                    rotation_period_days,
                    region: None,
                    encrypted_key: None,
                    cmk_arn: None,
                    access_key_id: None,
                    secret_access_key: None,
                }
            };
            let path = key_path(&env, &country);
            let reply = admin(client, Method::POST, &path, &body, code).await?;
            print_added(&reply.read()?, as_json)?;
        }
        KeysCmd::Rotate {
            env,
            country,
            rotation_period_days,
            code,
        } => {
            let body = PeriodRequest {
                rotation_period_days,
            };
            let path = format!("{}/rotate", key_path(&env, &country));
            let reply = admin(client, Method::POST, &path, &body, code).await?;
            print_added(&reply.read()?, as_json)?;
        }
        KeysCmd::Settings {
            env,
            country,
            rotation_period_days,
            code,
        } => {
            let body = PeriodRequest {
                rotation_period_days: Some(rotation_period_days),
            };
            let path = key_path(&env, &country);
            let reply = admin(client, Method::PATCH, &path, &body, code).await?;
            let key: KeyDocument = reply.read()?;
            if as_json {
                print_json(&key)?;
            } else {
                print_key(&key);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_added(made: &VersionAdded, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(made);
    }
    println!(
        "{}/{}: version {} ({}) is active",
        made.environment,
        made.country,
        made.version,
        made.kind.as_str()
    );
    Ok(())
}

/// Reads the IAM secret key: the file's first line.
fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    use std::io::Read;
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            anyhow::anyhow!("cannot read the IAM secret key from standard input: {e}")
        })?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| {
                anyhow::anyhow!("cannot read --secret-key-file {}: {e}", path.display())
            })?;
    }
    let secret = Zeroizing::new(text.lines().next().unwrap_or("").trim().to_string());
    if secret.is_empty() {
        bail!("--secret-key-file {} is empty", path.display());
    }
    Ok(secret)
}
