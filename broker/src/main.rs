//! `turnstile`: parses flags, starts tracing and the runtime, and calls the
//! library.

use clap::Parser;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;
use turnstile_broker::cli::{Cli, Command};
use turnstile_broker::{Broker, server};

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
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Doctor(args) => {
            let code = runtime.block_on(turnstile_broker::cli::doctor(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Sessions(args) => {
            let code = runtime.block_on(turnstile_broker::cli::sessions(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Run(args) => {
            let code = runtime.block_on(turnstile_broker::run::run(args));
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

async fn serve(args: turnstile_broker::cli::ServeArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("turnstile: {msg}");
        ExitCode::FAILURE
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let token = match config.token() {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let broker = match Broker::new(config) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    let mut listeners = Vec::new();
    match server::bind_unix(&broker.config.socket_path()) {
        Ok(l) => listeners.push(l),
        Err(e) => return fail(format!("cannot listen: {e}")),
    }
    if let (Some(addr), Some(token)) = (broker.config.listen, token) {
        match server::bind_tcp(addr, token).await {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(format!("cannot listen on {addr}: {e}")),
        }
    }
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match server::run(broker, listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
