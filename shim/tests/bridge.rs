//! The shim's LLM bridge, driven like the broker does in direct mode: the
//! test plays the broker's side of the turn's unix socket, and the agent is a
//! python3 script that talks to the URL the shim put in its environment.

mod common;

use common::{Shim, TempDir, payload};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;
use turnstile_shim::{AgentStatus, FailureClass, InitPayload, LlmBridge};

const PYTHON: &str = "/usr/bin/python3";
/// A safety net against a hung test, not a synchronisation.
const SAFETY: Duration = Duration::from_secs(60);

/// Run before every agent script: checks both URLs and defines `conn()`
/// (a new connection through the bridge) and `read_all(s)`.
const PRELUDE: &str = r#"
import os, socket, sys
url = os.environ["ANTHROPIC_BASE_URL"]
assert os.environ["OPENAI_BASE_URL"] == url, (url, os.environ["OPENAI_BASE_URL"])
assert url.startswith("http://127.0.0.1:"), url
PORT = int(url.rsplit(":", 1)[1])
assert PORT != 0

def conn():
    s = socket.create_connection(("127.0.0.1", PORT))
    s.settimeout(60)  # a safety net against a hang, not a synchronisation
    return s

def read_all(s):
    chunks = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
"#;

/// A payload running `script` (after [`PRELUDE`]) under python3, bridged to
/// the unix socket at `socket_path`.
fn bridged(dir: &Path, socket_path: &Path, script: &str, args: &[&str]) -> InitPayload {
    assert!(
        Path::new(PYTHON).exists(),
        "these tests need {PYTHON} as the agent"
    );
    let code = format!("{PRELUDE}\n{script}");
    let mut argv = vec![PYTHON, "-c", &code];
    argv.extend_from_slice(args);
    let mut p = payload(dir, &argv);
    p.llm = Some(LlmBridge {
        port: 0,
        socket_path: socket_path.to_str().expect("utf-8 path").into(),
        env_vars: vec!["ANTHROPIC_BASE_URL".into(), "OPENAI_BASE_URL".into()],
        url_path: String::new(),
    });
    p
}

/// Runs the turn to its end: exit status, shim exit code, stdout, stderr.
fn run(mut shim: Shim) -> (AgentStatus, i32, String, String) {
    shim.go();
    let status = shim.exited();
    let (code, stdout, stderr) = shim.finish();
    (status, code, stdout, stderr)
}

/// Accepts `n` connections on `listener`, each handled on its own thread by
/// `handle`, whose results arrive on the returned channel.
fn broker_side<T: Send + 'static>(
    listener: UnixListener,
    n: usize,
    handle: impl Fn(UnixStream) -> T + Send + Sync + 'static,
) -> (mpsc::Receiver<T>, thread::JoinHandle<UnixListener>) {
    let (tx, rx) = mpsc::channel();
    let handle = Arc::new(handle);
    let acceptor = thread::spawn(move || {
        for _ in 0..n {
            let (stream, _) = listener.accept().expect("broker side accept");
            let (tx, handle) = (tx.clone(), Arc::clone(&handle));
            thread::spawn(move || {
                let _ = tx.send(handle(stream));
            });
        }
        listener
    });
    (rx, acceptor)
}

fn read_to_end(mut stream: &UnixStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data).expect("broker side read");
    data
}

/// CRC-32 (IEEE), the same as python's `zlib.crc32`.
fn crc32(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        table
    });
    crc = !crc;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[test]
fn ping_pong_with_half_close_and_both_urls() {
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    let (got, _) = broker_side(UnixListener::bind(&sock).expect("bind"), 1, |mut s| {
        // Reading to EOF here only ends because the agent's SHUT_WR got
        // through the bridge as a half-close.
        let data = read_to_end(&s);
        s.write_all(b"pong:").expect("write");
        s.write_all(&data).expect("write");
        data
    });
    let script = r#"
env = open("/proc/self/environ", "rb").read().split(b"\0")
assert sum(e.startswith(b"OPENAI_BASE_URL=") for e in env) == 1, env
s = conn()
s.sendall(b"ping")
s.shutdown(socket.SHUT_WR)
print(read_all(s).decode())
"#;
    let mut p = bridged(&dir.0, &sock, script, &[]);
    // A stale entry is replaced, not duplicated.
    p.env
        .push(("OPENAI_BASE_URL".into(), "https://api.example".into()));
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    assert_eq!(got.recv_timeout(SAFETY).expect("broker side"), b"ping");
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(stdout, "pong:ping\n");
}

