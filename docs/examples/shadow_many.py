"""Several devices at once in one reactor, with Deferreds (no async/await), and clean
cancellation: each shadowing is stopped after SECONDS unless it ended before.

    python docs/examples/shadow_many.py SECONDS secret1.json secret2.json ...

Each secret file is what a console got from IMI (the thin-client document with
shadowSecret and lastIP) or {"certificate", "password", "host", "port"}. No viewer is
launched: connect yours to the printed ports.
"""

import sys

from twisted.internet import task
from twisted.internet.defer import DeferredList

from secshadow import events
from secshadow.api import start_shadowing
from secshadow.options import SessionOptions
from secshadow.secret import load_secret


def main(reactor, seconds: str, *paths: str):
    shadowings = []
    for path in paths:
        with open(path, "rb") as f:
            secret = load_secret(f.read())

        def on_event(event: events.Event, name: str = path) -> None:
            if isinstance(event, (events.Listening, events.SessionStarted, events.Closed, events.Pinned)):
                print(name, event.as_dict(), flush=True)

        shadowing = start_shadowing(reactor, secret, SessionOptions(), on_event=on_event, viewer=None)
        # Clean cancellation: stop() closes both sockets, releases the listener and
        # reaps the viewer before done fires (with a Closed whose reason is ours).
        reactor.callLater(float(seconds), shadowing.stop, "time is up")
        shadowings.append(shadowing)

    def report(results):
        for path, (ok, value) in zip(paths, results, strict=True):
            print(path, "->", value.reason if ok else f"failed: {value.getErrorMessage()}", flush=True)

    return DeferredList([s.done for s in shadowings], consumeErrors=True).addCallback(report)


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
