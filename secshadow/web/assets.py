"""Where noVNC is: npm ``@novnc/novnc``, installed outside the repository.

noVNC (MPL-2.0) is served to the browser as static ES modules: its ``core/`` (``rfb.js``
and what it imports) and ``vendor/`` (pako). secshadow never ships or copies it;
``bin/setup-debian`` installs the pinned :data:`NOVNC_VERSION` with npm::

    npm install --prefix /usr/local/share/secshadow/novnc @novnc/novnc@1.7.0

:func:`find_novnc` looks, in this order, at ``--novnc DIR``, ``$SECSHADOW_NOVNC``,
``$XDG_DATA_HOME/secshadow/novnc`` (default ``~/.local/share/secshadow/novnc``) and
:data:`DEFAULT_NOVNC_DIR`. A directory counts when it holds ``core/rfb.js`` itself or
under ``node_modules/@novnc/novnc`` (an npm ``--prefix``). A missing noVNC is a
:class:`~secshadow.errors.UsageError` that says how to install it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from secshadow.errors import UsageError

#: The noVNC release secshadow is tested with (``bin/setup-debian`` installs it).
NOVNC_VERSION = "1.7.0"
#: Where ``bin/setup-debian`` installs noVNC (an npm ``--prefix``).
DEFAULT_NOVNC_DIR = "/usr/local/share/secshadow/novnc"
#: The environment variable naming a noVNC directory.
ENVIRONMENT_VARIABLE = "SECSHADOW_NOVNC"

_PACKAGE_PATH = ("node_modules", "@novnc", "novnc")

INSTALL_COMMAND = f"npm install --prefix {DEFAULT_NOVNC_DIR} @novnc/novnc@{NOVNC_VERSION}"


@dataclass(frozen=True)
class NoVNCAssets:
    """An installed noVNC: ``root`` holds ``core/rfb.js`` and ``vendor/``; ``version`` is
    from its ``package.json`` (``None`` when it has none)."""

    root: Path
    version: str | None = None

    @property
    def core(self) -> Path:
        return self.root / "core"

    @property
    def vendor(self) -> Path:
        return self.root / "vendor"

    @classmethod
    def at(cls, directory: str | os.PathLike[str]) -> NoVNCAssets:
        """noVNC in ``directory`` (or in its ``node_modules/@novnc/novnc``); raises
        :class:`UsageError` saying how to install it when neither holds ``core/rfb.js``."""
        found = _package_root(Path(directory))
        if found is None:
            raise UsageError(f"no noVNC in {directory} (no core/rfb.js there or under "
                             f"node_modules/@novnc/novnc); install it with: {INSTALL_COMMAND}")
        return cls(found, _version(found))


def _package_root(directory: Path) -> Path | None:
    for candidate in (directory, directory.joinpath(*_PACKAGE_PATH)):
        if (candidate / "core" / "rfb.js").is_file():
            return candidate.resolve()
    return None


def _version(root: Path) -> str | None:
    try:
        with open(root / "package.json", encoding="utf-8") as f:
            value = json.load(f).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def candidate_directories(environ: Mapping[str, str] | None = None) -> list[str]:
    """The directories :func:`find_novnc` tries after ``--novnc``, in order."""
    env = os.environ if environ is None else environ
    places = []
    if env.get(ENVIRONMENT_VARIABLE):
        places.append(env[ENVIRONMENT_VARIABLE])
    data_home = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                          ".local", "share")
    places.append(os.path.join(data_home, "secshadow", "novnc"))
    places.append(DEFAULT_NOVNC_DIR)
    return places


def find_novnc(directory: str | None = None, environ: Mapping[str, str] | None = None) -> NoVNCAssets:
    """The noVNC to serve: ``directory`` (``--novnc``) when given, else the first of
    :func:`candidate_directories` that holds it. Raises :class:`UsageError` with the
    install command when there is none; an explicit ``directory`` or
    ``$SECSHADOW_NOVNC`` without noVNC is an error even if a default location has it."""
    if directory:
        return NoVNCAssets.at(directory)
    env = os.environ if environ is None else environ
    if env.get(ENVIRONMENT_VARIABLE):
        return NoVNCAssets.at(env[ENVIRONMENT_VARIABLE])
    for place in candidate_directories(env):
        root = _package_root(Path(place))
        if root is not None:
            return NoVNCAssets(root, _version(root))
    raise UsageError(
        "the browser viewer needs noVNC, which is not installed; install it with: "
        f"{INSTALL_COMMAND} (bin/setup-debian does this), or point --novnc DIR or "
        f"${ENVIRONMENT_VARIABLE} at a directory holding noVNC's core/rfb.js "
        f"(looked in: {', '.join(candidate_directories(env))})")


if __name__ == "__main__":  # pragma: no cover - used by bin/setup-debian
    print(INSTALL_COMMAND)
