"""One-time join tokens: let a new machine in without handing it the cluster key.

Theory of operation
-------------------
A token is ``gjt1-`` + base64url(body || mac), where

    body = msgpack [1, cluster, nonce (16 bytes), expires_ms, role, seeds, kid (8 bytes)]
    seeds = [[host, gossip_port, http_url], ...]    a few alive members when it was made
    mac  = HMAC-SHA256(derive_secret(K, "join"), "galaxy-join-token-v1" || body)

K is the installed cluster key whose fingerprint starts with ``kid`` (the primary one
when the token was made; any installed key verifies, so rotation does not void tokens
until their key is removed).  The token does not contain K.  ``mac`` is the secret part:
whoever holds the token holds ``mac``, and only holders of K can compute it.

Redeeming (``galaxy up --token``) never sends ``mac`` over the network, so a passive
eavesdropper learns neither the token nor the key, and an active one cannot redeem it:

    new node -> member   body, X25519 ephemeral public key P_n,
                         proof = HMAC(mac, "galaxy-join-req" || body || P_n)
    member               recomputes mac from body with K, checks proof (the body is
                         unaltered and the sender holds the token), cluster, expiry, then
                         spends the nonce through Raft (``JoinUse``: first one wins, on every
                         voter), and only then answers
    member -> new node   P_m, AES-256-GCM(k, zero nonce, payload, aad=body) where
                         k = HKDF(X25519(P_m, P_n), salt=mac, info=body || P_n || P_m)

k depends on the DH secret (the eavesdropper lacks it) and on mac (a fake member lacks
it, so the new node's AEAD check fails against anyone who is not a key holder).  Each k
encrypts exactly one message, so the fixed nonce is safe.  The payload is JSON
``{"keys": [...], "cluster", "role"}``: the keyring, primary first.

Everything here is pure: randomness (the token nonce, the ephemeral private keys) and
the clock come from the caller.  ``parse`` raises only ``TokenError`` for any input.

Invariants:

* A token verifies only if its body is byte-for-byte what some installed key signed.
* ``JoinNonces`` (the Raft machine) accepts each nonce at most once for as long as the
  token could still be accepted anywhere (spent nonces are pruned only
  ``PRUNE_GRACE_MS`` after their expiry, by the command's own clock, so every voter
  prunes the same), and holds at most ``SPENT_MAX`` nonces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from galaxy import wire
from galaxy.consensus.commands import ok, rejected
from galaxy.messages import JoinUse

TOKEN_PREFIX = "gjt1-"
TOKEN_VERSION = 1
TOKEN_CHARS_MAX = 2048              # three seeds with long names fit in about 600
NONCE_BYTES = 16
MAC_BYTES = 32
PUB_BYTES = 32
SEEDS_MAX = 5                       # enough to find one alive member; keeps the token pasteable
HOST_CHARS_MAX = 253                # a DNS name
URL_CHARS_MAX = 300
ROLES = ("worker", "coordinator")   # worker: never votes; coordinator: whatever the node asks
TTL_MS_MIN = 10_000
TTL_MS_MAX = 7 * 24 * 3_600_000     # a week: a token is a password; it should not live long
TTL_MS_DEFAULT = 5 * 60_000
PRUNE_GRACE_MS = 3_600_000          # clocks may differ by minutes; an hour past expiry no member accepts it
SPENT_MAX = 10_000                  # tokens spent and unexpired at once; beyond, redeem waits for expiry
SEALED_BYTES_MAX = 16_384           # a keyring of KEYRING_KEYS_MAX keys is under 1 KiB

# Refusal reasons (the HTTP "error" code and the stats key).
REASONS = ("malformed", "unknown_key", "altered", "foreign_cluster", "expired", "used", "busy")
MESSAGES = {
    "malformed": "not a Galaxy join token (cut off when copied?)",
    "unknown_key": "the token was signed with a key this mesh does not have (made by another mesh, "
                   "or its key was removed)",
    "altered": "the token's signature does not match: it was altered",
    "foreign_cluster": "the token is for another cluster",
    "expired": "the token has expired: make a new one with `galaxy token create`",
    "used": "the token was already used: each token lets one machine in; make a new one",
    "busy": "too many unexpired tokens were spent recently; try again after some expire",
}

_REQ_LABEL = b"galaxy-join-req"
_TOKEN_LABEL = b"galaxy-join-token-v1"
_KDF_LABEL = b"galaxy-join-v1"


class TokenError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(MESSAGES[reason] + (f" ({detail})" if detail else ""))
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Seed:
    host: str
    gossip_port: int
    http: str


@dataclass(frozen=True, slots=True)
class Token:
    body: bytes
    mac: bytes
    cluster: str
    nonce: bytes
    expires_ms: int
    role: str
    seeds: tuple[Seed, ...]
    kid: bytes

    @property
    def nonce_id(self) -> str:
        """The nonce as logged: it is public (in every redeem request), unlike the mac."""
        return self.nonce.hex()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> bytes:
    return bytes.fromhex(wire.key_fingerprint(key))[:8]


def _sign(key: bytes, body: bytes) -> bytes:
    return hmac.new(wire.derive_secret(key, "join"), _TOKEN_LABEL + body, hashlib.sha256).digest()


def make(key: bytes, cluster: str, nonce: bytes, expires_ms: int, role: str, seeds: tuple[Seed, ...]) -> str:
    """A signed token (the caller draws ``nonce`` from a CSPRNG)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    body = msgpack.packb([TOKEN_VERSION, cluster, nonce, expires_ms, role,
                          [[s.host, s.gossip_port, s.http] for s in seeds[:SEEDS_MAX]], key_id(key)],
                         use_bin_type=True)
    return TOKEN_PREFIX + _b64(body + _sign(key, body))


