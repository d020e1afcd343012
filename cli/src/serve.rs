//! `turnstile serve`: the broker daemon on its unix socket (and, with a
//! token, on loopback TCP) until SIGTERM or SIGINT.

use crate::args::ServeArgs;
use std::process::ExitCode;
use turnstile_broker::{Broker, server};

pub async fn serve(args: ServeArgs) -> ExitCode {
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
    match server::serve(broker, listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
