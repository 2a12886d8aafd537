//! `ingest`: the HTTP ingest service.
//!
//! ```text
//! ingest                                   serve (also: ingest serve)
//! ingest migrate                           apply the PostgreSQL migrations and exit
//! ingest tokens issue --device <id> [--label <text>]   a token for one device
//! ingest tokens issue --gateway [--label <text>]       a token for any device
//! ingest tokens issue --read [--label <text>]          a token for the query API
//! ingest tokens list                       every token (never the token itself)
//! ingest tokens revoke <token id>          revoke; effective within auth.cache_ttl_secs
//! ingest config env                        the effective server URLs and listen addresses
//! ```
//!
//! `ingest config env` loads the settings as every process does (API.md §8: the config
//! files, then `PIPELINE__*`) and prints the keys `scripts/lib.sh` needs, one
//! `PIPELINE__<SECTION>__<KEY>='value'` a line, single-quoted for the shell (the URLs
//! with their credentials). `scripts/up` exports them, so that it checks, waits for and
//! prints what the processes will really use. An invalid configuration exits with
//! status 2 and one line naming the key, as a start does.

use std::io::Write;

use contract::reading::check_device_id;
use contract::settings::{environment_variable, key_and_variable, Settings};
use ingest::auth::{self, Kind};
use ingest::{bootstrap, db};

const USAGE: &str = "usage: ingest [serve | migrate | tokens issue (--device <id> | --gateway | --read) [--label <text>] | tokens list | tokens revoke <id> | config env]";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bootstrap::exit_with("ingest", run().await)
}

async fn run() -> anyhow::Result<()> {
    let settings = bootstrap::settings_or_exit("ingest");
    bootstrap::init_tracing(&settings.log);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] | ["serve"] => {
            ingest_rules_or_exit(&settings);
            let listener = bootstrap::listen_or_exit(
                "ingest",
                "ingest.listen",
                settings.ingest.listen,
                &settings.http,
            );
            ingest::serve(settings, listener, bootstrap::shutdown_on_signal()).await
        }
        ["migrate"] => db::migrate(&settings.database).await,
        ["tokens", rest @ ..] => tokens(&settings, rest).await,
        ["config", "env"] => {
            // `scripts/up` checks the configuration through this: ingest's own rules too,
            // or it would start the rest and find ingest refused.
            ingest_rules_or_exit(&settings);
            config_env(&settings)
        }
        _ => usage(),
    }
}

/// Stops with status 2 and one line naming the key when `settings` break a rule of
/// ingest's own ([`Settings::validate_for_ingest`]), as an invalid setting does.
fn ingest_rules_or_exit(settings: &Settings) {
    if let Err(error) = settings.validate_for_ingest() {
        eprintln!("ingest: {error}");
        std::process::exit(2);
    }
}

async fn tokens(settings: &Settings, args: &[&str]) -> anyhow::Result<()> {
    db::migrate(&settings.database).await?;
    let pool = db::pool(&settings.database)?;
    match args {
        ["issue", options @ ..] => {
            let mut kind = None;
            let mut device_id = None;
            let mut label = "";
            let mut options = options.iter().copied();
            // One kind, and an option's value present and not the next option: until
            // 2026-12-07 `--device --gateway` issued a device token for a device named
            // `--gateway`, and `--device a --read` failed in the database.
            while let Some(option) = options.next() {
                let mut value = || options.next().filter(|value| !value.starts_with("--"));
                let named = match option {
                    "--device" => {
                        device_id = value();
                        if device_id.is_none() {
                            return usage();
                        }
                        Kind::Device
                    }
                    "--gateway" => Kind::Gateway,
                    "--read" => Kind::Read,
                    "--label" => {
                        let Some(text) = value() else {
                            return usage();
                        };
                        label = text;
                        continue;
                    }
                    _ => return usage(),
                };
                if kind.replace(named).is_some() {
                    return usage();
                }
            }
            let Some(kind) = kind else {
                return usage();
            };
            if let Some(device_id) = device_id {
                if let Err(message) = check_device_id(device_id) {
                    eprintln!("ingest: the device id {message}");
                    std::process::exit(2);
                }
            } else if kind == Kind::Device {
                return usage();
            }
            let (id, token) = auth::issue(&pool, kind, device_id, label).await?;
            println!("id:    {id}");
            println!("token: {token}");
            eprintln!("The token is shown only now; store it in the device. Revoke it with `ingest tokens revoke {id}`.");
            Ok(())
        }
        ["list"] => {
            println!(
                "{:<36}  {:<7}  {:<20}  {:<25}  {:<25}  label",
                "id", "kind", "device", "created", "revoked"
            );
            for token in auth::list(&pool).await? {
                println!(
                    "{:<36}  {:<7}  {:<20}  {:<25}  {:<25}  {}",
                    token.id,
                    token.kind,
                    token.device_id.as_deref().unwrap_or("-"),
                    contract::timestamp::format(token.created_at),
                    token
                        .revoked_at
                        .map(contract::timestamp::format)
                        .unwrap_or_else(|| "-".to_owned()),
                    token.label
                );
            }
            Ok(())
        }
        ["revoke", id] => {
            let Ok(id) = id.parse() else {
                return usage();
            };
            if auth::revoke(&pool, id).await? {
                println!(
                    "revoked {id}; requests with it fail within {} s",
                    settings.auth.cache_ttl_secs
                );
                Ok(())
            } else {
                eprintln!("ingest: no active token with id {id}");
                std::process::exit(1);
            }
        }
        _ => usage(),
    }
}

/// Prints the effective value of every key `scripts/lib.sh` reads (its server URLs and
/// listen addresses), as `PIPELINE__<SECTION>__<KEY>='value'` lines a shell can `eval`
/// and `scripts/lib.sh` reads without doing so.
fn config_env(settings: &Settings) -> anyhow::Result<()> {
    let values = [
        ("database.url", settings.database.url.clone()),
        ("nats.url", settings.nats.url.clone()),
        ("redis.url", settings.redis.url.clone()),
        ("ingest.listen", settings.ingest.listen.to_string()),
        ("query.listen", settings.query.listen.to_string()),
        (
            "relay.admin_listen",
            settings.relay.admin_listen.to_string(),
        ),
        (
            "projector.admin_listen",
            settings.projector.admin_listen.to_string(),
        ),
    ];
    let mut lines = String::new();
    for (key, value) in values {
        // No URL holds a raw control character, and a line break would split the line.
        if value.chars().any(char::is_control) {
            eprintln!(
                "ingest: invalid configuration: {} contains a control character",
                key_and_variable(key)
            );
            std::process::exit(2);
        }
        lines.push_str(&format!(
            "{}={}\n",
            environment_variable(key),
            shell_quoted(&value)
        ));
    }
    std::io::stdout().lock().write_all(lines.as_bytes())?;
    Ok(())
}

/// `value` in single quotes, each `'` in it written `'\''`: one word to a POSIX shell,
/// whatever it holds.
fn shell_quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn usage() -> anyhow::Result<()> {
    eprintln!("{USAGE}");
    std::process::exit(2);
}
