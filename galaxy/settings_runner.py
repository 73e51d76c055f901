"""Cluster-wide settings on a running node: learn them, run them live, change them.

Theory of operation
-------------------
``step()`` runs on every tick of the node's control loop (and whenever the settings
document changes):

1. *Which state.*  A voter holds the state in its ``ClusterSettings`` machine; every node
   holds the replicated document ``config/cluster`` (gossip).  The node runs the one
   with the higher version, the machine on a tie.  Versions are Raft indices, so within
   one Raft group the higher one is the newer; the machine also covers the moment after
   a restart when the journal replay is ahead of gossip, and the document the moment
   before a spare's machine has caught up.
2. *Publish.*  The coordinator, once caught up (it applied an entry of its own term,
   so its machine holds every committed change), writes the document whenever it
   differs from its machine.  Its write supersedes every sibling it saw, so after a
   group merge the winning group's settings replace the losing group's everywhere.
3. *Run.*  When the chosen state differs from the one running, the node builds
   ``settings.effective(base, state.settings)`` — its own Config with the cluster values
   over it — and hands it to ``apply_cfg`` (the node swaps its ``cfg`` and each subsystem
   that reads settings takes the new one; nothing restarts).  Settings the node cannot
   take (a relation with one of its own values) are listed in ``not_applied``.

``change(values, unset)`` validates at once (the same pure rules the state machine uses,
so a node-local key or a bad value is refused with the field named, even without a
coordinator), commits a ``ConfigSet`` through the gateway, and waits (bounded) until this
node runs the new version, so a ``get`` right after a ``set`` on the same node sees it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from galaxy.config import Config
from galaxy.consensus.commands import CommandError
from galaxy.messages import ConfigSet
from galaxy.settings import (CLUSTER_KEYS, CONFIG_KEY, CONFIG_TYPE, SettingError, SettingsState, as_text,
                             check_key, effective, from_value, parse_value, proposed)

log = logging.getLogger("galaxy.config")

APPLY_WAIT_POLL_MS = 20


class SettingsRunner:
    def __init__(self, *, node_id: str, base: Config, replica: Any, docs: Any, gateway: Any,
                 coordinator: Any, apply_cfg: Callable[[Config], None]) -> None:
        self.node_id = node_id
        self.base = base                     # the node's own Config: file, env, flags
        self._replica = replica
        self._docs = docs
        self._gateway = gateway
        self.coordinator = coordinator      # set by the node once it exists
        self._apply_cfg = apply_cfg
        self.running = SettingsState()       # the state this node runs
        self.cfg = base
        self.not_applied: dict[str, str] = {}
        self.stats = {"applied": 0, "published": 0}

    # -- learn, publish, run
    def _doc_state(self) -> SettingsState:
        doc = self._replica.get(CONFIG_TYPE, CONFIG_KEY)
        state = from_value(doc.value) if doc is not None else None
        return state or SettingsState()

    def _machine_state(self) -> SettingsState | None:
        commands = self.coordinator.commands if self.coordinator is not None else None
        if commands is None or not self.coordinator.running:
            return None
        return commands.machine(ConfigSet).state

    def step(self) -> None:
        doc = self._doc_state()
        machine = self._machine_state()
        if machine is not None and self.coordinator.caught_up() and \
                (doc.version, dict(doc.settings)) != (machine.version, dict(machine.settings)):
            self._docs.put(CONFIG_TYPE, CONFIG_KEY, machine.as_value())
            self.stats["published"] += 1
            doc = machine
        state = machine if machine is not None and machine.version >= doc.version else doc
        if (state.version, dict(state.settings)) != (self.running.version, dict(self.running.settings)):
            self._run(state)

    def _run(self, state: SettingsState) -> None:
        cfg, skipped = effective(self.base, state.settings)
        old = self.running
        self.running, self.cfg, self.not_applied = state, cfg, skipped
        self._apply_cfg(cfg)
        self.stats["applied"] += 1
        changed = sorted(k for k in set(old.settings) | set(state.settings)
                         if old.settings.get(k) != state.settings.get(k))
        log.info("cluster settings version %d: %s", state.version,
                 ", ".join(f"{k}={state.settings.get(k, '(node value)')}" for k in changed) or "no change",
                 extra={"event": "config", "version": state.version, "changed": changed})
        for key, why in skipped.items():
            log.warning("cluster setting %s not applied on this node: %s", key, why,
                        extra={"event": "config_not_applied", "key": key})

    # -- views
    def status(self) -> dict:
        out: dict[str, Any] = {"version": self.running.version, "settings": dict(self.running.settings)}
        if self.not_applied:
            out["not_applied"] = dict(self.not_applied)
        out["commands"] = dict(self._gateway.stats)      # submitted here: to own Raft / forwarded
        return out

    def value(self, key: str) -> dict:
        """One cluster setting as this node runs it; SettingError for other keys."""
        check_key(key)
        cluster = self.running.settings.get(key)
        return {"key": key, "value": getattr(self.cfg, key), "source": self._source(key),
                "cluster": cluster, "node": getattr(self.base, key), "version": self.running.version}

    def _source(self, key: str) -> str:
        return "cluster" if key in self.running.settings and key not in self.not_applied else "node"

    def view(self) -> dict:
        return {**self.status(), "node": self.node_id,
                "values": {k: {"value": getattr(self.cfg, k), "source": self._source(k)} for k in CLUSTER_KEYS}}

    # -- change
    async def change(self, values: Mapping[str, Any], unset: Iterable[str] = (), timeout_ms: int = 5000) -> dict:
        """Commit a change; the state machine's result plus ``applied_here``.  Raises
        SettingError (refused: the field is named) or CommandError (not committed)."""
        unset = tuple(unset)
        proposed(self.running.settings, values, unset)          # refuse early, with the field named
        canonical = {k: as_text(parse_value(k, v)) for k, v in values.items()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        result = await self._gateway.submit(ConfigSet(values=canonical, unset=unset, by=self.node_id), timeout_ms)
        if not result.get("ok"):
            raise SettingError(str(result.get("error")), str(result.get("message")), result.get("key"))
        version = int(result.get("version", 0))
        while self.running.version < version and loop.time() < deadline:
            self.step()
            if self.running.version >= version:
                break
            await asyncio.sleep(APPLY_WAIT_POLL_MS / 1000)
        return {**result, "applied_here": self.running.version >= version, "running_version": self.running.version}


__all__ = ["SettingsRunner", "SettingError", "CommandError"]
