"""The cluster keyring: several keys installed, one primary, rotated live across the mesh.

Theory of operation
-------------------
Like Serf's keyring: every node *accepts* frames, Raft traffic, internal HTTP calls and
sign-in tokens made with any installed key, and *sends* with the primary one.  Rotation
is three operator steps, each applied on every node before the next makes sense:

    install K2   every node accepts K2 (still sends with K1)
    use K2       every node sends with K2 (still accepts K1)
    remove K1    every node forgets K1 (refused while K1 is primary)

How a change spreads (the same path as cluster settings, galaxy/settings.py): a
``KeyringChange`` command is committed through Raft; every voter's ``KeyringMachine``
applies it at the same log index, so the ring's *version* is that index; the coordinator
publishes the machine's ring in the replicated document ``keyring/cluster``; every node
runs the ring with the highest version it has seen (machine or document) and writes it
to ``keyring.json`` in its data dir (0600), so a restart keeps it.  The machine starts
empty: the first command carries the proposer's running ring (``base``), which seeds it.

The document travels only inside gossip frames sealed with an installed key, and the
Raft log only over the Fernet-encrypted transport; both rest in the data dir next to
``cluster.key``.  No status page, log line or error shows a key, only fingerprints.

``use`` is safe only when every node has installed the key (a node that has not would
drop frames sent with it); ``KeyringRunner.members_missing`` is the check the HTTP route
makes before committing ``use`` (it asks every alive member).  Removing the key a node
was started with is fine: the ring file wins over the flag on restart.

Invariants (``KeyringMachine._check`` after every apply):

1. The ring is empty (never changed) or holds 1..KEYRING_KEYS_MAX distinct valid keys.
2. The version is 0 or the index of an applied entry, and never decreases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, MultiFernet

from galaxy import wire
from galaxy.consensus.commands import ok, rejected
from galaxy.gossip.replica import Lattice
from galaxy.messages import KeyringChange

log = logging.getLogger("galaxy.keyring")

KEYRING_TYPE = "keyring"             # replicated document type ...
KEYRING_KEY = "cluster"              # ... and key holding {"version": N, "keys": [primary, ...]}
KEYRING_FILE = "keyring.json"
KEYRING_KEYS_MAX = 8                 # rotation needs two; eight leaves room for mistakes, bounds every frame's key lookup
OPS = ("install", "use", "remove")

# Error codes (also the HTTP API's "error" field).
NOT_INSTALLED = "not_installed"
PRIMARY = "primary"
INVALID_KEY = "invalid_key"
FULL = "keyring_full"


@dataclass(frozen=True, slots=True)
class Ring:
    version: int = 0
    keys: tuple[str, ...] = ()       # key texts ("gk1-..."), the primary first

    def as_value(self) -> dict:
        return {"version": self.version, "keys": list(self.keys)}

    def fingerprints(self) -> list[str]:
        return [fingerprint(k) for k in self.keys]


def fingerprint(text: str) -> str:
    return wire.key_fingerprint(wire.parse_key(text))


def key_text(key: bytes) -> str:
    """A key's text form (the inverse of ``wire.parse_key``)."""
    return wire.KEY_PREFIX + base64.urlsafe_b64encode(key).decode().rstrip("=")


def canonical(text: str) -> str:
    """The key text as stored (ValueError without echoing the key)."""
    wire.parse_key(text)
    return text.strip()


def from_value(value: Any) -> Ring | None:
    """A document's (or file's) value as a Ring; None when it is not a valid one."""
    if not isinstance(value, dict):
        return None
    version, keys = value.get("version"), value.get("keys")
    if type(version) is not int or version < 0 or not isinstance(keys, list) \
            or not 1 <= len(keys) <= KEYRING_KEYS_MAX:
        return None
    try:
        ring = tuple(canonical(k) for k in keys if isinstance(k, str))
    except ValueError:
        return None
    if len(ring) != len(keys) or len({fingerprint(k) for k in ring}) != len(ring):
        return None
    return Ring(version, ring)


