"""Broker-side forwarding from Python: the credential goes in the turn's Start, the
broker serves the agent's LLM connections itself, and the turn yields an LlmRequest
summary per request. The upstream is a loopback HTTP server of the test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import (
    Broker,
    Exited,
    InvalidArgument,
    LlmRequest,
    LlmUpstream,
    Started,
    Stdout,
)

KEY = "sk-python-forwarded-5e1d9c"

# The agent: reads its events one by one and prints each as it arrives.
AGENT = r"""
import http.client, json, os, urllib.parse
u = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request("GET", "/v1/sse", headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"]})
r = c.getresponse()
print("status", r.status, flush=True)
while True:
    line = r.readline()
    if not line:
        break
    if line.startswith(b"data:"):
        print("event", json.loads(line[5:])["n"], flush=True)
print("done", flush=True)
"""


class Upstream:
    """Three server-sent events: the first at once, the others only once the test
    saw the first reach the agent (so it cannot have been buffered to the end)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.keys: list[str | None] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                upstream.keys.append(self.headers.get("x-api-key"))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for n in range(3):
                    if n == 1 and not upstream.release.wait(timeout=60):
                        return
                    self.wfile.write(f'data: {{"n": {n}}}\n\n'.encode())
                    self.wfile.flush()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@async_test
async def test_a_broker_side_forwarded_sse_request_streams(
    daemon: Daemon, upstream: Upstream
) -> None:
    up = LlmUpstream(upstream.url, KEY)
    assert KEY not in repr(up)
    events = []
    out = b""
    async with Broker(daemon.socket) as broker:
        async with broker.run_turn(
            new_session(), ["python3", "-c", AGENT], llm_upstream=up
        ) as turn:
            async for event in turn:
                events.append(event)
                if isinstance(event, Stdout):
                    out += event.data
                    if b"event 0\n" in out:
                        upstream.release.set()
    started, exited = events[0], events[-1]
    assert isinstance(started, Started) and started.llm_upstream == upstream.url
    assert isinstance(exited, Exited) and exited.ok, (exited, out)
    assert out == b"status 200\nevent 0\nevent 1\nevent 2\ndone\n"
    # The upstream got the key, not the agent's placeholder.
    assert upstream.keys == [KEY]
    assert KEY.encode() not in out
    summaries = [e for e in events if isinstance(e, LlmRequest)]
    assert len(summaries) == 1
    s = summaries[0]
    assert (s.method, s.path, s.status, s.error) == ("GET", "/v1/sse", 200, "")
    assert s.response_bytes == 3 * len(b'data: {"n": 0}\n\n')
    assert s.duration_us > 0


@async_test
async def test_a_bad_upstream_is_invalid_argument(direct_daemon: Daemon) -> None:
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(InvalidArgument, match="the scheme must be http or https"):
            await broker.run_turn(
                new_session(), ["true"], llm_upstream=LlmUpstream("ftp://127.0.0.1:1", KEY)
            )
        with pytest.raises(InvalidArgument, match="llm_upstream.credential") as e:
            await broker.run_turn(
                new_session(),
                ["true"],
                llm_upstream=LlmUpstream("http://127.0.0.1:1", "k" * 9000),
            )
        assert "kkkk" not in str(e.value)
    with pytest.raises(ValueError, match="credential_header"):
        LlmUpstream("http://127.0.0.1:1", KEY, credential_header="cookie").to_pb()
