"""secshadow: secure VNC shadowing of managed thin clients (IGEL OS 11 flow)."""

from setuptools import find_packages, setup

setup(
    name="secshadow",
    version="0.1.0",
    description="Secure VNC shadowing: pinned TLS tunnel, PROCYCMD handshake, local viewer port",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(exclude=["secshadow.tests", "secshadow.tests.*"]),
    package_data={"secshadow": ["py.typed"], "secshadow.web": ["static/*.html", "static/*.js", "static/*.css"]},
    install_requires=[
        "Twisted>=24.7",
        "pyOpenSSL>=24.0",
        "cryptography>=42",
        "service-identity>=24.1",
        # treq: the IMI client's HTTP (cookies, Basic auth, JSON) without our own HTTP code.
        "treq>=24.9",
        # vncdotool: an RFB client for --snapshot; Pillow writes the PNG.
        "vncdotool>=1.2",
        "Pillow>=10",
        # autobahn: the browser viewer's WebSocket (RFB in binary messages, subprotocols, ping)
        # and the gateway relay's legs (secshadow-gateway, secshadow-agent, the console's leg).
        "autobahn[twisted]>=23.1",
        # PyJWT: EdDSA (Ed25519) gateway tokens; the gateway verifies them with public keys only.
        "PyJWT>=2.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            # pytest-timeout: a hung test fails with a traceback instead of stalling CI.
            "pytest-timeout>=2.3",
            # selenium: drives the real headless Chromium (Debian's chromium-driver) in the browser tests.
            "selenium>=4.20",
        ],
    },
    entry_points={
        "console_scripts": [
            "secshadow-proxy = secshadow.cli:main",
            "secshadow-web = secshadow.web.service:main",
            "secshadow-device = secshadow.lab.device.cli:main",
            "secshadow-ums = secshadow.lab.imiserver.cli:main",
            "secshadow-matrix = secshadow.lab.matrix:main",
            "secshadow-demo = secshadow.lab.demo:main",
            "secshadow-gateway = secshadow.gateway.cli:gateway_main",
            "secshadow-agent = secshadow.gateway.cli:agent_main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: System :: Networking",
        "Topic :: Security",
    ],
)
