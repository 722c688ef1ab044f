"""Bounded memory under a slow reader (issue 4, part 5).

The device streams SIZE bytes (default 1 GiB) through a real ``secshadow-proxy`` process
while the viewer reads at RATE bytes/s (default 1 MB/s) for SLOW seconds, then as fast as
it can. The proxy's RSS (``/proc/<pid>/status`` VmRSS) is sampled throughout; the figure is
its growth over the level right after ``session-started``. Then the other direction: the
viewer sends SIZE bytes to a device that reads at RATE. Backpressure must keep both
growths far below 16 MiB.

    python benchmarks/bench_memory.py [--size BYTES] [--rate BYTES_PER_S] [--slow S]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secshadow.lab import certs  # noqa: E402
from secshadow.lab.harness import child_environment, python_module  # noqa: E402
from secshadow.lab.scripted import HELLO, DeviceConn, PeerClosed, ScriptedDevice, rss_kib, secret_json  # noqa: E402

CHUNK = 64 * 1024


def measure(size: int, rate: float, slow: float, direction: str = "to-viewer") -> dict[str, Any]:
    """One run; returns the figures (KiB, seconds, bytes)."""
    cert, key = certs.generate_self_signed()
    device_stats: dict[str, Any] = {"received": 0}

    def script(conn: DeviceConn) -> None:
        conn.recv_command()
        conn.send(HELLO)
        if direction == "to-viewer":
            block = b"\xa5" * CHUNK
            sent = 0
            while sent < size:
                conn.send(block[: min(CHUNK, size - sent)], timeout=600)
                sent += min(CHUNK, size - sent)
            conn.shutdown_write()
            conn.drain(30)
        else:
            started, got = time.monotonic(), 0
            while got < size:
                before = len(conn.received)
                try:
                    conn.recv(600)
                except (PeerClosed, TimeoutError):
                    break
                got += len(conn.received) - before
                del conn.received[:]
                elapsed = time.monotonic() - started
                if elapsed < slow and got > rate * elapsed:
                    time.sleep(min(0.2, (got - rate * elapsed) / rate))
            device_stats["received"] = got

    device = ScriptedDevice(cert, key, script)
    proxy = subprocess.Popen([*python_module("secshadow.cli"), "--json", "--secret-file", "-", "--viewer", "none"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env=child_environment())
    assert proxy.stdin is not None and proxy.stdout is not None
    proxy.stdin.write(secret_json(cert, str(uuid.uuid4()), device.port))
    proxy.stdin.close()
    port = 0
    for line in proxy.stdout:
        event = json.loads(line)
        if event["event"] == "listening":
            port = int(event["port"])
            break
    samples: list[int] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                samples.append(rss_kib(proxy.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.1)

    viewer = socket.create_connection(("127.0.0.1", port))
    viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    got = b""
    while len(got) < 12:
        got += viewer.recv(12 - len(got))
    assert got == HELLO
    time.sleep(0.3)
    baseline = rss_kib(proxy.pid)
    threading.Thread(target=sampler, daemon=True).start()
    started = time.monotonic()
    moved = 0
    if direction == "to-viewer":
        while True:
            elapsed = time.monotonic() - started
            if elapsed < slow and moved > rate * elapsed:
                time.sleep(0.01)
                continue
            data = viewer.recv(CHUNK if elapsed >= slow else max(1, int(rate / 100)))
            if not data:
                break
            moved += len(data)
    else:
        block = b"\x5a" * CHUNK
        while moved < size:
            viewer.sendall(block[: min(CHUNK, size - moved)])
            moved += min(CHUNK, size - moved)
        viewer.shutdown(socket.SHUT_WR)
        viewer.settimeout(60)
        try:
            while viewer.recv(65536):
                pass
        except OSError:
            pass
    seconds = time.monotonic() - started
    viewer.close()
    proxy.wait(60)
    stop.set()
    device.stop()
    peak = max(samples) if samples else baseline
    return {"direction": direction, "bytes": moved if direction == "to-viewer" else device_stats["received"],
            "slow_seconds": slow, "rate": rate, "seconds": round(seconds, 1), "baseline_kib": baseline,
            "peak_kib": peak, "growth_kib": peak - baseline, "proxy_exit": proxy.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1 << 30)
    parser.add_argument("--rate", type=float, default=1e6)
    parser.add_argument("--slow", type=float, default=30.0)
    args = parser.parse_args()
    for direction in ("to-viewer", "to-device"):
        figures = measure(args.size, args.rate, args.slow, direction)
        print(json.dumps(figures))
        print(f"{direction}: {figures['bytes']} bytes in {figures['seconds']} s, proxy RSS growth "
              f"{figures['growth_kib'] / 1024:.1f} MiB (limit 16 MiB)", flush=True)


if __name__ == "__main__":
    main()
