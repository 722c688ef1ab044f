"""Shadow one device from its IMI id, awaiting the result (async/await style).

    python docs/examples/shadow_one.py https://ums.example:8443 27 admin FINGERPRINT [DEVICE_PORT]
    (IMI password in $SECSHADOW_UMS_PASSWORD; the viewer: the first one installed)

Every event is a typed object from secshadow.events; as_dict() is the CLI's JSON.
"""

import json
import os
import sys

from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from secshadow import events
from secshadow.api import IMISource, start_shadowing
from secshadow.errors import SecShadowError
from secshadow.options import SessionOptions
from secshadow.umstrust import UMSTrust
from secshadow.viewers import launch, resolve_viewer, viewer_argv


def on_event(event: events.Event) -> None:
    match event:
        case events.Listening(host=host, port=port):
            print(f"viewer port: {host}:{port}", file=sys.stderr)
        case events.SessionStarted(rfb_version=version):
            print(f"the device accepted the password ({version})", file=sys.stderr)
    # The same JSON as secshadow-proxy --json, one line per event, flushed at once.
    print(json.dumps(event.as_dict()), flush=True)


async def main(reactor, url: str, device: str, user: str, fingerprint: str, port: str = "5900") -> int:
    source = IMISource(reactor, url, device, user, os.environ["SECSHADOW_UMS_PASSWORD"],
                       UMSTrust.from_fingerprint(fingerprint))
    spec = resolve_viewer("auto")
    # SessionOptions checks itself: a bad port or timeout is a UsageError here, not later.
    shadowing = start_shadowing(
        reactor, source, SessionOptions(device_port=int(port), view_only=False), on_event=on_event,
        viewer=lambda host, port: launch(reactor, spec.name, viewer_argv(spec, host, port)), viewer_name=spec.name,
    )
    try:
        closed = await shadowing.done
    except SecShadowError as e:
        print(f"failed ({e.code}): {e}", file=sys.stderr)
        return e.exit_code
    print(f"closed: {closed.reason}, {closed.bytes_to_viewer} bytes to the viewer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor, *sys.argv[1:6])))
