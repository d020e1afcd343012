//! `turnstile`: parses flags, starts tracing and the runtime, and hands the
//! command to its module. The daemon itself is the `turnstile-broker`
//! library; this crate is its command line and the executor-side client
//! commands.

mod args;
mod doctor;
mod run;
mod serve;
mod sessions;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its work; the client commands only warnings (an
    // embedded broker under `run` would otherwise chatter on the terminal).
    let default = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TURNSTILE_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("turnstile: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::serve(args)),
        Command::Doctor(args) => {
            let code = runtime.block_on(doctor::doctor(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Sessions(args) => {
            let code = runtime.block_on(sessions::sessions(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Run(args) => {
            let code = runtime.block_on(run::run_turn(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Attach(args) => {
            let code = runtime.block_on(run::attach(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
