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
//! ```

use contract::reading::check_device_id;
use contract::settings::Settings;
use ingest::auth::{self, Kind};
use ingest::{bootstrap, db};

const USAGE: &str = "usage: ingest [serve | migrate | tokens issue (--device <id> | --gateway | --read) [--label <text>] | tokens list | tokens revoke <id>]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().unwrap_or_else(|error| {
        eprintln!("ingest: {error}");
        std::process::exit(2);
    });
    bootstrap::init_tracing(&settings.log);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] | ["serve"] => {
            let listener = bootstrap::listen(settings.ingest.listen, &settings.http)?;
            ingest::serve(settings, listener, bootstrap::shutdown_on_signal()).await
        }
        ["migrate"] => db::migrate(&settings.database).await,
        ["tokens", rest @ ..] => tokens(&settings, rest).await,
        _ => usage(),
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
            let mut options = options.iter();
            while let Some(option) = options.next() {
                match *option {
                    "--device" => {
                        kind = Some(Kind::Device);
                        device_id = options.next().copied();
                    }
                    "--gateway" => kind = Some(Kind::Gateway),
                    "--read" => kind = Some(Kind::Read),
                    "--label" => label = options.next().copied().unwrap_or_default(),
                    _ => return usage(),
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

fn usage() -> anyhow::Result<()> {
    eprintln!("{USAGE}");
    std::process::exit(2);
}
