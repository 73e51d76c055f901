"""Join tokens on a running node (member side) and on a new machine (``galaxy up --token``).

Theory of operation
-------------------
Member side, ``JoinService``: ``create`` signs a token with the primary key, a fresh
nonce and a few alive members as seeds.  ``redeem`` checks a request with the pure rules
of galaxy/join.py against every installed key, then spends the token's nonce through
Raft (``JoinUse``; the first redemption anywhere in the mesh wins, every later one is
refused as ``used``) *before* sealing the keyring to the new node's ephemeral key: a
nonce is never answered twice.  Every refusal is counted by reason (``status()``, shown
as the ``join`` section of /v1/status) and logged with the nonce (public), never the
token.

New machine, ``prepare(cfg)``: before the node starts, redeem the token with one of its
seeds (network errors move on to the next seed; a refusal is final), store the keyring
(``keyring.json``) and the primary key (``cluster.key``), both 0600, and return the
Config the node runs: the token's cluster, its seeds as ``join``, the role capped by the
token.  A data dir that already holds a key is a restart: nothing is redeemed (the token
was spent the first time), only the seeds and the role cap are taken from it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from galaxy import join, keyring, wire
from galaxy.config import Config
from galaxy.messages import JoinUse

log = logging.getLogger("galaxy.join")

SEEDS_IN_TOKEN = 3                      # alive members named in a token: one is enough, three survive a death
REDEEM_TIMEOUT_S = 10.0                 # per seed: a Raft commit plus a round trip, with headroom


class JoinRefused(Exception):
    """``galaxy up --token`` cannot join; the message says why and what to do."""


class JoinService:
    def __init__(self, *, node_id: str, cluster: str, clock: Any, keyring: Any, gateway: Any,
                 seeds: Callable[[], list[join.Seed]], timeout_ms: int) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self._clock = clock
        self._keyring = keyring
        self._gateway = gateway
        self._seeds = seeds
        self._timeout_ms = timeout_ms
        self.stats: dict[str, Any] = {"created": 0, "redeemed": 0, "refused": {r: 0 for r in join.REASONS}}

    def create(self, ttl_ms: int, role: str, by: str = "") -> dict:
        now_ms = self._clock.wall_ms()
        seeds = tuple(self._seeds()[:SEEDS_IN_TOKEN])
        nonce = os.urandom(join.NONCE_BYTES)
        token = join.make(self._keyring.keys()[0], self.cluster, nonce, now_ms + ttl_ms, role, seeds)
        self.stats["created"] += 1
        log.info("join token %s made by %s (role %s, expires in %d s)", nonce.hex(), by or "?", role, ttl_ms // 1000,
                 extra={"event": "join_token", "nonce": nonce.hex(), "role": role, "by": by})
        return {"token": token, "expires_ms": now_ms + ttl_ms, "role": role,
                "seeds": [f"{s.host}:{s.gossip_port}" for s in seeds]}

    async def redeem(self, req: Any, peer: str) -> dict:
        now_ms = self._clock.wall_ms()
        nonce = "?"
        try:
            token, pub = join.check_request(req, self._keyring.keys(), self.cluster, now_ms)
            nonce = token.nonce_id
            result = await self._gateway.submit(
                JoinUse(nonce=nonce, expires_ms=token.expires_ms, now_ms=now_ms, by=self.node_id), self._timeout_ms)
            if not result.get("ok"):
                raise join.TokenError(str(result.get("error")) if result.get("error") in join.REASONS else "used")
        except join.TokenError as e:
            self.stats["refused"][e.reason] += 1
            log.warning("join refused from %s: %s (token %s)", peer, e.reason, nonce,
                        extra={"event": "join_refused", "reason": e.reason, "peer": peer, "nonce": nonce})
            raise
        answer = join.seal(token, pub, X25519PrivateKey.generate(), list(self._keyring.running.keys))
        self.stats["redeemed"] += 1
        log.info("join token %s redeemed from %s (role %s)", nonce, peer, token.role,
                 extra={"event": "join_redeemed", "nonce": nonce, "peer": peer, "role": token.role})
        return answer

    def status(self) -> dict:
        return {"created": self.stats["created"], "redeemed": self.stats["redeemed"],
                "refused": dict(self.stats["refused"])}


# --- the new machine -----------------------------------------------------------------------------

def _has_key(cfg: Config) -> bool:
    return bool(cfg.cluster_key or cfg.cluster_key_file) or any(
        os.path.exists(os.path.join(cfg.data_dir, name)) for name in (keyring.KEYRING_FILE, "cluster.key"))


def _redeem(token: join.Token) -> dict:
    from galaxy.client import Client, ClientError
    if not token.seeds:
        raise JoinRefused("the token names no member to ask; make it on a running member")
    why = []
    for seed in token.seeds:
        private = X25519PrivateKey.generate()
        try:
            url, _, pin = seed.http.partition("#sha256=")     # an https seed's certificate pin (node.py)
            client = Client(url, timeout_s=REDEEM_TIMEOUT_S, tls_fingerprint=pin or None)
            answer = client.post("/v1/join/redeem", join.redeem_request(token, private))
        except ClientError as e:
            if e.status == 403:
                raise JoinRefused(f"{url} refused the token: {e.message}") from None
            why.append(f"{url}: {e.message}")
            continue
        try:
            return join.open_sealed(token, private, answer)
        except ValueError as e:
            why.append(f"{url}: {e}")
    raise JoinRefused("no member named in the token could redeem it: " + "; ".join(why))


def prepare(cfg: Config) -> Config:
    """The Config to run after redeeming ``cfg.token`` (see the module docstring); JoinRefused."""
    try:
        token = join.parse(cfg.token)
    except join.TokenError as e:
        raise JoinRefused(str(e)) from None
    if _has_key(cfg):
        log.info("this node has a cluster key already: the join token is not redeemed again")
    else:
        sealed = _redeem(token)
        os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
        keyring.save(cfg.data_dir, keyring.Ring(0, tuple(sealed["keys"])))
        path = os.path.join(cfg.data_dir, "cluster.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(sealed["keys"][0] + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"galaxy: join token redeemed with the mesh; cluster key "
              f"{wire.key_fingerprint(wire.parse_key(sealed['keys'][0]))} stored in {path}", flush=True)
    seeds = tuple(f"{s.host}:{s.gossip_port}" for s in token.seeds)
    return dataclasses.replace(cfg, token=None, cluster=token.cluster, join=tuple(dict.fromkeys(cfg.join + seeds)),
                               role=join.cap_role(cfg.role, token.role))
