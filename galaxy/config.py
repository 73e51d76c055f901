"""Node configuration: one frozen ``Config`` with LAN defaults, and ``load()``.

Theory of operation
-------------------
Every tunable of a node is a field of ``Config``, and each field's default carries a
one-line reason (hashicorp memberlist's ``DefaultLANConfig``).  ``Config.lan()`` is the
defaults; ``Config.local()`` shortens timings for one machine (``galaxy dev``, tests);
``Config.wan()`` lengthens the failure detector's for routed networks (memberlist's
``DefaultWANConfig``); ``Config.sim()`` is the simulator's profile.

``load(flags, env, config_file, base)`` builds a Config from four layers, highest first::

    flags (only what the user typed)  >  GALAXY_<FIELD> env  >  TOML file  >  base (lan())

Each layer is parsed on its own, so an error names the key, the rule, the offending value
and where it came from, in one line the CLI prints before exiting 2::

    http_port: must be an integer in 0..65535, got 'abc' (from GALAXY_HTTP_PORT)

Invariants:

* Every ``Config`` that exists is valid: ``__post_init__`` runs the same per-field rules
  and cross-field relations as ``load`` (so ``dataclasses.replace`` cannot build a node
  that pysyncobj would later reject), and normalises values (sizes to MiB, join to a
  tuple, paths absolute).
* Unknown TOML keys and unknown flag keys are errors, not silently ignored: a typo must
  not turn into a default.  So is a ``GALAXY_*`` variable that looks like config (close to
  a field name, a flag spelling such as ``GALAXY_NO_MDNS``, or ending in a unit such as
  ``_ms``/``_port``).  Other ``GALAXY_*`` variables belong to clients and tests
  (``GALAXY_ADDR``, ``GALAXY_SIM_SEEDS``, ``GALAXY_SAFETY_ROUNDS``) and are skipped, as are
  ``NOT_NODE_CONFIG_ENV`` and the ``NOT_NODE_CONFIG_ENV_PREFIXES``.
* ``cluster_key`` and ``cluster_key_file`` are one setting: a layer that sets one of them
  clears the other from lower layers, and a layer that sets both is an error.
* Secrets (``cluster_key``, ``token``, ``admin_password``) never appear in ``redacted()`` or in error messages.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

ROLES = ("auto", "coordinator", "standby", "worker")
LOG_FORMATS = ("text", "json")
SCHEDULER_POLICIES = ("spread", "binpack")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TLS_MODES = ("off", "auto")

ENV_PREFIX = "GALAXY_"
# GALAXY_* variables that belong to clients, tests or the CLI rather than to a node's Config.
NOT_NODE_CONFIG_ENV = frozenset({"GALAXY_ADDR", "GALAXY_CONFIG", "GALAXY_SIM_SEEDS", "GALAXY_API_TOKEN",
                                 "GALAXY_TLS_FINGERPRINT", "GALAXY_CACERT"})
NOT_NODE_CONFIG_ENV_PREFIXES = ("GALAXY_SIM_", "GALAXY_TEST_", "GALAXY_BENCH_")
# Endings that only a setting would have (units last in names).
_CONFIG_LIKE_SUFFIXES = ("_ms", "_port", "_bytes", "_max", "_mb", "_dir", "_file", "_key")

CONFIG_FILE_MAX_BYTES = 1_048_576   # a config file is typed by a human; more is a mistake
LABELS_MAX = 64                     # labels are placement hints gossiped with every member record
JOIN_MAX = 256                      # a seed list is typed by a human
SECRET_MAX_CHARS = 4096
PORT_MAX = 65535
UDP_PAYLOAD_MAX_BYTES = 65_507      # largest IPv4 UDP payload


class ConfigError(ValueError):
    """One bad setting: the message names the key, the rule, the value and its source."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def default_data_dir(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_DATA_HOME/galaxy``, else ``~/.local/share/galaxy``.

    Reads XDG_DATA_HOME and HOME from ``env``, falling back to the process environment for
    each one ``env`` lacks.  A relative XDG_DATA_HOME is ignored, as the XDG spec says.
    """
    def lookup(name: str) -> str:
        if env is not None and name in env:
            return env[name]
        return os.environ.get(name, "")

    xdg = lookup("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "galaxy")
    home = lookup("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "share", "galaxy")


@dataclass(frozen=True, slots=True)
class Config:
    # --- identity and role
    node_id: str | None = None            # None: generated once, kept in the store: a restart keeps its identity
    role: str = "auto"                    # any machine may vote unless told otherwise: no planning on a LAN
    cluster: str = "galaxy"               # one well-known name so machines on a LAN find each other with no setup
    # --- addresses
    bind: str = "0.0.0.0"                 # listen on every interface: reaching LAN peers is the point
    advertise: str | None = None          # None: first non-loopback IPv4, else 127.0.0.1 (what peers can reach)
    http_port: int = 8000                 # the port client commands try first (GALAXY_ADDR's default)
    gossip_port: int = 7946               # memberlist/Serf's port: familiar to operators and firewall rules
    raft_port: int = 7947                 # gossip_port + 1, so one firewall range covers node-to-node traffic
    broadcast_port: int = 37021           # unassigned high port; beacons need one port every node shares
    data_dir: str = field(default_factory=default_data_dir)  # XDG per-user state: survives reboots, needs no root
    join: tuple[str, ...] = ()            # mDNS and beacons find LAN peers; seeds are only for routed networks
    # --- security (secrets are never defaulted: a shared default key would be no key)
    cluster_key: str | None = None        # None: no key given here; the node decides how to run without one
    cluster_key_file: str | None = None   # keeps the key out of `ps`, shell history and this config's logs
    token: str | None = None              # one-time join token: lets a new machine in without handing it the key
    tls: str = "off"                      # plain HTTP: a LAN mesh works with no certificates; "auto" self-signs one
    tls_cert: str | None = None           # PEM certificate (chain) to serve HTTPS with, e.g. from your CA
    tls_key: str | None = None            # its private key (PEM, unencrypted; keep the file 0600)
    # --- coordinator pool
    voters: int = 3                       # survives one voter failure; 5 adds latency for a rare gain on a LAN
    # --- discovery
    mdns: bool = True                     # zero-config discovery on a LAN
    broadcast: bool = True                # finds peers where multicast is filtered (many Wi-Fi access points)
    # --- resources offered to the mesh
    cpu: float | None = None              # None: offer the cores psutil sees
    memory_mb: int | None = None          # None: offer the memory psutil sees
    gpu: int | None = None                # None: offer the GPUs the executor detects
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # placement constraints are opt-in
    owner: str | None = None              # account credited for work done here; None earns nothing
    max_nodes_per_owner: int = 16         # one account cannot farm the ledger with a swarm of tiny nodes
    admin_password: str | None = None     # the first coordinator opens `admin` with it; None: a random one, printed once
    # --- logging
    log_format: str = "text"              # humans read logs first; json is for log shippers
    log_level: str = "info"               # state changes without per-packet noise
    # --- gossip and failure detection
    gossip_interval_ms: int = 200         # fast dissemination on a LAN (memberlist's LAN value)
    gossip_fanout: int = 3                # news reaches N nodes in about log3(N) rounds; more only adds traffic
    dead_reap_after_ms: int = 3_600_000   # an hour: status still shows what died, and a late rejoin is no stranger
    # --- SWIM failure detection (memberlist's settings, Lifeguard's extensions; see gossip/membership.py)
    probe_interval_ms: int = 400          # 2.5x memberlist's pace: 10 nodes know a dead one dead in ~2 s (< 3 s)
    probe_timeout_ms: int = 200           # a LAN round trip is < 1 ms; the margin absorbs a busy Python process
    indirect_checks: int = 3              # 3 other paths to the target before suspecting it (SWIM's k, memberlist's)
    suspicion_mult: int = 3               # suspect >= 3 * log10(N) probes (memberlist 4): Lifeguard's confirmations make it safe
    suspicion_max_mult: int = 6           # an unconfirmed suspicion lasts up to 6x that (Lifeguard, memberlist)
    retransmit_mult: int = 4              # each update rides on 4 * log10(N+1) messages: reaches all with margin
    push_pull_interval_ms: int = 30_000   # full-state exchange now and then repairs what gossip missed (memberlist)
    awareness_max: int = 8                # a node that misses acks probes up to 8x slower (Lifeguard's health score)
    # --- discovery timings
    beacon_interval_ms: int = 1000        # one tiny broadcast a second is negligible load and finds peers fast
    seed_retry_min_ms: int = 200          # retry soon: seeds are often starting at the same moment
    seed_retry_max_ms: int = 10_000       # back off so a dead seed costs one packet per 10 s
    bootstrap_window_ms: int = 2500       # > mDNS probing (1.2 s measured) + a beacon round: hear a mesh before founding one
    voter_replace_after_ms: int = 30_000  # a reboot must not trigger a Raft membership change; a dead box should
    # --- Raft (pysyncobj)
    raft_min_timeout_ms: int = 300        # > 3 heartbeats (pysyncobj asserts) and many LAN round trips
    raft_max_timeout_ms: int = 600        # 2x the minimum spreads candidates out, so split votes are rare
    raft_heartbeat_ms: int = 50           # 6 heartbeats per minimum timeout: one lost packet elects no one
    raft_connection_retry_ms: int = 500   # reconnect quickly to a restarted voter without a busy loop
    leader_lease_ms: int = 150            # < raft_min_timeout_ms: an old leader stops before a new one exists
    raft_call_timeout_ms: int = 2000      # several election timeouts: a call survives one leader change
    # --- limits
    frame_max_bytes: int = 65_000         # fits one UDP datagram (65,507 over IPv4) with room to spare
    replay_window_ms: int = 30_000        # drop frames older than this; tolerates modest clock skew on a LAN
    http_body_max_bytes: int = 1_048_576  # 1 MiB: task specs are small; bigger bodies are mistakes or attacks
    tasks_per_owner_max: int = 10_000     # unfinished tasks per owner: one client cannot fill every node's task table
    transfers_pending_per_account_max: int = 100  # transfers waiting for a coordinator: bounds an outage's backlog per payer
    submit_rate_per_s: float = 50.0       # task submissions per client address per second, after the burst
    submit_burst: int = 200               # a script submitting a batch at once is normal; a flood past it waits (429)
    submit_account_rate_per_s: float = 50.0  # per signed-in account too: one account spread over many addresses is held
    submit_account_burst: int = 200       # the same batch allowance as per address
    # --- tasks
    scheduler_policy: str = "spread"      # spread load (and risk) over nodes; binpack keeps whole nodes free
    scheduler_settle_ms: int = 500        # a new coordinator waits this long so its predecessor's last writes reach it
    worker_queue_depth: int = -1          # tasks a node may hold beyond what fits (-1: its cores x 1-16 by task length; 0: none): it starts the next itself
    task_ack_timeout_ms: int = 2000       # a submission waits this long for a second node's copy, then 503s
    task_output_bytes_max: int = 1 << 20  # per stream and attempt: logs are for reading, results go to out/
    task_progress_interval_ms: int = 250  # progress is gossiped at most 4 times a second per task
    input_bytes_max: int = 256 << 20      # an input archive: 256 MiB travels between nodes in seconds on a LAN
    task_retention_ms: int = 7 * 86_400_000  # ended tasks (and their logs) are kept a week, then forgotten
    task_default_timeout_s: float = 0.0   # 0: a task that names no timeout runs until it ends (no surprise kills)
    # --- sign-in and transfer rate limits (token buckets, counted by each node for what it serves)
    login_rate_per_min: float = 5.0       # per account name: a typo costs a retry; a guesser gets 5 passwords a minute
    login_burst: int = 5                  # a few quick retries after a typo before the 5-a-minute pace applies
    login_addr_rate_per_min: float = 30.0  # per client address: one address may front many users (NAT, galaxy dev)
    login_addr_burst: int = 10            # a classroom signing in at once from one NAT address is not an attack
    transfer_rate_per_s: float = 1000.0   # per signed-in account: stops a runaway script, not batch payouts
    transfer_burst: int = 1000            # a 1,000-payment batch goes through at once; the steady rate caps the rest
    transfer_addr_rate_per_s: float = 2000.0  # per client address: one address may front many accounts (NAT)
    transfer_addr_burst: int = 2000       # twice one account's allowance, so two accounts' batches pass at once
    anonymous_read: bool = True           # `curl /v1/status` works out of the box; writes always need a token

    def __post_init__(self) -> None:
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = getattr(self, name)
            try:
                values[name] = parse(raw)
            except _Invalid as e:
                got = raw if e.got is _WHOLE else e.got
                raise ConfigError(_bad(name, e.expected, got, None), key=name) from None
        _check_relations(values, {})
        for name, value in values.items():
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)

    @classmethod
    def lan(cls) -> Config:
        """The defaults: machines on one LAN, discovered by mDNS and beacons."""
        return cls()

    @classmethod
    def local(cls) -> Config:
        """One machine (``galaxy dev``, tests): loopback has no packet loss, so detect faster."""
        return replace(
            cls(),
            gossip_interval_ms=100,
            beacon_interval_ms=500,
            bootstrap_window_ms=1000,
            voter_replace_after_ms=10_000,
        )

    @classmethod
    def wan(cls) -> Config:
        """Hosts across routed networks or the internet: slower, lossier paths (memberlist's WAN).

        Probes every 5 s with a 3 s timeout (round trips of hundreds of ms, and loss
        bursts), suspicion lasts longer (x6) so a refutation has time to cross, gossip
        goes to 4 peers every 0.5 s (fewer rounds, each more redundant), and the
        full-state exchange runs every 60 s.  Dead-node detection takes ~30-60 s.
        """
        return replace(
            cls(),
            gossip_interval_ms=500,
            gossip_fanout=4,
            probe_interval_ms=5000,
            probe_timeout_ms=3000,
            suspicion_mult=6,
            push_pull_interval_ms=60_000,
        )

    @classmethod
    def sim(cls) -> Config:
        """The simulator's profile: local timings, so simulated runs reach steady state fast."""
        return cls.local()

    def redacted(self) -> dict[str, Any]:
        """All fields as plain JSON-able values, with secrets shown as "***" when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRETS and value is not None:
                value = "***"
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Config))
_SECRETS = frozenset({"cluster_key", "token", "admin_password"})
_KEY_PAIR = ("cluster_key", "cluster_key_file")


# ---------------------------------------------------------------------------- loading

# Layers in increasing precedence; a value's source is (rank, label).
_DEFAULT, _FILE, _ENV, _FLAG = 0, 1, 2, 3

# Flag spellings that differ from the field name (argparse dests a CLI may pass as they are).
_FLAG_ALIASES = {"memory": "memory_mb", "label": "labels"}
_FLAG_NEGATIONS = {"no_mdns": "mdns", "no_broadcast": "broadcast"}
_FLAG_LABELS = {"memory_mb": "--memory", "labels": "--label"}


def profile_env(profile: Config, base: Config | None = None, skip: Iterable[str] = ()) -> dict[str, str]:
    """``GALAXY_<FIELD>`` variables that turn ``base`` (default: LAN) into ``profile``.

    How `galaxy dev` and the test harness hand a profile such as ``Config.local()`` to the
    `galaxy up` processes they start (plain values only; secrets and paths are theirs).
    """
    base = base or Config.lan()
    skipped = set(skip)
    env = {}
    for name in FIELDS:
        value = getattr(profile, name)
        if name in skipped or value == getattr(base, name) or not isinstance(value, (bool, int, float, str)):
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[f"GALAXY_{name.upper()}"] = text
    return env


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: str | None = None,
    base: Config | None = None,
) -> Config:
    """Build a Config: flags > GALAXY_* env > TOML file > base (default ``Config.lan()``).

    ``flags`` holds only what the user gave, keyed by field name, as parsed values or raw
    strings (``None`` counts as not given).  ``config_file`` names the TOML file; when it
    is None, ``flags["config"]`` or then ``GALAXY_CONFIG`` may name one.  Raises
    ``ConfigError`` with one line naming the key.
    """
    if base is None:
        base = replace(Config.lan(), data_dir=default_data_dir(env))
    values: dict[str, Any] = {f: getattr(base, f) for f in FIELDS}
    sources: dict[str, tuple[int, str]] = {}

    flags = dict(flags)
    file_origin = ""
    if config_file is None and flags.get("config") is not None:
        config_file, file_origin = str(flags["config"]), " (from --config)"
    elif config_file is None and env.get("GALAXY_CONFIG"):
        config_file, file_origin = env["GALAXY_CONFIG"], " (from GALAXY_CONFIG)"
    flags.pop("config", None)

    if config_file is not None:
        path = os.path.expanduser(config_file)
        _merge(values, sources, _FILE, _file_layer(path, file_origin))
    _merge(values, sources, _ENV, _env_layer(env))
    _merge(values, sources, _FLAG, _flag_layer(flags))

    _check_relations(values, sources)
    return replace(base, **values)


# A layer maps field -> (raw value as given, parsed value, source label).
_Layer = dict[str, tuple[Any, Any, str]]


def _merge(values: dict[str, Any], sources: dict[str, tuple[int, str]], rank: int, layer: _Layer) -> None:
    given = [k for k in _KEY_PAIR if k in layer and layer[k][1] is not None]
    if len(given) == 2:
        label = layer["cluster_key_file"][2]
        raise ConfigError(
            f"cluster_key: give cluster_key or cluster_key_file, not both (both set in {label})",
            key="cluster_key",
        )
    for other in _KEY_PAIR:  # the layer's key replaces a lower layer's key in either form
        if given and other not in layer:
            values[other] = None
            sources.pop(other, None)
    for name, (_raw, value, label) in layer.items():
        values[name] = value
        sources[name] = (rank, label)


def _parse_into(layer: _Layer, name: str, raw: Any, label: str) -> None:
    layer[name] = (raw, parse_field(name, raw, label), label)


def parse_field(name: str, raw: Any, label: str | None = None) -> Any:
    """One field's value by its rule, as ``load`` parses it; ConfigError names the field.

    ``label`` says where the value came from (shown in the message).  Used by
    galaxy/settings.py for cluster-wide settings, so both paths share one rule per field.
    """
    parse = _PARSERS.get(name)
    if parse is None:
        raise ConfigError(f"{name}: not a Galaxy setting{_suggest(name, FIELDS)}", key=name)
    try:
        return parse(raw)
    except _Invalid as e:
        raise ConfigError(_bad(name, e.expected, raw if e.got is _WHOLE else e.got, label), key=name) from None


def check_relations(values: Mapping[str, Any], changed: Iterable[str] = (), label: str = "") -> None:
    """The cross-field rules over every field's value; when one breaks, the field blamed
    (named in the ConfigError) is one of ``changed`` if it can be, as ``load`` blames the
    higher layer."""
    _check_relations(values, {name: (_FLAG, label) for name in changed})


def _file_layer(path: str, origin: str) -> _Layer:
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config: cannot read {path}: no such file{origin}", key="config") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}{origin}", key="config") from None
    if len(data) > CONFIG_FILE_MAX_BYTES:
        raise ConfigError(f"config: {path} is larger than {CONFIG_FILE_MAX_BYTES} bytes{origin}", key="config")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {path} is not UTF-8 text: {e.reason}{origin}", key="config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}{origin}", key="config") from None

    unknown = [k for k in table if k not in _PARSERS]
    if unknown:
        what = "not a Galaxy setting (unknown key" if len(unknown) == 1 else "not Galaxy settings (unknown keys"
        hints = "".join(f"; {k}: did you mean {close}?" for k in unknown if (close := _closest(k, FIELDS)))
        raise ConfigError(f"{', '.join(unknown)}: {what} in {path}{hints})", key=unknown[0])
    layer: _Layer = {}
    for name, raw in table.items():
        _parse_into(layer, name, raw, path)
    return layer


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in NOT_NODE_CONFIG_ENV:
            continue
        if var.startswith(NOT_NODE_CONFIG_ENV_PREFIXES):
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in _PARSERS:
            if name in _FLAG_NEGATIONS:
                hint = f" (use {ENV_PREFIX}{_FLAG_NEGATIONS[name].upper()}=0)"
            elif name in _FLAG_ALIASES:
                hint = f" (use {ENV_PREFIX}{_FLAG_ALIASES[name].upper()})"
            elif _closest(name, FIELDS) is not None or name.endswith(_CONFIG_LIKE_SUFFIXES):
                hint = _suggest(name, FIELDS, ENV_PREFIX)
            else:
                continue            # someone else's variable (a test knob, a client setting)
            raise ConfigError(f"{var}: not a Galaxy setting{hint}", key=var)
        _parse_into(layer, name, env[var], var)
    return layer


def _flag_layer(flags: Mapping[str, Any]) -> _Layer:
    layer: _Layer = {}
    for key, raw in flags.items():
        if raw is None:
            continue
        if key in _FLAG_NEGATIONS:
            if raw is False:        # a store_true flag that was not given
                continue
            name = _FLAG_NEGATIONS[key]
            try:
                raw = not _parse_bool(raw)
            except _Invalid as e:
                raise ConfigError(_bad(name, e.expected, raw, "--" + key.replace("_", "-")), key=name) from None
        else:
            name = _FLAG_ALIASES.get(key, key)
        if name not in _PARSERS:
            raise ConfigError(f"{key}: unknown flag setting{_suggest(key, FIELDS)}", key=key)
        if name in ("mdns", "broadcast") and raw in (False, "false", "0", "no"):
            label = f"--no-{name}"
        else:
            label = _FLAG_LABELS.get(name, "--" + name.replace("_", "-"))
        _parse_into(layer, name, raw, label)
    return layer


def _closest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.8)
    return close[0] if close else None


def _suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    close = _closest(word, choices)
    if close is None:
        return ""
    return f" (did you mean {prefix}{close.upper() if prefix else close}?)"


# ---------------------------------------------------------------------------- field rules


_WHOLE = object()


class _Invalid(Exception):
    """A value broke its field's rule; ``expected`` says what the rule wants ("must be ...").

    ``got`` names the offending part when the value is a list (one bad join entry).
    """

    def __init__(self, expected: str, got: Any = _WHOLE) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got


def _bad(name: str, expected: str, raw: Any, label: str | None) -> str:
    shown = "***" if name in _SECRETS else repr(raw)
    origin = f" (from {label})" if label else ""
    return f"{name}: {expected}, got {shown}{origin}"


def _as_int(raw: Any, expected: str) -> int:
    if isinstance(raw, bool):
        raise _Invalid(expected)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+(_\d+)*\s*", raw):
        return int(raw)
    raise _Invalid(expected)


def _int_in(lo: int, hi: int | None = None, what: str = "an integer") -> Callable[[Any], int]:
    expected = f"must be {what} in {lo}..{hi}" if hi is not None else f"must be {what} >= {lo}"
    if hi is None and lo == 1:
        expected = f"must be {what} > 0"

    def parse(raw: Any) -> int:
        value = _as_int(raw, expected)
        if value < lo or (hi is not None and value > hi):
            raise _Invalid(expected)
        return value

    return parse


_port = _int_in(0, PORT_MAX)
_positive_ms = _int_in(1, what="an integer number of milliseconds")


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise _Invalid("must be a boolean (1/0, true/false, yes/no)")


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """None or a blank string means "not set" (so env can undo a file's value)."""
    def wrapped(raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        return parse(raw)

    return wrapped


def _pattern(regex: str, expected: str, lower: bool = False) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def parse(raw: Any) -> str:
        if not isinstance(raw, str):
            raise _Invalid(expected)
        text = raw.strip().lower() if lower else raw.strip()
        if not compiled.fullmatch(text):
            raise _Invalid(expected)
        return text

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    expected = "must be one of " + ", ".join(options)

    def parse(raw: Any) -> str:
        if not isinstance(raw, str) or raw.strip().lower() not in options:
            raise _Invalid(expected)
        return raw.strip().lower()

    return parse


_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*\.?")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


def _parse_bind(raw: Any) -> str:
    expected = "must be an IP address or host name to listen on, such as 0.0.0.0 or 127.0.0.1"
    if not isinstance(raw, str) or not _is_host(raw.strip()):
        raise _Invalid(expected)
    return raw.strip()


def _parse_advertise(raw: Any) -> str:
    expected = "must be an IP address or host name that peers can reach (not 0.0.0.0 or ::)"
    if not isinstance(raw, str) or not _is_host(raw.strip()):
        raise _Invalid(expected)
    text = raw.strip()
    try:
        if ipaddress.ip_address(text).is_unspecified:
            raise _Invalid(expected)
    except ValueError:
        pass
    return text


def _parse_path(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        raise _Invalid("must be a file system path")
    return os.path.abspath(os.path.expanduser(raw.strip()))


def _split(raw: Any, expected: str) -> list[str]:
    """A comma-separated string, or a list of them (a repeated flag, a TOML array)."""
    if isinstance(raw, str):
        items: Iterable[Any] = [raw]
    elif isinstance(raw, (list, tuple)):
        items = raw
    else:
        raise _Invalid(expected)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise _Invalid(expected)
        out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def _parse_join_entry(entry: str) -> str:
    expected = f"each entry must be HOST:PORT with PORT in 1..{PORT_MAX} (IPv6 as [ADDR]:PORT)"
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(expected) from None
    else:
        host, sep, port = entry.rpartition(":")
        if ":" in host or not _is_host(host):
            raise _Invalid(expected)
    if not sep or not port.isdigit() or not 1 <= int(port) <= PORT_MAX:
        raise _Invalid(expected)
    return entry


def _parse_join(raw: Any) -> tuple[str, ...]:
    expected = "must be HOST:PORT entries, comma-separated"
    out: list[str] = []
    for entry in _split(raw, expected):
        try:
            parsed = _parse_join_entry(entry)
        except _Invalid as e:
            raise _Invalid(e.expected, got=entry) from None
        if parsed not in out:
            out.append(parsed)
    if len(out) > JOIN_MAX:
        raise _Invalid(f"must have at most {JOIN_MAX} entries")
    return tuple(out)


# The one label grammar, of a node's labels and of the labels a task asks for (tasks.core):
# a value has no control character (C0, DEL, C1), no lone surrogate, no ',' or '='
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE = re.compile(r"[^\x00-\x1f\x7f-\x9f,=\ud800-\udfff]{0,128}")
LABEL_RULE = "keys like [A-Za-z0-9][A-Za-z0-9._/-]{0,62}, values up to 128 printable chars without ',' or '='"


def _parse_labels(raw: Any) -> dict[str, str]:
    expected = f"must be K=V pairs ({LABEL_RULE})"
    pairs: list[tuple[Any, Any]]
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    else:
        pairs = []
        for item in _split(raw, expected):
            key, sep, value = item.partition("=")
            if not sep:
                raise _Invalid(expected, got=item)
            pairs.append((key.strip(), value.strip()))
    out: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            raise _Invalid(f"{expected}; bad key", got=key)
        if not isinstance(value, str) or not LABEL_VALUE.fullmatch(value):
            raise _Invalid(f"{expected}; bad value for {key!r}", got=value)
        if key in out and not isinstance(raw, Mapping):
            raise _Invalid("must name each key once", got=key)
        out[key] = value
    if len(out) > LABELS_MAX:
        raise _Invalid(f"must have at most {LABELS_MAX} labels")
    return out


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size_mb(raw: Any) -> int:
    """A memory size in MiB: an int (MiB) or a string "512M", "8G", "1.5G", "2048K", "1024".

    Suffixes are binary (K = KiB, ...), case-insensitive, with optional "i"/"B" ("8GiB",
    "512MB"); "B" alone means bytes; no suffix means MiB.  Rounds down to whole MiB.
    Raises ValueError when it is not a size.
    """
    try:
        return _parse_memory(raw)
    except _Invalid as e:
        raise ValueError(e.expected) from None


def _parse_memory(raw: Any) -> int:
    expected = "must be a size > 0 such as 512M, 8G or 1.5G, or an integer number of MiB"
    if isinstance(raw, bool):
        raise _Invalid(expected)
    if isinstance(raw, int):
        mib = raw
    elif isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        mib = int(raw)
    elif isinstance(raw, str):
        m = _SIZE.fullmatch(raw.strip())
        if not m:
            raise _Invalid(expected)
        number, unit, tail = m.group(1), m.group(2).lower(), m.group(3).lower()
        if tail.startswith("i") and not unit:
            raise _Invalid(expected)            # "Gi"/"GiB" need a unit letter; "ib" alone is nothing
        if not unit and not tail:
            unit = "m"                          # a bare number is MiB, like the int form
        value = float(number) * (1 << _SIZE_SHIFT[unit])
        mib = int(value // (1 << 20))
        if 0 < value < (1 << 20):
            raise _Invalid(f"must be at least 1 MiB (sizes are whole MiB), got {raw.strip()!r:.40}")
    else:
        raise _Invalid(expected)
    if mib <= 0 or mib > (1 << 40):
        raise _Invalid(expected)
    return mib


def _parse_cpu(raw: Any) -> float:
    expected = "must be a number of cores > 0, such as 2 or 0.5"
    if isinstance(raw, bool):
        raise _Invalid(expected)
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise _Invalid(expected) from None
    else:
        raise _Invalid(expected)
    if not math.isfinite(value) or value <= 0 or value > 65536:
        raise _Invalid(expected)
    return value


def _float_in(lo: float, hi: float, what: str) -> Callable[[Any], float]:
    expected = f"must be {what} in {lo:g}..{hi:g}"

    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise _Invalid(expected)
        try:
            value = float(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            raise _Invalid(expected) from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise _Invalid(expected)
        return value

    return parse


def _parse_secret(raw: Any) -> str:
    expected = f"must be a non-empty string without whitespace, at most {SECRET_MAX_CHARS} chars"
    if not isinstance(raw, str):
        raise _Invalid(expected)
    text = raw.strip()
    if not text or len(text) > SECRET_MAX_CHARS or any(c.isspace() or not c.isprintable() for c in text):
        raise _Invalid(expected)
    return text


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "node_id": _optional(_pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}",
                                  "must be 1-63 chars of A-Z a-z 0-9 . _ - starting with a letter or digit")),
    "role": _choice(ROLES),
    "cluster": _pattern(r"[a-z0-9][a-z0-9-]{0,62}",
                        "must be 1-63 chars of a-z 0-9 - starting with a letter or digit"),
    "bind": _parse_bind,
    "advertise": _optional(_parse_advertise),
    "http_port": _port,
    "gossip_port": _port,
    "raft_port": _port,
    "broadcast_port": _port,
    "data_dir": _parse_path,
    "join": _parse_join,
    "cluster_key": _optional(_parse_secret),
    "cluster_key_file": _optional(_parse_path),
    "token": _optional(_parse_secret),
    "tls": _choice(TLS_MODES),
    "tls_cert": _optional(_parse_path),
    "tls_key": _optional(_parse_path),
    "voters": _int_in(1, 9),
    "mdns": _parse_bool,
    "broadcast": _parse_bool,
    "cpu": _optional(_parse_cpu),
    "memory_mb": _optional(_parse_memory),
    "gpu": _optional(_int_in(0, 1024)),
    "labels": _parse_labels,
    "max_nodes_per_owner": _int_in(1, 100_000),
    "admin_password": _optional(_pattern(r"[^\x00]{8,1024}", "must be 8 to 1024 characters")),
    "owner": _optional(_pattern(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}",
                                "must be an account name: 1-64 chars of A-Z a-z 0-9 . _ @ -")),
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "gossip_interval_ms": _positive_ms,
    "gossip_fanout": _int_in(1, 64),
    "dead_reap_after_ms": _positive_ms,
    "probe_interval_ms": _positive_ms,
    "probe_timeout_ms": _positive_ms,
    "indirect_checks": _int_in(0, 16),
    "suspicion_mult": _int_in(1, 100),
    "suspicion_max_mult": _int_in(1, 100),
    "retransmit_mult": _int_in(1, 64),
    "push_pull_interval_ms": _positive_ms,
    "awareness_max": _int_in(1, 64),
    "beacon_interval_ms": _positive_ms,
    "seed_retry_min_ms": _positive_ms,
    "seed_retry_max_ms": _positive_ms,
    "bootstrap_window_ms": _positive_ms,
    "voter_replace_after_ms": _positive_ms,
    "raft_min_timeout_ms": _positive_ms,
    "raft_max_timeout_ms": _positive_ms,
    "raft_heartbeat_ms": _positive_ms,
    "raft_connection_retry_ms": _positive_ms,
    "leader_lease_ms": _positive_ms,
    "raft_call_timeout_ms": _positive_ms,
    "frame_max_bytes": _int_in(512, UDP_PAYLOAD_MAX_BYTES),
    "replay_window_ms": _positive_ms,
    "http_body_max_bytes": _int_in(1024, 1 << 30),
    "tasks_per_owner_max": _int_in(1, 10_000_000),
    "transfers_pending_per_account_max": _int_in(1, 1_000_000),
    "submit_rate_per_s": _float_in(0.001, 1_000_000, "a number of submissions per second (> 0)"),
    "submit_burst": _int_in(1, 1_000_000),
    "submit_account_rate_per_s": _float_in(0.001, 1_000_000, "a number of submissions per second (> 0)"),
    "submit_account_burst": _int_in(1, 1_000_000),
    "scheduler_policy": _choice(SCHEDULER_POLICIES),
    "scheduler_settle_ms": _positive_ms,
    "worker_queue_depth": _int_in(-1, 1024, "an integer number of tasks (-1: auto, by the node's cores and task length; 0: no queue)"),
    "task_ack_timeout_ms": _positive_ms,
    "task_output_bytes_max": _int_in(1024, 1 << 30),
    "task_progress_interval_ms": _positive_ms,
    "input_bytes_max": _int_in(1024, 1 << 40),
    "task_retention_ms": _positive_ms,
    "task_default_timeout_s": _float_in(0, 7 * 24 * 3600, "a number of seconds (0 = none)"),
    "login_rate_per_min": _float_in(0.01, 1e6, "a number of attempts per minute"),
    "login_burst": _int_in(1, 1_000_000),
    "login_addr_rate_per_min": _float_in(0.01, 1e6, "a number of attempts per minute"),
    "login_addr_burst": _int_in(1, 1_000_000),
    "transfer_rate_per_s": _float_in(0.01, 1e7, "a number of transfers per second"),
    "transfer_burst": _int_in(1, 10_000_000),
    "transfer_addr_rate_per_s": _float_in(0.01, 1e7, "a number of transfers per second"),
    "transfer_addr_burst": _int_in(1, 10_000_000),
    "anonymous_read": _parse_bool,
}
assert set(_PARSERS) == set(FIELDS), "every Config field needs a parser"


# ---------------------------------------------------------------------------- cross-field rules

# (small, big, factor, strict, why): factor * small < big (or <= when not strict).
_RELATIONS: tuple[tuple[str, str, int, bool, str], ...] = (
    ("probe_timeout_ms", "probe_interval_ms", 1, True, "the indirect probes need the rest of the interval"),
    ("raft_heartbeat_ms", "raft_min_timeout_ms", 3, True, "pysyncobj asserts it"),
    ("raft_min_timeout_ms", "raft_max_timeout_ms", 1, True, ""),
    ("leader_lease_ms", "raft_min_timeout_ms", 1, True, "else two leaders may both act"),
    ("raft_heartbeat_ms", "leader_lease_ms", 1, True, "else the lease lapses between heartbeats"),
    ("seed_retry_min_ms", "seed_retry_max_ms", 1, False, ""),
)
_PORTS = ("http_port", "gossip_port", "raft_port", "broadcast_port")


def _check_relations(values: Mapping[str, Any], sources: Mapping[str, tuple[int, str]]) -> None:
    def rank(name: str) -> int:
        return sources.get(name, (_DEFAULT, ""))[0]

    def other(name: str) -> str:
        label = sources.get(name, (_DEFAULT, ""))[1]
        return f"{name} ({values[name]}{' from ' + label if label else ''})"

    def fail(name: str, expected: str) -> None:
        label = sources.get(name, (_DEFAULT, ""))[1] or None
        raise ConfigError(_bad(name, expected, values[name], label), key=name)

    for small, big, factor, strict, why in _RELATIONS:
        lhs, rhs = factor * values[small], values[big]
        if lhs < rhs or (not strict and lhs == rhs):
            continue
        note = f" ({why})" if why else ""
        if rank(big) > rank(small):
            times = f"{factor} * " if factor != 1 else ""
            cmp = "greater than" if strict else "at least"
            fail(big, f"must be {cmp} {times}{other(small)}{note}")
        else:
            per = f" / {factor}" if factor != 1 else ""
            cmp = "less than" if strict else "at most"
            fail(small, f"must be {cmp} {other(big)}{per}{note}")

    # Serving HTTPS needs a certificate and its key together, from one source of them.
    for have, lack in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if values[have] is not None and values[lack] is None:
            fail(have, f"needs {lack} too (the certificate and its private key)")
    if values["tls"] == "auto" and values["tls_cert"] is not None:
        fail("tls", "must be off when tls_cert/tls_key are given (auto makes its own certificate)")

    # One node binds each port itself (TCP and UDP alike), so two roles cannot share one.
    for i, name in enumerate(_PORTS):
        for earlier in _PORTS[:i]:
            if values[name] != 0 and values[name] == values[earlier]:
                blame, keep = (earlier, name) if rank(earlier) > rank(name) else (name, earlier)
                fail(blame, f"must differ from {other(keep)}")
