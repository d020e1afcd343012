//! `turnstile serve`: the broker daemon on its unix socket (and, with a
//! token, on loopback TCP) until SIGTERM or SIGINT.

use crate::args::ServeArgs;
use std::process::ExitCode;
use std::sync::Arc;
use turnstile_broker::{Broker, server};
use turnstile_client::TlsRoots;
use turnstile_client::broker_side::BrokerUpstreams;

/// Installs the broker-side LLM forwarder (`Start.llm_upstream`): `https`
/// upstreams verified against the config's `llm_ca_file`, or else the
/// system's roots (Mozilla's built-in ones, said in the log, on a system
/// that has none). A CA file that cannot be used is an error.
pub fn install_forwarder(broker: &Broker) -> Result<(), String> {
    let upstreams = match &broker.config.llm_ca_file {
        Some(path) => BrokerUpstreams::new(TlsRoots::CaFile(path.clone()))
            .map_err(|e| format!("llm_ca_file: {e}"))?,
        None => BrokerUpstreams::new(TlsRoots::System).or_else(|e| {
            tracing::warn!(
                "broker-side LLM forwarding: {e}; https upstreams are verified against the built-in Mozilla roots instead"
            );
            BrokerUpstreams::new(TlsRoots::Bundled).map_err(|e| e.to_string())
        })?,
    };
    broker.set_llm_upstreams(Arc::new(upstreams));
    Ok(())
}

pub async fn serve(args: ServeArgs) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let fail = |msg: String| {
        eprintln!("turnstile: {msg}");
        ExitCode::FAILURE
    };
    // The handlers go in first: a SIGTERM that arrives while the broker
    // starts (or right after it listens) must stop it cleanly, not kill it
    // with the default action before its shutdown is armed.
    let (term, int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return fail(format!("cannot handle signals: {e}")),
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let token = match config.token() {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    // Fleet mode: the database (its schema migrated, or a newer one
    // refused) and the archive store, before the broker takes its state dir.
    let fleet = match &config.fleet {
        Some(f) => match turnstile_fleet::PgFleet::open(f, config.import_caps()).await {
            Ok(fleet) => Some(turnstile_fleet::shared(fleet)),
            Err(e) => return fail(format!("fleet mode: {e}")),
        },
        None => None,
    };
    let broker = match Broker::with_fleet(config, fleet) {
        Ok(b) => b,
        Err(e) => return fail(e.to_string()),
    };
    // Without cgroups only the process tree ties an agent's processes to
    // its turn: orphans cut loose from it (an agent that killed its shim)
    // come to the broker, which kills them when the turn ends.
    if broker.cgroups.is_none()
        && let Err(e) = turnstile_broker::process::own::adopt_orphans()
    {
        return fail(format!("cannot become a child subreaper: {e}"));
    }
    if let Err(e) = install_forwarder(&broker) {
        return fail(e);
    }
    let access = match server::SocketAccess::from_config(&broker.config) {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let mut listeners = Vec::new();
    match server::bind_unix_with(&broker.config.socket_path(), &access) {
        Ok(l) => listeners.push(l),
        Err(e) => return fail(format!("cannot listen: {e}")),
    }
    if let (Some(addr), Some(token)) = (broker.config.listen, token) {
        match server::bind_tcp(addr, token).await {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(format!("cannot listen on {addr}: {e}")),
        }
    }
    let shutdown = async move {
        let (mut term, mut int) = (term, int);
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
