//! The binary edge: parses arguments, runs a command, turns errors into one clear line.

mod commands;

use std::process::ExitCode;

use clap::Parser as _;
use twtrace::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .parse_env("TWTRACE_LOG")
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("twtrace: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let verbose = cli.verbose > 0;
    let result = runtime.block_on(async move {
        match cli.command {
            Some(Command::Trace(args)) => commands::trace::run(&args, verbose).await,
            Some(Command::Record(args)) => commands::record::run(&args, verbose).await,
            Some(Command::Report(args)) => commands::report::run(&args),
            Some(Command::Compare(args)) => commands::compare::run(&args),
            Some(Command::Replay(args)) => commands::live::replay(&args).await,
            Some(Command::Serve(args)) => commands::serve::run(&args, verbose).await,
            Some(Command::Check) => commands::check::run(),
            None => commands::live::run(&cli.live, verbose).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause chain, no backtrace.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("twtrace: {msg}");
            ExitCode::FAILURE
        }
    }
}
