"""Shadowing through a gateway relay: ``secshadow-relay/1`` (PROTOCOL.md section 6).

Console and device both dial out over WebSocket to a gateway, which pairs the two legs
of one session and relays the binary messages between them without reading them. The
pinned TLS session and ``PROCYCMD`` run end to end *inside* that stream, so the gateway
never sees the password or the screen, and it holds only public keys, so it cannot mint
sessions either. See ``docs/gateway.md``.

- :mod:`~secshadow.gateway.wire`: URLs, limits and close codes of the relay protocol.
- :mod:`~secshadow.gateway.tokens`: EdDSA (Ed25519) JWTs: minting, verification, replay cache.
- :mod:`~secshadow.gateway.pairing`: the sessions and their two legs (sans-IO, injectable clock).
- :mod:`~secshadow.gateway.server`: ``secshadow-gateway``, the relay (autobahn over Twisted).
- :mod:`~secshadow.gateway.dialer`: the client side; :func:`~secshadow.gateway.dialer.gateway_endpoint`
  is an ``IStreamClientEndpoint`` whose stream is the relayed byte stream.
- :mod:`~secshadow.gateway.agent`: ``secshadow-agent``, the device-side end in front of an
  unmodified device's TLS port.
- :mod:`~secshadow.gateway.cli`: the two programs' command lines.
"""