def parse(text: Any) -> Token:
    """The fields of a well-formed token (not yet verified); TokenError("malformed") otherwise."""
    if not isinstance(text, str):
        raise TokenError("malformed", "not text")
    text = text.strip()
    if len(text) > TOKEN_CHARS_MAX:
        raise TokenError("malformed", "too long")
    if not text.startswith(TOKEN_PREFIX):
        raise TokenError("malformed", f"a join token starts with {TOKEN_PREFIX}")
    try:
        raw = _unb64(text[len(TOKEN_PREFIX):])
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "not base64url") from None
    if len(raw) <= MAC_BYTES:
        raise TokenError("malformed", "too short")
    return parse_body(raw[:-MAC_BYTES], raw[-MAC_BYTES:])


def parse_body(body: bytes, mac: bytes = b"") -> Token:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, max_str_len=TOKEN_CHARS_MAX,
                              max_bin_len=TOKEN_CHARS_MAX, max_array_len=16, max_map_len=0, max_ext_len=0)
    except Exception:                   # msgpack raises a zoo of types on bad input
        raise TokenError("malformed", "undecodable") from None
    if type(obj) is not list or len(obj) != 7 or obj[0] != TOKEN_VERSION or type(obj[0]) is not int:
        raise TokenError("malformed", "unknown layout or version")
    _, cluster, nonce, expires_ms, role, raw_seeds, kid = obj
    if type(cluster) is not str or not 0 < len(cluster) <= wire.STR_LEN_MAX \
            or type(nonce) is not bytes or len(nonce) != NONCE_BYTES \
            or type(expires_ms) is not int or not 0 <= expires_ms <= wire.INT_MAX \
            or role not in ROLES or type(kid) is not bytes or len(kid) != 8 \
            or type(raw_seeds) is not list or len(raw_seeds) > SEEDS_MAX:
        raise TokenError("malformed", "a field of the wrong type or size")
    seeds = []
    for s in raw_seeds:
        if type(s) is not list or len(s) != 3 or type(s[0]) is not str or not 0 < len(s[0]) <= HOST_CHARS_MAX \
                or type(s[1]) is not int or not 0 < s[1] < 65536 or type(s[2]) is not str \
                or not s[2].startswith(("http://", "https://")) or len(s[2]) > URL_CHARS_MAX:
            raise TokenError("malformed", "a seed of the wrong shape")
        seeds.append(Seed(s[0], s[1], s[2]))
    return Token(body=body, mac=mac, cluster=cluster, nonce=nonce, expires_ms=expires_ms, role=role,
                 seeds=tuple(seeds), kid=kid)


def _check(token: Token, cluster: str, now_ms: int) -> None:
    if token.cluster != cluster:
        raise TokenError("foreign_cluster")
    if now_ms >= token.expires_ms:
        raise TokenError("expired")


def _mac_for(body_kid: bytes, body: bytes, keys: list[bytes]) -> bytes:
    for key in keys:
        if key_id(key) == body_kid:
            return _sign(key, body)
    raise TokenError("unknown_key")


def verify(token: Token, keys: list[bytes], cluster: str, now_ms: int) -> None:
    """A holder of the keys checks a whole token (the mac is in it); TokenError if bad."""
    want = _mac_for(token.kid, token.body, keys)
    if not hmac.compare_digest(want, token.mac):
        raise TokenError("altered")
    _check(token, cluster, now_ms)


# --- the exchange ---------------------------------------------------------------------------------

def redeem_request(token: Token, private: X25519PrivateKey) -> dict:
    """What the new node sends: the body, its public key, and a proof it holds the token."""
    pub = private.public_key().public_bytes_raw()
    proof = hmac.new(token.mac, _REQ_LABEL + token.body + pub, hashlib.sha256).digest()
    return {"body": _b64(token.body), "pub": _b64(pub), "proof": _b64(proof)}


