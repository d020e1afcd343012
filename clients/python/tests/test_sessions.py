"""Session operations round-trip: list, show, fork, export, import, delete."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Daemon, async_test, new_session

from turnstile_client import Broker, NotFound


async def run_sh(broker: Broker, session: str, script: str) -> bytes:
    result = await (await broker.run_turn(session, ["/bin/sh", "-c", script])).collect()
    assert result.exited.ok, result
    return result.stdout


@async_test
async def test_export_import_fork_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    source = new_session()
    imported_from_file = new_session()
    imported_from_bytes = new_session()
    forked = new_session()
    async with Broker(daemon.socket) as broker:
        await run_sh(broker, source, "echo kept > note.txt; mkdir -p d; head -c 300000 /dev/urandom > d/blob; echo home > ~/h")
        digest = await run_sh(broker, source, "cat note.txt ~/h; cksum d/blob")

        archive = tmp_path / "source.tar"
        await broker.export_session_to(source, archive)
        assert archive.stat().st_size > 300_000
        assert [p.name for p in tmp_path.iterdir()] == ["source.tar"]  # no temp left
        info = await broker.import_session_from(imported_from_file, archive)
        assert info.session_id == imported_from_file

        chunks = [c async for c in broker.export_session(source)]
        assert len(chunks) > 1
        await broker.import_session(imported_from_bytes, b"".join(chunks))

        info = await broker.fork_session(source, forked)
        assert (info.session_id, info.turn_count) == (forked, 0)

        for other in (imported_from_file, imported_from_bytes, forked):
            assert await run_sh(broker, other, "cat note.txt ~/h; cksum d/blob") == digest

        # A copy is a copy: changing it leaves the source alone.
        await run_sh(broker, forked, "echo changed > note.txt")
        assert (await run_sh(broker, source, "cat note.txt")) == b"kept\n"

        listed = {s.session_id: s for s in await broker.list_sessions()}
        for s in (source, imported_from_file, imported_from_bytes, forked):
            assert s in listed
        ids = [s.session_id for s in await broker.list_sessions()]
        assert ids == sorted(ids)

        shown = await broker.get_session(source)
        assert shown == listed[source]
        assert shown.turn_count == 3
        assert shown.last_exit_reason == "exited"
        assert shown.last_turn_id is not None and shown.running_turn_id is None
        assert shown.disk_usage_bytes >= 300_000
        assert shown.last_turn_end_unix_ms >= shown.last_turn_start_unix_ms > 0

        await broker.delete_session(source)
        with pytest.raises(NotFound):
            await broker.get_session(source)
        # The others do not depend on it.
        assert await run_sh(broker, forked, "cat ~/h") == b"home\n"


@async_test
async def test_import_takes_a_file_object_and_chunks(direct_daemon: Daemon, tmp_path: Path) -> None:
    source = new_session()
    async with Broker(direct_daemon.socket) as broker:
        await run_sh(broker, source, "echo from-chunks > f")
        archive = tmp_path / "a.tar"
        await broker.export_session_to(source, archive)
        data = archive.read_bytes()

        with archive.open("rb") as f:
            a = await broker.import_session(new_session(), f)

        async def agen():  # type: ignore[no-untyped-def]
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        b = await broker.import_session(new_session(), agen())
        c = await broker.import_session(new_session(), [data[:10], data[10:]])
        for info in (a, b, c):
            assert await run_sh(broker, info.session_id, "cat f") == b"from-chunks\n"


@async_test
async def test_a_failed_export_leaves_no_file(direct_daemon: Daemon, tmp_path: Path) -> None:
    dest = tmp_path / "out.tar"
    async with Broker(direct_daemon.socket) as broker:
        with pytest.raises(NotFound):
            await broker.export_session_to(new_session(), dest)
    assert list(tmp_path.iterdir()) == []
