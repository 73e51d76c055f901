"""Pure parts of the replicated-command layer and of cluster-wide settings."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy import wire
from galaxy.api.internal import AuthError, InternalAuth
from galaxy.config import Config
from galaxy.consensus.commands import InvariantError, Replicated, ok
from galaxy.messages import ConfigSet
from galaxy.settings import (CLUSTER_KEYS, INVALID_SETTING, NODE_LOCAL, UNKNOWN_SETTING, ClusterSettings, SettingError,
                             SettingsState, as_text, check_key, effective, from_value, parse_value, proposed)

# ---------------------------------------------------------------- wire


def test_command_round_trip_and_version_byte():
    cmd = ConfigSet(values={"gossip_fanout": "4"}, unset=("probe_timeout_ms",), by="n-1")
    data = wire.encode_command(cmd)
    assert data[:3] == b"GC\x01"
    assert wire.decode_command(data) == cmd
    with pytest.raises(wire.DecodeError) as err:
        wire.decode_command(b"GC\x02" + data[3:])
    assert err.value.reason == "version"


@pytest.mark.parametrize("data,reason", [
    (b"", "malformed"), (b"GX\x01\x90", "malformed"), (b"GC\x01\xc1", "malformed"),
    (b"GC\x01" + __import__("msgpack").packb([39, {}]), "unknown_type"),
    (b"GC\x01" + __import__("msgpack").packb([40, {"values": {"k": 1}}]), "invalid"),
    (b"GC\x01" + __import__("msgpack").packb([40, {"nope": 1}]), "invalid"),
    (b"GC\x01" + b"\x00" * wire.COMMAND_BYTES_MAX, "too_large"),
])
def test_decode_command_refuses_with_a_reason(data, reason):
    with pytest.raises(wire.DecodeError) as err:
        wire.decode_command(data)
    assert err.value.reason == reason


def test_encode_command_refuses_what_peers_would_drop():
    with pytest.raises(wire.EncodeError):
        wire.encode_command(ConfigSet(values={"k": 1}))          # type: ignore[dict-item]
    with pytest.raises(wire.EncodeError):
        wire.encode_command(object())
    with pytest.raises(wire.EncodeError) as err:
        wire.encode_command(ConfigSet(values={f"k{i}": "x" * 1000 for i in range(100)}))
    assert err.value.reason == "too_large"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b"GC\x01" + b))
def test_decode_command_raises_only_decode_error(data):
    try:
        wire.decode_command(data)
    except wire.DecodeError:
        pass


# ---------------------------------------------------------------- dispatcher


class Echo:
    commands = (ConfigSet,)

    def __init__(self, result=None):
        self.seen = []
        self.result = result

    def apply(self, index, term, cmd):
        self.seen.append((index, term, cmd))
        return self.result if self.result is not None else ok(n=len(self.seen))

    def snapshot(self):
        return {"n": len(self.seen)}


def test_replicated_routes_in_order_and_rejects_undecodable_entries():
    m = Echo()
    r = Replicated([m])
    assert r.apply_bytes(2, 1, wire.encode_command(ConfigSet(by="x"))) == {"ok": True, "n": 1}
    bad = r.apply_bytes(3, 1, b"garbage")
    assert not bad["ok"] and bad["error"] == "undecodable"
    assert r.applied_index == 3 and r.applied_total == 2 and r.rejected_total == 1
    assert m.seen == [(2000, 1, ConfigSet(by="x"))]      # the command index: entry 2, position 0
    assert r.snapshot()["machines"] == {"Echo": {"n": 1}}
    with pytest.raises(InvariantError):
        r.apply(3, 1, ConfigSet())             # an index applied twice
    with pytest.raises(InvariantError):
        r.apply(9, 0, ConfigSet())             # a term going back


def test_replicated_refuses_bad_machines_and_results():
    with pytest.raises(TypeError):
        Replicated([Echo(), Echo()])           # one type, two owners
    with pytest.raises(InvariantError):
        Replicated([Echo(result={"ok": True, "x": object()})]).apply(1, 1, ConfigSet())


# ---------------------------------------------------------------- settings rules


def test_keys_cluster_node_local_and_unknown():
    check_key("gossip_fanout")
    with pytest.raises(SettingError) as err:
        check_key("http_port")
    assert err.value.code == NODE_LOCAL and "http_port" in str(err.value)
    with pytest.raises(SettingError) as err:
        check_key("gossip_fanuot")
    assert err.value.code == UNKNOWN_SETTING and "gossip_fanout" in str(err.value)
    for key in ("data_dir", "bind", "cluster_key", "role", "raft_port"):
        with pytest.raises(SettingError):
            check_key(key)


def test_values_are_parsed_by_the_fields_own_rules():
    assert parse_value("gossip_fanout", "4") == 4
    assert parse_value("scheduler_policy", " BinPack ") == "binpack"
    assert parse_value("task_default_timeout_s", "1.5") == 1.5
    for key in CLUSTER_KEYS:
        v = getattr(Config(), key)
        assert parse_value(key, as_text(v)) == v
    with pytest.raises(SettingError) as err:
        parse_value("gossip_fanout", "0")
    assert err.value.code == INVALID_SETTING and err.value.key == "gossip_fanout"
    assert "gossip_fanout: must be an integer in 1..64, got '0'" in str(err.value)


def test_relations_blame_the_changed_field_and_allow_moving_both():
    with pytest.raises(SettingError) as err:
        proposed({}, {"probe_timeout_ms": "900"})
    assert err.value.key == "probe_timeout_ms" and "probe_interval_ms" in str(err.value)
    with pytest.raises(SettingError) as err:
        proposed({"probe_timeout_ms": 300}, {"probe_interval_ms": "200"})
    assert err.value.key == "probe_interval_ms"
    both = proposed({}, {"probe_interval_ms": "2000", "probe_timeout_ms": "900"})
    assert both == {"probe_interval_ms": 2000, "probe_timeout_ms": 900}
    with pytest.raises(SettingError):
        proposed(both, {}, ["probe_interval_ms"])     # unsetting one would break the pair
    assert proposed(both, {}, ["probe_timeout_ms"]) == {"probe_interval_ms": 2000}


def test_effective_overrides_the_node_and_skips_what_conflicts_with_it():
    base = dataclasses.replace(Config(), gossip_fanout=2, probe_interval_ms=250, probe_timeout_ms=100)
    cfg, skipped = effective(base, {"gossip_fanout": 5, "probe_timeout_ms": 300, "scheduler_policy": "binpack"})
    assert cfg.gossip_fanout == 5 and cfg.scheduler_policy == "binpack"
    assert cfg.probe_timeout_ms == 100 and list(skipped) == ["probe_timeout_ms"]
    assert effective(base, {}) == (base, {})


def test_document_values_are_filtered():
    assert from_value({"version": 7, "settings": {"gossip_fanout": 4, "http_port": 1, "probe_timeout_ms": "x"}}) \
        == SettingsState(7, {"gossip_fanout": 4})
    for bad in (None, [], {"version": -1, "settings": {}}, {"version": True, "settings": {}}, {"version": 1}):
        assert from_value(bad) is None


def test_machine_versions_are_the_index_of_the_last_change():
    m = ClusterSettings()
    r = m.apply(5, 1, ConfigSet(values={"gossip_fanout": "4"}))
    assert r == {"ok": True, "version": 5, "settings": {"gossip_fanout": 4}, "changed": True}
    assert m.apply(6, 1, ConfigSet(values={"gossip_fanout": "4"}))["changed"] is False
    assert m.state.version == 5
    bad = m.apply(7, 1, ConfigSet(values={"http_port": "1"}))
    assert not bad["ok"] and bad["error"] == NODE_LOCAL and bad["key"] == "http_port" and m.state.version == 5
    assert m.apply(8, 2, ConfigSet(unset=("gossip_fanout",)))["settings"] == {}
    assert m.snapshot() == {"version": 8, "settings": {}}


_CHANGES = st.lists(st.tuples(
    st.dictionaries(st.sampled_from(["gossip_fanout", "probe_timeout_ms", "probe_interval_ms", "http_port",
                                     "scheduler_policy"]),
                    st.sampled_from(["1", "3", "150", "500", "2000", "spread", "x"]), max_size=3),
    st.lists(st.sampled_from(["gossip_fanout", "probe_interval_ms", "bind"]), max_size=2)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(_CHANGES)
def test_two_voters_applying_one_log_agree_on_every_result(changes):
    a, b = ClusterSettings(), ClusterSettings()
    for i, (values, unset) in enumerate(changes, start=2):
        cmd = wire.decode_command(wire.encode_command(ConfigSet(values=values, unset=tuple(unset))))
        assert a.apply(i, 1, cmd) == b.apply(i, 1, cmd)
        assert a.snapshot() == b.snapshot()
        effective(Config(), a.state.settings)         # the state always makes a valid Config


# ---------------------------------------------------------------- internal route auth


def test_internal_auth_accepts_once_and_refuses_forgeries_stale_and_replays():
    secret = wire.derive_secret(bytes(32), "http-internal")
    auth = InternalAuth(secret, window_ms=30_000, seen_max=2)
    body = b"GC\x01..."
    h = auth.header("n-1", 1_000_000, "POST", "/v1/internal/commands", body, "ab" * 16)
    assert auth.verify(1_000_500, h, "POST", "/v1/internal/commands", body) == "n-1"

    def refused(header, body=body, now=1_000_500, path="/v1/internal/commands", a=auth):
        with pytest.raises(AuthError) as err:
            a.verify(now, header, "POST", path, body)
        return err.value

    assert refused(h).reason == "replayed"
    assert "unauthenticated" in refused(auth.header("n-1", 1_000_000, "POST", "/x", body, "cd" * 16)).reason
    assert "unauthenticated" in refused(h.replace("n-1", "n-2")).reason
    other = InternalAuth(wire.derive_secret(bytes(range(32)), "http-internal"), 30_000)
    assert "unauthenticated" in refused(other.header("n-1", 1_000_000, "POST", "/v1/internal/commands", body,
                                                     "ef" * 16)).reason
    assert "unauthenticated" in refused(auth.header("n-1", 1_000_000, "POST", "/v1/internal/commands", body,
                                                    "01" * 16), body=body + b"!").reason
    assert "stale" in refused(auth.header("n-1", 900_000, "POST", "/v1/internal/commands", body, "02" * 16)).reason
    assert "malformed" in refused(None).reason
    auth.verify(1_000_500, auth.header("n-1", 1_000_000, "POST", "/v1/internal/commands", body, "03" * 16), "POST",
                "/v1/internal/commands", body)
    full = refused(auth.header("n-1", 1_000_000, "POST", "/v1/internal/commands", body, "04" * 16))
    assert full.status == 503                         # bounded: refuse rather than forget a nonce
    # once the window has passed, the old nonces are forgotten and room is made
    late = auth.header("n-1", 1_040_000, "POST", "/v1/internal/commands", body, "05" * 16)
    assert auth.verify(1_040_000, late, "POST", "/v1/internal/commands", body) == "n-1"
