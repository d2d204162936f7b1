//! The binary edge: parses arguments, runs a command, turns errors into one clear line.

mod commands;

use std::process::ExitCode;

use twtrace::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
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
    // Commands that print a result and exit end quietly when their reader goes away
    // (`twtrace report f | head`), as other Unix tools do. The tracing commands keep SIGPIPE
    // ignored: they see the broken pipe, stop, and still give their summary.
    if matches!(
        cli.command,
        Some(
            Command::Report(_)
                | Command::Compare(_)
                | Command::Check(_)
                | Command::Completions(_)
                | Command::Man(_)
        )
    ) {
        // SAFETY: restores the default action of one signal before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
            Some(Command::Check(args)) => commands::check::run(&args),
            Some(Command::Completions(args)) => commands::docs::completions(&args),
            Some(Command::Man(args)) => commands::docs::man(&args),
            None => commands::live::run(&cli.live, verbose).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twtrace: {}", one_line(&e));
            exit_code(&e)
        }
    }
}

/// 2 for what the user can correct on the command line or in a file it names (as clap's
/// usage errors), else 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    let usage = e.chain().any(|c| {
        c.downcast_ref::<twtrace::record::RecordError>()
            .is_some_and(|e| e.is_usage())
            || c.downcast_ref::<twtrace::safe_file::SafeFileError>()
                .is_some_and(|e| e.is_usage())
            || c.is::<twtrace::http::web_config::WebConfigError>()
    });
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// The cause chain on one line, no backtrace. A cause that its parent's message already spells
/// out (an error that prints its source) is said once.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if msg.ends_with(&cause) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&cause);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_already_in_its_parents_message_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(twtrace::record::RecordError::Io {
            path: "/x.twt".into(),
            source: io,
        });
        assert_eq!(one_line(&e), "/x.twt: No such file");
        let e = anyhow::anyhow!("disk full").context("writing /x.twt");
        assert_eq!(one_line(&e), "writing /x.twt: disk full");
    }

    #[test]
    fn a_refused_output_path_is_a_usage_error() {
        use twtrace::{record::RecordError, safe_file::SafeFileError};
        let e = anyhow::Error::new(RecordError::from(SafeFileError::Exists {
            path: "out.twt".into(),
        }));
        assert_eq!(
            one_line(&e),
            "out.twt exists: choose another path, or pass --force to replace it"
        );
        assert_eq!(super::exit_code(&e), std::process::ExitCode::from(2));
        let io = std::io::Error::other("disk full");
        let e = anyhow::Error::new(RecordError::from(SafeFileError::Io {
            path: "out.twt".into(),
            source: io,
        }));
        assert_eq!(super::exit_code(&e), std::process::ExitCode::FAILURE);
    }
}
