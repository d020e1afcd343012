"""A stand-in for the Codex CLI's start-up and first model request, for the
agent-profile tests. Like the real CLI (0.171) it ignores OPENAI_BASE_URL
for its model provider: it reads the provider table named by
`model_provider` from ~/.codex/config.toml, takes the key from the variable
`env_key` names (refusing to start without it), needs the base URL to end in
/v1, and tries a WebSocket upgrade of `<base>/responses` first; then it posts
to `<base>/responses`. Prints what it saw, one `tag value` line each."""
import base64
import hashlib
import http.client
import os
import socket
import struct
import sys
import tomllib
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

with open(os.path.join(os.environ["HOME"], ".codex", "config.toml"), "rb") as f:
    cfg = tomllib.load(f)
provider = cfg["model_providers"][cfg["model_provider"]]
base = provider["base_url"]
key = os.environ.get(provider["env_key"])
if not key:
    print(f"Missing environment variable: `{provider['env_key']}`", file=sys.stderr)
    sys.exit(1)
u = urllib.parse.urlparse(base)
if not u.path.endswith("/v1"):
    print("base-url-without-v1", base, file=sys.stderr)
    sys.exit(3)
print("provider", cfg["model_provider"], u.path)
print("env-url-matches", os.environ.get("OPENAI_BASE_URL") == base)
print("key", key)


def send(s, opcode, payload):
    """One masked frame (clients mask every frame)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


class Reader:
    def __init__(self, s, buf):
        self.s, self.buf = s, buf

    def take(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        b0, b1 = self.take(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.take(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.take(8))[0]
        return b0 & 0x0F, self.take(n)


s = socket.create_connection((u.hostname, u.port), timeout=60)
ws_key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {u.path}/responses HTTP/1.1\r\nHost: {u.netloc}\r\n"
           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Version: 13\r\n"
           f"Authorization: Bearer {key}\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
head, _, rest = buf.partition(b"\r\n\r\n")
lines = head.decode().split("\r\n")
status = int(lines[0].split(" ")[1])
headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
want = base64.b64encode(hashlib.sha1((ws_key + GUID).encode()).digest()).decode()
print("ws-status", status, headers.get("sec-websocket-accept") == want)
if status != 101:
    # The real CLI retries the upgrade for seconds before falling back.
    sys.exit(4)
r = Reader(s, rest)
print("ws-greeting", r.frame()[1].decode())
for i in (1, 2):
    send(s, 0x1, f"ping {i}".encode())
    print("ws-echo", r.frame()[1].decode())
send(s, 0x8, struct.pack("!H", 1000))
s.close()

c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request("POST", u.path + "/responses", body=b'{"model":"stand-in","input":"hi"}',
          headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
resp = c.getresponse()
print("http", resp.status, resp.read().decode())
