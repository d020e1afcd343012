# A test agent for the LLM relay: talks HTTP to the URL the shim put in
# ANTHROPIC_BASE_URL and prints one line per check, flushed at once (the
# test reacts to "sse-first"). argv: mode, upstream port, cap in bytes.
import http.client, json, os, socket, sys, threading, urllib.parse

mode, upstream_port, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
url = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
HOST, PORT = url.hostname, url.port
# A safety net against a hang, not a synchronisation.
TIMEOUT = 60


def say(*parts):
    print(*parts, flush=True)


def conn():
    return http.client.HTTPConnection(HOST, PORT, timeout=TIMEOUT)


def request(method, path, body=None, headers=None):
    c = conn()
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    hdrs = dict(r.getheaders())
    c.close()
    return r.status, hdrs, data


say("env", json.dumps(dict(os.environ), sort_keys=True))
for f in ("/proc/self/environ", "/proc/1/environ"):
    try:
        say("file", f, open(f, "rb").read().replace(b"\0", b" ").decode())
    except OSError as e:
        say("file", f, "unreadable", e.errno)

# A 5 MiB body, checked end to end.
body = bytes(range(256)) * (5 * 1024 * 4)
status, _, data = request("POST", "/v1/echo", body, {"content-type": "application/octet-stream"})
say("echo", status, data.decode(), len(body), sum(body) % 2**32)

# Server-sent events: the upstream sends the first, then waits until the
# test has seen "sse-first" on stdout.
c = conn()
c.request("GET", "/v1/sse")
r = c.getresponse()
events = []
first = True
while len(events) < 5:
    line = r.readline()
    if not line:
        break
    if line.startswith(b"data:"):
        events.append(json.loads(line[5:])["n"])
        if first:
            say("sse-first", events[0])
            first = False
say("sse-all", r.status, r.getheader("content-type"), events)
c.close()

# 16 requests at once: the upstream answers none before all 16 arrived.
results = [None] * 16


def one(i):
    try:
        results[i] = request("GET", "/v1/concurrent")[0]
    except Exception as e:
        results[i] = repr(e)


threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
say("concurrent", results)

# Three requests on one keep-alive connection.
c = conn()
socks = []
for _ in range(3):
    c.request("GET", "/v1/keepalive")
    r = c.getresponse()
    r.read()
    socks.append(id(c.sock))
say("keepalive", r.status, len(set(socks)))
c.close()

# Upstream statuses pass through.
status, hdrs, data = request("GET", "/v1/ratelimited")
say("ratelimited", status, hdrs.get("retry-after"), data.decode())

# The agent's own credentials never reach the upstream.
status, hdrs, data = request(
    "GET", "/v1/whoami", headers={"x-api-key": "agent-fake", "authorization": "Bearer agent-fake"}
)
say("whoami", status, json.dumps(hdrs, sort_keys=True), data.decode())

# Over the cap: 413, and the connection is still usable.
c = conn()
c.request("POST", "/v1/echo", body=b"x" * (cap + 1))
r = c.getresponse()
data = r.read()
say("toolarge", r.status, json.loads(data)["error"]["type"])
c.request("GET", "/v1/after")
r = c.getresponse()
say("after-toolarge", r.status, r.read().decode())
c.close()

# A response the agent does not read holds up no other connection: its
# bytes wait within that connection's window.
a = conn()
a.request("GET", "/v1/big")
ra = a.getresponse()
status, _, data = request("POST", "/v1/echo", b"hol")
say("hol", ra.status, status, data.decode())
a.close()

# Nothing but the bridge is reachable from the jail: the host's loopback
# listener (the upstream) is not, on any loopback address, and the jail has
# no interface but lo and no route out. Only loopback addresses are tried.
if mode == "nsjail":
    with open("/proc/net/dev") as f:
        ifaces = sorted(l.split(":")[0].strip() for l in f.read().splitlines()[2:] if ":" in l)
    say("ifaces", ",".join(ifaces))
    with open("/proc/net/route") as f:
        routes = [l.split()[0] for l in f.read().splitlines()[1:] if l.strip()]
    say("routes", ",".join(routes) or "none")
    for family, addr in (
        (socket.AF_INET, ("127.0.0.1", upstream_port)),
        (socket.AF_INET, ("127.0.0.2", upstream_port)),
        (socket.AF_INET6, ("::1", upstream_port)),
    ):
        s = socket.socket(family)
        s.settimeout(5)
        try:
            s.connect(addr)
            say("reach", addr, "CONNECTED")
        except OSError as e:
            say("reach", addr, "refused", type(e).__name__)
        s.close()
say("done")
