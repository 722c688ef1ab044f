"""``secshadow-ums``: a reference IMI-compatible management server for tests and demos.

It speaks the subset of IGEL's IMI REST API the shadowing flow needs
(``docs/protocol.md`` section 1): v3 login/logout with a ``JSESSIONID`` cookie, the
thin-client document with ``?facets=shadow`` on ``/umsapi/v2`` and ``/umsapi/v3``, and
ITG error bodies. One-time passwords it issues can be checked by the device emulator
through an extra endpoint documented in :mod:`secshadow.lab.imiserver.server`.
"""
