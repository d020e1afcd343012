//! Serving the broker: the unix socket (owner-only by default; shared with
//! a group, or with peers whose uid is allowed, for executors that are not
//! root), the optional loopback TCP listener with its bearer token,
//! `grpc.health.v1`, and the shutdown sequence: stop accepting, end running
//! turns, clean up, return.

use crate::Broker;
use crate::service::Service;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::Server;
use tonic::{Request, Status};
use tracing::{info, warn};
use turnstile_proto::v1::broker_server::BrokerServer;

/// h2 flow-control windows: large enough that the relay is not throttled by
/// window updates on loopback.
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame we accept (the default is 16 KiB): a relay chunk
/// then travels in a few frames instead of sixteen.
pub const MAX_FRAME: u32 = 1 << 20;

/// Who may use the unix socket besides the broker's own uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// The socket is 0660 and owned by this group: its members connect.
    pub group: Option<u32>,
    /// When not empty, every call's peer uid (`SO_PEERCRED`) must be one
    /// of these, the broker's own or root's; others get `PermissionDenied`
    /// naming their uid. Without `group` the socket is then 0666.
    pub allowed_uids: Vec<u32>,
}

impl SocketAccess {
    /// The access the config asks for (the group's name resolved).
    pub fn from_config(cfg: &crate::config::Config) -> Result<Self, crate::config::ConfigError> {
        Ok(SocketAccess {
            group: cfg.socket_gid()?,
            allowed_uids: cfg.allowed_uids.clone(),
        })
    }

    fn mode(&self) -> u32 {
        match (self.group, self.allowed_uids.is_empty()) {
            (Some(_), _) => 0o660,
            (None, false) => 0o666,
            (None, true) => 0o600,
        }
    }

    fn shared(&self) -> bool {
        self.mode() != 0o600
    }
}

/// A bound endpoint.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
        /// The uids allowed to call (see [`SocketAccess::allowed_uids`]).
        allowed_uids: Vec<u32>,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        token: String,
    },
}

/// Binds a unix socket that only its owner can connect to. The socket is
/// created inside a fresh 0700 directory, made 0600, then renamed into place,
/// so it is never reachable with wider permissions, whatever the umask.
pub fn bind_unix(path: &Path) -> io::Result<Listener> {
    bind_unix_with(path, &SocketAccess::default())
}

/// Binds the unix socket with `access`: made 0600, 0660 with its group, or
/// 0666 with an allowlist of uids, before it is renamed into place. A
/// missing parent directory is made 0711 when others may connect (0700
/// otherwise); an existing one must let them through.
pub fn bind_unix_with(path: &Path, access: &SocketAccess) -> io::Result<Listener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another broker is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(if access.shared() { 0o711 } else { 0o700 })
        .create(parent)?;
    let staging = parent.join(format!(".turnstile-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let tmp = staging.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        if let Some(gid) = access.group {
            std::os::unix::fs::lchown(&tmp, None, Some(gid))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(access.mode()))?;
        std::fs::rename(&tmp, path)?;
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    Ok(Listener::Unix {
        listener: result?,
        path: path.to_path_buf(),
        allowed_uids: access.allowed_uids.clone(),
    })
}

/// Binds the loopback TCP listener; any other address is refused.
pub async fn bind_tcp(addr: std::net::SocketAddr, token: String) -> io::Result<Listener> {
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} is not a loopback address"),
        ));
    }
    Ok(Listener::Tcp {
        listener: tokio::net::TcpListener::bind(addr).await?,
        token,
    })
}

/// Requires `authorization: Bearer <token>` on every call.
#[derive(Clone)]
struct TokenCheck {
    want: Arc<[u8]>,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes)
            .unwrap_or_default();
        // Constant-time comparison of equal-length tokens.
        let same = got.len() == self.want.len()
            && got
                .iter()
                .zip(self.want.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// Refuses calls on the unix socket from a peer whose uid is not allowed.
#[derive(Clone)]
struct PeerCheck {
    allowed: Arc<[u32]>,
}

impl PeerCheck {
    fn new(mut allowed: Vec<u32>) -> PeerCheck {
        allowed.push(nix::unistd::geteuid().as_raw());
        allowed.push(0);
        allowed.sort_unstable();
        allowed.dedup();
        PeerCheck {
            allowed: allowed.into(),
        }
    }
}

impl Interceptor for PeerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let uid = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if self.allowed.contains(&uid) => Ok(req),
            Some(uid) => Err(Status::permission_denied(format!(
                "uid {uid} may not use this broker: allowed are uids {:?} (allowed_uids, the broker's own and root)",
                self.allowed
            ))),
            None => Err(Status::permission_denied(
                "the peer's uid is unknown (no SO_PEERCRED): refused",
            )),
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, ends every
/// running turn with reason `broker_shutdown`, removes the socket and returns.
pub async fn serve(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    if let Some(w) = &broker.warm {
        w.start();
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<Service>>().await;
    let max = broker.config.max_message_bytes;
    let api = || {
        BrokerServer::new(Service::new(broker.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    };
    let builder = || {
        Server::builder()
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONN_WINDOW))
            .max_frame_size(Some(MAX_FRAME))
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut socket_paths = Vec::new();
    for l in listeners {
        let stop = stop.clone();
        match l {
            Listener::Unix {
                listener,
                path,
                allowed_uids,
            } => {
                info!(socket = %path.display(), "listening");
                socket_paths.push(path);
                let router = if allowed_uids.is_empty() {
                    builder()
                        .add_service(health_service.clone())
                        .add_service(api())
                } else {
                    let check = PeerCheck::new(allowed_uids);
                    info!(uids = ?check.allowed, "unix socket: peers checked by uid");
                    let api =
                        tonic::service::interceptor::InterceptedService::new(api(), check.clone());
                    let health = tonic::service::interceptor::InterceptedService::new(
                        health_service.clone(),
                        check,
                    );
                    builder().add_service(health).add_service(api)
                };
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(
                            UnixListenerStream::new(listener),
                            stop.cancelled_owned(),
                        )
                        .await
                });
            }
            Listener::Tcp { listener, token } => {
                info!(addr = ?listener.local_addr().ok(), "listening (tcp, token required)");
                let check = TokenCheck {
                    want: Arc::from(token.into_bytes()),
                };
                let api =
                    tonic::service::interceptor::InterceptedService::new(api(), check.clone());
                let health = tonic::service::interceptor::InterceptedService::new(
                    health_service.clone(),
                    check,
                );
                let router = builder().add_service(health).add_service(api);
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(listener),
                            stop.cancelled_owned(),
                        )
                        .await
                });
            }
        }
    }
    if let Some(ttl) = broker.config.session_ttl_ms {
        let b = broker.clone();
        let every = Duration::from_millis(broker.config.gc_interval_ms.max(1000));
        let stop = stop.clone();
        info!(ttl_ms = ttl, "session garbage collection on");
        servers.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = Service::gc(&b, false).await {
                            warn!(error = %e, "session garbage collection failed");
                        }
                    }
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        });
    }
    tokio::select! {
        _ = shutdown => info!("shutting down"),
        Some(r) = servers.join_next() => {
            warn!(result = ?r, "a listener stopped by itself; shutting down");
        }
    }
    health.set_not_serving::<BrokerServer<Service>>().await;
    stop.cancel();
    broker.shutdown().await;
    let drain = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        warn!("listeners did not drain; closing");
        servers.abort_all();
    }
    for p in socket_paths {
        let _ = std::fs::remove_file(p);
    }
    info!("stopped");
    Ok(())
}
