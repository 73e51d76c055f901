"""HTTPS for the node API: the node's certificate, and how peers and clients trust it.

Theory of operation
-------------------
A node serves its HTTP API over TLS when ``tls = "auto"`` or ``tls_cert``/``tls_key``
name a PEM certificate and its private key.  ``auto`` makes a self-signed EC P-256
certificate once (SAN: the node's addresses, localhost, 127.0.0.1), keeps it in the data
dir (``tls.crt``, and ``tls.key`` mode 0600) and reuses it on every restart, so its
fingerprint stays what peers and clients pinned.

Trust never depends on a certificate authority between nodes: every node gossips the
SHA-256 of its certificate in its member record (``MemberRecord.tls``), which the
cluster key authenticates, and a node connecting to a peer's HTTPS port checks that the
certificate it is shown has exactly that digest (``aiohttp.Fingerprint``).  A peer that
serves plain HTTP gossips an empty ``tls`` and is reached with ``http://``: a mixed mesh
works.  ``PeerTLS`` is the one place where a peer's URL and its pin are made.

Invariants:

* ``server_tls(cfg)`` either returns a certificate whose private key matches it, or
  raises ``ConfigError`` naming ``tls_cert`` or ``tls_key`` (the CLI exits 2 with it).
* A peer URL is ``https://`` exactly when the peer's record carries a 32-byte digest;
  an ``https://`` URL that names no known peer gets a pin no certificate can match, so a
  node never talks to an unpinned HTTPS peer.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from galaxy.config import Config, ConfigError

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
FINGERPRINT_BYTES = 32                 # SHA-256
CERT_VALID_DAYS = 3650                 # a self-signed cert is trusted by pin, not by date: outlive the machine
PEM_BYTES_MAX = 1 << 20                # a certificate chain is a few KiB; more is not a PEM file
_NO_MATCH = b"\x00" * FINGERPRINT_BYTES  # a pin no certificate has (its SHA-256 is not all zeros)


def fingerprint_text(digest: bytes) -> str:
    """``AB:CD:...``: how ``openssl x509 -fingerprint -sha256`` shows it."""
    return ":".join(f"{b:02X}" for b in digest)


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint typed by a user: hex, with or without colons, optional
    ``sha256:`` prefix, any case.  ValueError when it is not 32 bytes of hex."""
    t = text.strip()
    if t.lower().startswith(("sha256:", "sha256=")):
        t = t[7:]
    t = t.replace(":", "").replace(" ", "")
    try:
        digest = bytes.fromhex(t)
    except ValueError:
        digest = b""
    if len(digest) != FINGERPRINT_BYTES:
        raise ValueError(f"a TLS fingerprint is 64 hex digits (SHA-256, colons allowed), got {text!r}")
    return digest


def cert_fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


@dataclass(frozen=True, slots=True)
class ServerTLS:
    cert_path: str
    key_path: str
    fingerprint: bytes                 # SHA-256 of the DER certificate
    generated: bool                    # made by this start (``auto`` with no certificate yet)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def enabled(cfg: Config) -> bool:
    return cfg.tls == "auto" or cfg.tls_cert is not None


def server_tls(cfg: Config, hosts: Iterable[str] = ()) -> ServerTLS | None:
    """The certificate this node serves, or None for plain HTTP; ConfigError naming the key.

    ``hosts`` are the node's addresses for a certificate ``auto`` generates.
    """
    if cfg.tls == "auto":
        cert, key = os.path.join(cfg.data_dir, CERT_FILE), os.path.join(cfg.data_dir, KEY_FILE)
        generated = False
        if not (os.path.exists(cert) and os.path.exists(key)):
            os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
            generate_self_signed(cert, key, hosts)
            generated = True
        der = _check_pair(cert, key, "tls", "tls")
        return ServerTLS(cert, key, cert_fingerprint(der), generated)
    if cfg.tls_cert is None:
        return None
    assert cfg.tls_key is not None     # config's relations: both or neither
    der = _check_pair(cfg.tls_cert, cfg.tls_key, "tls_cert", "tls_key")
    return ServerTLS(cfg.tls_cert, cfg.tls_key, cert_fingerprint(der), False)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(PEM_BYTES_MAX + 1)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {path}", key=key) from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a directory, not a PEM file", key=key) from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}", key=key) from None
    if len(data) > PEM_BYTES_MAX:
        raise ConfigError(f"{key}: {path} is larger than {PEM_BYTES_MAX} bytes: not a PEM file", key=key)
    return data


def _check_pair(cert_path: str, key_path: str, cert_key: str, key_key: str) -> bytes:
    """The certificate's DER after checking both files parse and the key matches it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read(cert_path, cert_key), _read(key_path, key_key)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_key}: {cert_path} is not a PEM certificate", key=cert_key) from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{key_key}: {key_path} is encrypted; give an unencrypted key "
                          "(file mode 0600 protects it)", key=key_key) from None
    except (ValueError, Exception):     # UnsupportedAlgorithm and parse errors alike
        raise ConfigError(f"{key_key}: {key_path} is not a PEM private key", key=key_key) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_key}: the key in {key_path} does not match the certificate in {cert_path}",
                          key=key_key)
    try:
        ServerTLS(cert_path, key_path, b"", False).context()
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{cert_key}: {cert_path}: TLS refuses this certificate and key ({e})",
                          key=cert_key) from None
    return cert.public_bytes(serialization.Encoding.DER)


def generate_self_signed(cert_path: str, key_path: str, hosts: Iterable[str] = ()) -> bytes:
    """Write a new self-signed EC P-256 certificate and its key (0600); returns its fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        if name not in names and host not in ("0.0.0.0", "::"):
            names.append(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "galaxy node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))   # a peer's clock a little behind
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private, hashes.SHA256()))
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- peers

class PeerTLS:
    """Peers' HTTP base URLs and the ``ssl=`` argument that pins each one's certificate.

    ``records()`` yields the member records gossip knows (authenticated by the cluster
    key), so a pin is exactly what the peer itself gossiped.
    """

    def __init__(self, records: Callable[[], Iterable[Any]]) -> None:
        self._records = records

    @staticmethod
    def url(host: str, http_port: int, tls: bytes) -> str:
        scheme = "https" if tls else "http"
        return f"{scheme}://{host}:{http_port}"

    def url_of(self, record: Any) -> str:
        return self.url(record.host, record.http_port, record.tls)

    def ssl_for(self, url: str) -> Any:
        """aiohttp's ``ssl=`` for a request to ``url``: True (default checks; unused by
        plain http) or a ``Fingerprint`` pin for a peer's https."""
        import aiohttp

        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https":
            return True
        try:
            port = parts.port
        except ValueError:
            port = None
        for r in self._records():
            if r.host == parts.hostname and r.http_port == port and len(r.tls) == FINGERPRINT_BYTES:
                return aiohttp.Fingerprint(r.tls)
        return aiohttp.Fingerprint(_NO_MATCH)