def changed(ring: tuple[str, ...], op: str, key: str) -> tuple[str, ...]:
    """The ring after one operation (pure); KeyringError names what is wrong."""
    try:
        key = canonical(key)
    except ValueError as e:
        raise KeyringError(INVALID_KEY, str(e)) from None
    fps = [fingerprint(k) for k in ring]
    fp = fingerprint(key)
    if op == "install":
        if fp in fps:
            return ring
        if len(ring) >= KEYRING_KEYS_MAX:
            raise KeyringError(FULL, f"the keyring holds {KEYRING_KEYS_MAX} keys already; remove one first")
        return (*ring, key)
    if fp not in fps:
        raise KeyringError(NOT_INSTALLED, f"key {fp} is not installed; install it first")
    if op == "use":
        return (key, *(k for k in ring if fingerprint(k) != fp))
    if op == "remove":
        if fps[0] == fp:
            raise KeyringError(PRIMARY, f"key {fp} is the primary key; `use` another key before removing it")
        return tuple(k for k in ring if fingerprint(k) != fp)
    raise KeyringError(INVALID_KEY, f"unknown operation {op!r}; one of {', '.join(OPS)}")


class KeyringError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class KeyringMachine:
    """The state machine behind ``KeyringChange`` (see the module docstring)."""

    commands = (KeyringChange,)

    def __init__(self) -> None:
        self.ring = Ring()

    def apply(self, index: int, term: int, cmd: KeyringChange) -> dict:
        before = self.ring
        keys = before.keys
        if not keys:
            base = from_value({"version": 0, "keys": list(cmd.base)})
            if base is None:
                return rejected(INVALID_KEY, "the first keyring change must carry the proposer's ring", None)
            keys = base.keys
        try:
            new = changed(keys, cmd.op, cmd.key)
        except KeyringError as e:
            return rejected(e.code, str(e), None, version=before.version)
        if new == before.keys:
            return ok(version=before.version, changed=False, fingerprints=before.fingerprints())
        self.ring = Ring(index, new)
        self._check(before)
        return ok(version=index, changed=True, fingerprints=self.ring.fingerprints())

    def snapshot(self) -> dict:
        # fingerprints only: this shows in /v1/status
        return {"version": self.ring.version, "fingerprints": self.ring.fingerprints()}

    def _check(self, before: Ring) -> None:
        ring = self.ring
        assert ring.version >= before.version, (before.version, ring.version)
        assert 1 <= len(ring.keys) <= KEYRING_KEYS_MAX, len(ring.keys)
        assert len(set(ring.fingerprints())) == len(ring.keys)


def _rank(doc: Any) -> int:
    ring = from_value(doc.value)
    return ring.version if ring is not None else -1


KEYRING_RESOLVER = Lattice(_rank)


# --- Raft's Fernet with a ring -----------------------------------------------------------------

class RotatingFernet:
    """What pysyncobj calls its encryptor, with keys swapped in place.

    pysyncobj hands the encryptor object to every connection when it opens, so the keys
    change inside one long-lived object: open connections use the new ring at once.
    """

    def __init__(self, secrets: Sequence[bytes]) -> None:
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Sequence[bytes]) -> None:
        # one attribute assignment: the pysyncobj thread sees the old ring or the new one
        self._multi = MultiFernet([Fernet(_fernet_key(s)) for s in secrets])

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._multi.encrypt_at_time(data, current_time)

    def encrypt(self, data: bytes) -> bytes:
        return self._multi.encrypt(data)

    def decrypt(self, token: bytes, ttl: int | None = None) -> bytes:
        return self._multi.decrypt(token, ttl)

    def extract_timestamp(self, token: bytes) -> int:
        return self._multi.extract_timestamp(token)


def _fernet_key(secret: bytes) -> bytes:
    return base64.urlsafe_b64encode(secret)



