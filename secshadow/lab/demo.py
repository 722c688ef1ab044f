"""The built-in demo: the main job, end to end, on one machine.

It starts a real VNC server (TigerVNC ``Xvnc``, blue screen with a label), the
reference IMI server and the device emulator in front of Xvnc, then runs
``secshadow-proxy`` through the IMI server as a user would. With a display it
launches the TigerVNC viewer (close its window to end); without one it saves a
snapshot PNG through the tunnel. Each step is printed as it happens.

Run: ``bin/secshadow-demo`` (after ``bin/setup-debian``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from secshadow.lab.harness import LabError, ManagedProcess, child_environment, start_lab
from secshadow.lab.vnc import XvncError


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="secshadow-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewer", choices=("auto", "tigervnc", "snapshot"), default="auto",
                        help="auto: TigerVNC when $DISPLAY is set and vncviewer is installed, else snapshot")
    parser.add_argument("--snapshot", default="demo-output/snapshot.png", metavar="FILE",
                        help="where the snapshot PNG goes (default: %(default)s)")
    args = parser.parse_args(argv)

    mode = args.viewer
    if mode == "auto":
        mode = "tigervnc" if os.environ.get("DISPLAY") and shutil.which("vncviewer") else "snapshot"
    missing = [p for p in ("Xvnc", "xsetroot") if shutil.which(p) is None]
    if missing:
        _say(f"missing programs: {', '.join(missing)}; run bin/setup-debian first")
        sys.exit(2)

    try:
        lab = start_lab(progress=_say)
    except (LabError, XvncError) as e:
        _say(f"could not start the lab: {e}")
        sys.exit(1)
    status = 1
    try:
        extra = ["--json"]
        if mode == "snapshot":
            snapshot = Path(args.snapshot)
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            extra += ["--snapshot", str(snapshot)]
            _say("no display: the proxy will save one frame through the tunnel instead of a viewer")
        else:
            extra += ["--viewer", "tigervnc"]
            _say("a TigerVNC window will open: close it to end the session")
        argv_shown = " ".join(lab.proxy_argv(*extra)[2:])
        _say(f"running secshadow-proxy {argv_shown}")
        started = time.monotonic()
        proxy = ManagedProcess("proxy", lab.proxy_argv(*extra), lab.workdir, env=child_environment())
        first_frame = None
        for name in ("secret", "pinned", "listening", "viewer-connected", "session-started"):
            try:
                event = proxy.wait_for(name, timeout=60)
            except LabError:
                break
            elapsed = time.monotonic() - started
            details = {k: v for k, v in event.items() if k != "event"}
            _say(f"+{elapsed:5.2f} s  {name}: {details}")
            if name == "session-started":
                first_frame = elapsed
        status = proxy.process.wait(timeout=600)
        total = time.monotonic() - started
        proxy.stop()
        for event in proxy.named("closed") + proxy.named("error"):
            _say(f"+{total:5.2f} s  {event['event']}: { {k: v for k, v in event.items() if k != 'event'} }")
        if status != 0:
            _say(f"secshadow-proxy exited {status}; its messages:\n{proxy.log_tail(30)}")
        elif mode == "snapshot":
            _say(f"snapshot of the device's screen saved to {args.snapshot} "
                 f"(proxy start to first RFB byte {first_frame:.2f} s, to saved frame {total:.2f} s)")
        else:
            _say(f"viewer closed; session over after {total:.1f} s")
        device_verdicts = [e.get("accepted") for e in (lab.device.named("procycmd") if lab.device else [])]
        _say(f"the device emulator saw {len(device_verdicts)} PROCYCMD command(s), accepted: {device_verdicts}")
    except (LabError, subprocess.TimeoutExpired) as e:
        _say(f"demo failed: {e}")
    finally:
        _say("stopping the device emulator, the IMI server and Xvnc")
        lab.stop()
    sys.exit(status)


if __name__ == "__main__":
    main()
