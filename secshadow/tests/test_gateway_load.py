"""The gateway under load, measured on the real process: a slow reader keeps its memory
bounded (backpressure both ways), and many paired sessions cost little memory each.
1000 paired sessions run here (SECSHADOW_GATEWAY_SESSIONS changes it); CPU per GB and the
plaintext-mode figures come from benchmarks/bench_gateway.py."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from secshadow.lab.harness import GatewayProcess, start_gateway
from secshadow.tests._gateway_helpers import endpoint_for, rss_kib, wait_until
from secshadow.tests._gateway_load import Reader, Writer, open_idle_sessions

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def gateway(tmp_path: Any) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_keeps_the_gateway_memory_bounded(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor

    pid = gateway.process.process.pid
    sid = "slow-reader"
    reader = Reader(reactor, rate=256 * 1024)  # 256 KiB/s
    writer = Writer(reactor, limit=2048 * MIB)  # far more than it will manage to send
    device = endpoint_for(reactor, gateway, sid, "device").connect(Factory.forProtocol(lambda: reader))
    await endpoint_for(reactor, gateway, sid, "console").connect(Factory.forProtocol(lambda: writer))
    await device
    await deferLater(reactor, 0.5, lambda: None)
    baseline = rss_kib(pid)
    peak = baseline
    for _ in range(16):  # 8 s of a writer pushing as fast as it is allowed to
        await deferLater(reactor, 0.5, lambda: None)
        peak = max(peak, rss_kib(pid))
    in_flight = writer.sent - reader.received
    growth_mib = (peak - baseline) / 1024
    print(f"\nslow reader: writer sent {writer.sent / MIB:.1f} MiB, reader got {reader.received / MIB:.1f} MiB, "
          f"{writer.pauses} pauses, gateway RSS {baseline / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB")
    assert writer.pauses > 0  # the writer was held back, through the gateway, by the slow reader
    assert reader.received > MIB  # and the reader did get data all along
    # Without backpressure the writer would have pushed hundreds of MiB into the gateway.
    assert in_flight < 16 * MIB, f"{in_flight / MIB:.1f} MiB in flight"
    assert growth_mib < 12, f"gateway RSS grew by {growth_mib:.1f} MiB"
    # The reader catches up at full speed, and every byte arrived in order, unchanged.
    writer.limit = writer.sent
    reader.full_speed()
    assert await _eventually(reactor, lambda: reader.received == writer.sent, 30)
    assert not reader.corrupt
    writer.transport.loseConnection()  # type: ignore[union-attr]
    await reader.done
    assert wait_until(lambda: [e for e in gateway.process.named("closed") if e["sid"] == sid])
    [closed] = [e for e in gateway.process.named("closed") if e["sid"] == sid]
    assert closed["bytes_console_to_device"] == writer.sent and closed["close_code"] == 1000


@pytest_twisted.ensureDeferred
async def test_a_thousand_paired_sessions_cost_little_memory_each(gateway: GatewayProcess) -> None:
    from twisted.internet import reactor

    from secshadow.hygiene import raise_descriptor_limit

    raise_descriptor_limit()  # this process holds both legs of every session
    pid = gateway.process.process.pid
    count = int(os.environ.get("SECSHADOW_GATEWAY_SESSIONS", "1000"))
    warm = await open_idle_sessions(lambda sid, role: endpoint_for(reactor, gateway, sid, role), 5, "warm")
    await deferLater(reactor, 0.5, lambda: None)
    before = rss_kib(pid)
    started = time.monotonic()
    legs = await open_idle_sessions(lambda sid, role: endpoint_for(reactor, gateway, sid, role), count, "many")
    opened_s = time.monotonic() - started
    assert await _eventually(reactor, lambda: all(leg.received == 5 for leg in legs), 20)
    await deferLater(reactor, 1.0, lambda: None)
    after = rss_kib(pid)
    per_session = (after - before) / count
    print(f"\n{count} paired sessions (TLS legs) opened in {opened_s:.2f} s: gateway RSS {before / 1024:.1f} -> "
          f"{after / 1024:.1f} MiB, {per_session:.1f} KiB per session")
    assert len(gateway.process.named("paired")) >= count + 5
    assert per_session < 256, f"{per_session:.0f} KiB per session"
    for leg in legs + warm:
        leg.transport.loseConnection()  # type: ignore[union-attr]
    for leg in legs + warm:
        await leg.done
    assert wait_until(lambda: len(gateway.process.named("closed")) == count + 5, timeout=20)


async def _eventually(reactor: Any, predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await deferLater(reactor, 0.05, lambda: None)
    return bool(predicate())
