"""The lab: real, runnable programs the tests, the demo and the benchmarks use.

Never imported by the product (``secshadow.cli``, ``secshadow.api``, ``secshadow.control``
and the modules below them); ``secshadow/tests/test_layout.py`` proves it.

- ``device/``: the device emulator ``secshadow-device`` (firmware profiles, legacy certificates)
- ``imiserver/``: the reference IMI server ``secshadow-ums``
- ``vnc.py``: a real TigerVNC ``Xvnc`` on a virtual display
- ``harness.py``: starts the whole lab (processes, environment)
- ``demo.py``: ``secshadow-demo``; ``matrix.py``: ``secshadow-matrix``
- ``certs.py``: certificate helpers; ``scripted.py``: scripted peers (misbehaving devices,
  viewers, UMS servers, ``openssl s_server`` impostors)
"""
