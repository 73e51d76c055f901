"""Cluster-wide settings: which keys, their validation, and the replicated state machine.

Theory of operation
-------------------
Some settings must agree across the mesh (scheduling policy, failure-detection timing,
limits): ``CLUSTER_KEYS``.  An operator sets them once (``galaxy config set``); the
change is a ``ConfigSet`` command committed through the Raft log, and every voter's
``ClusterSettings`` machine applies it at the same log index.  The *version* of the
settings is the Raft index of the last entry that changed them, so versions only grow
within one Raft group and every node that runs version N runs the same settings.
Non-voters learn the state from a replicated document (``CONFIG_TYPE``/``CONFIG_KEY``,
value ``doc_value(state)``) that the coordinator writes whenever it differs from its
machine (galaxy/settings_runner.py), so every node converges by gossip.

Each node runs ``effective(base, settings)``: its own Config (file, env, flags) with the
cluster settings laid over it, i.e. **a cluster setting overrides the node's own value
for that key**; unsetting a key gives the node its own value back.  Node-local settings
(ports, data dir, addresses, keys, role, resources) are never cluster settings.

Validation reuses galaxy/config.py: each value is parsed by that field's own rule
(``config.parse_field``), and the cross-field relations (``config.check_relations``) are
checked over the defaults with the cluster settings laid over them — a pure function of
the command and the state, so every voter decides the same.  A node whose own values
conflict with a cluster setting (say a local ``probe_interval_ms`` below the cluster's
``probe_timeout_ms``) applies the settings it can and reports the others in
``not_applied`` (``effective``); it never runs an invalid Config.

Invariants (``ClusterSettings._check()`` after every apply):

1. The state holds only ``CLUSTER_KEYS``, each with the canonical value its field's rule
   gives for it (parse(value) == value), and the relations hold over defaults + state.
2. The version is 0 (never set) or the index of an applied entry, and never decreases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from galaxy import config as gconfig
from galaxy.config import Config, ConfigError
from galaxy.consensus.commands import ok, rejected
from galaxy.gossip.replica import Lattice
from galaxy.messages import ConfigSet

CONFIG_TYPE = "config"               # replicated document type ...
CONFIG_KEY = "cluster"               # ... and key holding {"version": N, "settings": {...}}

# Settings that must agree across nodes.  Each is read live by the subsystem that uses it
# (docs/config.md says which), so a change needs no restart.
CLUSTER_KEYS: tuple[str, ...] = (
    "scheduler_policy", "scheduler_settle_ms", "worker_queue_depth",
    "task_ack_timeout_ms", "task_output_bytes_max", "task_progress_interval_ms", "task_default_timeout_s",
    "gossip_interval_ms", "gossip_fanout", "probe_interval_ms", "probe_timeout_ms", "indirect_checks",
    "suspicion_mult", "suspicion_max_mult", "retransmit_mult", "push_pull_interval_ms",
    "voter_replace_after_ms", "http_body_max_bytes", "input_bytes_max", "anonymous_read",
)
assert set(CLUSTER_KEYS) <= set(gconfig.FIELDS)

# Every default, without running default factories (which read the environment): the
# relations only involve plain fields, and a state machine must not depend on the node.
_DEFAULTS: dict[str, Any] = {
    f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(Config)}

# Error codes (also the HTTP API's "error" field).
NODE_LOCAL = "node_local"
UNKNOWN_SETTING = "unknown_setting"
INVALID_SETTING = "invalid_setting"
KEYS_PER_CHANGE_MAX = len(CLUSTER_KEYS)


class SettingError(ValueError):
    """A change that cannot be made; ``code`` is one of the codes above, ``key`` the field."""

    def __init__(self, code: str, message: str, key: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.key = key


def check_key(key: str) -> None:
    if key in CLUSTER_KEYS:
        return
    if key in gconfig.FIELDS:
        raise SettingError(NODE_LOCAL, f"{key}: is a node-local setting, not a cluster-wide one; set it on "
                                       f"each node (flag, GALAXY_{key.upper()} or the config file)", key)
    close = gconfig._closest(key, CLUSTER_KEYS)
    hint = f" (did you mean {close}?)" if close else ""
    raise SettingError(UNKNOWN_SETTING, f"{key}: not a cluster-wide setting{hint}; see `galaxy config list`", key)


def parse_value(key: str, raw: Any) -> Any:
    """The canonical value of cluster setting ``key`` from text or JSON; SettingError names the key."""
    check_key(key)
    try:
        return gconfig.parse_field(key, raw, "cluster setting")
    except ConfigError as e:
        raise SettingError(INVALID_SETTING, str(e), key) from None


def as_text(value: Any) -> str:
    """A canonical value as the text a ``ConfigSet`` carries (parse_value(k, as_text(v)) == v)."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def proposed(current: Mapping[str, Any], values: Mapping[str, Any], unset: Iterable[str] = ()) -> dict[str, Any]:
    """The settings after a change (pure: the same answer on every voter), or SettingError."""
    unset = tuple(unset)
    if len(values) + len(unset) > KEYS_PER_CHANGE_MAX:
        raise SettingError(INVALID_SETTING, f"a change names at most {KEYS_PER_CHANGE_MAX} settings", None)
    new = dict(current)
    for key in unset:
        check_key(key)
        new.pop(key, None)
    for key in sorted(values):
        new[key] = parse_value(key, values[key])
    try:
        gconfig.check_relations({**_DEFAULTS, **new}, changed=[*values, *unset], label="cluster setting")
    except ConfigError as e:
        raise SettingError(INVALID_SETTING, str(e), e.key) from None
    return new


