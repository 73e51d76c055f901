"""Join tokens and the keyring, pure: token format, the redeem exchange, the Raft machines."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy import join, keyring, wire
from galaxy.consensus.commands import Replicated
from galaxy.messages import Beacon, JoinUse, KeyringChange

K1, K2, K3 = (wire.generate_key() for _ in range(3))
B1, B2 = wire.parse_key(K1), wire.parse_key(K2)
SEEDS = (join.Seed("10.77.0.1", 7946, "http://10.77.0.1:8000"), join.Seed("host-b.lan", 7946, "http://host-b.lan:8000"))
NOW = 1_700_000_000_000


def token(key: bytes = B1, expires_ms: int = NOW + 60_000, role: str = "worker", cluster: str = "galaxy") -> str:
    return join.make(key, cluster, b"n" * 16, expires_ms, role, SEEDS)


# --- the token ------------------------------------------------------------------------------------

def test_round_trip_and_verify():
    t = join.parse(token())
    assert (t.cluster, t.expires_ms, t.role, t.seeds) == ("galaxy", NOW + 60_000, "worker", SEEDS)
    join.verify(t, [B2, B1], "galaxy", NOW)          # any installed key, found by its id


@pytest.mark.parametrize("keys, cluster, now_ms, reason", [
    ([B2], "galaxy", NOW, "unknown_key"),
    ([B1], "other", NOW, "foreign_cluster"),
    ([B1], "galaxy", NOW + 60_000, "expired"),
])
def test_refusals(keys, cluster, now_ms, reason):
    with pytest.raises(join.TokenError) as e:
        join.verify(join.parse(token()), keys, cluster, now_ms)
    assert e.value.reason == reason
    assert K1 not in str(e.value)


def test_any_changed_byte_is_refused():
    raw = join._unb64(token()[len(join.TOKEN_PREFIX):])
    for i in range(len(raw)):
        bad = join.TOKEN_PREFIX + join._b64(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
        with pytest.raises(join.TokenError) as e:
            join.verify(join.parse(bad), [B1], "galaxy", NOW)
        assert e.value.reason in ("malformed", "altered", "unknown_key", "foreign_cluster", "expired"), i


def test_token_does_not_contain_the_key():
    raw = join._unb64(token()[len(join.TOKEN_PREFIX):])
    assert B1 not in raw and wire.derive_secret(B1, "join") not in raw


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: join.TOKEN_PREFIX + join._b64(b)),
                 st.binary(max_size=200).map(lambda b: join.TOKEN_PREFIX + b.decode("latin-1"))))
def test_parser_fuzz_raises_only_token_error(text):
    try:
        join.parse(text)
    except join.TokenError as e:
        assert e.reason == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_parser_fuzz_mutated_tokens(data):
    raw = bytearray(join._unb64(token()[len(join.TOKEN_PREFIX):]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        join.verify(join.parse(join.TOKEN_PREFIX + join._b64(bytes(raw))), [B1], "galaxy", NOW)
    except join.TokenError:
        pass


# --- the exchange ---------------------------------------------------------------------------------

def redeem(tok: str, member_keys: list[bytes], ring: list[str]):
    t = join.parse(tok)
    new = X25519PrivateKey.generate()
    req = join.redeem_request(t, new)
    checked, pub = join.check_request(req, member_keys, "galaxy", NOW)
    answer = join.seal(checked, pub, X25519PrivateKey.generate(), ring)
    return t, new, req, answer


def test_exchange_delivers_the_ring_and_never_sends_the_mac():
    t, new, req, answer = redeem(token(), [B1], [K1, K2])
    assert join.open_sealed(t, new, answer) == {"keys": [K1, K2], "cluster": "galaxy", "role": "worker"}
    on_the_wire = repr(req) + repr(answer)
    assert join._b64(t.mac) not in on_the_wire and K1 not in on_the_wire and K2 not in on_the_wire


def test_eavesdropper_with_a_different_key_cannot_open():
    t, _new, _req, answer = redeem(token(), [B1], [K1])
    with pytest.raises(ValueError):
        join.open_sealed(t, X25519PrivateKey.generate(), answer)


def test_fake_member_without_the_key_is_detected():
    t = join.parse(token())
    new = X25519PrivateKey.generate()
    req = join.redeem_request(t, new)
    forged = join.Token(**{**{f: getattr(t, f) for f in t.__dataclass_fields__}, "mac": b"\0" * 32})
    answer = join.seal(forged, join._unb64(req["pub"]), X25519PrivateKey.generate(), [K3])
    with pytest.raises(ValueError):
        join.open_sealed(t, new, answer)


def test_request_with_swapped_public_key_is_altered():
    t = join.parse(token())
    req = join.redeem_request(t, X25519PrivateKey.generate())
    req["pub"] = join._b64(X25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(join.TokenError) as e:
        join.check_request(req, [B1], "galaxy", NOW)
    assert e.value.reason == "altered"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.dictionaries(st.sampled_from(["body", "pub", "proof", "x"]),
                                                           st.one_of(st.text(max_size=80), st.integers()))))
def test_check_request_fuzz(req):
    with pytest.raises(join.TokenError):
        join.check_request(req, [B1], "galaxy", NOW)


def test_cap_role():
    assert join.cap_role("auto", "worker") == "worker"
    assert join.cap_role("standby", "coordinator") == "standby"


# --- spent nonces ---------------------------------------------------------------------------------

def test_nonce_spent_once_then_pruned_after_grace():
    m = join.JoinNonces()
    assert m.apply(1, 1, JoinUse("aa", NOW + 10, NOW))["ok"]
    assert m.apply(2, 1, JoinUse("aa", NOW + 10, NOW))["error"] == "used"
    assert m.apply(3, 1, JoinUse("bb", NOW, NOW))["error"] == "expired"
    assert m.apply(4, 1, JoinUse("cc", NOW + join.PRUNE_GRACE_MS * 3, NOW + join.PRUNE_GRACE_MS * 2))["ok"]
    assert m.snapshot() == {"spent": 1}


def test_nonces_bounded(monkeypatch):
    monkeypatch.setattr(join, "SPENT_MAX", 2)
    m = join.JoinNonces()
    for i, n in enumerate(("a", "b")):
        assert m.apply(i + 1, 1, JoinUse(n, NOW + 10, NOW))["ok"]
    assert m.apply(3, 1, JoinUse("c", NOW + 10, NOW))["error"] == "busy"


# --- the keyring ----------------------------------------------------------------------------------

def test_machine_install_use_remove():
    m = keyring.KeyringMachine()
    r = Replicated([m])
    fp1, fp2 = keyring.fingerprint(K1), keyring.fingerprint(K2)
    assert r.apply_bytes(1, 1, wire.encode_command(KeyringChange("install", K2, base=(K1,))))["fingerprints"] == [fp1, fp2]
    assert r.apply_bytes(2, 1, wire.encode_command(KeyringChange("remove", K2 + " ")))["ok"]
    assert r.apply_bytes(3, 1, wire.encode_command(KeyringChange("install", K2)))["ok"]
    assert r.apply_bytes(4, 1, wire.encode_command(KeyringChange("remove", K1)))["error"] == "primary"
    assert r.apply_bytes(5, 1, wire.encode_command(KeyringChange("use", K3)))["error"] == "not_installed"
    assert r.apply_bytes(6, 1, wire.encode_command(KeyringChange("use", K2)))["version"] == 6 * 1000     # the command index: Raft index * 1000 + position in its batch
    assert r.apply_bytes(7, 1, wire.encode_command(KeyringChange("remove", K1)))["ok"]
    assert m.ring == keyring.Ring(7 * 1000, (K2,))
    assert K2 not in repr(m.snapshot()) and m.snapshot()["fingerprints"] == [fp2]


def test_machine_refuses_first_change_without_base():
    assert keyring.KeyringMachine().apply(1, 1, KeyringChange("install", K2))["ok"] is False


def test_ring_file_is_owner_only(tmp_path):
    keyring.save(str(tmp_path), keyring.Ring(3, (K2, K1)))
    assert os.stat(tmp_path / keyring.KEYRING_FILE).st_mode & 0o077 == 0
    assert keyring.load(str(tmp_path)) == keyring.Ring(3, (K2, K1))
    assert keyring.load(str(tmp_path / "none")) is None


def test_from_value_rejects_bad_rings():
    assert keyring.from_value({"version": 1, "keys": [K1, K1]}) is None
    assert keyring.from_value({"version": 1, "keys": ["gk1-short"]}) is None
    assert keyring.from_value({"version": -1, "keys": [K1]}) is None
    assert keyring.from_value({"version": 1, "keys": [K1] + [wire.generate_key() for _ in range(8)]}) is None


def test_codec_rotation_accepts_both_sends_primary():
    old = wire.Codec("galaxy", [B1], "a")
    new = wire.Codec("galaxy", [B1], "b")
    new.set_keys([B2, B1])
    msg = Beacon(cluster="galaxy", node_id="b", host="127.0.0.1", gossip_port=7946)
    frame = new.encode(msg, NOW)                       # sent with K2
    with pytest.raises(wire.DecodeError):
        old.decode(frame, NOW)                         # K1-only peer cannot read it
    old.set_keys([B1, B2])
    assert old.decode(frame, NOW).sender == "b"        # after install it can
    assert new.decode(old.encode(msg, NOW + 1), NOW + 1).sender == "a"


def test_rotating_fernet_swaps_in_place():
    s1, s2 = wire.derive_secret(B1, "raft"), wire.derive_secret(B2, "raft")
    a, b = keyring.RotatingFernet([s1]), keyring.RotatingFernet([s1])
    token = a.encrypt_at_time(b"x", 100)
    b.set_secrets([s2, s1])
    assert b.decrypt(b.encrypt_at_time(b"y", 100)) == b"y" and b.decrypt(token) == b"x"
    assert b.extract_timestamp(token) == 100
