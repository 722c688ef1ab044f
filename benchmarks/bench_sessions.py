"""Leaks and memory per session (issue 4, parts 4 and 5), through the library API.

1. N sessions one after another in this process (default 500): open file descriptors,
   threads, child processes and RSS before and after.
2. N sessions at once (default 500), all relaying: RSS growth divided by N. The devices run
   in a helper process (``--device-helper``) so their memory is not counted; the viewers
   are plain sockets here.

    python benchmarks/bench_sessions.py [--sessions N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from secshadow.lab.harness import child_environment  # noqa: E402
from secshadow.lab.scripted import (  # noqa: E402
    HELLO,
    DeviceConn,
    PeerClosed,
    ScriptedDevice,
    children_of,
    fd_count,
    rss_kib,
)


def _echo(conn: DeviceConn) -> None:
    conn.recv_command()
    conn.send(HELLO)
    try:
        while True:
            data = conn.recv(600)
            conn.send(data)
            del conn.received[:]
    except (PeerClosed, TimeoutError):
        pass


def device_helper(cert_path: str, key_path: str) -> None:
    device = ScriptedDevice(Path(cert_path).read_bytes(), Path(key_path).read_bytes(), _echo)
    print(device.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    device.stop()


def run(sessions: int) -> dict[str, Any]:
    from twisted.internet import reactor, task, threads
    from twisted.internet.defer import DeferredList, ensureDeferred

    from secshadow import events as ev
    from secshadow.proxy import SessionOptions, ShadowSession
    from secshadow.secret import OneTimePassword, ShadowSecret
    from secshadow.lab.certs import der_of

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    cert, key = certs.generate_self_signed()
    (work / "c.pem").write_bytes(cert)
    (work / "k.pem").write_bytes(key)
    helper = subprocess.Popen([sys.executable, __file__, "--device-helper", str(work / "c.pem"), str(work / "k.pem")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_environment())
    assert helper.stdout is not None and helper.stdin is not None
    port = int(helper.stdout.readline())
    secret = ShadowSecret(der_of(cert), OneTimePassword(str(uuid.uuid4())), "127.0.0.1", None)
    figures = FIGURES
    figures["sessions"] = sessions

    def options() -> SessionOptions:
        return SessionOptions(device_host="127.0.0.1", device_port=port, connect_timeout=30, viewer_timeout=60,
                              hello_timeout=60)

    async def one_session(hold: Any = None) -> tuple[Any, Any]:
        seen: list[Any] = []
        session = ShadowSession(reactor, secret, options(), on_event=seen.append)
        done = session.start()
        while not [e for e in seen if isinstance(e, ev.Listening)]:
            if done.called:
                break
            await task.deferLater(reactor, 0.005, lambda: None)
        listening = [e for e in seen if isinstance(e, ev.Listening)][0]
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", listening.port))
        while not [e for e in seen if isinstance(e, ev.SessionStarted)]:
            await task.deferLater(reactor, 0.005, lambda: None)
        return session, (sock, done)

    async def sequential() -> None:
        for _ in range(5):
            _, (sock, done) = await one_session()
            sock.close()
            await done
        gc.collect()
        await task.deferLater(reactor, 0.5, lambda: None)
        me = os.getpid()
        before = (fd_count(), threading.active_count(), len(children_of(me)), rss_kib())
        started = time.monotonic()
        closed = 0
        for _ in range(sessions):
            _, (sock, done) = await one_session()
            sock.close()
            result = await done
            closed += isinstance(result, ev.Closed)
        gc.collect()
        await task.deferLater(reactor, 0.5, lambda: None)
        after = (fd_count(), threading.active_count(), len(children_of(me)), rss_kib())
        figures["sequential"] = {"closed": closed, "seconds": round(time.monotonic() - started, 1),
                                 "fds": [before[0], after[0]], "threads": [before[1], after[1]],
                                 "children": [before[2] - 1, after[2] - 1],  # minus the device helper
                                 "rss_kib": [before[3], after[3]]}

    async def concurrent() -> None:
        gc.collect()
        base = rss_kib()
        started = time.monotonic()
        pending = [ensureDeferred(one_session()) for _ in range(sessions)]
        opened = await DeferredList(pending, consumeErrors=False)
        ok = [r for success, r in opened if success]
        # every session relays: one echo round-trip through each
        for _, (sock, _) in ok:
            sock.setblocking(True)
        await threads.deferToThread(_ping_all, [s for _, (s, _) in ok])
        gc.collect()
        during = rss_kib()
        figures["concurrent"] = {"relaying": len(ok), "seconds_to_open": round(time.monotonic() - started, 1),
                                 "rss_before_kib": base, "rss_during_kib": during,
                                 "kib_per_session": round((during - base) / max(1, len(ok)), 1),
                                 "fds_during": fd_count()}
        for _session, (sock, _done) in ok:
            sock.close()
        await DeferredList([done for _, (_, done) in ok], consumeErrors=True)
        gc.collect()
        await task.deferLater(reactor, 1.0, lambda: None)
        figures["concurrent"]["fds_after"] = fd_count()
        figures["concurrent"]["rss_after_kib"] = rss_kib()

    async def main(_: Any) -> None:
        try:
            await sequential()
            await concurrent()
        finally:
            helper.stdin.close()  # type: ignore[union-attr]
            helper.wait(30)
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    task.react(lambda r: ensureDeferred(main(r)))  # exits the process
    return figures  # pragma: no cover


def _ping_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.settimeout(30)
        got = b""
        while len(got) < 12:
            got += s.recv(12 - len(got))
        s.sendall(b"ping")
        echoed = b""
        while len(echoed) < 4:
            echoed += s.recv(4 - len(echoed))


FIGURES: dict[str, Any] = {}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--device-helper":
        device_helper(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500)
    args = parser.parse_args()
    import atexit

    atexit.register(lambda: print(json.dumps(FIGURES), flush=True))
    run(args.sessions)  # task.react ends the process; the figures print at exit


if __name__ == "__main__":
    main()
