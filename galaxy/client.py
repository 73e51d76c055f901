"""A tiny synchronous HTTP client for the node API, used by the CLI.

Theory of operation: one request per call, JSON in and out, no retries (the CLI is
interactive; the user retries).  Every failure becomes one ``ClientError`` whose
message is a complete sentence fit to print after "galaxy: ", so the CLI never shows
a traceback for a network problem.  Proxies from the environment are ignored: nodes
are on the LAN or loopback, and an ``http_proxy`` meant for the internet must not
swallow ``127.0.0.1``.  Response bodies are bounded by ``body_max_bytes``.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_ADDR = "http://127.0.0.1:8000"
TIMEOUT_S = 10.0
BODY_MAX_BYTES = 64 * 1024 * 1024       # bounded even if a node misbehaves


class ClientError(Exception):
    """A failed call; ``str(err)`` is the line to show the user."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body


def normalize_addr(addr: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``; raises ClientError."""
    text = addr.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"bad address {addr!r}: expected http://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise ClientError(f"bad address {addr!r}: the port is not a number in 0..65535") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _unreachable(addr: str, reason: str) -> ClientError:
    return ClientError(f"cannot reach {addr}: {reason} — is a node running? "
                       "(galaxy up / galaxy dev)")


class Client:
    def __init__(self, addr: str = DEFAULT_ADDR, timeout_s: float = TIMEOUT_S,
                 token: str | None = None, tls_fingerprint: str | None = None, cacert: str | None = None,
                 pins_path: Any = None) -> None:
        self.addr = normalize_addr(addr)
        self.timeout_s = timeout_s
        self.token = token
        self._tls: Any = None
        if self.addr.startswith("https://"):     # whom to trust: galaxy/client_tls.py
            from galaxy.client_tls import ClientTLS
            try:
                self._tls = ClientTLS(self.addr, tls_fingerprint, cacert, pins_path)
            except ValueError as e:
                raise ClientError(str(e)) from None
        self._opener = self._build_opener()

    def _build_opener(self) -> urllib.request.OpenerDirector:
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if self._tls is not None:
            try:
                handlers.append(self._tls.handler())
            except ValueError as e:
                raise ClientError(str(e)) from None
        return urllib.request.build_opener(*handlers)

    def get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, body=body, query=query)

    def upload(self, path: str, file: Any, size: int) -> Any:
        """POST a file's bytes as is (an input archive); the parsed JSON answer."""
        return self.request("POST", path, data=file, content_type="application/octet-stream",
                            extra_headers={"Content-Length": str(size)})

    def stream(self, path: str, query: dict[str, Any] | None = None, timeout_s: float | None = None,
               headers: dict[str, str] | None = None) -> Any:
        """GET a streamed body (``logs -f``): yields chunks as they arrive; ``headers`` gets
        the response's headers before the first chunk."""
        url = self.addr + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, headers=self._headers(), method="GET")
        resp = self._open(req, url, timeout_s, None)
        if headers is not None:
            headers.update(resp.headers.items())
        with resp:
            try:
                while chunk := resp.read1(1 << 16):
                    yield chunk
            except (OSError, http.client.HTTPException) as err:
                raise ClientError(f"the stream from {self.addr} broke off ({type(err).__name__})") from None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "galaxy-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None, *, data: Any = None, content_type: str = "",
                extra_headers: dict[str, str] | None = None) -> Any:
        """Send one request; the parsed JSON answer of a 2xx, else ClientError."""
        url = self.addr + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {**self._headers(), **(extra_headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        return self._open(req, url, self.timeout_s,
                          lambda resp: self._parse(url, resp.status, resp.read(BODY_MAX_BYTES + 1)))

    def _open(self, req: urllib.request.Request, url: str, timeout_s: float | None,
              read: Callable[[Any], Any] | None) -> Any:
        """Open ``req``; ``read(resp)`` of the answer, or the open answer when ``read`` is None."""
        try:
            try:
                resp = self._opener.open(req, timeout=timeout_s)
            except urllib.error.URLError as err:
                # a self-signed certificate: trust it on first use (client_tls.py), once
                if self._tls is None or not self._tls.learn_from(err.reason):
                    raise
                self._opener = self._build_opener()
                resp = self._opener.open(req, timeout=timeout_s)
            if read is None:
                return resp
            with resp:
                return read(resp)
        except urllib.error.HTTPError as err:
            try:
                raw = err.read(BODY_MAX_BYTES + 1)
            except OSError:
                raw = b""
            finally:
                err.close()
            raise self._http_error(url, err.code, raw) from None
        except urllib.error.URLError as err:
            raise self._network_error(err.reason) from None
        except (TimeoutError, socket.timeout):
            raise _unreachable(self.addr, f"no answer within {self.timeout_s:g}s") from None
        except (ConnectionError, OSError) as err:
            raise self._network_error(err) from None
        except http.client.HTTPException as err:
            hint = self._https_hint() or " — is this a Galaxy node's HTTP port?"
            raise ClientError(f"{self.addr} gave a malformed HTTP answer ({type(err).__name__}){hint}") from None

    def _https_hint(self) -> str:
        """A node serving HTTPS drops a plain-HTTP request without an answer: say so."""
        if not self.addr.startswith("http://"):
            return ""
        return f" — if the node serves HTTPS, use {'https://' + self.addr[len('http://'):]}"

    def _network_error(self, reason: Any) -> ClientError:
        explained = self._tls.explain(reason) if self._tls is not None else None
        if explained is not None:
            return ClientError(explained)
        if isinstance(reason, http.client.RemoteDisconnected):
            return ClientError(f"{self.addr} closed the connection without an HTTP answer{self._https_hint()}")
        if isinstance(reason, ConnectionRefusedError) or getattr(reason, "errno", None) == errno.ECONNREFUSED:
            return _unreachable(self.addr, "connection refused")
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return _unreachable(self.addr, f"no answer within {self.timeout_s:g}s")
        if isinstance(reason, socket.gaierror):
            return _unreachable(self.addr, f"unknown host ({reason.strerror or reason})")
        if isinstance(reason, ConnectionResetError):
            return _unreachable(self.addr, "connection reset") if not self._https_hint() else \
                ClientError(f"cannot reach {self.addr}: connection reset{self._https_hint()}")
        if isinstance(reason, OSError) and reason.strerror:
            return _unreachable(self.addr, reason.strerror.lower())
        return _unreachable(self.addr, str(reason) or type(reason).__name__)

    def _parse(self, url: str, status: int, raw: bytes) -> Any:
        if len(raw) > BODY_MAX_BYTES:
            raise ClientError(f"{url}: answer larger than {BODY_MAX_BYTES} bytes", status)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"{url}: answered HTTP {status} with a body that is not JSON "
                              "— is this a Galaxy node?", status) from None

    def _http_error(self, url: str, status: int, raw: bytes) -> ClientError:
        body: Any = None
        try:
            body = json.loads(raw[:BODY_MAX_BYTES])
        except ValueError:
            pass
        if isinstance(body, dict) and "error" in body:
            code = str(body.get("error"))
            message = str(body.get("message") or code)
            return ClientError(f"{message} (HTTP {status} {code})", status, code, body)
        if isinstance(body, dict):
            # Some endpoints answer non-2xx with a normal body (/readyz's 503).
            detail = body.get("reason") or body.get("message")
            if detail:
                return ClientError(f"{detail} (HTTP {status})", status, None, body)
        return ClientError(f"{url}: HTTP {status} (not a Galaxy error body "
                           "— is this a Galaxy node?)", status, None, body)
