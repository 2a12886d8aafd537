//! `projector`: the JetStream consumer that keeps the Redis read model.
//! `projector rebuild` replays the stream into a new generation and switches to it.

use std::time::Duration;

use anyhow::Context;
use contract::settings::{connecting_to, Settings};
use ingest::bootstrap;
use projector::rebuild::RebuildError;

const USAGE: &str =
    "usage: projector [run | rebuild | dlq list [--limit N] | dlq redrive <dlq sequence>...]";

/// What `projector dlq ...` was asked to do.
#[derive(Debug, PartialEq)]
enum DeadLetterCommand {
    /// `list [--limit N]`: the oldest `limit` letters (100 unless given).
    List { limit: usize },
    /// `redrive <dlq sequence>...`.
    Redrive(Vec<u64>),
}

/// Reads the arguments after `dlq`, before anything connects: a typo gets the usage
/// (or names the word that is no number), not a NATS error or a silent default.
fn dead_letter_command(args: &[&str]) -> Result<DeadLetterCommand, String> {
    match args {
        ["list"] => Ok(DeadLetterCommand::List { limit: 100 }),
        ["list", "--limit", limit] => match limit.parse() {
            Ok(limit @ 1..) => Ok(DeadLetterCommand::List { limit }),
            _ => Err(format!("--limit {limit:?} is not a count of at least 1")),
        },
        ["redrive", sequences @ ..] if !sequences.is_empty() => sequences
            .iter()
            .map(|sequence| {
                sequence
                    .parse()
                    .map_err(|_| format!("{sequence:?} is not a sequence number"))
            })
            .collect::<Result<_, _>>()
            .map(DeadLetterCommand::Redrive),
        _ => Err(USAGE.to_owned()),
    }
}

/// `projector dlq list` and `projector dlq redrive <sequence>...`.
async fn dead_letters(settings: &Settings) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let command = match dead_letter_command(&args) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("projector: {message}");
            std::process::exit(2);
        }
    };
    let client = ingest::bootstrap::nats_options(&settings.nats.url)
        .connect(&settings.nats.url)
        .await
        .with_context(|| connecting_to("NATS", &settings.nats.url))?;
    let jetstream = async_nats::jetstream::new(client);
    let subjects = contract::subjects::Subjects::for_stream(&settings.nats.stream);
    match command {
        DeadLetterCommand::List { limit } => {
            println!(
                "{:>8}  {:>10}  {:<32}  {:<40}  payload",
                "dlq seq", "orig seq", "subject", "reason"
            );
            for letter in projector::dlq::list(&jetstream, &subjects, limit).await? {
                let original = letter
                    .original_sequence
                    .map(|sequence| sequence.to_string())
                    .unwrap_or_default();
                println!(
                    "{:>8}  {original:>10}  {:<32}  {:<40}  {}",
                    letter.sequence, letter.subject, letter.reason, letter.payload_preview
                );
            }
        }
        DeadLetterCommand::Redrive(sequences) => {
            for sequence in sequences {
                let live = projector::dlq::redrive(&jetstream, &subjects, sequence).await?;
                println!("re-drove dead letter {sequence} as event stream sequence {live}");
            }
        }
    }
    Ok(())
}

/// One thread: the process is a pipeline of awaits whose CPU fits in one core, and on a
/// small box a single-threaded runtime spares it the cross-thread wake-ups (measured in
/// PERFORMANCE.md). More throughput comes from more copies of the process.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    bootstrap::exit_with("projector", run().await)
}

async fn run() -> anyhow::Result<()> {
    let settings = bootstrap::settings_or_exit("projector");
    bootstrap::init_tracing(&settings.log);
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            let listener = bootstrap::listen_or_exit(
                "projector",
                "projector.admin_listen",
                settings.projector.admin_listen,
                &settings.http,
            );
            projector::run(settings, listener, bootstrap::shutdown_on_signal()).await
        }
        Some("rebuild") => {
            let rebuild = projector::connect_rebuild(&settings).await?;
            let nats = rebuild.jetstream.client();
            let deadline = Duration::from_secs(30);
            tokio::time::timeout(deadline, nats.flush())
                .await
                .context("NATS did not answer within 30 s")??;
            match rebuild.run(&bootstrap::shutdown_on_signal()).await {
                Ok(generation) => {
                    println!(
                        "rebuilt the read model as generation {generation} and switched to it"
                    );
                    Ok(())
                }
                Err(RebuildError::AlreadyRunning) => {
                    eprintln!("projector: a rebuild is already running; try again when it is done");
                    std::process::exit(1);
                }
                Err(RebuildError::Failed(error)) => Err(error),
            }
        }
        Some("dlq") => dead_letters(&settings).await,
        Some(other) => {
            eprintln!("projector: unknown command {other:?}; {USAGE}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_arguments_are_parsed_or_refused_with_what_is_wrong() {
        assert_eq!(
            dead_letter_command(&["list"]),
            Ok(DeadLetterCommand::List { limit: 100 })
        );
        assert_eq!(
            dead_letter_command(&["list", "--limit", "7"]),
            Ok(DeadLetterCommand::List { limit: 7 })
        );
        assert_eq!(
            dead_letter_command(&["redrive", "3", "9"]),
            Ok(DeadLetterCommand::Redrive(vec![3, 9]))
        );
        for (args, says) in [
            (&["list", "--limit", "abc"][..], "\"abc\" is not a count"),
            (&["list", "--limit", "0"][..], "\"0\" is not a count"),
            (&["redrive", "3", "x"][..], "\"x\" is not a sequence number"),
            (&["redrive"][..], "usage:"),
            (&["lsit"][..], "usage:"),
            (&[][..], "usage:"),
        ] {
            let message = dead_letter_command(args).expect_err("refused");
            assert!(message.contains(says), "{args:?}: {message}");
        }
    }
}
