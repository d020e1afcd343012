#!/usr/bin/env python3
"""The Python client against the Rust client, in the same run, on one broker.

- turn start: ``Start`` sent → ``Started`` received, for a ``/bin/true`` turn
  (Python: ``await broker.run_turn(...)``, which returns on ``Started``; Rust:
  ``Turn::start`` and the first event). Goal: Python p50 ≤ Rust p50 + 1 ms.
- stdout relay: ``Started`` → ``Exited`` of ``head -c BYTES /dev/zero``, every
  byte counted. Goal: Python ≥ 100 MB/s.

The Rust side is ``client_peer`` (benches/src/bin/client_peer.rs), a separate
process on the same socket. Both sides take their samples in alternating batches,
so whatever else the machine does weighs on both alike; each keeps one channel
for all its turns, as an executor would.

Reproduce (root, after scripts/setup-nsjail.sh, scripts/build-shim.sh and
scripts/setup-python.sh)::

    cargo build --release -p turnstile-cli -p turnstile-benches --bin turnstile --bin client_peer
    .tools/venv/bin/python clients/python/bench/bench.py

Binaries: TURNSTILE_BIN and TURNSTILE_CLIENT_PEER, else <target>/release/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from turnstile_client import Broker, ExitReason, Exited, Stdout

REPO = Path(__file__).resolve().parents[3]


def target_dir() -> Path:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(json.loads(out)["target_directory"])


def binary(var: str, name: str) -> Path:
    path = Path(os.environ.get(var) or target_dir() / "release" / name)
    if not path.is_file():
        sys.exit(
            f"bench: {path} is missing ({var}); build it with cargo build --release "
            "-p turnstile-cli -p turnstile-benches --bin turnstile --bin client_peer"
        )
    return path


def tool(var: str, default: Path, remedy: str) -> Path:
    path = Path(os.environ.get(var) or default)
    if not path.exists():
        sys.exit(f"bench: {path} is missing ({var}); {remedy}")
    return path


class Daemon:
    def __init__(self, mode: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="turnstile-bench-"))
        self.dir.chmod(0o711)
        self.socket = self.dir / "broker.sock"
        cargo_target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        args = [
            str(binary("TURNSTILE_BIN", "turnstile")),
            "serve",
            "--mode", mode,
            "--state-dir", str(self.dir / "state"),
            "--socket", str(self.socket),
            "--shim", str(tool(
                "TURNSTILE_SHIM",
                cargo_target / "x86_64-unknown-linux-gnu/shim/turnstile-shim",
                "build it with scripts/build-shim.sh",
            )),
            "--jail-config", str(REPO / "jail-configs/agent.cfg"),
        ]  # fmt: skip
        if mode == "nsjail":
            args += ["--nsjail", str(tool(
                "TURNSTILE_NSJAIL", REPO / ".tools/bin/nsjail",
                "install it with scripts/setup-nsjail.sh",
            ))]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            env=dict(os.environ, TURNSTILE_LOG="info"),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "listening" in line:
                break
        else:
            sys.exit(f"bench: the broker exited before listening ({self.proc.wait()})")
        # The rest of its log is read and dropped: a full pipe would stall it.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Session disk images a broker that did not stop cleanly left mounted,
        # deepest first, so that the temp dir can go.
        mounts = [
            line.split(" ")[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split(" ")[4].startswith(f"{self.dir}/")
        ]
        for mount in sorted(mounts, key=lambda m: m.count("/"), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def rust_samples(socket: Path, what: str, n: int, session: str, *extra: str) -> list[list[float]]:
    """The columns of client_peer's lines, in seconds."""
    peer = binary("TURNSTILE_CLIENT_PEER", "client_peer")
    out = subprocess.run(
        [str(peer), str(socket), what, str(n), session, *extra],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [[int(v) / 1e6 for v in line.split()] for line in out.splitlines()]


async def python_start(broker: Broker, session: str) -> tuple[float, float]:
    """Start → Started as the caller sees it, and the broker's part of it."""
    t0 = time.perf_counter()
    turn = await broker.run_turn(session, ["/bin/true"])
    elapsed = time.perf_counter() - t0
    assert turn.started is not None
    exited = await turn.wait()
    assert exited.reason == ExitReason.EXITED, exited
    return elapsed, turn.started.spawn_us / 1e6


async def python_relay(broker: Broker, session: str, size: int) -> float:
    turn = await broker.run_turn(session, ["/usr/bin/head", "-c", str(size), "/dev/zero"])
    t0 = time.perf_counter()
    n = 0
    async for event in turn:
        if isinstance(event, Stdout):
            n += len(event.data)
        elif isinstance(event, Exited):
            elapsed = time.perf_counter() - t0
            assert event.reason == ExitReason.EXITED, event
    assert n == size, (n, size)
    return elapsed


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[round((len(s) - 1) * p)]


async def bench_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    daemon = Daemon(mode)
    try:
        starts: dict[str, list[float]] = {"rust": [], "python": []}
        # Start → Started less the broker's own part (Started.spawn_us): what the
        # client and the transport add, less sensitive to the spawn's noise.
        overhead: dict[str, list[float]] = {"rust": [], "python": []}
        relays: dict[str, list[float]] = {"rust": [], "python": []}
        async with Broker(daemon.socket) as broker:
            # Warm-up (unmeasured), as client_peer does.
            await python_start(broker, "py-start")
            await python_relay(broker, "py-relay", args.bytes)
            for _ in range(args.rounds):
                for total, spawn in rust_samples(daemon.socket, "start", args.batch, "rs-start"):
                    starts["rust"].append(total)
                    overhead["rust"].append(total - spawn)
                for _ in range(args.batch):
                    total, spawn = await python_start(broker, "py-start")
                    starts["python"].append(total)
                    overhead["python"].append(total - spawn)
                relays["rust"] += [
                    row[0]
                    for row in rust_samples(
                        daemon.socket, "relay", args.relay_batch, "rs-relay", str(args.bytes)
                    )
                ]
                for _ in range(args.relay_batch):
                    relays["python"].append(await python_relay(broker, "py-relay", args.bytes))
    finally:
        daemon.stop()
    r50, p50 = pct(starts["rust"], 0.5), pct(starts["python"], 0.5)
    r90, p90 = pct(starts["rust"], 0.9), pct(starts["python"], 0.9)
    o50 = {k: pct(v, 0.5) for k, v in overhead.items()}
    s50 = {k: pct([t - o for t, o in zip(starts[k], overhead[k])], 0.5) for k in starts}
    mbps = {k: args.bytes / statistics.median(v) / 1e6 for k, v in relays.items()}
    print(
        f"REPORT python_client/{mode} turn start: n={len(starts['python'])} "
        f"python p50={p50 * 1e3:.3f} ms p90={p90 * 1e3:.3f} ms | "
        f"rust p50={r50 * 1e3:.3f} ms p90={r90 * 1e3:.3f} ms | "
        f"python - rust: p50 {(p50 - r50) * 1e3:+.3f} ms p90 {(p90 - r90) * 1e3:+.3f} ms "
        f"(goal p50 ≤ +1 ms)"
    )
    print(
        f"REPORT python_client/{mode} turn start less the broker's spawn_us: "
        f"python p50={o50['python'] * 1e3:.3f} ms | rust p50={o50['rust'] * 1e3:.3f} ms | "
        f"python - rust: {(o50['python'] - o50['rust']) * 1e3:+.3f} ms "
        f"(spawn_us p50: python turns {s50['python'] * 1e3:.3f} ms, "
        f"rust turns {s50['rust'] * 1e3:.3f} ms)"
    )
    print(
        f"REPORT python_client/{mode} stdout relay ({args.bytes >> 20} MiB per turn, "
        f"median of {len(relays['python'])}): python {mbps['python']:.0f} MB/s | "
        f"rust {mbps['rust']:.0f} MB/s | ratio {mbps['python'] / mbps['rust']:.2f} "
        f"(goal python ≥ 100 MB/s)"
    )
    return {
        "start_p50_delta_ms": (p50 - r50) * 1e3,
        "relay_python_mbps": mbps["python"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["direct", "nsjail", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=10, help="alternating batches")
    parser.add_argument("--batch", type=int, default=10, help="turn starts per batch and side")
    parser.add_argument("--relay-batch", type=int, default=2, help="relay turns per batch and side")
    parser.add_argument("--bytes", type=int, default=256 << 20, help="stdout bytes per relay turn")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a goal is missed"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (the broker's jails and cgroups), like the other benchmarks")
    modes = ["direct", "nsjail"] if args.mode == "both" else [args.mode]
    ok = True
    for mode in modes:
        got = asyncio.run(bench_mode(mode, args))
        ok &= got["start_p50_delta_ms"] <= 1.0 and got["relay_python_mbps"] >= 100
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
