"""What depends on the daemon's own setup: the loopback TCP listener with its
token, and a broker that shuts down under a running turn."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import Broker, ExitReason, Stdout, Unauthenticated, Unavailable

HERE = Path(__file__).resolve().parent


@async_test
async def test_tcp_listener_with_its_token(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-for-the-test\n")
    token_file.chmod(0o600)
    daemon = start_daemon("direct", ["--listen", "127.0.0.1:0", "--token-file", str(token_file)])
    line = daemon.wait_log("listening (tcp")
    port = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert port, line
    address = f"127.0.0.1:{port.group(1)}"
    async with Broker.tcp(address, token_file.read_text()) as broker:
        result = await (await broker.run_turn(new_session(), ["echo", "over tcp"])).collect()
        assert result.stdout == b"over tcp\n"
    async with Broker.tcp(address, "wrong") as broker:
        with pytest.raises(Unauthenticated):
            await broker.list_sessions()
        with pytest.raises(Unauthenticated):
            await broker.run_turn(new_session(), ["true"])
    daemon.stop()


@async_test
async def test_a_broker_shutting_down_ends_the_turn_then_is_unavailable(
    start_daemon: Callable[..., Daemon],
) -> None:
    daemon = start_daemon("direct")
    async with Broker(daemon.socket) as broker:
        turn = await broker.run_turn(new_session(), ["/bin/sh", "-c", "echo ready; sleep 60"])
        first = await turn.__anext__()
        assert first == turn.started
        ready = await turn.__anext__()
        assert isinstance(ready, Stdout) and ready.data == b"ready\n"
        assert daemon.proc.poll() is None
        daemon.proc.terminate()
        exited = await turn.wait()
        assert exited.reason == ExitReason.BROKER_SHUTDOWN
        assert daemon.proc.wait(timeout=60) == 0
        with pytest.raises(Unavailable):
            await broker.run_turn(new_session(), ["true"])
    daemon.stop()


def test_the_checked_in_stubs_match_the_proto() -> None:
    script = HERE.parent / "scripts" / "generate_proto.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr + done.stdout
