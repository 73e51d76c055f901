"""galaxy.wire: keys, frame integrity, replay defence, field validation, fuzzing.

Some tests build frames by hand from the layout in wire's docstring (header as AAD,
AES-GCM under derive_secret(key, "wire")), which pins that layout down and lets us feed the
parser authenticated plaintexts that a correct encoder would never produce.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy import messages, wire
from galaxy.messages import Beacon, Gossip, MemberRecord, RaftView, Resources

T0 = 1_700_000_000_000
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def codec(cluster: str = "galaxy", keys: typing.Sequence[bytes] = (KEY,), sender: str = "n-a",
          **kw: Any) -> wire.Codec:
    return wire.Codec(cluster, list(keys), sender, **kw)


def member(i: int = 1, **kw: Any) -> MemberRecord:
    base = dict(
        id=f"n-{i:04x}", incarnation=3, heartbeat=100 + i, state="alive", host=f"10.77.0.{i % 250}",
        gossip_port=7946, http_port=8000, raft_port=7947, role="auto", version="0.1.0",
        cluster="galaxy", started_ms=T0 - 5_000,
        resources=Resources(cpu=4.0, memory_mb=8192, gpu=1, free_cpu=2.5, free_memory_mb=4096),
        labels={"zone": "a", "disk": "ssd"},
        raft=RaftView(term=7, leader="n-0001", voters=("n-0001", "n-0002"), raft_state="follower"),
    )
    base.update(kw)
    return MemberRecord(**base)


def reason(c: wire.Codec, data: bytes, wall_ms: int = T0) -> str:
    with pytest.raises(wire.DecodeError) as info:
        c.decode(data, wall_ms)
    assert info.value.reason in wire.REASONS
    return info.value.reason


def seal(plaintext: bytes, key: bytes = KEY, version: int = wire.VERSION,
         nonce: bytes | None = None) -> bytes:
    """A frame with any plaintext, authenticated exactly as the docstring says."""
    nonce = os.urandom(12) if nonce is None else nonce
    kid = bytes.fromhex(wire.key_fingerprint(key))
    header = b"GX" + bytes((version,)) + kid + nonce
    return header + AESGCM(wire.derive_secret(key, "wire")).encrypt(nonce, plaintext, header)


def sealed(obj: Any, **kw: Any) -> bytes:
    return seal(msgpack.packb(obj, use_bin_type=True), **kw)


def beacon_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"cluster": "galaxy", "node_id": "n-b", "host": "10.77.0.2",
                            "gossip_port": 7946}
    body.update(kw)
    return body


# --- keys --------------------------------------------------------------------------------

def test_generated_keys_parse_and_differ() -> None:
    a, b = wire.generate_key(), wire.generate_key()
    assert a.startswith("gk1-") and len(a) == 4 + 43 and a != b
    assert len(wire.parse_key(a)) == 32
    assert wire.parse_key(f"  {a}\n") == wire.parse_key(a)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("   \n", "empty"),
    ("gk2-" + "A" * 43, "must start with 'gk1-'"),
    ("A" * 47, "must start with"),
    ("gk1-" + "A" * 42 + "!", "base64url"),
    ("gk1-" + "A" * 40 + "+/=", "base64url"),
    ("gk1-" + "A" * 42, "42 characters"),
    ("gk1-" + "A" * 44, "44 characters"),
    ("gk1-", "0 characters"),
])
def test_parse_key_errors_say_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        wire.parse_key(text)


def test_parse_key_rejects_non_text() -> None:
    with pytest.raises(ValueError):
        wire.parse_key(b"gk1-" + b"A" * 43)  # type: ignore[arg-type]


def test_parse_key_error_never_echoes_the_key() -> None:
    text = wire.generate_key()[:-1] + "*"
    with pytest.raises(ValueError) as info:
        wire.parse_key(text)
    assert text[4:20] not in str(info.value)


def test_fingerprint_is_short_stable_and_not_the_key() -> None:
    fp = wire.key_fingerprint(KEY)
    assert fp == wire.key_fingerprint(KEY) and len(fp) == 16
    int(fp, 16)
    assert fp != wire.key_fingerprint(OTHER_KEY)
    assert fp not in KEY.hex()


def test_derive_secret_separates_purposes() -> None:
    raft, wire_secret = wire.derive_secret(KEY, "raft"), wire.derive_secret(KEY, "wire")
    assert len(raft) == 32 and raft != wire_secret and raft != KEY
    assert raft == wire.derive_secret(KEY, "raft")
    assert raft != wire.derive_secret(OTHER_KEY, "raft")
    with pytest.raises(ValueError):
        wire.derive_secret(KEY, "")
    with pytest.raises(ValueError):
        wire.derive_secret(b"short", "raft")


# --- round trips -----------------------------------------------------------------------------

def test_beacon_round_trips() -> None:
    msg = Beacon(cluster="galaxy", node_id="n-1", host="10.77.0.1", gossip_port=7946)
    env = codec(sender="n-1").decode(codec(sender="n-1").encode(msg, T0), T0 + 5)
    assert env == wire.Envelope(sender="n-1", sent_ms=T0, msg=msg)


def test_gossip_with_nested_members_round_trips() -> None:
    msg = Gossip(members=tuple(member(i) for i in range(20)), want_reply=True)
    env = codec().decode(codec().encode(msg, T0), T0)
    assert env.msg == msg
    assert type(env.msg.members) is tuple and type(env.msg.members[0].raft.voters) is tuple
    assert type(env.msg.members[0].resources.cpu) is float


def test_gossip_defaults_and_empty() -> None:
    msg = Gossip(members=(MemberRecord(
        id="n", incarnation=0, heartbeat=0, state="alive", host="h", gossip_port=0,
        http_port=0, raft_port=0, role="worker", version="", cluster="galaxy",
        started_ms=0),))
    assert codec().decode(codec().encode(msg, T0), T0).msg == msg
    assert codec().decode(codec().encode(Gossip(members=()), T0), T0).msg == Gossip(members=())


def test_every_frame_is_fresh() -> None:
    c, msg = codec(), Gossip(members=())
    frames = {c.encode(msg, T0) for _ in range(50)}
    assert len(frames) == 50                           # nonce differs every time


# --- integrity ------------------------------------------------------------------------------

def test_flipping_any_bit_anywhere_is_caught() -> None:
    frame = codec().encode(Gossip(members=(member(),)), T0)
    seen = set()
    for i in range(len(frame)):
        for bit in (0x01, 0x80):
            bad = bytearray(frame)
            bad[i] ^= bit
            r = reason(codec(), bytes(bad))
            expected = ("malformed" if i < 2 else "version" if i == 2
                        else "unknown_key" if i < 11 else "unauthenticated")
            assert r == expected, (i, bit)
            seen.add(r)
    assert seen == {"malformed", "version", "unknown_key", "unauthenticated"}


def test_every_truncation_and_extension_is_caught() -> None:
    frame = codec().encode(Beacon(cluster="galaxy", node_id="n", host="h", gossip_port=1), T0)
    for n in range(len(frame)):
        assert reason(codec(), frame[:n]) in {"malformed", "unauthenticated"}
    assert reason(codec(), frame + b"\0") == "unauthenticated"


def test_foreign_key_is_unknown_key() -> None:
    frame = codec(keys=[OTHER_KEY]).encode(Gossip(members=()), T0)
    assert reason(codec(), frame) == "unknown_key"


def test_key_id_of_an_installed_key_with_another_key_is_unauthenticated() -> None:
    frame = bytearray(codec(keys=[OTHER_KEY]).encode(Gossip(members=()), T0))
    frame[3:11] = bytes.fromhex(wire.key_fingerprint(KEY))
    assert reason(codec(), bytes(frame)) == "unauthenticated"


def test_same_key_other_cluster_is_foreign_cluster() -> None:
    frame = codec(cluster="staging").encode(Gossip(members=()), T0)
    assert reason(codec(cluster="galaxy"), frame) == "foreign_cluster"


def test_wrong_version_and_magic() -> None:
    frame = bytearray(codec().encode(Gossip(members=()), T0))
    frame[2] = 2
    assert reason(codec(), bytes(frame)) == "version"
    assert reason(codec(), sealed([2, "n", "galaxy", T0, {"members": []}], version=2)) == "version"
    assert reason(codec(), b"XY" + bytes(frame[2:])) == "malformed"


def test_too_large_both_ways() -> None:
    c = codec(frame_max_bytes=1_000)
    assert reason(c, b"GX\x01" + bytes(1_000)) == "too_large"
    assert reason(c, bytes(999)) == "malformed"
    with pytest.raises(wire.EncodeError) as info:
        c.encode(Gossip(members=tuple(member(i) for i in range(10))), T0)
    assert info.value.reason == "too_large" and isinstance(info.value, ValueError)


def test_key_rotation_accepts_old_sends_new() -> None:
    old, new = KEY, OTHER_KEY
    rotated, legacy = codec(keys=[new, old]), codec(keys=[old])
    msg = Gossip(members=(member(),))
    assert rotated.decode(legacy.encode(msg, T0), T0).msg == msg
    assert rotated.decode(codec(keys=[new]).encode(msg, T0), T0).msg == msg
    assert reason(legacy, rotated.encode(msg, T0)) == "unknown_key"   # sends with the primary
    assert rotated.key_fingerprints == (wire.key_fingerprint(new), wire.key_fingerprint(old))


# --- time and replay ------------------------------------------------------------------------

def test_replay_is_refused() -> None:
    c, frame = codec(), codec().encode(Gossip(members=()), T0)
    c.decode(frame, T0)
    assert reason(c, frame, T0 + 1) == "replayed"


def test_stale_both_directions_window_inclusive() -> None:
    sender = codec()
    for sent, ok in [(T0 - 30_000, True), (T0 + 30_000, True),
                     (T0 - 30_001, False), (T0 + 30_001, False)]:
        frame = sender.encode(Gossip(members=()), sent)
        if ok:
            codec().decode(frame, T0)
        else:
            assert reason(codec(), frame) == "stale"


def test_replay_cache_is_bounded_and_refuses_what_it_forgot() -> None:
    c, sender = codec(replay_cache_max=3), codec()
    frames = [sender.encode(Gossip(members=()), T0 + i) for i in range(6)]
    for f in frames:
        c.decode(f, T0 + 10)
    assert len(c._seen) <= 3 and len(c._seen_heap) <= 3
    for f in frames:                   # evicted or remembered: never accepted twice
        assert reason(c, f, T0 + 10) == "replayed"
    c.decode(sender.encode(Gossip(members=()), T0 + 10), T0 + 10)   # newer frames still pass


def test_old_entries_are_pruned_and_a_clock_step_back_cannot_replay() -> None:
    c, sender = codec(), codec()
    first = sender.encode(Gossip(members=()), T0)
    c.decode(first, T0)
    c.decode(sender.encode(Gossip(members=()), T0 + 60_000), T0 + 60_000)   # prunes `first`
    assert len(c._seen) == 1
    assert reason(c, first, T0 + 1) == "replayed"                        # clock went back


def test_replay_floor_refuses_frames_from_before_start() -> None:
    frame = codec().encode(Gossip(members=()), T0 - 1)
    assert reason(codec(replay_floor_ms=T0), frame, T0) == "replayed"
    codec(replay_floor_ms=T0).decode(codec().encode(Gossip(members=()), T0 + 1), T0)


# --- validation behind the AEAD ------------------------------------------------------------

ENVELOPE_CASES: list[tuple[Any, str]] = [
    ([1, "n", "galaxy", T0], "malformed"),
    ({"tag": 1}, "malformed"),
    ([True, "n", "galaxy", T0, beacon_body()], "malformed"),
    ([1, b"n", "galaxy", T0, beacon_body()], "malformed"),
    ([1, "n" * 1025, "galaxy", T0, beacon_body()], "malformed"),
    ([1, "n", "galaxy", float(T0), beacon_body()], "malformed"),
    ([1, "n", "galaxy", True, beacon_body()], "malformed"),
    ([1, "n", "galaxy", 2**64 - 1, beacon_body()], "malformed"),
    ([1, "n", None, T0, beacon_body()], "malformed"),
    ([1, "n", "prod", T0, beacon_body()], "foreign_cluster"),
    ([99, "n", "galaxy", T0, beacon_body()], "unknown_type"),
    ([1, "n", "galaxy", T0, [1, 2]], "invalid"),
]

BODY_CASES: list[tuple[dict[str, Any], str]] = [
    (beacon_body(gossip_port=True), "bool is not int"),
    (beacon_body(gossip_port=2**63), "beyond int64"),
    (beacon_body(gossip_port=2**64 - 1), "beyond int64 (uint64)"),
    (beacon_body(gossip_port=1.0), "float is not int"),
    (beacon_body(host="h" * 1025), "str too long"),
    (beacon_body(host=b"h"), "bytes is not str"),
    (beacon_body(host=None), "None is not str"),
    (beacon_body(extra=1), "unknown field"),
    ({"cluster": "galaxy", "node_id": "n", "host": "h"}, "missing field"),
]


@pytest.mark.parametrize("envelope, why", ENVELOPE_CASES)
def test_bad_envelopes(envelope: Any, why: str) -> None:
    assert reason(codec(), sealed(envelope)) == why


@pytest.mark.parametrize("body, why", BODY_CASES)
def test_bad_beacon_bodies_are_invalid(body: dict[str, Any], why: str) -> None:
    assert reason(codec(), sealed([1, "n", "galaxy", T0, body])) == "invalid", why


def gossip_frame(member_body: dict[str, Any], **gossip: Any) -> bytes:
    body = {"members": [member_body], **gossip}
    return sealed([2, "n", "galaxy", T0, body])


def member_body(**kw: Any) -> dict[str, Any]:
    body = wire._spec(MemberRecord).encode(member())
    body.update(kw)
    return body


@pytest.mark.parametrize("body, why", [
    (member_body(labels={"k": 1}), "dict value not str"),
    # msgpack's own length limits catch these before the field checks do.
    (member_body(labels={str(i): "v" for i in range(257)}), "dict too big (malformed)"),
    (member_body(labels={"k" * 1025: "v"}), "dict key too long"),
    (member_body(labels=["k", "v"]), "list is not dict"),
    (member_body(raft={"voters": "n-1"}), "str is not tuple"),
    (member_body(raft={"voters": [f"n{i}" for i in range(1025)]}), "tuple too long (malformed)"),
    (member_body(raft={"voters": [1]}), "int in tuple[str]"),
    (member_body(raft={"term": 1, "bogus": 2}), "unknown nested field"),
    (member_body(resources={"cpu": float("nan")}), "NaN"),
    (member_body(resources={"cpu": float("inf")}), "inf"),
    (member_body(resources={"cpu": True}), "bool is not float"),
    (member_body(resources={"cpu": "1"}), "str is not float"),
    (member_body(resources=None), "None is not a dataclass"),
    (member_body(resources=[]), "list is not a dataclass"),
])
def test_bad_nested_fields_are_invalid(body: dict[str, Any], why: str) -> None:
    expected = "malformed" if "(malformed)" in why else "invalid"
    assert reason(codec(), gossip_frame(body)) == expected, why


def test_invalid_detail_names_the_path() -> None:
    with pytest.raises(wire.DecodeError) as info:
        codec().decode(gossip_frame(member_body(raft={"voters": ["a", 1]})), T0)
    assert info.value.detail.startswith("Gossip") and "members[0].raft.voters[1]" in info.value.detail


def test_gossip_want_reply_must_be_bool() -> None:
    assert reason(codec(), gossip_frame(member_body(), want_reply=1)) == "invalid"


def test_missing_fields_with_defaults_take_the_default_and_int_is_a_float() -> None:
    body = member_body()
    for name in ("resources", "labels", "raft"):
        del body[name]
    env = codec().decode(sealed([2, "n", "galaxy", T0, {"members": [
        {**body, "resources": {"cpu": 2}}]}]), T0)
    m = env.msg.members[0]
    assert env.msg.want_reply is False
    assert m.resources == Resources(cpu=2.0) and type(m.resources.cpu) is float
    assert m.labels == {} and m.raft == RaftView()


@pytest.mark.parametrize("plaintext", [
    b"",
    b"\xc1",                                           # never-used msgpack byte
    msgpack.packb([1, "n", "galaxy", T0, beacon_body()]) + b"\x00",   # trailing data
    b"\x95\x01\xa1\xff\xa6galaxy" + msgpack.packb(T0) + msgpack.packb(beacon_body()),  # bad UTF-8
    msgpack.packb(msgpack.ExtType(5, b"xyz")),
    msgpack.packb([1, "n", "galaxy", T0, {1: 2}]),    # int map key
    b"\x91" * 5000 + b"\xc0",                          # nested deeper than msgpack allows
    b"\xdd\xff\xff\xff\xff",                           # array claiming 4G items
])
def test_hostile_plaintexts_are_malformed(plaintext: bytes) -> None:
    assert reason(codec(), seal(plaintext)) in {"malformed", "invalid"}


def test_stats_count_ok_and_each_drop() -> None:
    c, sender = codec(), codec()
    frame = sender.encode(Gossip(members=()), T0)
    c.decode(frame, T0)
    for data in (frame, b"", codec(keys=[OTHER_KEY]).encode(Gossip(members=()), T0)):
        with pytest.raises(wire.DecodeError):
            c.decode(data, T0)
    assert c.stats["ok"] == 1
    assert c.stats["replayed"] == c.stats["malformed"] == c.stats["unknown_key"] == 1
    assert c.drops_total == 3 and set(c.stats) == {"ok", *wire.REASONS}


def test_decode_takes_bytearray_and_memoryview_only() -> None:
    frame = codec().encode(Gossip(members=()), T0)
    codec().decode(bytearray(frame), T0)
    codec().decode(memoryview(frame), T0)
    with pytest.raises(TypeError):
        codec().decode("GX", T0)  # type: ignore[arg-type]


# --- encode-side checks ---------------------------------------------------------------------

@pytest.mark.parametrize("msg", [
    Beacon(cluster="galaxy", node_id="n" * 1025, host="h", gossip_port=1),
    Beacon(cluster="galaxy", node_id="n", host="h", gossip_port=True),
    Beacon(cluster="galaxy", node_id="n", host="h", gossip_port=2**63),
    Gossip(members=[member()]),  # type: ignore[arg-type]
    Gossip(members=(member(labels={"k": 1}),)),
    Gossip(members=(member(resources=Resources(cpu=math.nan)),)),
    Gossip(members=(member(resources=Resources(cpu=10**400)),)),
    Gossip(members=(member(resources=None),)),
])
def test_encode_refuses_what_peers_would_drop(msg: Any) -> None:
    with pytest.raises(wire.EncodeError) as info:
        codec().encode(msg, T0)
    assert info.value.reason == "invalid"


def test_encode_refuses_unregistered_types() -> None:
    with pytest.raises(wire.EncodeError) as info:
        codec().encode(member(), T0)
    assert info.value.reason == "unknown_type"


def test_codec_construction_checks() -> None:
    with pytest.raises(ValueError):
        wire.Codec("galaxy", [], "n")
    with pytest.raises(ValueError):
        wire.Codec("galaxy", KEY, "n")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        wire.Codec("galaxy", [b"short"], "n")
    with pytest.raises(ValueError):
        wire.Codec("", [KEY], "n")
    wire.Codec("galaxy", [KEY, KEY], "n")      # the same key twice is harmless


# --- message types added later -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Inner:
    name: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class _FutureMsg:
    TAG: ClassVar[int] = 250
    blob: bytes
    inners: tuple[_Inner, ...]
    scores: dict[str, int]
    maybe: int | None = None
    opt_inner: typing.Optional[_Inner] = None
    flags: tuple[bool, ...] = field(default_factory=tuple)


def test_a_type_appended_to_message_types_needs_no_wire_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "MESSAGE_TYPES", (*messages.MESSAGE_TYPES, _FutureMsg))
    msg = _FutureMsg(blob=b"\x00\xff" * 100, inners=(_Inner("a"), _Inner("b", 2.5)),
                     scores={"x": -1}, maybe=7, opt_inner=_Inner("c"), flags=(True, False))
    assert codec().decode(codec().encode(msg, T0), T0).msg == msg
    bare = _FutureMsg(blob=b"", inners=(), scores={})
    assert codec().decode(codec().encode(bare, T0), T0).msg == bare
    assert reason(codec(), sealed([250, "n", "galaxy", T0, {
        "blob": "text", "inners": [], "scores": {}}])) == "invalid"
    # An old node without the type drops it by name, not as garbage.
    monkeypatch.undo()
    assert reason(codec(), codec_with_future().encode(msg, T0)) == "unknown_type"


def codec_with_future() -> wire.Codec:
    saved = messages.MESSAGE_TYPES
    messages.MESSAGE_TYPES = (*saved, _FutureMsg)
    try:
        return codec()
    finally:
        messages.MESSAGE_TYPES = saved


def test_duplicate_tags_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True, slots=True)
    class Clash:
        TAG: ClassVar[int] = 1
        x: int
    monkeypatch.setattr(messages, "MESSAGE_TYPES", (*messages.MESSAGE_TYPES, Clash))
    with pytest.raises(TypeError, match="reuses TAG 1"):
        codec()


# --- hypothesis ------------------------------------------------------------------------------

def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values within wire's bounds for any annotation wire supports."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return st.text(max_size=40)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=wire.INT_MIN, max_value=wire.INT_MAX)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is bytes:
        return st.binary(max_size=64)
    if origin is tuple:
        return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
    if origin is dict:
        return st.dictionaries(st.text(max_size=16), strategy_for(args[1]), max_size=4)
    if origin in (typing.Union, types.UnionType):
        return st.none() | strategy_for(next(a for a in args if a is not type(None)))
    hints = typing.get_type_hints(tp)
    return st.builds(tp, **{f.name: strategy_for(hints[f.name])
                            for f in dataclasses.fields(tp) if f.init})


@pytest.mark.parametrize("cls", messages.MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(strategy_for(cls))
    sent_ms = data.draw(st.integers(min_value=T0 - 30_000, max_value=T0 + 30_000))
    sender = data.draw(st.text(max_size=30))
    env = codec(sender=sender).decode(codec(sender=sender).encode(msg, sent_ms), T0)
    assert env == wire.Envelope(sender=sender, sent_ms=sent_ms, msg=msg)


@settings(max_examples=100, deadline=None)
@given(msg=st.builds(Gossip, members=st.lists(strategy_for(MemberRecord), max_size=12).map(tuple),
                     want_reply=st.booleans()))
def test_valid_gossip_round_trips(msg: Gossip) -> None:
    assert codec().decode(codec().encode(msg, T0), T0).msg == msg


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    reason(codec(), data)


@FUZZ
@given(tail=st.binary(max_size=300), version=st.sampled_from([1, 1, 1, 0, 2]))
def test_fuzz_bytes_behind_a_valid_header(tail: bytes, version: int) -> None:
    header = b"GX" + bytes((version,)) + bytes.fromhex(wire.key_fingerprint(KEY))
    assert reason(codec(), header + tail) in {"malformed", "version", "unauthenticated"}


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(
        ["id", "members", "labels", "raft", "voters", "cpu", "host", "want_reply"]), inner,
        max_size=5),
    max_leaves=30,
)


@FUZZ
@given(tag=st.sampled_from([1, 2, 3, -1]), body=msgpack_values,
       members=st.lists(msgpack_values, max_size=3))
def test_fuzz_authenticated_garbage_only_raises_decode_error(
        tag: int, body: Any, members: list[Any]) -> None:
    c = codec()
    for obj in ([tag, "n", "galaxy", T0, body],
                [2, "n", "galaxy", T0, {"members": members}],
                [2, "n", "galaxy", T0, {"members": [{**member_body(), "raft": body}]}],
                body):
        try:
            env = c.decode(sealed(obj), T0)
        except wire.DecodeError as err:
            assert err.reason in wire.REASONS
        else:                          # only well-typed messages get through
            assert type(env.msg) in messages.MESSAGE_TYPES


@FUZZ
@given(raw=st.binary(max_size=400))
def test_fuzz_authenticated_raw_plaintext(raw: bytes) -> None:
    try:
        codec().decode(seal(raw), T0)
    except wire.DecodeError:
        pass


VALID_FRAME = codec().encode(Gossip(members=(member(1), member(2)), want_reply=True), T0)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]),
                                 st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                      min_size=1, max_size=4))
def test_fuzz_mutated_frames_never_decode(edits: list[tuple[str, int, int]]) -> None:
    data = bytearray(VALID_FRAME)
    for op, pos, value in edits:
        pos %= len(data) + 1
        if op == "insert":
            data.insert(pos, value)
        elif pos == len(data):
            continue
        elif op == "delete":
            del data[pos]
        elif op == "flip":
            data[pos] ^= value or 1
        else:
            data[pos] = value
    if bytes(data) == VALID_FRAME:
        return
    assert reason(codec(), bytes(data)) in {
        "malformed", "version", "unknown_key", "unauthenticated", "too_large"}