def effective(base: Config, settings: Mapping[str, Any]) -> tuple[Config, dict[str, str]]:
    """``base`` with the cluster settings laid over it, and the settings it could not take
    (key -> why: a relation with one of this node's own values)."""
    if not settings:
        return base, {}
    try:
        return dataclasses.replace(base, **settings), {}
    except ConfigError:
        pass
    cfg, skipped = base, {}
    for key in sorted(settings):
        try:
            cfg = dataclasses.replace(cfg, **{key: settings[key]})
        except ConfigError as e:
            skipped[key] = str(e)
    return cfg, skipped


@dataclass(frozen=True, slots=True)
class SettingsState:
    version: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)

    def as_value(self) -> dict:
        """The replicated document's value (plain data)."""
        return {"version": self.version, "settings": dict(self.settings)}


def from_value(value: Any) -> SettingsState | None:
    """A replicated document's value back as a state; None when it is not one.

    Documents come from any key holder: keep only cluster keys whose values pass their rule.
    """
    if not isinstance(value, Mapping):
        return None
    version, raw = value.get("version"), value.get("settings")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0 or not isinstance(raw, Mapping):
        return None
    settings = {}
    for key, v in raw.items():
        try:
            if isinstance(key, str) and parse_value(key, v) == v:
                settings[key] = v
        except SettingError:
            continue
    return SettingsState(version, settings)


def _version_rank(doc: Any) -> int:
    state = from_value(doc.value)
    return state.version if state is not None else -1


# Siblings of the settings document (two coordinators wrote it concurrently around a
# leader change) resolve to the higher version; the coordinator's next write settles them.
CONFIG_RESOLVER = Lattice(_version_rank)


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b      # 1 and 1.0 are different settings for an int field


class ClusterSettings:
    """The state machine behind ``ConfigSet`` (see the module docstring)."""

    commands = (ConfigSet,)

    def __init__(self) -> None:
        # One immutable state, replaced whole: readers on other threads see old or new, never half.
        self.state = SettingsState()

    def apply(self, index: int, term: int, cmd: ConfigSet) -> dict:
        current = self.state
        try:
            new = proposed(current.settings, cmd.values, cmd.unset)
        except SettingError as e:
            return rejected(e.code, str(e), e.key, version=current.version)
        if new.keys() == current.settings.keys() and all(_same(new[k], current.settings[k]) for k in new):
            return ok(version=current.version, settings=dict(new), changed=False)
        self.state = SettingsState(index, new)
        self._check(current)
        return ok(version=index, settings=dict(new), changed=True)

    def snapshot(self) -> dict:
        return self.state.as_value()

    def _check(self, before: SettingsState) -> None:
        state = self.state
        assert state.version >= before.version, (before.version, state.version)
        for key, value in state.settings.items():
            assert key in CLUSTER_KEYS, key
            assert _same(parse_value(key, value), value), (key, value)
        gconfig.check_relations({**_DEFAULTS, **state.settings})