#[test]
fn five_mebibytes_each_way_at_once() {
    const N: usize = 5 << 20;
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    // An echo server that counts and checksums what it relays back.
    let (got, _) = broker_side(UnixListener::bind(&sock).expect("bind"), 1, |s| {
        let (mut count, mut crc) = (0usize, 0u32);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = (&s).read(&mut buf).expect("broker side read");
            if n == 0 {
                break;
            }
            count += n;
            crc = crc32(crc, &buf[..n]);
            (&s).write_all(&buf[..n]).expect("broker side write");
        }
        s.shutdown(Shutdown::Write).expect("half-close");
        (count, crc)
    });
    // The agent sends and receives at the same time (the echo comes back
    // while it is still sending), so both directions are busy together.
    let script = r#"
import threading, zlib
N = int(sys.argv[1])
data = os.urandom(N)
s = conn()
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
got = read_all(s)
t.join()
print(len(data), zlib.crc32(data), len(got), zlib.crc32(got), got == data)
"#;
    let p = bridged(&dir.0, &sock, script, &[&N.to_string()]);
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    let (count, crc) = got.recv_timeout(SAFETY).expect("broker side");
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(count, N);
    assert_eq!(stdout, format!("{N} {crc} {N} {crc} True\n"));
}

#[test]
fn concurrent_connections_each_get_their_own_stream() {
    const CONNS: usize = 8;
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    // No connection is answered before all of them are open on the broker
    // side: a bridge that served them one by one would never get there.
    let barrier = Arc::new(Barrier::new(CONNS));
    let (got, _) = broker_side(
        UnixListener::bind(&sock).expect("bind"),
        CONNS,
        move |mut s| {
            let data = read_to_end(&s);
            barrier.wait();
            s.write_all(b"echo:").expect("write");
            s.write_all(&data).expect("write");
            data
        },
    );
    let script = r#"
n = int(sys.argv[1])
socks = [conn() for _ in range(n)]
msg = lambda i: ("conn-%d;" % i).encode() * (1000 * (i + 1))
for i, s in enumerate(socks):
    s.sendall(msg(i))
    s.shutdown(socket.SHUT_WR)
for i, s in enumerate(socks):
    got = read_all(s)
    assert got == b"echo:" + msg(i), (i, len(got))
print("ok", n)
"#;
    let p = bridged(&dir.0, &sock, script, &[&CONNS.to_string()]);
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(stdout, format!("ok {CONNS}\n"));
    let mut seen: Vec<Vec<u8>> = (0..CONNS)
        .map(|_| got.recv_timeout(SAFETY).expect("broker side"))
        .collect();
    seen.sort_by_key(Vec::len);
    for (i, data) in seen.iter().enumerate() {
        assert_eq!(
            data,
            &format!("conn-{i};").repeat(1000 * (i + 1)).into_bytes()
        );
    }
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    const CAP: usize = 64;
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    let (got, acceptor) = broker_side(UnixListener::bind(&sock).expect("bind"), CAP, |mut s| {
        let data = read_to_end(&s);
        s.write_all(&data).expect("write");
        data.len()
    });
    // The first CAP connections stay open (the broker side waits for their
    // EOF), so the next one finds no room.
    let script = r#"
cap = int(sys.argv[1])
socks = [conn() for _ in range(cap)]
extra = conn()
try:
    print("extra", "eof" if extra.recv(10) == b"" else "data")
except ConnectionResetError:
    print("extra", "reset")
for i, s in enumerate(socks):
    s.sendall(b"x" * (i + 1))
    s.shutdown(socket.SHUT_WR)
for i, s in enumerate(socks):
    assert read_all(s) == b"x" * (i + 1), i
print("ok", len(socks))
"#;
    let p = bridged(&dir.0, &sock, script, &[&CAP.to_string()]);
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(stdout, format!("extra reset\nok {CAP}\n"));
    let mut lens: Vec<usize> = (0..CAP)
        .map(|_| got.recv_timeout(SAFETY).expect("broker side"))
        .collect();
    lens.sort_unstable();
    assert_eq!(lens, (1..=CAP).collect::<Vec<_>>());
    // The refused connection never reached the broker side.
    let listener = acceptor.join().expect("acceptor");
    listener.set_nonblocking(true).expect("nonblocking");
    let err = listener.accept().expect_err("no further connection");
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn nobody_listening_closes_the_agents_connection_and_the_turn_goes_on() {
    let dir = TempDir::new();
    // A path that does not exist, and a socket file nobody listens on.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    for sock in [dir.0.join("missing.sock"), stale] {
        let script = r#"
s = conn()
try:
    s.sendall(b"hello")
    print("eof" if s.recv(100) == b"" else "data")
except (ConnectionResetError, BrokenPipeError):
    print("reset")
except socket.timeout:
    print("timeout")
"#;
        let p = bridged(&dir.0, &sock, script, &[]);
        let (status, code, stdout, stderr) = run(Shim::start(TempDir::new(), &p));
        assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
        assert!(
            stdout == "reset\n" || stdout == "eof\n",
            "{sock:?}: {stdout}"
        );
    }
}

