//! The `communesync` binary: parse the command line, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use communesync::cli::{exit_code, log_utc_offset, run, safe, Cli, LogTime};

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // Scan transfer progress is the one `info` line kept by default: it is what a log reader
    // of a long sync (journald, cron) wants to see moving. Automerge logs each document it
    // cannot parse at ERROR, without saying which: every such failure is reported by this
    // node with the document and the peer, so its own line is noise (and a hostile peer's
    // to write) below -vv.
    let default_level = match cli.verbose {
        0 => "warn,communesync::net::progress=info,automerge=off",
        1 => "info,automerge=off",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMMUNESYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_timer(LogTime(log_utc_offset(&cli)))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Errors may quote a peer's refusal reason or a file name: shown, never obeyed.
            eprintln!("error: {}", safe(&one_line(&err)));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The error and its causes on one line, each cause once: library errors often already quote
/// their cause in their own message.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}
