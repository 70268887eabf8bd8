"""tls://: the transport, its configuration, and a real Broker, Client and Worker over it.

Certificates are generated here at runtime (the `cryptography` package, in the
`test` extra): a CA, a server certificate for 127.0.0.1 (IP SAN), a client
certificate from that CA, and a client certificate from a second, untrusted
CA. Every wait is bounded; synchronisation is awaited, never slept.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import transports
from reasonbroker.core import protocol as p
from reasonbroker.core.errors import ConfigError
from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import (
    Config,
    ListenerConfig,
    default_journal_path,
    load_config,
)
from reasonbroker.sdk.client import Client
from reasonbroker.sdk.errors import BrokerConnectionError
from reasonbroker.sdk.worker import Worker
from tests.rawpeer import WAIT_S

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
DEFAULT_CONFIG = Config(journal_path=default_journal_path({}))
CLIENTS, WORKERS = ListenerRole.CLIENTS, ListenerRole.WORKERS

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[str, str]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    signer_key, issuer_name = (
        (key, _name(subject)) if issuer is None else (issuer[0], issuer[1].subject)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
    return builder.sign(signer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")

    def new_key() -> ec.EllipticCurvePrivateKey:
        # P-256: fast to generate, accepted by every TLS stack.
        return ec.generate_private_key(ec.SECP256R1())

    ca_key = new_key()
    ca_cert = _certificate("reasonbroker test CA", ca_key, None)
    ca, _ = _write(directory, "ca", ca_key, ca_cert)
    server_key = new_key()
    server = _write(
        directory,
        "server",
        server_key,
        _certificate("127.0.0.1", server_key, (ca_key, ca_cert), server=True),
    )
    client_key = new_key()
    client = _write(
        directory, "client", client_key, _certificate("client", client_key, (ca_key, ca_cert))
    )
    rogue_ca_key = new_key()
    rogue_ca_cert = _certificate("rogue CA", rogue_ca_key, None)
    rogue_ca, _ = _write(directory, "rogue-ca", rogue_ca_key, rogue_ca_cert)
    rogue_key = new_key()
    rogue = _write(
        directory,
        "rogue",
        rogue_key,
        _certificate("rogue", rogue_key, (rogue_ca_key, rogue_ca_cert)),
    )
    return Pki(ca, *server, *client, rogue_ca, *rogue)


# --------------------------------------------------------------------------- transport


def test_tls_is_registered() -> None:
    endpoint = transports.parse_url("tls://127.0.0.1:0")
    assert isinstance(endpoint, transports.TlsEndpoint)
    assert (endpoint.host, endpoint.port) == ("127.0.0.1", 0)
    assert transports.SCHEMES["tls"] == transports.TlsEndpoint.parse


def test_tls_listener_requires_a_context() -> None:
    with pytest.raises(ValueError, match="needs an SSL context"):
        transports.listener_for("tls://127.0.0.1:0")


def test_verify_client_requires_a_cafile(pki: Pki) -> None:
    with pytest.raises(ValueError, match="cafile"):
        transports.server_context(pki.server_cert, pki.server_key, verify_client=True)


def test_server_context_settings(pki: Pki) -> None:
    plain = transports.server_context(pki.server_cert, pki.server_key)
    mutual = transports.server_context(pki.server_cert, pki.server_key, pki.ca, verify_client=True)
    assert plain.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    assert mutual.verify_mode == ssl.CERT_REQUIRED


async def test_transport_echo_over_tls(pki: Pki) -> None:
    server = transports.server_context(pki.server_cert, pki.server_key)
    listener = transports.listener_for("tls://127.0.0.1:0", ssl=server)
    streams: asyncio.Queue[transports.Stream] = asyncio.Queue()

    class Echo:
        def __init__(self, stream: transports.Stream) -> None:
            self.stream = stream

        def data_received(self, data: bytes) -> None:
            self.stream.write(data)

        def connection_lost(self, exc: BaseException | None) -> None:
            pass

    def on_stream(stream: transports.Stream) -> None:
        stream.set_handler(Echo(stream))
        streams.put_nowait(stream)

    await listener.start(on_stream)
    try:
        assert listener.address.startswith("tls://127.0.0.1:")
        async with asyncio.timeout(WAIT_S):
            reader, writer = await transports.connect(
                listener.address, ssl=transports.client_context(cafile=pki.ca)
            )
            stream = await streams.get()
            assert stream.get_extra_info("ssl_object") is not None
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            await writer.wait_closed()
    finally:
        await listener.close()


async def test_connect_without_context_uses_system_cas(pki: Pki) -> None:
    # The system store does not know the test CA: the default context verifies
    # (and so refuses), it never silently accepts.
    server = transports.server_context(pki.server_cert, pki.server_key)
    listener = transports.listener_for("tls://127.0.0.1:0", ssl=server)
    await listener.start(lambda stream: stream.close())
    try:
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(ssl.SSLCertVerificationError):
                await transports.connect(listener.address)
    finally:
        await listener.close()


# --------------------------------------------------------------------------- config


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rb.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _listener_toml(url: str, **keys: Any) -> str:
    lines = ["[[listeners]]", f'url = "{url}"', 'role = "clients"']
    for name, value in keys.items():
        lines.append(f"{name} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
    return "\n".join(lines) + "\n"


def test_tls_listener_from_toml(tmp_path: Path, pki: Pki) -> None:
    text = _listener_toml(
        "tls://127.0.0.1:0",
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        cafile=pki.ca,
        verify_client=True,
    )
    config = load_config(_toml(tmp_path, text), {}, {})
    assert config.listeners == (
        ListenerConfig("tls://127.0.0.1:0", CLIENTS, pki.server_cert, pki.server_key, pki.ca, True),
    )


@pytest.mark.parametrize(
    ("url", "keys", "key"),
    [
        ("tls://127.0.0.1:0", {}, "listeners[0].certfile"),
        ("tls://127.0.0.1:0", {"certfile": "CERT"}, "listeners[0].keyfile"),
        ("tls://127.0.0.1:0", {"keyfile": "KEY"}, "listeners[0].certfile"),
        (
            "tls://127.0.0.1:0",
            {"certfile": "CERT", "keyfile": "KEY", "verify_client": True},
            "listeners[0].cafile",
        ),
        (
            "tls://127.0.0.1:0",
            {"certfile": "/nonexistent/cert.pem", "keyfile": "KEY"},
            "listeners[0].certfile",
        ),
        (
            "tls://127.0.0.1:0",
            {"certfile": "CERT", "keyfile": "/nonexistent/k"},
            "listeners[0].keyfile",
        ),
        (
            "tls://127.0.0.1:0",
            {"certfile": "CERT", "keyfile": "KEY", "cafile": "/nope"},
            "listeners[0].cafile",
        ),
        ("tls://127.0.0.1:0", {"certfile": 1, "keyfile": "KEY"}, "listeners[0].certfile"),
        (
            "tls://127.0.0.1:0",
            {"certfile": "CERT", "keyfile": "KEY", "verify_client": "yes"},
            "listeners[0].verify_client",
        ),
        ("tcp://127.0.0.1:0", {"certfile": "CERT"}, "listeners[0].certfile"),
        ("tcp://127.0.0.1:0", {"cafile": "CERT"}, "listeners[0].cafile"),
        ("unix:///tmp/rb.sock", {"keyfile": "KEY"}, "listeners[0].keyfile"),
        ("tcp://127.0.0.1:0", {"verify_client": False}, "listeners[0].verify_client"),
    ],
)
def test_tls_config_errors_name_the_key(
    tmp_path: Path, pki: Pki, url: str, keys: dict[str, Any], key: str
) -> None:
    real = {"CERT": pki.server_cert, "KEY": pki.server_key}
    keys = {
        name: real.get(value, value) if isinstance(value, str) else value
        for name, value in keys.items()
    }
    with pytest.raises(ConfigError) as info:
        load_config(_toml(tmp_path, _listener_toml(url, **keys)), {}, {})
    assert info.value.key == key


def test_tls_url_from_environment_or_flag_names_it() -> None:
    # Environment and flags carry URLs only: a tls:// one has no certificate.
    with pytest.raises(ConfigError) as info:
        load_config(None, {"REASONBROKER_CLIENT": "tls://127.0.0.1:0"}, {})
    assert info.value.key == "REASONBROKER_CLIENT"
    assert "certfile" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {"listeners.workers": ["tls://127.0.0.1:0"]})
    assert info.value.key == "listeners.workers"


def test_example_file_documents_the_tls_keys() -> None:
    # The TLS listener there is commented out (the example loads to the
    # defaults); its keys must still be written out.
    assert load_config(EXAMPLE, {}, {}) == DEFAULT_CONFIG
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in ("tls://", "certfile", "keyfile", "cafile", "verify_client"):
        assert f"# {key}" in text or f'"{key}' in text or f" {key} =" in text, key


# --------------------------------------------------------------------------- broker


def _tls_listeners(pki: Pki, *, verify_client: bool) -> tuple[ListenerConfig, ...]:
    cafile = pki.ca if verify_client else None
    return tuple(
        ListenerConfig(
            "tls://127.0.0.1:0", role, pki.server_cert, pki.server_key, cafile, verify_client
        )
        for role in (CLIENTS, WORKERS)
    )


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
async def broker(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[Broker]:
    async with Broker(Config(listeners=_tls_listeners(pki, verify_client=request.param))) as b:
        yield b


async def echo(variables: Any) -> Any:
    return variables


def _trusted(pki: Pki) -> ssl.SSLContext:
    return transports.client_context(
        cafile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key
    )


async def _round_trip(
    broker: Broker, client_ssl: ssl.SSLContext, worker_ssl: ssl.SSLContext
) -> None:
    async with asyncio.timeout(WAIT_S):
        async with (
            Worker(broker.address("worker"), handlers={"echo": echo}, ssl=worker_ssl) as worker,
            Client(broker.address("client"), ssl=client_ssl, connect_timeout=WAIT_S) as client,
        ):
            await worker.registered.wait()
            assert await client.run("echo", {"over": "tls"}) == {"over": "tls"}


async def test_job_round_trips_over_tls(broker: Broker, pki: Pki) -> None:
    assert all(url.startswith("tls://127.0.0.1:") for _, url in broker.addresses)
    await _round_trip(broker, _trusted(pki), _trusted(pki))


@pytest.fixture
async def mutual(pki: Pki) -> AsyncIterator[Broker]:
    async with Broker(Config(listeners=_tls_listeners(pki, verify_client=True))) as b:
        yield b


@pytest.mark.parametrize("certificate", ["none", "untrusted"])
async def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    mutual: Broker, pki: Pki, certificate: str
) -> None:
    if certificate == "none":
        context = transports.client_context(cafile=pki.ca)
    else:
        context = transports.client_context(
            cafile=pki.ca, certfile=pki.rogue_cert, keyfile=pki.rogue_key
        )
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerConnectionError):
            await Client(mutual.address("client"), ssl=context, connect_timeout=WAIT_S).connect()
        worker = Worker(
            mutual.address("worker"), handlers={"echo": echo}, ssl=context, reconnect=False
        )
        with pytest.raises(BrokerConnectionError):
            await worker.run()
    # The refusal cost the broker nothing: trusted peers are still served.
    await _round_trip(mutual, _trusted(pki), _trusted(pki))


async def test_client_that_does_not_trust_the_server_ca_fails(broker: Broker, pki: Pki) -> None:
    context = transports.client_context(
        cafile=pki.rogue_ca, certfile=pki.client_cert, keyfile=pki.client_key
    )
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerConnectionError) as info:
            await Client(broker.address("client"), ssl=context, connect_timeout=WAIT_S).connect()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(info.value)


async def test_plaintext_peer_on_a_tls_listener_is_closed(broker: Broker, pki: Pki) -> None:
    host, _, port = broker.address("client").removeprefix("tls://").rpartition(":")
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(p.encode(p.Hello(role=p.Role.CLIENT)))
            # The bytes are not a TLS ClientHello: the handshake fails and the
            # broker closes the connection without ever seeing a stream.
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass  # an RST instead of a FIN is a close too
        finally:
            writer.close()
    assert broker.connections == 0
    await _round_trip(broker, _trusted(pki), _trusted(pki))
