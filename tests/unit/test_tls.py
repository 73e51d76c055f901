"""TLS: config rules, certificate files, peer pins, and the CLI's trust decisions against a
real HTTPS server (make_app over a fake node, in a thread)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from galaxy import cli, client_tls, config, tls
from galaxy.client import Client, ClientError
from galaxy.config import Config, ConfigError
from tests.unit.test_cli import FakeNode, fake_node_module, served  # noqa: F401  (fixture)


def _cfg(tmp_path: Path, **kw: Any) -> Config:
    return config.load({"data_dir": str(tmp_path / "data"), **kw}, {})


# ---------------------------------------------------------------- config rules

def test_tls_settings_come_from_flags_env_and_file(tmp_path: Path) -> None:
    assert _cfg(tmp_path).tls == "off" and not tls.enabled(_cfg(tmp_path))
    assert config.load({}, {"GALAXY_TLS": "AUTO"}).tls == "auto"
    toml = tmp_path / "n.toml"
    toml.write_text('tls_cert = "c.pem"\ntls_key = "k.pem"\n')
    cfg = config.load({}, {}, str(toml))
    assert cfg.tls_cert == os.path.abspath("c.pem") and tls.enabled(cfg)
    # client-side variables are not node settings
    assert config.load({}, {"GALAXY_TLS_FINGERPRINT": "x", "GALAXY_CACERT": "/y"}).tls == "off"


@pytest.mark.parametrize("kw, key, words", [
    ({"tls": "yes"}, "tls", "must be one of off, auto"),
    ({"tls_cert": "/c.pem"}, "tls_cert", "needs tls_key"),
    ({"tls_key": "/k.pem"}, "tls_key", "needs tls_cert"),
    ({"tls": "auto", "tls_cert": "/c", "tls_key": "/k"}, "tls", "must be off"),
])
def test_tls_settings_are_validated_naming_the_key(tmp_path: Path, kw: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, **kw)
    assert err.value.key == key and words in str(err.value) and str(err.value).startswith(key)


# ---------------------------------------------------------------- certificate files

def _pair(tmp_path: Path, name: str) -> tuple[str, str]:
    cert, key = str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")
    tls.generate_self_signed(cert, key, ["10.77.0.5", "node.lan"])
    return cert, key


def test_auto_makes_an_ec_p256_certificate_once_and_keeps_it(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tls="auto")
    first = tls.server_tls(cfg, hosts=["10.77.0.5", "0.0.0.0"])
    assert first is not None and first.generated and len(first.fingerprint) == 32
    assert stat.S_IMODE(os.stat(first.key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(Path(first.cert_path).read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.77.0.5")}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    again = tls.server_tls(cfg, hosts=["10.77.0.6"])       # a restart: same certificate, same pin
    assert again is not None and not again.generated and again.fingerprint == first.fingerprint
    assert again.context() is not None


def test_given_files_are_checked_with_the_key_named(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path, "a")
    _, other_key = _pair(tmp_path, "b")
    ok = tls.server_tls(_cfg(tmp_path, tls_cert=cert, tls_key=key))
    assert ok is not None and not ok.generated

    def refused(c: str, k: str) -> ConfigError:
        with pytest.raises(ConfigError) as err:
            tls.server_tls(_cfg(tmp_path, tls_cert=c, tls_key=k))
        return err.value

    e = refused(str(tmp_path / "missing.crt"), key)
    assert e.key == "tls_cert" and "no such file" in str(e)
    e = refused(cert, str(tmp_path))
    assert e.key == "tls_key" and "directory" in str(e)
    e = refused(cert, other_key)
    assert e.key == "tls_key" and "does not match" in str(e)
    e = refused(key, key)
    assert e.key == "tls_cert" and "not a PEM certificate" in str(e)
    e = refused(cert, cert)
    assert e.key == "tls_key" and "not a PEM private key" in str(e)


def test_galaxy_up_exits_2_naming_the_key(tmp_path: Path, fake_node_module: list[Any],  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cert, _ = _pair(tmp_path, "a")
    _, other_key = _pair(tmp_path, "b")
    code = cli.main(["up", "--data-dir", str(tmp_path / "d"), "--tls-cert", cert, "--tls-key", other_key])
    assert code == 2 and not fake_node_module
    assert "error: tls_key: the key in" in capsys.readouterr().err
    assert cli.main(["up", "--data-dir", str(tmp_path / "d"), "--tls-cert", cert]) == 2
    assert "tls_cert: needs tls_key" in capsys.readouterr().err


# ---------------------------------------------------------------- peers

def test_peer_urls_and_pins_come_from_the_gossiped_record() -> None:
    fp = b"\x01" * 32
    records = [SimpleNamespace(host="10.0.0.1", http_port=8000, tls=fp),
               SimpleNamespace(host="10.0.0.2", http_port=8000, tls=b"")]
    peers = tls.PeerTLS(lambda: records)
    assert peers.url_of(records[0]) == "https://10.0.0.1:8000"
    assert peers.url_of(records[1]) == "http://10.0.0.2:8000"
    pin = peers.ssl_for("https://10.0.0.1:8000")
    assert isinstance(pin, aiohttp.Fingerprint) and pin.fingerprint == fp
    assert peers.ssl_for("http://10.0.0.2:8000") is True
    stranger = peers.ssl_for("https://10.0.0.9:8000")        # nobody gossiped it: nothing matches
    assert isinstance(stranger, aiohttp.Fingerprint) and stranger.fingerprint == bytes(32)


def test_fingerprints_parse_in_the_forms_users_paste() -> None:
    fp = bytes(range(32))
    text = tls.fingerprint_text(fp)
    for form in (text, text.lower(), text.replace(":", ""), "SHA256:" + text, " sha256=" + text.lower()):
        assert tls.parse_fingerprint(form) == fp
    for bad in ("", "AB:CD", "zz" * 32, text + ":00"):
        with pytest.raises(ValueError):
            tls.parse_fingerprint(bad)


# ---------------------------------------------------------------- the CLI against a real HTTPS server

def _server(cert: str, key: str) -> Any:
    return served(FakeNode(), tls.ServerTLS(cert, key, b"", False).context())


def _fp(cert: str) -> bytes:
    return tls.cert_fingerprint(x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(
        serialization.Encoding.DER))


def test_trust_on_first_use_then_refuse_a_changed_certificate(tmp_path: Path) -> None:
    pins = tmp_path / "cfg" / "known_nodes.json"
    cert, key = _pair(tmp_path, "a")
    said: list[str] = []
    with _server(cert, key) as url:
        c = Client(url, pins_path=pins)
        c._tls._warn = said.append
        assert c.get("/v1/leader")["leader"] == FakeNode().node_id
        assert len(said) == 1 and tls.fingerprint_text(_fp(cert)) in said[0] and "pinned" in said[0]
        assert stat.S_IMODE(os.stat(pins).st_mode) == 0o600
        assert json.loads(pins.read_text())["nodes"][url]["sha256"] == tls.fingerprint_text(_fp(cert))
        c2 = Client(url, pins_path=pins)                      # a later run: pinned, silent
        c2._tls._warn = said.append
        assert c2.get("/v1/leader")["leader"] == FakeNode().node_id and len(said) == 1
        port = url.rsplit(":", 1)[1]
    cert2, key2 = _pair(tmp_path, "b")                        # same address, new certificate
    with _server_on(cert2, key2, int(port)) as url2:
        assert url2 == url
        with pytest.raises(ClientError) as err:
            Client(url, pins_path=pins).get("/v1/leader")
        msg = err.value.message
        assert "CHANGED" in msg and tls.fingerprint_text(_fp(cert2)) in msg and f"galaxy tls forget {url}" in msg
        assert client_tls.forget(url, pins) and not client_tls.forget(url, pins)
        assert Client(url, pins_path=pins).get("/v1/leader")["leader"] == FakeNode().node_id     # pins the new one


def _server_on(cert: str, key: str, port: int) -> Any:
    """Like ``served`` but on a given port (a node restarted with a new certificate)."""
    import contextlib
    import socket

    from tests.unit import test_cli

    @contextlib.contextmanager
    def run() -> Any:
        real = test_cli.serve

        async def on_port(app: Any, host: str, _port: int, **kw: Any) -> Any:
            return await real(app, host, port, **kw)
        test_cli.serve = on_port
        try:
            with socket.socket() as probe:        # the old server released it
                probe.bind(("127.0.0.1", port))
            with served(FakeNode(), tls.ServerTLS(cert, key, b"", False).context()) as url:
                yield url
        finally:
            test_cli.serve = real
    return run()


def test_explicit_fingerprint_and_cacert(tmp_path: Path) -> None:
    pins = tmp_path / "known_nodes.json"
    cert, key = _pair(tmp_path, "a")
    with _server(cert, key) as url:
        assert Client(url, pins_path=pins, tls_fingerprint=tls.fingerprint_text(_fp(cert))).get("/healthz")
        with pytest.raises(ClientError) as err:
            Client(url, pins_path=pins, tls_fingerprint="00" * 32).get("/healthz")
        assert "not 00:00" in err.value.message and "--tls-fingerprint" in err.value.message
        with pytest.raises(ClientError) as err:            # a CA bundle that did not sign it: no TOFU
            Client(url, pins_path=pins, cacert=_ca(tmp_path, "other")[0]).get("/healthz")
        assert "cannot verify the TLS certificate" in err.value.message
        assert not pins.exists()
    with pytest.raises(ClientError, match="--tls-fingerprint|64 hex"):
        Client("https://127.0.0.1:1", tls_fingerprint="abc")
    with pytest.raises(ClientError, match="--cacert: no such file"):
        Client("https://127.0.0.1:1", cacert=str(tmp_path / "nope.pem"))

    ca_cert, leaf_cert, leaf_key = _ca(tmp_path, "ca")
    with _server(leaf_cert, leaf_key) as url:
        assert Client(url, pins_path=pins, cacert=ca_cert).get("/healthz")    # verified: nothing pinned
        assert not pins.exists()


def test_plain_http_to_a_tls_port_and_tls_to_a_plain_port_fail_clearly(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path, "a")
    with _server(cert, key) as url:
        with pytest.raises(ClientError) as err:
            Client(url.replace("https://", "http://")).get("/healthz")
        assert "use https://" in err.value.message
    with served(FakeNode()) as plain:
        with pytest.raises(ClientError) as err:
            Client(plain.replace("http://", "https://"), pins_path=tmp_path / "p.json").get("/healthz")
        assert "TLS handshake" in err.value.message and "http://" in err.value.message


def _ca(tmp_path: Path, name: str) -> tuple[str, str, str]:
    """A CA certificate and a leaf for 127.0.0.1 signed by it (PEM paths)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test ca {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [tmp_path / f"{name}-ca.pem", tmp_path / f"{name}-leaf.pem", tmp_path / f"{name}-leaf.key"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return str(paths[0]), str(paths[1]), str(paths[2])
