"""A real broker for the tests: the `turnstile` binary run as `turnstile serve` on a
temp state dir and socket, in direct mode and in nsjail mode.

The binary comes from TURNSTILE_BIN, or is built with cargo (in CARGO_TARGET_DIR when
set); the shim and nsjail from TURNSTILE_SHIM and TURNSTILE_NSJAIL, or where
scripts/build-shim.sh and scripts/setup-nsjail.sh put them. Like the Rust integration
suite, this needs root (namespaces, cgroups, a separate jail uid) and fails with the
remedy when something is missing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
MODES = ("direct", "nsjail")


def _target_dir() -> Path:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(json.loads(out)["target_directory"])


def _env_path(var: str, default: Path, remedy: str) -> Path:
    path = Path(os.environ.get(var) or default)
    if not path.exists():
        pytest.fail(f"MISSING: {path} ({var}) — {remedy}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def turnstile_bin() -> Path:
    if os.geteuid() != 0:
        pytest.fail(
            "MISSING: root — the broker's nsjail-mode and cgroup setup needs it (CI runs as root)",
            pytrace=False,
        )
    if os.environ.get("TURNSTILE_BIN"):
        return _env_path("TURNSTILE_BIN", Path(), "build it with cargo build -p turnstile-cli")
    if shutil.which("cargo") is None:
        pytest.fail("MISSING: cargo (or set TURNSTILE_BIN to a turnstile binary)", pytrace=False)
    subprocess.run(
        ["cargo", "build", "--locked", "--quiet", "-p", "turnstile-cli", "--bin", "turnstile"],
        cwd=REPO,
        check=True,
    )
    return _target_dir() / "debug" / "turnstile"


@pytest.fixture(scope="session")
def shim() -> Path:
    default = Path(
        os.environ.get("CARGO_TARGET_DIR") or REPO / "target"
    ) / "x86_64-unknown-linux-gnu/shim/turnstile-shim"
    return _env_path("TURNSTILE_SHIM", default, "build it with scripts/build-shim.sh")


@pytest.fixture(scope="session")
def nsjail() -> Path:
    return _env_path(
        "TURNSTILE_NSJAIL", REPO / ".tools/bin/nsjail", "install it with scripts/setup-nsjail.sh"
    )


def _unmount_below(root: Path) -> None:
    """Unmounts what a broker that did not stop cleanly left mounted below `root`
    (session disk images), deepest first, so the temp dir can go."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    below = [
        Path(fields[4])
        for fields in (line.split(" ") for line in lines)
        if len(fields) > 4 and Path(fields[4]).is_relative_to(root) and Path(fields[4]) != root
    ]
    for mount in sorted(below, key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


class Daemon:
    """`turnstile serve` as a child process, with its log collected."""

    def __init__(
        self,
        binary: Path,
        mode: str,
        shim: Path,
        nsjail: Path,
        extra: list[str] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="turnstile-py-"))
        # The jail traverses the state dir from inside its user namespace.
        self.dir.chmod(0o711)
        self.socket = self.dir / "broker.sock"
        self.state = self.dir / "state"
        self.mode = mode
        args = [
            str(binary),
            "serve",
            "--state-dir", str(self.state),
            "--socket", str(self.socket),
            "--mode", mode,
            "--shim", str(shim),
            "--jail-config", str(REPO / "jail-configs/agent.cfg"),
            "--kill-grace-ms", "300",
            *(extra or []),
        ]  # fmt: skip
        if mode == "nsjail":
            args += ["--nsjail", str(nsjail)]
        env = dict(os.environ, TURNSTILE_LOG="info")
        self.proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_log, daemon=True).start()
        self.listening = self.wait_log("listening")

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            print(f"[daemon {self.mode}] {line}", end="", file=sys.stderr)
            self._lines.put(line)
        self._lines.put(None)

    def wait_log(self, needle: str) -> str:
        """Waits for a log line containing `needle` (the daemon's own progress;
        bounded so that a daemon that hangs fails the test instead)."""
        while True:
            try:
                line = self._lines.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"no daemon log line with {needle!r} in 120 s: {self.log}")
            if line is None:
                pytest.fail(f"daemon exited before logging {needle!r}: {self.log}")
            self.log.append(line)
            if needle in line:
                return line

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        _unmount_below(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


@pytest.fixture(scope="session")
def start_daemon(
    turnstile_bin: Path, shim: Path, nsjail: Path
) -> Iterator[Callable[..., Daemon]]:
    """A factory for daemons of a test's own (stopped at the end of the session at
    the latest)."""
    started: list[Daemon] = []

    def start(mode: str = "direct", extra: list[str] | None = None) -> Daemon:
        d = Daemon(turnstile_bin, mode, shim, nsjail, extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="session", params=MODES)
def daemon(request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon]) -> Daemon:
    """A broker shared by the tests of one mode (each test uses its own sessions)."""
    return start_daemon(request.param)


@pytest.fixture(scope="session")
def direct_daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    """A direct-mode broker, for tests whose subject does not depend on the mode."""
    return start_daemon("direct")


def async_test(fn: Callable[..., Any]) -> Callable[..., None]:
    """Runs an async test function in a fresh event loop."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def new_session() -> str:
    return f"py-{uuid.uuid4().hex[:12]}"
