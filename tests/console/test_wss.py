"""The console over TLS, as a worker's browser reaches it in production (WSS on 443): the API Site
listening on a Twisted ``ssl:`` strports description, a WSS client that checks the certificate, the
RFB handshake and a frame from a real Xvnc through it."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, SSL4ClientEndpoint, connectProtocol, serverFromString
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.console.support import XVNC, WsPipe, Xvnc, read_frame, rfb_handshake
from tests.integration.conftest import free_port
from vmcloud.api.site import ApiSite
from vmcloud.console.gate import Gate
from vmcloud.console.registry import AccessRegistry
from vmcloud.console.targets import Target, handle_key
from vmcloud.console.vnc import ConsoleFactory, ConsoleResource

ssl = pytest.importorskip("twisted.internet.ssl")
pytest.importorskip("OpenSSL")
pytestmark = pytest.mark.skipif(XVNC is None, reason="needs Xvnc")


def self_signed(directory: FilePath[str]) -> tuple[str, str, bytes]:
    """A key and a certificate for 127.0.0.1 (paths), and the certificate's PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    directory.makedirs(ignoreExistingDirectory=True)
    key_path, cert_path = directory.child("key.pem"), directory.child("cert.pem")
    key_path.setContent(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.setContent(pem)
    return key_path.path, cert_path.path, pem


class WssTests(TestCase):
    timeout = 60

    def test_console_over_wss(self) -> Deferred[None]:
        async def run() -> None:
            xvnc = Xvnc(reactor, self.mktemp(), free_port())
            await xvnc.start()
            self.addCleanup(lambda: ensureDeferred(xvnc.stop()))
            key, cert, pem = self_signed(FilePath(self.mktemp()))
            root = Resource()
            target = Target(handle_key("H"), "127.0.0.1", xvnc.port, "vm1")
            factory = ConsoleFactory(
                clock=reactor,
                dial=lambda t, p: connectProtocol(HostnameEndpoint(reactor, t.host, t.port, timeout=5), p),
                registry=AccessRegistry(),
            )
            root.putChild(
                b"console",
                ConsoleResource(
                    factory,
                    Gate(token=None, cors_origins=["*"]),
                    resolve_handle=lambda _: target,
                    resolve_vm=lambda _: None,
                ),
            )
            # what an operator writes in [api] listen (the port would be 443)
            endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
            port = await endpoint.listen(ApiSite(root))
            self.addCleanup(port.stopListening)
            number = port.getHost().port
            url = f"wss://127.0.0.1:{number}/console/H"
            client = WebSocketClientFactory(url, protocols=["binary"], reactor=reactor)
            client.setProtocolOptions(openHandshakeTimeout=5, closeHandshakeTimeout=1)
            pipe = WsPipe()
            pipe.factory = client
            trust = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(pem))
            await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", number, trust), pipe)
            await pipe.opened
            self.addCleanup(pipe.transport.abortConnection)
            size = await rfb_handshake(pipe, xvnc.password)
            screen = await read_frame(pipe, *size)
            assert screen[:3] == b"\xff\xff\xff"

        return ensureDeferred(run())
