"""Shadowing in the browser (PROTOCOL.md section 5): the page, noVNC, RFB over a WebSocket.

- :mod:`secshadow.web.tokens`: single-use 128-bit tokens valid 60 s.
- :mod:`secshadow.web.policy`: the ``Origin`` rule and the security headers.
- :mod:`secshadow.web.assets`: where noVNC (npm ``@novnc/novnc``) is installed.
- :mod:`secshadow.web.stream`: a WebSocket connection as an ordinary stream transport.
- :mod:`secshadow.web.endpoint`: :class:`~secshadow.web.endpoint.WebViewerEndpoint`, the
  viewer-side endpoint of ``--web``, and :class:`~secshadow.web.endpoint.SharedSiteEndpoint`
  for the ``secshadow-web`` service.
- :mod:`secshadow.web.browser`: ``--viewer browser``, without the token on any command line.
- :mod:`secshadow.web.service`: ``secshadow-web``, the multi-user browser console.
"""
