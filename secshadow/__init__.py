"""secshadow: secure VNC shadowing of managed thin clients.

The library fetches a device's shadow secret (certificate and one-time password),
opens a TLS connection to the device that accepts only that certificate (the pin),
sends the ``PROCYCMD`` command and relays plain RFB to a local VNC viewer.
See ``docs/protocol.md`` for the wire and ``docs/cli.md`` for the command line.
"""

__version__ = "0.1.0"
