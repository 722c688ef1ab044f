"""Process hygiene for a process that holds secrets: no core dumps, no same-user ptrace.

The proxy holds the UMS password and the device's one-time password in memory; a core
file (a crash, ``gcore``, ``kill -QUIT`` with cores enabled) would write both to disk.
:func:`make_undumpable` closes that, where the platform allows:

- Linux: ``prctl(PR_SET_DUMPABLE, 0)`` (``prctl(2)``). The kernel then writes no core
  for the process, and other processes of the same user may neither ``ptrace`` it nor
  read ``/proc/<pid>/mem``, ``environ``, ``fd/`` (those entries become owned by root).
  The flag is reset by ``execve``, so a viewer the proxy launches is unaffected. Root
  can still read everything.
- Every POSIX system: ``RLIMIT_CORE`` set to ``(0, 0)`` (``setrlimit(2)``), so no core
  file is written even where ``prctl`` does not exist. This limit *is* inherited by
  children (e.g. a launched viewer).

Call it once, early in ``main``, before any secret is read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: ``<linux/prctl.h>``
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _no_core_files() -> bool:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        return False
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def make_undumpable() -> bool:
    """Make this process write no core file and (on Linux) refuse same-user ptrace.

    Returns ``True`` when the process is now protected: on Linux, when
    ``prctl(PR_GET_DUMPABLE)`` reads 0 afterwards and ``RLIMIT_CORE`` is ``(0, 0)``;
    elsewhere, when ``RLIMIT_CORE`` is ``(0, 0)``. ``False`` when the platform allows
    neither (the caller may warn). Never raises.
    """
    no_cores = _no_core_files()
    if not sys.platform.startswith("linux"):
        return no_cores
    try:
        libc = _libc()
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        undumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    return undumpable and no_cores


#: File descriptors one session may hold at once (viewer, device, listener, and a spare).
DESCRIPTORS_PER_SESSION = 2


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (control mode: each
    session holds two sockets, so 5000 sessions need over 10,000 descriptors, and the
    common soft limit is 1024). Returns the (soft, hard) limits in force afterwards;
    never raises."""
    import resource  # POSIX only, like RLIMIT_CORE above

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return resource.getrlimit(resource.RLIMIT_NOFILE)
