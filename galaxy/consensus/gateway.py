"""Where a node sends a command: its own Raft, or the coordinator over HTTP.

Theory of operation
-------------------
``submit(cmd, timeout_ms)`` works on every node:

* a voter (Raft running and contacted by a leader) submits to its own ``Coordinator``:
  on the leader the entry is appended, on a follower pysyncobj forwards it to the leader;
* any other node (role worker; a spare that does not run Raft or still waits for the
  leader's first contact) POSTs the command's wire bytes to the coordinator's
  ``/v1/internal/commands`` (galaxy/api/internal.py), signed with the cluster key.  The
  coordinator is the one gossip names; when none is known, or the one named answers
  503 ``no_coordinator`` (it lost the lead meanwhile), the gateway tries again every
  ``RETRY_MS`` until the deadline.  A 504 or a broken connection after the request was
  sent leaves the outcome unknown and is reported as ``timeout``, never retried: a
  command is never sent twice by the gateway.

``submit_here`` is the receiving side of a forward: only the local Raft, never another hop.

``submit_many(cmds, timeout_ms)`` sends several commands together (a batch of transfers):
on a voter ``Coordinator.submit_many``; otherwise one forward whose body is a
``CommandBatch`` of their wire bytes, answered ``{"result": {"results": [...]}}`` with one
item per command: its result, or ``{"submit_error": code, "message"}``.  One outcome per
command, in order: a result dict or a ``CommandError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from galaxy.api.internal import AUTH_HEADER, COMMANDS_PATH, InternalAuth, new_nonce
from galaxy.clock import Clock
from galaxy.consensus.commands import CommandError, encode
from galaxy.messages import CommandBatch

log = logging.getLogger("galaxy.consensus")

RETRY_MS = 100                     # a few gossip rounds: time for a new coordinator to be named
ANSWER_BYTES_MAX = 1 << 20


class CommandGateway:
    def __init__(self, *, node_id: str, coordinator: Any, leader_http: Callable[[], str | None],
                 auth: InternalAuth, clock: Clock, ssl_for: Callable[[str], Any] = lambda url: True) -> None:
        self.node_id = node_id
        self.coordinator = coordinator      # set by the node once it exists
        self._leader_http = leader_http
        self._auth = auth
        self._clock = clock
        self._ssl_for = ssl_for             # the coordinator's certificate pin (galaxy/tls.py)
        self.stats = {"local": 0, "forwarded": 0, "forward_retries": 0}

    def votes(self) -> bool:
        return self.coordinator is not None and self.coordinator.running and self.coordinator.view().raft_state not in ("none", "starting")

    async def submit(self, cmd: Any, timeout_ms: int) -> dict:
        if self.votes():
            return await self.submit_here(cmd, timeout_ms)
        return await self._forward(cmd, timeout_ms)

    async def submit_here(self, cmd: Any, timeout_ms: int) -> dict:
        if self.coordinator is None or not self.coordinator.running:
            raise CommandError("no_coordinator", f"{self.node_id} does not run Raft")
        self.stats["local"] += 1
        return await self.coordinator.submit(cmd, timeout_ms)

    async def submit_many(self, cmds: list[Any], timeout_ms: int) -> list[dict | CommandError]:
        if not cmds:
            return []
        if self.votes():
            return await self.submit_many_here(cmds, timeout_ms)
        answer = await self._forward(CommandBatch(tuple(encode(c) for c in cmds)), timeout_ms)
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(cmds) or \
                not all(isinstance(r, dict) for r in results):
            raise CommandError("timeout", f"the coordinator's answer does not list {len(cmds)} results; check "
                                          "the version")
        return [CommandError(str(r["submit_error"]), str(r.get("message") or r["submit_error"]))
                if "submit_error" in r else r for r in results]

    async def submit_many_here(self, cmds: list[Any], timeout_ms: int) -> list[dict | CommandError]:
        if self.coordinator is None or not self.coordinator.running:
            raise CommandError("no_coordinator", f"{self.node_id} does not run Raft")
        self.stats["local"] += 1
        return await self.coordinator.submit_many(cmds, timeout_ms)

    async def _forward(self, cmd: Any, timeout_ms: int) -> dict:
        body = encode(cmd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        why = "no coordinator is known"
        while True:
            url = self._leader_http()
            left_s = deadline - loop.time()
            if url is not None and left_s > 0:
                status, answer = await self._post(url, body, left_s)
                if status == 200 and isinstance(answer, dict) and isinstance(answer.get("result"), dict):
                    self.stats["forwarded"] += 1
                    return answer["result"]
                code = answer.get("error") if isinstance(answer, dict) else None
                message = answer.get("message") if isinstance(answer, dict) else None
                if status != 503 or code != "no_coordinator":
                    raise CommandError(code if code in ("busy", "invalid") else "timeout",
                                       f"the coordinator at {url} answered HTTP {status}: {message or code}")
                why = f"{url}: {message}"
            if loop.time() + RETRY_MS / 1000 >= deadline:
                raise CommandError("no_coordinator", f"no coordinator took the command within {timeout_ms} ms "
                                                     f"({why})")
            self.stats["forward_retries"] += 1
            await asyncio.sleep(RETRY_MS / 1000)

    async def _post(self, url: str, body: bytes, timeout_s: float) -> tuple[int, Any]:
        headers = {AUTH_HEADER: self._auth.header(self.node_id, self._clock.wall_ms(), "POST", COMMANDS_PATH, body,
                                                  new_nonce()),
                   "Content-Type": "application/octet-stream"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                async with session.post(url + COMMANDS_PATH, data=body, headers=headers,
                                        ssl=self._ssl_for(url)) as resp:
                    raw = await resp.content.read(ANSWER_BYTES_MAX)
                    try:
                        return resp.status, json.loads(raw)
                    except ValueError:
                        return resp.status, None
        except aiohttp.ClientConnectorError as e:
            # nothing reached the coordinator: as good as "no coordinator", try again
            return 503, {"error": "no_coordinator", "message": f"cannot connect ({e.__class__.__name__})"}
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            raise CommandError("timeout", f"no answer from the coordinator at {url}; the change may still be "
                                          "applied (check the version)") from None
