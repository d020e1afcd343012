//! Clients other than Turnstile's own: a stock Python `grpcio` client on
//! the broker's unix socket, with nothing set but the target.

use super::harness::*;
use std::path::PathBuf;
use turnstile_broker::config::Mode;

/// Python with grpcio (scripts/setup-grpcio.sh); panics with the remedy
/// when it is missing.
fn grpcio_python() -> PathBuf {
    let p = std::env::var_os("TURNSTILE_GRPCIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".tools/grpcio-venv/bin/python"));
    assert!(
        p.exists(),
        "MISSING: Python with grpcio at {} — install it with scripts/setup-grpcio.sh (or run \
         scripts/test.sh)",
        p.display()
    );
    p
}

/// Calls three RPCs with raw protobuf bytes (no generated code needed) and
/// prints one line per call: the health check, the session list, and a
/// session that does not exist (a status, not a transport error).
/// grpcio (since 1.57) sends the percent-encoded socket path as
/// `:authority` unless `grpc.default_authority` is set; it is not.
const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
def call(method, request):
    f = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        return "ok " + f(request, timeout=30).hex()
    except grpc.RpcError as e:
        return "error %s %s" % (e.code().name, e.details())
print("health", call("/grpc.health.v1.Health/Check", b""))
print("list", call("/turnstile.v1.Broker/ListSessions", b""))
print("get", call("/turnstile.v1.Broker/GetSession", b"\x0a\x07missing"))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpcio_client_needs_no_authority_on_the_unix_socket() {
    let python = grpcio_python();
    let h = Harness::start(Mode::Direct).await;
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(CLIENT)
        .arg(&h.socket)
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            // HealthCheckResponse { status: SERVING }
            "health ok 0801",
            // ListSessionsReply {} (no sessions yet)
            "list ok ",
            "get error NOT_FOUND session missing not found",
        ],
        "{stderr}"
    );
    h.stop().await;
}