def check_request(req: Any, keys: list[bytes], cluster: str, now_ms: int) -> tuple[Token, bytes]:
    """A member checks a redeem request; (token with its mac, the new node's public key)."""
    if not isinstance(req, dict) or set(req) != {"body", "pub", "proof"}:
        raise TokenError("malformed", "a request is {body, pub, proof}")
    try:
        body, pub, proof = (_unb64(req[k]) for k in ("body", "pub", "proof"))
    except (binascii.Error, ValueError, TypeError):
        raise TokenError("malformed", "not base64url") from None
    if len(body) > TOKEN_CHARS_MAX or len(pub) != PUB_BYTES or len(proof) != MAC_BYTES:
        raise TokenError("malformed", "a field of the wrong size")
    token = parse_body(body)
    mac = _mac_for(token.kid, body, keys)
    if not hmac.compare_digest(proof, hmac.new(mac, _REQ_LABEL + body + pub, hashlib.sha256).digest()):
        raise TokenError("altered")
    _check(token, cluster, now_ms)
    return Token(body=body, mac=mac, cluster=token.cluster, nonce=token.nonce, expires_ms=token.expires_ms,
                 role=token.role, seeds=token.seeds, kid=token.kid), pub


def _session_key(shared: bytes, token: Token, pub_new: bytes, pub_member: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=token.mac,
                info=_KDF_LABEL + token.body + pub_new + pub_member).derive(shared)


def seal(token: Token, pub_new: bytes, private: X25519PrivateKey, keys_text: list[str]) -> dict:
    """The member's answer: the keyring encrypted to the new node (see the docstring)."""
    pub_member = private.public_key().public_bytes_raw()
    k = _session_key(private.exchange(X25519PublicKey.from_public_bytes(pub_new)), token, pub_new, pub_member)
    payload = json.dumps({"keys": keys_text, "cluster": token.cluster, "role": token.role}).encode()
    return {"pub": _b64(pub_member), "sealed": _b64(AESGCM(k).encrypt(b"\0" * 12, payload, token.body))}


def open_sealed(token: Token, private: X25519PrivateKey, answer: Any) -> dict:
    """The new node opens the answer: {"keys", "cluster", "role"}; ValueError if it is not genuine."""
    try:
        pub_member, sealed = _unb64(answer["pub"]), _unb64(answer["sealed"])
        if len(pub_member) != PUB_BYTES or len(sealed) > SEALED_BYTES_MAX:
            raise ValueError("size")
        pub_new = private.public_key().public_bytes_raw()
        k = _session_key(private.exchange(X25519PublicKey.from_public_bytes(pub_member)), token, pub_new,
                         pub_member)
        payload = json.loads(AESGCM(k).decrypt(b"\0" * 12, sealed, token.body))
        keys = payload["keys"]
        if not isinstance(keys, list) or not keys or not all(isinstance(x, str) for x in keys):
            raise ValueError("keys")
        for x in keys:
            wire.parse_key(x)
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag):
        raise ValueError("the member's answer is not genuine: it does not know this token's key") from None
    return {"keys": keys, "cluster": payload.get("cluster"), "role": payload.get("role")}


# --- the replicated fact: spent nonces ------------------------------------------------------------

class JoinNonces:
    """The state machine behind ``JoinUse`` (see the module docstring)."""

    commands = (JoinUse,)

    def __init__(self) -> None:
        self.spent: dict[str, int] = {}    # nonce hex -> the token's expires_ms

    def apply(self, index: int, term: int, cmd: JoinUse) -> dict:
        if cmd.nonce in self.spent:
            return rejected("used", MESSAGES["used"], None)
        if cmd.now_ms >= cmd.expires_ms:
            return rejected("expired", MESSAGES["expired"], None)
        horizon_ms = cmd.now_ms - PRUNE_GRACE_MS
        for nonce in [n for n, exp in self.spent.items() if exp < horizon_ms]:
            del self.spent[nonce]
        if len(self.spent) >= SPENT_MAX:
            return rejected("busy", MESSAGES["busy"], None)
        self.spent[cmd.nonce] = cmd.expires_ms
        self._check()
        return ok(spent=len(self.spent))

    def snapshot(self) -> dict:
        return {"spent": len(self.spent)}

    def _check(self) -> None:
        assert len(self.spent) <= SPENT_MAX, len(self.spent)


def cap_role(node_role: str, token_role: str) -> str:
    """The role a node joining with a token runs: a worker token makes it a worker."""
    return "worker" if token_role == "worker" else node_role
