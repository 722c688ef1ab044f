"""The gateway relay's costs (issue 12): memory per paired session, CPU per GB relayed.

The gateway is a real ``secshadow-gateway`` process (TLS, or ``--plaintext`` as behind a
TLS-terminating load balancer); this script plays every leg, in its own process, so only
the gateway's RSS (``/proc/PID/status`` VmRSS) and CPU time (``/proc/PID/stat``) are
counted.

``sessions``: open N paired sessions (two legs each, one small message each way), then
report the gateway's RSS growth divided by N (after a warm-up of 10 sessions).
``throughput``: pump BYTES through S sessions at once (console to device) as fast as the
legs can, and report the gateway's CPU seconds per GB and the rate.

    python benchmarks/bench_gateway.py sessions [--sessions 1000] [--plaintext]
    python benchmarks/bench_gateway.py throughput [--bytes 1000000000] [--streams 1] [--chunk 16384] [--plaintext]

Prints one JSON object. Runs alone (2 cores: the legs and the gateway compete for CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import DeferredList, ensureDeferred  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from secshadow.lab.harness import start_gateway  # noqa: E402
from secshadow.tests._gateway_helpers import cpu_seconds, endpoint_for, rss_kib  # noqa: E402
from secshadow.tests._gateway_load import Reader, Writer, open_idle_sessions  # noqa: E402

GB = 1_000_000_000


async def sessions(reactor: Any, args: argparse.Namespace, gateway: Any) -> dict[str, Any]:
    pid = gateway.process.process.pid

    def endpoint(sid: str, role: str) -> Any:
        return endpoint_for(reactor, gateway, sid, role, timeout=120)

    warm = await open_idle_sessions(endpoint, 10, "warm")
    await deferLater(reactor, 1.0, lambda: None)
    before = rss_kib(pid)
    started = time.monotonic()
    legs = await open_idle_sessions(endpoint, args.sessions, "bench", batch=args.batch)
    opened = time.monotonic() - started
    while not all(leg.received == 5 for leg in legs):
        await deferLater(reactor, 0.1, lambda: None)
    await deferLater(reactor, 2.0, lambda: None)
    after = rss_kib(pid)
    cpu = cpu_seconds(pid)
    for leg in legs + warm:
        leg.transport.loseConnection()  # type: ignore[union-attr]
    await DeferredList([leg.done for leg in legs + warm])
    return {
        "sessions": args.sessions,
        "tls": not args.plaintext,
        "open_seconds": round(opened, 2),
        "gateway_rss_before_mib": round(before / 1024, 1),
        "gateway_rss_after_mib": round(after / 1024, 1),
        "kib_per_session": round((after - before) / args.sessions, 1),
        "gateway_cpu_seconds_total": round(cpu, 2),
    }


async def throughput(reactor: Any, args: argparse.Namespace, gateway: Any) -> dict[str, Any]:
    pid = gateway.process.process.pid
    per_stream = args.bytes // args.streams
    pairs = []
    for i in range(args.streams):
        sid = f"pump-{i}"
        reader = Reader(reactor)
        writer = Writer(reactor, per_stream, args.chunk)
        device = endpoint_for(reactor, gateway, sid, "device", timeout=60).connect(Factory.forProtocol(lambda r=reader: r))
        await endpoint_for(reactor, gateway, sid, "console", timeout=60).connect(
            Factory.forProtocol(lambda w=writer: w))
        await device
        pairs.append((writer, reader))
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    while not all(r.received >= per_stream for _, r in pairs):
        await deferLater(reactor, 0.05, lambda: None)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    total = per_stream * args.streams
    assert not any(r.corrupt for _, r in pairs)
    for writer, reader in pairs:
        writer.transport.loseConnection()  # type: ignore[union-attr]
        await reader.done
    return {
        "bytes": total,
        "streams": args.streams,
        "message_bytes": args.chunk,
        "tls": not args.plaintext,
        "seconds": round(elapsed, 2),
        "mb_per_s": round(total / elapsed / 1e6, 1),
        "gateway_cpu_seconds": round(cpu, 2),
        "gateway_cpu_seconds_per_gb": round(cpu / (total / GB), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("sessions", "throughput"))
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=GB)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=16 * 1024,
                        help="bytes per write, i.e. per message (default: one TLS record, 16 KiB)")
    parser.add_argument("--plaintext", action="store_true", help="gateway without TLS (behind a TLS front)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def run(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as work:
            gateway = start_gateway(Path(work), "--max-sessions", str(args.sessions + 100),
                                    "--pairing-timeout", "120", plaintext=args.plaintext)
            try:
                job = sessions if args.what == "sessions" else throughput
                print(json.dumps(await job(reactor, args, gateway)), flush=True)
            finally:
                gateway.stop()

    react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