#[test]
fn agent_inherits_no_bridge_descriptor() {
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    let _listener = UnixListener::bind(&sock).expect("bind");
    // The listing's own descriptor is the only one past stdio.
    let script = r#"
print(sorted(int(fd) for fd in os.listdir("/proc/self/fd")))
"#;
    let p = bridged(&dir.0, &sock, script, &[]);
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(stdout, "[0, 1, 2, 3]\n");
}

#[test]
fn open_bridged_connections_do_not_keep_the_shim_alive() {
    let dir = TempDir::new();
    let sock = dir.0.join("llm.sock");
    // The broker side answers and then holds its connection open.
    let (got, _) = broker_side(UnixListener::bind(&sock).expect("bind"), 1, |mut s| {
        s.write_all(b"hello").expect("write");
        s
    });
    let script = r#"
s = conn()
got = b""
while len(got) < 5:
    got += s.recv(5 - len(got))
print(got.decode(), flush=True)
os._exit(0)
"#;
    let p = bridged(&dir.0, &sock, script, &[]);
    let (status, code, stdout, stderr) = run(Shim::start(dir, &p));
    assert_eq!((status, code), (AgentStatus::Code(0), 0), "{stderr}");
    assert_eq!(stdout, "hello\n");
    // The shim is gone, and its end of the connection with it.
    let mut held = got.recv_timeout(SAFETY).expect("broker side");
    assert_eq!(read_to_end(&held), b"");
    let err = held.write_all(b"more").expect_err("peer closed");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn a_port_in_use_is_a_setup_failure_before_the_agent_runs() {
    let dir = TempDir::new();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let marker = dir.0.join("marker");
    let mut p = payload(&dir.0, &["/bin/sh", "-c", "touch marker"]);
    p.llm = Some(LlmBridge {
        port,
        socket_path: dir.0.join("llm.sock").to_str().expect("utf-8").into(),
        env_vars: vec!["ANTHROPIC_BASE_URL".into()],
        url_path: String::new(),
    });
    let mut shim = Shim::start(dir, &p);
    let (class, message) = shim.go_and_fail();
    assert_eq!(class, FailureClass::Setup);
    assert!(
        message.starts_with(&format!("cannot listen on 127.0.0.1:{port}: ")),
        "{message}"
    );
    let ((code, _, stderr), _dir) = shim.finish_keeping_dir();
    assert_eq!(code, 124);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!marker.exists(), "the agent ran");
}
