"""How the CLI trusts a node's HTTPS certificate: a CA, an explicit pin, or trust on first use.

Theory of operation
-------------------
For an ``https://`` address the client decides, per connection, in this order:

1. ``--tls-fingerprint``/``GALAXY_TLS_FINGERPRINT`` given: the certificate's SHA-256 must
   be that one (no CA involved).
2. A pin for this address in ``known_nodes.json``: the certificate must have the pinned
   SHA-256.  A different one is refused, with the way to drop the pin
   (``galaxy tls forget ADDR``) -- like ssh's changed host key.
3. Otherwise the certificate is verified against the system's CAs (or ``--cacert FILE``),
   hostname included.  When that fails only because the certificate is self-signed (or
   its issuer is unknown) and no ``--cacert`` was given, the client connects again
   without CA checks, pins the fingerprint it was shown and says so on stderr (ssh's
   ``accept-new``): ``galaxy up --tls auto`` nodes work with no setup, and a later
   substitution is caught.

The pin file is ``$XDG_CONFIG_HOME/galaxy/known_nodes.json`` (default
``~/.config/galaxy``), written atomically, mode 0600, at most ``PINS_MAX`` entries.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from galaxy.tls import cert_fingerprint, fingerprint_text, parse_fingerprint
from galaxy.user_files import config_path, read_table, write_private

KNOWN_NODES_FILE = "known_nodes.json"
PINS_MAX = 1024                         # addresses pinned; the oldest pin goes first
PIN_FILE_BYTES_MAX = 1 << 20
FINGERPRINT_ENV = "GALAXY_TLS_FINGERPRINT"
CACERT_ENV = "GALAXY_CACERT"
# OpenSSL verify codes that mean "no CA vouches for this certificate": only then is TOFU offered.
_UNKNOWN_ISSUER = frozenset({18, 19, 20, 21})


class TLSRefused(OSError):
    """The node's certificate is not the one we trust; ``str()`` is the sentence to show."""


def known_nodes_path(env: Any = None) -> Path:
    return config_path(KNOWN_NODES_FILE, env)


def load_pins(path: Path | None = None) -> dict[str, dict]:
    pins = read_table(path or known_nodes_path(), "nodes", PIN_FILE_BYTES_MAX)
    return {a: e for a, e in pins.items() if isinstance(e.get("sha256"), str)}


def _save_pins(pins: dict[str, dict], path: Path) -> None:
    newest = sorted(pins.items(), key=lambda kv: kv[1].get("pinned_at_ms", 0))[-PINS_MAX:]
    write_private(path, {"nodes": dict(newest)})


def pin(addr: str, digest: bytes, path: Path | None = None) -> Path:
    path = path or known_nodes_path()
    pins = load_pins(path)
    pins[addr] = {"sha256": fingerprint_text(digest), "pinned_at_ms": int(time.time() * 1000)}
    _save_pins(pins, path)
    return path


def forget(addr: str, path: Path | None = None) -> bool:
    path = path or known_nodes_path()
    pins = load_pins(path)
    if pins.pop(addr, None) is None:
        return False
    _save_pins(pins, path)
    return True


class _PinnedConnection(http.client.HTTPSConnection):
    """An HTTPS connection that hands the server's certificate to ``check`` once connected."""

    def __init__(self, *args: Any, check: Callable[[bytes], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check = check

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True)
        try:
            self._check(der or b"")
        except BaseException:
            self.close()
            raise


class _PinnedHandler(urllib.request.HTTPSHandler):
    def __init__(self, check: Callable[[bytes], None]) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False           # the pin is the identity: no CA, no name
        ctx.verify_mode = ssl.CERT_NONE
        super().__init__(context=ctx)
        self._pin_check = check

    def https_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_PinnedConnection, check=self._pin_check), req,
                            context=self._context)


class ClientTLS:
    """The trust decision for one https address (see the module docstring)."""

    def __init__(self, addr: str, fingerprint: str | None = None, cacert: str | None = None,
                 pins_path: Path | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.addr = addr
        self.explicit = parse_fingerprint(fingerprint) if fingerprint else None
        if cacert is not None and not os.path.isfile(cacert):
            raise ValueError(f"--cacert: no such file {cacert}")
        self.cacert = cacert
        self.pins_path = pins_path or known_nodes_path()
        self._warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.learning = False                # set after a self-signed certificate failed CA checks

    def handler(self) -> urllib.request.BaseHandler:
        if self.explicit is not None or self.learning or self._pinned() is not None:
            return _PinnedHandler(self._check)
        try:
            ctx = ssl.create_default_context(cafile=self.cacert)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"--cacert: cannot load {self.cacert}: {e}") from None
        return urllib.request.HTTPSHandler(context=ctx)

    def _pinned(self) -> dict | None:
        return load_pins(self.pins_path).get(self.addr)

    def _check(self, der: bytes) -> None:
        got = cert_fingerprint(der)
        if self.explicit is not None:
            if got != self.explicit:
                raise TLSRefused(f"the TLS certificate of {self.addr} has fingerprint {fingerprint_text(got)}, "
                                 f"not {fingerprint_text(self.explicit)} (--tls-fingerprint / {FINGERPRINT_ENV}): "
                                 "refusing to talk to it")
            return
        entry = self._pinned()
        if entry is not None:
            try:
                want = parse_fingerprint(entry["sha256"])
            except ValueError:
                want = b""
            if got != want:
                raise TLSRefused(
                    f"the TLS certificate of {self.addr} CHANGED: it now has fingerprint {fingerprint_text(got)}, "
                    f"but {entry['sha256']} was pinned in {self.pins_path}. Someone may be intercepting the "
                    f"connection; if the node's certificate was replaced on purpose, drop the old pin with "
                    f"`galaxy tls forget {self.addr}` and try again (or pass --tls-fingerprint)")
            return
        if not self.learning:              # a CA-verified connection never gets here
            raise TLSRefused(f"no pin for {self.addr}")
        path = pin(self.addr, got, self.pins_path)
        self._warn(f"galaxy: {self.addr} presents a self-signed TLS certificate, fingerprint\n"
                   f"    SHA256 {fingerprint_text(got)}\n"
                   f"  pinned in {path}; a different certificate at this address will be refused "
                   "(compare with the fingerprint `galaxy up` printed)")

    def learn_from(self, err: BaseException) -> bool:
        """After a failed CA check: switch to trust-on-first-use when that is allowed here."""
        if (isinstance(err, ssl.SSLCertVerificationError) and err.verify_code in _UNKNOWN_ISSUER
                and self.cacert is None and self.explicit is None and not self.learning):
            self.learning = True
            return True
        return False

    def explain(self, err: BaseException) -> str | None:
        """The sentence for a TLS failure, or None when ``err`` is not about TLS."""
        if isinstance(err, TLSRefused):
            return str(err)
        if isinstance(err, ssl.SSLCertVerificationError):
            how = f" against {self.cacert}" if self.cacert else " against the system's CAs"
            return (f"cannot verify the TLS certificate of {self.addr}{how}: {err.verify_message}; "
                    "pass --cacert FILE or --tls-fingerprint SHA256 to trust it")
        if isinstance(err, ssl.SSLError):
            reason = err.reason or err.__class__.__name__
            hint = (" — does this port serve plain HTTP? then use http://"
                    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING",
                                  "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST") else "")
            return f"TLS handshake with {self.addr} failed ({reason}){hint}"
        return None
