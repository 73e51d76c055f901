"""Content-addressed input archives: stored under their sha256, checked on every transfer.

Theory of operation: a blob is written to a temporary file while its sha256 is computed,
fsynced, and renamed to ``<dir>/<sha256>`` only when the digest matches what the caller
expected (when it expected one) and the size is within ``bytes_max``.  A blob in the
directory is therefore always whole and correct; a crash leaves at most a ``.tmp`` file,
removed on the next start.  Fetching from another node streams into the same path, so a
corrupt or truncated transfer is never kept.  A fetch is signed by this node (``sign``, set
by the node: its ``X-Galaxy-Auth`` header), so it works also when reads need a token.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp

SHA256 = re.compile(r"[0-9a-f]{64}\Z")
CHUNK_BYTES = 1 << 16


class BlobError(ValueError):
    """A blob was refused: too large, or not the content its name promised."""


class Blobs:
    def __init__(self, root: str, bytes_max: int) -> None:
        self.root = root
        self.bytes_max = bytes_max
        self.ssl_for: Any = lambda url: True    # the node sets its peers' certificate pins (galaxy/tls.py)
        self.sign: Callable[[str], dict[str, str]] | None = None     # path -> headers of a signed GET
        os.makedirs(root, mode=0o700, exist_ok=True)
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(root, name))

    def path(self, sha: str) -> str:
        if not SHA256.match(sha):
            raise BlobError(f"not a sha256: {sha!r}")
        return os.path.join(self.root, sha)

    def has(self, sha: str) -> bool:
        return os.path.exists(self.path(sha))

    async def put(self, chunks: AsyncIterator[bytes], expected: str = "") -> str:
        """Store a stream; returns its sha256.  Raises ``BlobError`` (nothing is kept)."""
        digest = hashlib.sha256()
        tmp = os.path.join(self.root, f"{os.getpid()}-{id(chunks)}.tmp")
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.bytes_max:
                        raise BlobError(f"larger than {self.bytes_max} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = digest.hexdigest()
            if expected and sha != expected:
                raise BlobError(f"content has sha256 {sha}, not {expected}")
            os.replace(tmp, self.path(sha))
            return sha
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def fetch(self, sha: str, urls: Iterable[str], timeout_s: float = 60.0) -> str:
        """Copy blob ``sha`` from the first node (HTTP base URL) that has it; returns its path."""
        if self.has(sha):
            return self.path(sha)
        errors = []
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for url in urls:
                try:
                    path = f"/v1/blobs/{sha}"
                    async with session.get(url + path, headers=self.sign(path) if self.sign else None,
                                           ssl=self.ssl_for(url)) as resp:
                        if resp.status != 200:
                            errors.append(f"{url}: HTTP {resp.status}")
                            continue
                        await self.put(resp.content.iter_chunked(CHUNK_BYTES), expected=sha)
                        return self.path(sha)
                except (aiohttp.ClientError, TimeoutError, OSError, BlobError) as e:
                    errors.append(f"{url}: {e}")
        raise BlobError(f"input archive {sha[:12]}… is on no reachable node ({'; '.join(errors) or 'no nodes'})")
