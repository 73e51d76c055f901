"""The wire codec: the only place where messages become bytes and bytes become messages.

Theory of operation
-------------------
Everything a node receives from the network passes through ``Codec.decode`` before any
other code sees it, so this module is the trust boundary.  A frame is::

    offset  size  field
    0       2     magic  b"GX"
    2       1     version (1)
    3       8     key id = the first 8 bytes of the key's fingerprint (public, not the key)
    11      12    nonce, fresh from os.urandom for every frame
    23      n+16  AES-256-GCM(subkey, nonce, plaintext, aad=bytes 0..22) = ciphertext || tag

``subkey = derive_secret(key, "wire")`` (HKDF-SHA256), so the cluster key itself never
keys a cipher and other users of the key (the Raft transport) get independent secrets.
The plaintext is msgpack of ``[TAG, sender, cluster, sent_ms, body]``; ``body`` is a map
from field name to value for the message dataclass, nested dataclasses again as maps.

``decode`` checks, cheapest first, and stops at the first failure, raising
``DecodeError(reason)``:

    too_large        the frame is longer than frame_max_bytes
    malformed        too short, bad magic, undecodable msgpack, wrong envelope shape
    version          a version byte this build does not speak
    unknown_key      the key id names no installed key
    unauthenticated  the AEAD tag does not verify (tampered, truncated, wrong key)
    foreign_cluster  authentic, but sent for another cluster name that shares the key
    stale            sent_ms is more than replay_window_ms away from our wall clock
    replayed         this nonce was already accepted, or is too old to prove it was not
    unknown_type     a TAG this build does not know (sent by a newer peer)
    invalid          a body field of the wrong type, range or size, unknown or missing

Invariants:

* Nothing that is not authenticated by an installed key reaches msgpack; nothing that is
  not fully validated against the dataclass annotations reaches the caller.  ``decode``
  raises nothing but ``DecodeError`` for any input bytes (the tests fuzz this), and
  never uses pickle or any msgpack extension type.
* A frame is accepted at most once per Codec.  Accepted nonces are remembered in a
  bounded cache until their sent_ms leaves the window.  When an entry must be dropped
  (pruned, or evicted because the cache is full) the *floor* rises to its sent_ms and
  every later frame sent at or before the floor is refused as ``replayed``: under overload
  we drop rather than accept a frame we can no longer prove fresh.  The floor also stops
  replays after our wall clock steps back.  The cache starts empty in a new process;
  pass ``replay_floor_ms=clock.wall_ms()`` to refuse frames sent before it started.
* Every field is bounded: str <= 1024 chars, tuple <= 1024 items, dict <= 256 items,
  int within int64, float finite, bytes within the frame.  ``encode`` applies the same
  checks, so a node never sends what its peers would drop as ``invalid``.
* Type tags come from ``messages.MESSAGE_TYPES`` when a Codec is built; a message class
  appended there works with no change here, if its fields are str, int, float, bool,
  bytes, ``tuple[X, ...]``, ``dict[str, X]``, ``X | None`` or dataclasses of the same.
  Appending a field with a default keeps old senders working (their frames decode with
  the default); old receivers drop the new sender's frames as ``invalid``, so when old
  nodes must understand, add a new message type instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import heapq
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from galaxy import messages

# --- frame layout (see the module docstring) -------------------------------------------
MAGIC = b"GX"
VERSION = 1
KEY_ID_BYTES = 8
NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + NONCE_BYTES            # 23
FRAME_MIN_BYTES = HEADER_BYTES + AEAD_TAG_BYTES + 1                    # a 1-byte plaintext

# --- keys --------------------------------------------------------------------------------
KEY_BYTES = 32
KEY_PREFIX = "gk1-"
_KEY_B64_CHARS = 43                    # 32 bytes of urlsafe base64 without padding
_KEY_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

# --- field bounds ------------------------------------------------------------------------
STR_LEN_MAX = 1024                     # characters
TUPLE_LEN_MAX = 1024
DICT_LEN_MAX = 256
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

REASONS = (
    "too_large", "malformed", "version", "unknown_key", "unauthenticated",
    "foreign_cluster", "stale", "replayed", "unknown_type", "invalid",
)


class DecodeError(Exception):
    """A frame was dropped.  ``reason`` is one of REASONS; ``detail`` is for logs only."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class EncodeError(ValueError):
    """A local bug: the message cannot be sent (reason: too_large, invalid, unknown_type)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str                        # as claimed by a holder of the cluster key
    sent_ms: int                       # sender's wall clock
    msg: Any


# --- keys --------------------------------------------------------------------------------

def generate_key() -> str:
    """A new cluster key as text: ``gk1-`` + 32 random bytes in urlsafe base64."""
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip("=")


def parse_key(text: str) -> bytes:
    """Parse a key made by ``generate_key``; ValueError says what is wrong (never echoes it)."""
    if not isinstance(text, str):
        raise ValueError("cluster key must be text")
    text = text.strip()
    if not text:
        raise ValueError("cluster key is empty; make one with `galaxy keygen`")
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"cluster key must start with {KEY_PREFIX!r}; make one with `galaxy keygen`")
    body = text[len(KEY_PREFIX):]
    if not set(body) <= _KEY_ALPHABET:
        raise ValueError("cluster key has characters outside base64url (A-Z a-z 0-9 - _)")
    if len(body) != _KEY_B64_CHARS:
        raise ValueError(
            f"cluster key has {len(body)} characters after {KEY_PREFIX!r}, expected "
            f"{_KEY_B64_CHARS} ({KEY_BYTES} bytes); was it cut off when copied?")
    try:
        key = base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"cluster key is not valid base64url ({exc})") from None
    if len(key) != KEY_BYTES:          # unreachable with 43 valid chars; kept as the real rule
        raise ValueError(f"cluster key decodes to {len(key)} bytes, expected {KEY_BYTES}")
    return key


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a cluster key is {KEY_BYTES} bytes (use parse_key)")


def key_fingerprint(key: bytes) -> str:
    """16 hex chars naming a key in logs, the store and the UI; a one-way hash of it."""
    _check_key(key)
    return hashlib.sha256(b"galaxy-fp" + key).hexdigest()[:16]


def derive_secret(key: bytes, purpose: str) -> bytes:
    """A 32-byte secret for one purpose ("wire", "raft", ...), independent of the others."""
    _check_key(key)
    if not isinstance(purpose, str) or not purpose:
        raise ValueError("purpose must be a non-empty string")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"galaxy-hkdf-v1",
                info=b"galaxy:" + purpose.encode())
    return hkdf.derive(key)


# --- the dataclass codec -----------------------------------------------------------------
# Each annotation compiles once into an (encode, decode) pair of closures; per frame the
# work is one closure call per value.  Failures raise _Bad and gather their path while
# unwinding, so the success path never formats strings.

class _Bad(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []

    def render(self) -> str:
        return "".join(reversed(self.path)).lstrip(".") + ": " + self.what


_Fn = Callable[[Any], Any]


@dataclass(slots=True)
class _Spec:
    cls: type
    names: tuple[str, ...]
    required: frozenset[str]
    enc_fields: dict[str, _Fn]
    dec_fields: dict[str, _Fn]

    def encode(self, obj: Any) -> dict[str, Any]:
        if type(obj) is not self.cls:
            raise _Bad(f"expected {self.cls.__name__}, got {type(obj).__name__}")
        out = {}
        for name, enc in self.enc_fields.items():
            try:
                out[name] = enc(getattr(obj, name))
            except _Bad as bad:
                bad.path.append("." + name)
                raise
        return out

    def decode(self, raw: Any) -> Any:
        if type(raw) is not dict:
            raise _Bad(f"expected a map for {self.cls.__name__}")
        dec_fields = self.dec_fields
        kwargs = {}
        for name, value in raw.items():
            dec = dec_fields.get(name)
            if dec is None:
                raise _Bad(f"unknown field of {self.cls.__name__}")
            try:
                kwargs[name] = dec(value)
            except _Bad as bad:
                bad.path.append("." + name)
                raise
        if len(kwargs) != len(self.names) and not self.required <= kwargs.keys():
            missing = sorted(self.required - kwargs.keys())
            raise _Bad(f"{self.cls.__name__} misses {', '.join(missing)}")
        try:
            return self.cls(**kwargs)
        except Exception as exc:       # a __post_init__ check of a message class
            raise _Bad(f"{self.cls.__name__} rejected its fields ({type(exc).__name__})") from None


_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is not None:
        return spec
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    spec = _Spec(
        cls=cls,
        names=tuple(f.name for f in fields),
        required=frozenset(f.name for f in fields if f.default is dataclasses.MISSING
                           and f.default_factory is dataclasses.MISSING),
        enc_fields={}, dec_fields={},
    )
    _SPECS[cls] = spec                 # before compiling fields, so a class may nest itself
    try:
        for f in fields:
            spec.enc_fields[f.name], spec.dec_fields[f.name] = _compile(hints[f.name], cls)
    except Exception:
        del _SPECS[cls]
        raise
    return spec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and INT_MIN <= v <= INT_MAX


def _compile(tp: Any, owner: type) -> tuple[_Fn, _Fn]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is str:
        def enc(v: Any) -> Any:
            if not isinstance(v, str) or len(v) > STR_LEN_MAX:
                raise _Bad(f"expected str of at most {STR_LEN_MAX} chars")
            return v

        def dec(v: Any) -> Any:
            if type(v) is not str or len(v) > STR_LEN_MAX:
                raise _Bad(f"expected str of at most {STR_LEN_MAX} chars")
            return v
        return enc, dec

    if tp is bool:
        def enc(v: Any) -> Any:
            if type(v) is not bool:
                raise _Bad("expected bool")
            return v
        return enc, enc

    if tp is int:
        def enc(v: Any) -> Any:
            if not _is_int(v):
                raise _Bad("expected int64")
            return v

        def dec(v: Any) -> Any:
            if type(v) is not int or not INT_MIN <= v <= INT_MAX:
                raise _Bad("expected int64")
            return v
        return enc, dec

    if tp is float:
        def enc(v: Any) -> Any:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Bad("expected float")
            try:
                f = float(v)
            except OverflowError:
                raise _Bad("expected finite float") from None
            if not math.isfinite(f):
                raise _Bad("expected finite float")
            return f

        def dec(v: Any) -> Any:
            t = type(v)
            if t is float:
                if not math.isfinite(v):
                    raise _Bad("expected finite float")
                return v
            if t is int and INT_MIN <= v <= INT_MAX:
                return float(v)
            raise _Bad("expected float")
        return enc, dec

    if tp is bytes:
        # Length is bounded by the frame: encode checks the frame, unpackb's max_bin_len.
        def enc(v: Any) -> Any:
            if not isinstance(v, bytes):
                raise _Bad("expected bytes")
            return v

        def dec(v: Any) -> Any:
            if type(v) is not bytes:
                raise _Bad("expected bytes")
            return v
        return enc, dec

    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_enc, item_dec = _compile(args[0], owner)

        def enc(v: Any) -> Any:
            if type(v) is not tuple or len(v) > TUPLE_LEN_MAX:
                raise _Bad(f"expected tuple of at most {TUPLE_LEN_MAX} items")
            out = []
            for i, x in enumerate(v):
                try:
                    out.append(item_enc(x))
                except _Bad as bad:
                    bad.path.append(f"[{i}]")
                    raise
            return out

        def dec(v: Any) -> Any:
            if type(v) is not list or len(v) > TUPLE_LEN_MAX:
                raise _Bad(f"expected array of at most {TUPLE_LEN_MAX} items")
            out = []
            for i, x in enumerate(v):
                try:
                    out.append(item_dec(x))
                except _Bad as bad:
                    bad.path.append(f"[{i}]")
                    raise
            return tuple(out)
        return enc, dec

    if origin is dict and len(args) == 2 and args[0] is str:
        key_enc, key_dec = _compile(str, owner)
        val_enc, val_dec = _compile(args[1], owner)

        def make(key_fn: _Fn, val_fn: _Fn, exact: bool) -> _Fn:
            def fn(v: Any) -> Any:
                if (type(v) is not dict if exact else not isinstance(v, dict)) \
                        or len(v) > DICT_LEN_MAX:
                    raise _Bad(f"expected map of at most {DICT_LEN_MAX} items")
                out = {}
                for k, x in v.items():
                    try:
                        out[key_fn(k)] = val_fn(x)
                    except _Bad as bad:
                        bad.path.append("[key]" if not isinstance(k, str) or len(k) > 64
                                        else f"[{k!r}]")
                        raise
                return out
            return fn
        return make(key_enc, val_enc, False), make(key_dec, val_dec, True)

    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        inner_enc, inner_dec = _compile(inner, owner)

        def enc(v: Any) -> Any:
            return None if v is None else inner_enc(v)

        def dec(v: Any) -> Any:
            return None if v is None else inner_dec(v)
        return enc, dec

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        nested = _spec(tp)
        return nested.encode, nested.decode

    raise TypeError(f"{owner.__name__}: wire cannot carry a field of type {tp!r}")


# --- the codec -----------------------------------------------------------------------------

class Codec:
    """Encrypts, authenticates and validates frames for one cluster and one local sender."""

    def __init__(
        self,
        cluster: str,
        keys: Sequence[bytes],
        sender: str,
        frame_max_bytes: int = 65_000,
        replay_window_ms: int = 30_000,
        replay_cache_max: int = 100_000,
        *,
        replay_floor_ms: int | None = None,
    ) -> None:
        if not isinstance(cluster, str) or not 0 < len(cluster) <= STR_LEN_MAX:
            raise ValueError(f"cluster must be a non-empty string of at most {STR_LEN_MAX} chars")
        if not isinstance(sender, str) or len(sender) > STR_LEN_MAX:
            raise ValueError(f"sender must be a string of at most {STR_LEN_MAX} chars")
        if isinstance(keys, (bytes, str)) or not keys:
            raise ValueError("keys must be a non-empty sequence of keys, the primary first")
        if not FRAME_MIN_BYTES <= frame_max_bytes:
            raise ValueError(f"frame_max_bytes must be at least {FRAME_MIN_BYTES}")
        if replay_window_ms < 0 or replay_cache_max < 1:
            raise ValueError("replay_window_ms must be >= 0 and replay_cache_max >= 1")
        self.cluster = cluster
        self.sender = sender
        self.frame_max_bytes = frame_max_bytes
        self.replay_window_ms = replay_window_ms
        self.replay_cache_max = replay_cache_max

        self.set_keys(keys)

        # Read the tuple now, not at import: types appended later need no change here.
        self._by_tag: dict[int, _Spec] = {}
        self._tag_of: dict[type, int] = {}
        for cls in messages.MESSAGE_TYPES:
            tag = getattr(cls, "TAG", None)
            if not _is_int(tag) or tag < 0:
                raise TypeError(f"{cls.__name__}.TAG must be a non-negative int")
            if tag in self._by_tag:
                raise TypeError(f"{cls.__name__} reuses TAG {tag} of {self._by_tag[tag].cls.__name__}")
            self._by_tag[tag] = _spec(cls)
            self._tag_of[cls] = tag
        fields_max = max((len(s.names) for s in _SPECS.values()), default=0)
        self._unpack_limits = dict(
            max_str_len=frame_max_bytes, max_bin_len=frame_max_bytes,
            max_array_len=max(TUPLE_LEN_MAX, 5), max_map_len=max(DICT_LEN_MAX, fields_max),
            max_ext_len=0,
        )

        # Replay cache: nonces accepted with sent_ms > _floor_ms (see the docstring).
        self._seen: set[bytes] = set()
        self._seen_heap: list[tuple[int, bytes]] = []
        self._floor_ms = INT_MIN - 1 if replay_floor_ms is None else replay_floor_ms

        self.stats: dict[str, int] = {"ok": 0, **{r: 0 for r in REASONS}}

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """Install a key ring, the primary (sending) key first; any of them is accepted.

        Keyring rotation (galaxy/keyring.py) calls this on a live codec: the new tables are
        built aside and swapped in, so a frame is checked against the old ring or the new."""
        if isinstance(keys, (bytes, str)) or not keys:
            raise ValueError("keys must be a non-empty sequence of keys, the primary first")
        ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            _check_key(key)
            kid = bytes.fromhex(key_fingerprint(key))[:KEY_ID_BYTES]
            if kid in ciphers:
                continue               # the same key twice; harmless
            ciphers[kid] = AESGCM(derive_secret(key, "wire"))
        send_kid = bytes.fromhex(key_fingerprint(keys[0]))[:KEY_ID_BYTES]
        self._ciphers, self._send_kid, self._send_cipher = ciphers, send_kid, ciphers[send_kid]
        self.key_fingerprints = tuple(key_fingerprint(k) for k in keys)

    @property
    def drops_total(self) -> int:
        return sum(n for reason, n in self.stats.items() if reason != "ok")

    # --- encode -------------------------------------------------------------------------

    def encode(self, msg: Any, wall_ms: int) -> bytes:
        tag = self._tag_of.get(type(msg))
        if tag is None:
            raise EncodeError("unknown_type", f"{type(msg).__name__} is not in messages.MESSAGE_TYPES")
        if not _is_int(wall_ms):
            raise EncodeError("invalid", "wall_ms must be an int64")
        try:
            body = self._by_tag[tag].encode(msg)
        except _Bad as bad:
            raise EncodeError("invalid", f"{type(msg).__name__}{bad.render()}") from None
        try:
            plaintext = msgpack.packb([tag, self.sender, self.cluster, wall_ms, body],
                                      use_bin_type=True)
        except UnicodeEncodeError:     # a lone surrogate, e.g. from os.fsdecode
            raise EncodeError("invalid", f"{type(msg).__name__} has a str that is not UTF-8") from None
        nonce = os.urandom(NONCE_BYTES)
        header = MAGIC + bytes((VERSION,)) + self._send_kid + nonce
        frame = header + self._send_cipher.encrypt(nonce, plaintext, header)
        if len(frame) > self.frame_max_bytes:
            raise EncodeError("too_large", f"{type(msg).__name__} frame is {len(frame)} bytes, "
                                           f"frame_max_bytes is {self.frame_max_bytes}")
        return frame

    # --- decode -------------------------------------------------------------------------

    def decode(self, data: bytes, wall_ms: int) -> Envelope:
        try:
            env = self._decode(data, wall_ms)
        except DecodeError as err:
            self.stats[err.reason] += 1
            raise
        self.stats["ok"] += 1
        return env

    def _decode(self, data: bytes, wall_ms: int) -> Envelope:
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"decode takes bytes, not {type(data).__name__}")
            data = bytes(data)
        n = len(data)
        if n > self.frame_max_bytes:
            raise DecodeError("too_large", f"{n} bytes")
        if n < 3 or data[:2] != MAGIC:
            raise DecodeError("malformed", "no frame header")
        if data[2] != VERSION:
            raise DecodeError("version", f"version {data[2]}")
        if n < FRAME_MIN_BYTES:
            raise DecodeError("malformed", f"frame of {n} bytes is too short")
        kid = data[3:3 + KEY_ID_BYTES]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecodeError("unknown_key", f"key id {kid.hex()}")
        header = data[:HEADER_BYTES]
        nonce = data[HEADER_BYTES - NONCE_BYTES:HEADER_BYTES]
        try:
            plaintext = cipher.decrypt(nonce, data[HEADER_BYTES:], header)
        except InvalidTag:
            raise DecodeError("unauthenticated") from None

        # From here on the bytes come from a key holder; still check everything, so a
        # buggy or newer peer cannot crash us.
        try:
            obj = msgpack.unpackb(plaintext, raw=False, strict_map_key=True, use_list=True,
                                  **self._unpack_limits)
        except Exception as exc:       # msgpack raises a zoo of types on bad input
            raise DecodeError("malformed", f"msgpack: {type(exc).__name__}") from None
        if type(obj) is not list or len(obj) != 5:
            raise DecodeError("malformed", "envelope is not a 5-item array")
        tag, sender, cluster, sent_ms, body = obj
        if type(tag) is not int or type(sender) is not str or len(sender) > STR_LEN_MAX \
                or type(cluster) is not str or type(sent_ms) is not int \
                or not INT_MIN <= sent_ms <= INT_MAX:
            raise DecodeError("malformed", "envelope field of the wrong type")
        if cluster != self.cluster:
            raise DecodeError("foreign_cluster", "cluster name differs")
        if abs(wall_ms - sent_ms) > self.replay_window_ms:
            raise DecodeError("stale", f"sent {sent_ms - wall_ms:+d} ms from now")
        if sent_ms <= self._floor_ms or nonce in self._seen:
            raise DecodeError("replayed")
        spec = self._by_tag.get(tag)
        if spec is None:
            raise DecodeError("unknown_type", f"tag {tag}")
        try:
            msg = spec.decode(body)
        except _Bad as bad:
            raise DecodeError("invalid", spec.cls.__name__ + bad.render()) from None
        except RecursionError:
            raise DecodeError("invalid", "nested too deeply") from None
        self._remember(nonce, sent_ms, wall_ms)
        return Envelope(sender=sender, sent_ms=sent_ms, msg=msg)

    def _remember(self, nonce: bytes, sent_ms: int, wall_ms: int) -> None:
        heap = self._seen_heap
        oldest_ok_ms = wall_ms - self.replay_window_ms
        while heap and (heap[0][0] < oldest_ok_ms or len(heap) >= self.replay_cache_max):
            old_ms, old_nonce = heapq.heappop(heap)
            self._seen.discard(old_nonce)
            if old_ms > self._floor_ms:
                self._floor_ms = old_ms
        heapq.heappush(heap, (sent_ms, nonce))
        self._seen.add(nonce)


# --- replicated commands ---------------------------------------------------------------------
# A Raft log entry is ``b"GC" || version || msgpack([TAG, body])``: the same annotation-driven
# validation as frames, without the AES envelope (pysyncobj's transport is Fernet-encrypted
# and the journal is local), but versioned, so that a later build can still read the log an
# older one wrote.  Every voter decodes every entry, also on replay after a restart, so
# ``decode_command`` must be deterministic and raise nothing but DecodeError.

COMMAND_MAGIC = b"GC"
COMMAND_VERSION = 1
COMMAND_BYTES_MAX = 64 * 1024          # an entry rides in one AppendEntries; big ones are mistakes

_command_tags: tuple[dict[int, _Spec], dict[type, int]] | None = None


def _command_table() -> tuple[dict[int, _Spec], dict[type, int]]:
    global _command_tags
    if _command_tags is None:
        frame_tags = {getattr(cls, "TAG", None) for cls in messages.MESSAGE_TYPES}
        by_tag: dict[int, _Spec] = {}
        tag_of: dict[type, int] = {}
        for cls in messages.COMMAND_TYPES:
            tag = getattr(cls, "TAG", None)
            if not _is_int(tag) or tag < 0:
                raise TypeError(f"{cls.__name__}.TAG must be a non-negative int")
            if tag in by_tag or tag in frame_tags:
                raise TypeError(f"{cls.__name__} reuses TAG {tag}")
            by_tag[tag] = _spec(cls)
            tag_of[cls] = tag
        _command_tags = (by_tag, tag_of)
    return _command_tags


def encode_command(cmd: Any) -> bytes:
    """A command of ``messages.COMMAND_TYPES`` as log-entry bytes; EncodeError if invalid."""
    by_tag, tag_of = _command_table()
    tag = tag_of.get(type(cmd))
    if tag is None:
        raise EncodeError("unknown_type", f"{type(cmd).__name__} is not in messages.COMMAND_TYPES")
    try:
        body = by_tag[tag].encode(cmd)
    except _Bad as bad:
        raise EncodeError("invalid", f"{type(cmd).__name__}{bad.render()}") from None
    try:
        data = COMMAND_MAGIC + bytes((COMMAND_VERSION,)) + msgpack.packb([tag, body], use_bin_type=True)
    except UnicodeEncodeError:
        raise EncodeError("invalid", f"{type(cmd).__name__} has a str that is not UTF-8") from None
    if len(data) > COMMAND_BYTES_MAX:
        raise EncodeError("too_large", f"{type(cmd).__name__} is {len(data)} bytes, "
                                       f"at most {COMMAND_BYTES_MAX}")
    return data


def decode_command(data: bytes) -> Any:
    """Log-entry bytes -> the command; DecodeError(too_large|malformed|version|unknown_type|invalid)."""
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise DecodeError("malformed", f"a command is bytes, not {type(data).__name__}")
        data = bytes(data)
    if len(data) > COMMAND_BYTES_MAX:
        raise DecodeError("too_large", f"{len(data)} bytes")
    if len(data) < 4 or data[:2] != COMMAND_MAGIC:
        raise DecodeError("malformed", "no command header")
    if data[2] != COMMAND_VERSION:
        raise DecodeError("version", f"command version {data[2]}")
    by_tag, _ = _command_table()
    fields_max = max((len(s.names) for s in by_tag.values()), default=0)
    try:
        obj = msgpack.unpackb(data[3:], raw=False, strict_map_key=True, use_list=True,
                              max_str_len=COMMAND_BYTES_MAX, max_bin_len=COMMAND_BYTES_MAX,
                              max_array_len=TUPLE_LEN_MAX, max_map_len=max(DICT_LEN_MAX, fields_max),
                              max_ext_len=0)
    except Exception as exc:           # msgpack raises a zoo of types on bad input
        raise DecodeError("malformed", f"msgpack: {type(exc).__name__}") from None
    if type(obj) is not list or len(obj) != 2 or type(obj[0]) is not int:
        raise DecodeError("malformed", "command is not a [tag, body] array")
    spec = by_tag.get(obj[0])
    if spec is None:
        raise DecodeError("unknown_type", f"command tag {obj[0]}")
    try:
        return spec.decode(obj[1])
    except _Bad as bad:
        raise DecodeError("invalid", spec.cls.__name__ + bad.render()) from None
    except RecursionError:
        raise DecodeError("invalid", "nested too deeply") from None