# --- the file ------------------------------------------------------------------------------------

def load(data_dir: str) -> Ring | None:
    """The ring stored in the data dir, None when there is none; SystemExit when it is broken."""
    path = os.path.join(data_dir, KEYRING_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SystemExit(f"galaxy: error: keyring {path}: {type(e).__name__}") from None
    ring = from_value(raw)
    if ring is None:
        raise SystemExit(f"galaxy: error: keyring {path} is not a valid keyring; remove it to start from "
                         "the cluster key")
    return ring


def save(data_dir: str, ring: Ring) -> None:
    """Write the ring atomically, owner-only, durable before the node runs it."""
    path = os.path.join(data_dir, KEYRING_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ring.as_value(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- the runner ----------------------------------------------------------------------------------

class KeyringRunner:
    """Learn the cluster's ring, run it on this node, change it (see the module docstring)."""

    def __init__(self, *, node_id: str, data_dir: str, ring: Ring, replica: Any, docs: Any, gateway: Any,
                 coordinator: Any, apply_keys: Callable[[list[bytes]], None]) -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.running = ring
        self._replica = replica
        self._docs = docs
        self._gateway = gateway
        self.coordinator = coordinator
        self._apply_keys = apply_keys
        self.stats = {"applied": 0, "published": 0}

    def keys(self) -> list[bytes]:
        return [wire.parse_key(k) for k in self.running.keys]

    def _doc_ring(self) -> Ring:
        doc = self._replica.get(KEYRING_TYPE, KEYRING_KEY)
        ring = from_value(doc.value) if doc is not None else None
        return ring or Ring()

    def _machine_ring(self) -> Ring | None:
        commands = self.coordinator.commands if self.coordinator is not None else None
        if commands is None or not self.coordinator.running:
            return None
        ring = commands.machine(KeyringChange).ring
        return ring if ring.keys else None

    def step(self) -> None:
        doc = self._doc_ring()
        machine = self._machine_ring()
        if machine is not None and self.coordinator.caught_up() and \
                (doc.version, doc.keys) != (machine.version, machine.keys):
            self._docs.put(KEYRING_TYPE, KEYRING_KEY, machine.as_value())
            self.stats["published"] += 1
            doc = machine
        best = machine if machine is not None and machine.version >= doc.version else doc
        if best.keys and best.version > self.running.version:
            self._run(best)

    def _run(self, ring: Ring) -> None:
        old = self.running
        save(self.data_dir, ring)            # durable first: a restart runs what this node ran
        self.running = ring
        self._apply_keys(self.keys())
        self.stats["applied"] += 1
        log.info("keyring version %d: primary %s, installed %s", ring.version, ring.fingerprints()[0],
                 ", ".join(ring.fingerprints()),
                 extra={"event": "keyring", "version": ring.version, "primary": ring.fingerprints()[0],
                        "was": old.fingerprints()})

    def view(self) -> dict:
        fps = self.running.fingerprints()
        return {"node": self.node_id, "version": self.running.version, "primary": fps[0] if fps else None,
                "installed": fps}

    async def change(self, op: str, key: str, timeout_ms: int) -> dict:
        """Commit one change and wait (bounded) until this node runs it."""
        changed(self.running.keys, op, key)                  # refuse early, naming the problem
        cmd = KeyringChange(op=op, key=canonical(key), base=self.running.keys, by=self.node_id)
        result = await self._gateway.submit(cmd, timeout_ms)
        if not result.get("ok"):
            raise KeyringError(str(result.get("error")), str(result.get("message")))
        version = int(result.get("version", 0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while self.running.version < version and loop.time() < deadline:
            self.step()
            if self.running.version >= version:
                break
            await asyncio.sleep(0.02)
        return {"ok": True, "op": op, "fingerprint": fingerprint(key), "version": version,
                "changed": bool(result.get("changed")), "applied_here": self.running.version >= version,
                "installed": self.running.fingerprints()}
