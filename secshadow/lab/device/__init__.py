"""The device emulator: what a thin client runs on port 5900 for secure shadowing.

- :mod:`secshadow.lab.device.firmware`: firmware profiles (TLS settings, PROCYCMD quirks,
  consent behaviour) and the pyOpenSSL server context.
- :mod:`secshadow.lab.device.emulator`: the TLS server, the password check and the relay
  to a real VNC server (:class:`~secshadow.lab.device.emulator.DeviceEmulator`).
- :mod:`secshadow.lab.device.cli`: the ``secshadow-device`` program.
"""
