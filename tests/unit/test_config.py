"""Config: defaults, precedence, parsing, validation messages, example files."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import pytest

from galaxy.config import (
    FIELDS,
    Config,
    ConfigError,
    default_data_dir,
    load,
    parse_size_mb,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SOURCE = Path(__file__).resolve().parents[2] / "galaxy" / "config.py"


def write(tmp_path: Path, text: str, name: str = "galaxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- defaults and profiles


def test_lan_defaults_match_the_field_table():
    c = Config.lan()
    assert (c.node_id, c.role, c.cluster, c.bind, c.advertise) == (None, "auto", "galaxy", "0.0.0.0", None)
    assert (c.http_port, c.gossip_port, c.raft_port, c.broadcast_port) == (8000, 7946, 7947, 37021)
    assert c.join == () and c.labels == {} and c.voters == 3 and c.mdns and c.broadcast
    assert (c.cluster_key, c.cluster_key_file, c.token, c.owner) == (None, None, None, None)
    assert (c.cpu, c.memory_mb, c.gpu) == (None, None, None)
    assert (c.log_format, c.log_level) == ("text", "info")
    assert (c.gossip_interval_ms, c.gossip_fanout) == (200, 3)
    assert (c.dead_reap_after_ms, c.beacon_interval_ms) == (3_600_000, 1000)
    assert (c.seed_retry_min_ms, c.seed_retry_max_ms, c.bootstrap_window_ms) == (200, 10_000, 2500)
    assert c.voter_replace_after_ms == 30_000
    assert (c.raft_min_timeout_ms, c.raft_max_timeout_ms, c.raft_heartbeat_ms) == (300, 600, 50)
    assert (c.raft_connection_retry_ms, c.leader_lease_ms, c.raft_call_timeout_ms) == (500, 150, 2000)
    assert (c.frame_max_bytes, c.replay_window_ms, c.http_body_max_bytes) == (65_000, 30_000, 1_048_576)


def test_every_field_has_a_one_line_reason():
    text = SOURCE.read_text()
    for name in FIELDS:
        line = next(l for l in text.splitlines() if re.match(rf"    {name}: [^=(]+ = ", l))
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, name


def test_local_and_sim_profiles():
    local = Config.local()
    assert local.gossip_interval_ms == 100
    assert (local.beacon_interval_ms, local.bootstrap_window_ms, local.voter_replace_after_ms) == (500, 1000, 10_000)
    assert local.raft_min_timeout_ms == Config.lan().raft_min_timeout_ms
    assert Config.sim() == local


def test_frozen_slotted_and_hashable():
    c = Config.lan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.http_port = 1  # type: ignore[misc]
    assert not hasattr(c, "__dict__")
    assert hash(c) == hash(Config.lan())
    labelled = Config(labels={"zone": "a"}, join=("a:1",))
    assert pickle.loads(pickle.dumps(labelled)) == labelled   # configs cross into subprocesses


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"^probe_timeout_ms: must be less than probe_interval_ms \(150\) "
                                          r"\(the indirect probes need the rest of the interval\), got 200$"):
        dataclasses.replace(Config.local(), probe_interval_ms=150)
    with pytest.raises(ConfigError, match=r"^http_port: "):
        Config(http_port=70000)
    c = Config(join=["a:1"], memory_mb="1G")  # type: ignore[arg-type]
    assert c.join == ("a:1",) and c.memory_mb == 1024


def test_redacted_hides_secrets():
    c = Config(cluster_key="s3cret", token="tok", join=("a:1",), labels={"k": "v"})
    r = c.redacted()
    assert r["cluster_key"] == "***" and r["token"] == "***"
    assert r["join"] == ["a:1"] and r["labels"] == {"k": "v"} and r["http_port"] == 8000
    assert "s3cret" not in repr(r) and set(r) == set(FIELDS)
    assert Config.lan().redacted()["cluster_key"] is None


def test_default_data_dir(monkeypatch):
    assert default_data_dir({"XDG_DATA_HOME": "/xdg", "HOME": "/h"}) == "/xdg/galaxy"
    assert default_data_dir({"XDG_DATA_HOME": "relative", "HOME": "/h"}) == "/h/.local/share/galaxy"
    assert default_data_dir({"XDG_DATA_HOME": "", "HOME": "/h"}) == "/h/.local/share/galaxy"
    monkeypatch.setenv("XDG_DATA_HOME", "/from-process")
    assert default_data_dir({}) == "/from-process/galaxy"
    assert Config.lan().data_dir == "/from-process/galaxy"
    assert load({}, {"XDG_DATA_HOME": "/given"}).data_dir == "/given/galaxy"


# ---------------------------------------------------------------- precedence

# (field, file value (TOML literal), env value, flag value, expected from each layer)
PRECEDENCE = [
    ("http_port", "8001", "8002", 8003, (8000, 8001, 8002, 8003)),
    ("cluster", '"filec"', "envc", "flagc", ("galaxy", "filec", "envc", "flagc")),
    ("mdns", "false", "1", False, (True, False, True, False)),
    ("cpu", "1.5", "2", "2.5", (None, 1.5, 2.0, 2.5)),
    ("memory_mb", '"1G"', "512M", 256, (None, 1024, 512, 256)),
    ("join", '["f:1"]', "e:1,e:2", ["g:1"], ((), ("f:1",), ("e:1", "e:2"), ("g:1",))),
    ("labels", '{a = "f"}', "a=e,b=e", ["a=g"], ({}, {"a": "f"}, {"a": "e", "b": "e"}, {"a": "g"})),
    ("node_id", '"n-file"', "n-env", "n-flag", (None, "n-file", "n-env", "n-flag")),
    ("voters", "5", "1", 7, (3, 5, 1, 7)),
    ("gossip_interval_ms", "300", "400", 500, (200, 300, 400, 500)),
]


@pytest.mark.parametrize("name,file_value,env_value,flag_value,expected", PRECEDENCE, ids=[p[0] for p in PRECEDENCE])
def test_flag_beats_env_beats_file_beats_default(tmp_path, name, file_value, env_value, flag_value, expected):
    path = write(tmp_path, f"{name} = {file_value}\n")
    env = {f"GALAXY_{name.upper()}": env_value}
    flags = {name: flag_value}
    assert getattr(load({}, {}), name) == expected[0]
    assert getattr(load({}, {}, path), name) == expected[1]
    assert getattr(load({}, env, path), name) == expected[2]
    assert getattr(load(flags, env, path), name) == expected[3]
    assert getattr(load(flags, {}, None), name) == expected[3]


def test_layers_combine_field_by_field(tmp_path):
    path = write(tmp_path, 'http_port = 9001\ncluster = "a"\nvoters = 5\n')
    c = load({"http_port": 9003}, {"GALAXY_CLUSTER": "b"}, path)
    assert (c.http_port, c.cluster, c.voters) == (9003, "b", 5)


def test_base_is_the_lowest_layer():
    c = load({"gossip_interval_ms": 150}, {}, None, base=Config.local())
    assert c.gossip_interval_ms == 150 and c.beacon_interval_ms == 500


def test_config_file_from_env_or_flag(tmp_path):
    a = write(tmp_path, "http_port = 1111\n", "a.toml")
    b = write(tmp_path, "http_port = 2222\n", "b.toml")
    assert load({}, {"GALAXY_CONFIG": a}).http_port == 1111
    assert load({"config": b}, {"GALAXY_CONFIG": a}).http_port == 2222
    assert load({}, {"GALAXY_CONFIG": a}, b).http_port == 2222


def test_none_flags_and_store_false_negations_are_not_given():
    c = load({"http_port": None, "no_mdns": False, "no_broadcast": True}, {"GALAXY_MDNS": "0"})
    assert c.http_port == 8000 and c.mdns is False and c.broadcast is False


def test_no_mdns_flag_arrives_as_false():
    assert load({"mdns": False}, {}).mdns is False
    assert load({"mdns": False, "broadcast": False}, {"GALAXY_MDNS": "yes"}).broadcast is False


def test_blank_env_unsets_an_optional_value(tmp_path):
    path = write(tmp_path, 'advertise = "10.77.0.9"\ncpu = 2\n')
    c = load({}, {"GALAXY_ADVERTISE": "", "GALAXY_CPU": " "}, path)
    assert c.advertise is None and c.cpu is None


def test_cluster_key_and_key_file_are_one_setting(tmp_path):
    path = write(tmp_path, 'cluster_key = "k-from-file"\n')
    c = load({"cluster_key_file": "/etc/galaxy/key"}, {}, path)
    assert c.cluster_key is None and c.cluster_key_file == "/etc/galaxy/key"
    c = load({"cluster_key": "k-flag"}, {"GALAXY_CLUSTER_KEY_FILE": "/k"}, None)
    assert c.cluster_key == "k-flag" and c.cluster_key_file is None
    with pytest.raises(ConfigError, match=r"^cluster_key: .*not both.*GALAXY_CLUSTER_KEY_FILE"):
        load({}, {"GALAXY_CLUSTER_KEY": "k", "GALAXY_CLUSTER_KEY_FILE": "/k"})


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("text,mib", [
    ("512M", 512), ("8G", 8192), ("1.5G", 1536), ("2048K", 2), ("1024", 1024), (" 2g ", 2048),
    ("512MB", 512), ("512MiB", 512), ("8Gi", 8192), ("1T", 1 << 20), ("1048576B", 1), (".5G", 512),
    (300, 300), ("3072k", 3),
])
def test_size_parsing(text, mib):
    assert parse_size_mb(text) == mib
    assert load({"memory_mb": text}, {}).memory_mb == mib
    assert load({}, {"GALAXY_MEMORY_MB": str(text)}).memory_mb == mib


@pytest.mark.parametrize("text", ["", "abc", "0", "-1G", "1X", "512K", "1.2.3G", "G", "8 G B", "ib", True, 1.5])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size_mb(text)


@pytest.mark.parametrize("text", ["0.5M", "512K", "1023k"])
def test_a_size_under_one_mib_says_so(text):
    with pytest.raises(ValueError, match=r"must be at least 1 MiB \(sizes are whole MiB\)"):
        parse_size_mb(text)


def test_memory_flag_alias_and_error_names_the_flag():
    assert load({"memory": "8G"}, {}).memory_mb == 8192
    with pytest.raises(ConfigError, match=r"^memory_mb: must be a size .*got 'lots' \(from --memory\)$"):
        load({"memory": "lots"}, {})


def test_join_parsing():
    assert load({}, {"GALAXY_JOIN": " a:1 , b.example:7946,,10.77.0.2:7946,a:1 "}).join == (
        "a:1", "b.example:7946", "10.77.0.2:7946")
    assert load({"join": ["[::1]:7946", "c:2,d:3"]}, {}).join == ("[::1]:7946", "c:2", "d:3")
    assert load({}, {"GALAXY_JOIN": ""}).join == ()
    for bad in ["a", "a:", "a:0", "a:70000", ":7946", "::1:7946", "[zz]:1", "a b:1", "a:x"]:
        with pytest.raises(ConfigError, match=rf"^join: .*got {re.escape(repr(bad))} \(from GALAXY_JOIN\)$"):
            load({}, {"GALAXY_JOIN": f"ok:1,{bad}"})


def test_labels_parsing(tmp_path):
    assert load({}, {"GALAXY_LABELS": "zone=a, gpu.model=a100 ,empty="}).labels == {
        "zone": "a", "gpu.model": "a100", "empty": ""}
    assert load({"label": ["a=1", "b=2,c=3"]}, {}).labels == {"a": "1", "b": "2", "c": "3"}
    path = write(tmp_path, '[labels]\nzone = "dc1"\n"kubernetes.io/arch" = "amd64"\n')
    assert load({}, {}, path).labels == {"zone": "dc1", "kubernetes.io/arch": "amd64"}
    for bad in ["novalue", "=v", "-k=v", "k=v,k=w", "k=a\x01b"]:
        with pytest.raises(ConfigError, match=r"^labels: .*\(from GALAXY_LABELS\)$"):
            load({}, {"GALAXY_LABELS": bad})
    with pytest.raises(ConfigError, match=r"^labels: .*at most 64"):
        load({"labels": {f"k{i}": "v" for i in range(65)}}, {})


@pytest.mark.parametrize("text,value", [("1", True), ("0", False), ("true", True), ("FALSE", False),
                                        ("yes", True), ("no", False), ("on", True), ("off", False)])
def test_env_bools(text, value):
    assert load({}, {"GALAXY_BROADCAST": text}).broadcast is value


def test_strings_are_normalised():
    c = load({"role": " Worker ", "log_format": "JSON", "log_level": "DEBUG", "http_port": " 81 "}, {})
    assert (c.role, c.log_format, c.log_level, c.http_port) == ("worker", "json", "debug", 81)


def test_paths_are_expanded(tmp_path):
    c = load({"data_dir": "~/g", "cluster_key_file": "rel/key"}, {"HOME": "/h"})
    assert c.data_dir == os.path.expanduser("~/g") and os.path.isabs(c.cluster_key_file)


def test_port_zero_means_pick_free_and_may_repeat():
    c = load({"http_port": 0, "gossip_port": 0, "raft_port": 0, "broadcast_port": 0}, {})
    assert (c.http_port, c.gossip_port, c.raft_port, c.broadcast_port) == (0, 0, 0, 0)


# ---------------------------------------------------------------- validation: one line naming the key

# (flag key, bad value, expected message fragment)
BAD_FLAGS = [
    ("http_port", "abc", "must be an integer in 0..65535"),
    ("gossip_port", -1, "must be an integer in 0..65535"),
    ("raft_port", 65536, "must be an integer in 0..65535"),
    ("broadcast_port", True, "must be an integer in 0..65535"),
    ("http_port", 80.0, "must be an integer in 0..65535"),
    ("role", "leader", "must be one of auto, coordinator, standby, worker"),
    ("cluster", "Galaxy", "must be 1-63 chars of a-z 0-9 -"),
    ("cluster", "-x", "must be 1-63 chars"),
    ("cluster", "a" * 64, "must be 1-63 chars"),
    ("cluster", "", "must be 1-63 chars"),
    ("node_id", "bad id", "must be 1-63 chars"),
    ("node_id", ".hidden", "must be 1-63 chars"),
    ("voters", 0, "must be an integer in 1..9"),
    ("voters", 10, "must be an integer in 1..9"),
    ("cpu", 0, "must be a number of cores > 0"),
    ("cpu", "nan", "must be a number of cores > 0"),
    ("memory_mb", 0, "must be a size > 0"),
    ("gpu", -1, "must be an integer in 0..1024"),
    ("log_format", "xml", "must be one of text, json"),
    ("log_level", "loud", "must be one of debug, info"),
    ("bind", "not a host!", "must be an IP address or host name"),
    ("advertise", "0.0.0.0", "must be an IP address or host name that peers can reach"),
    ("owner", "a b", "must be an account name"),
    ("token", "has space", "must be a non-empty string without whitespace"),
    ("mdns", "maybe", "must be a boolean"),
    ("gossip_interval_ms", 0, "must be an integer number of milliseconds > 0"),
    ("dead_reap_after_ms", -5, "must be an integer number of milliseconds > 0"),
    ("gossip_fanout", 0, "must be an integer in 1..64"),
    ("frame_max_bytes", 70_000, "must be an integer in 512..65507"),
    ("http_body_max_bytes", 10, "must be an integer in 1024..1073741824"),
    ("data_dir", "", "must be a file system path"),
]


@pytest.mark.parametrize("key,value,fragment", BAD_FLAGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_FLAGS])
def test_bad_flag_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        load({key: value}, {})
    message = str(err.value)
    assert message.startswith(f"{key}: {fragment}"), message
    flag = "--memory" if key == "memory_mb" else f"--{key.replace('_', '-')}"
    assert message.endswith(f"(from {flag})"), message
    assert "\n" not in message and err.value.key == key


def test_the_documented_example_message():
    with pytest.raises(ConfigError) as err:
        load({}, {"GALAXY_HTTP_PORT": "abc"})
    assert str(err.value) == "http_port: must be an integer in 0..65535, got 'abc' (from GALAXY_HTTP_PORT)"


def test_file_values_name_the_file(tmp_path):
    path = write(tmp_path, 'http_port = "abc"\n')
    with pytest.raises(ConfigError, match=rf"^http_port: .*got 'abc' \(from {re.escape(path)}\)$"):
        load({}, {}, path)
    path = write(tmp_path, "mdns = 3\n")
    with pytest.raises(ConfigError, match=r"^mdns: must be a boolean"):
        load({}, {}, path)


def test_secrets_never_appear_in_errors():
    with pytest.raises(ConfigError) as err:
        load({}, {"GALAXY_CLUSTER_KEY": "top secret"})
    assert "top secret" not in str(err.value) and str(err.value).startswith("cluster_key: ")


# (overrides, key blamed, fragment): the key the user set is blamed, naming the other one.
BAD_RELATIONS = [
    ({"probe_timeout_ms": 400}, "probe_timeout_ms", "must be less than probe_interval_ms (400)"),
    ({"probe_interval_ms": 200}, "probe_interval_ms", "must be greater than probe_timeout_ms (200)"),
    ({"raft_heartbeat_ms": 100}, "raft_heartbeat_ms", "must be less than raft_min_timeout_ms (300) / 3"),
    ({"raft_min_timeout_ms": 150}, "raft_min_timeout_ms", "must be greater than 3 * raft_heartbeat_ms (50)"),
    ({"raft_max_timeout_ms": 300}, "raft_max_timeout_ms", "must be greater than raft_min_timeout_ms (300)"),
    ({"raft_min_timeout_ms": 600}, "raft_min_timeout_ms", "must be less than raft_max_timeout_ms (600)"),
    ({"leader_lease_ms": 300}, "leader_lease_ms", "must be less than raft_min_timeout_ms (300)"),
    ({"leader_lease_ms": 50}, "leader_lease_ms", "must be greater than raft_heartbeat_ms (50)"),
    ({"seed_retry_min_ms": 20_000}, "seed_retry_min_ms", "must be at most seed_retry_max_ms (10000)"),
    ({"raft_port": 7946}, "raft_port", "must differ from gossip_port (7946)"),
    ({"http_port": 37021}, "http_port", "must differ from broadcast_port (37021)"),
]


@pytest.mark.parametrize("flags,key,fragment", BAD_RELATIONS, ids=[k for _, k, _ in BAD_RELATIONS])
def test_inconsistent_settings_name_the_key_the_user_set(flags, key, fragment):
    with pytest.raises(ConfigError) as err:
        load(flags, {})
    assert str(err.value).startswith(f"{key}: {fragment}"), str(err.value)
    assert err.value.key == key


def test_relation_names_the_other_keys_source(tmp_path):
    path = write(tmp_path, "raft_max_timeout_ms = 1000\n")
    with pytest.raises(ConfigError) as err:
        load({}, {"GALAXY_RAFT_MIN_TIMEOUT_MS": "1500"}, path)
    assert str(err.value) == (f"raft_min_timeout_ms: must be less than raft_max_timeout_ms (1000 from {path}), "
                              "got 1500 (from GALAXY_RAFT_MIN_TIMEOUT_MS)")


def test_consistent_changes_together_are_fine():
    c = load({"raft_heartbeat_ms": 100, "leader_lease_ms": 250, "raft_min_timeout_ms": 400,
              "raft_max_timeout_ms": 800}, {})
    assert c.raft_heartbeat_ms == 100


# ---------------------------------------------------------------- unknown keys


def test_unknown_toml_keys_are_named(tmp_path):
    path = write(tmp_path, 'memory = "8G"\nhttp_port = 1\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load({}, {}, path)
    message = str(err.value)
    assert message == f"memory, bogus: not Galaxy settings (unknown keys in {path}; memory: did you mean memory_mb?)"


def test_unknown_toml_table_is_named(tmp_path):
    path = write(tmp_path, "[gossip]\ninterval_ms = 100\n")
    with pytest.raises(ConfigError, match=r"^gossip: not a Galaxy setting"):
        load({}, {}, path)


def test_unknown_env_vars_are_named():
    with pytest.raises(ConfigError, match=r"^GALAXY_HTTP_PROT: not a Galaxy setting \(did you mean GALAXY_HTTP_PORT\?\)$"):
        load({}, {"GALAXY_HTTP_PROT": "1"})
    with pytest.raises(ConfigError, match=r"^GALAXY_NO_MDNS: .*GALAXY_MDNS=0"):
        load({}, {"GALAXY_NO_MDNS": "1"})
    with pytest.raises(ConfigError, match=r"^GALAXY_MEMORY: .*\(use GALAXY_MEMORY_MB\)$"):
        load({}, {"GALAXY_MEMORY": "8G"})
    with pytest.raises(ConfigError, match=r"^GALAXY_GOSSIP_INTERVAL: .*did you mean GALAXY_GOSSIP_INTERVAL_MS"):
        load({}, {"GALAXY_GOSSIP_INTERVAL": "100"})
    with pytest.raises(ConfigError, match=r"^GALAXY_ELECTION_DELAY_MS: not a Galaxy setting$"):
        load({}, {"GALAXY_ELECTION_DELAY_MS": "100"})


def test_non_config_env_vars_are_ignored():
    env = {"GALAXY_ADDR": "http://x:1", "GALAXY_SIM_SEEDS": "5", "GALAXY_API_TOKEN": "gt1.a.b",
           "GALAXY_TEST_ANYTHING": "1", "GALAXY_BENCH_N": "2", "PATH": "/bin", "galaxy_http_port": "x",
           "GALAXY_SAFETY_ROUNDS": "3", "GALAXY_PROFILE": "dev", "GALAXY_CONFIG": ""}
    assert load({}, env) == load({}, {})


def test_the_admin_password_comes_from_the_env_and_is_never_shown():
    cfg = load({}, {"GALAXY_ADMIN_PASSWORD": "first-admin-pw"})
    assert cfg.admin_password == "first-admin-pw"
    assert "first-admin-pw" not in repr(cfg.redacted())


def test_unknown_flags_are_named():
    with pytest.raises(ConfigError, match=r"^http_prot: unknown flag setting \(did you mean http_port\?\)$"):
        load({"http_prot": 1}, {})


def test_missing_and_broken_files(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=rf"^config: cannot read {re.escape(missing)}: no such file$"):
        load({}, {}, missing)
    with pytest.raises(ConfigError, match=r"\(from GALAXY_CONFIG\)$"):
        load({}, {"GALAXY_CONFIG": missing})
    broken = write(tmp_path, "http_port = \n", "broken.toml")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(broken)} is not valid TOML: .*line 1"):
        load({}, {}, broken)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"^config: .* is not UTF-8"):
        load({}, {}, str(binary))
    with pytest.raises(ConfigError, match=r"^config: cannot read"):
        load({}, {}, str(tmp_path))


# ---------------------------------------------------------------- example files


@pytest.mark.parametrize("name", ["lan.toml", "dev.toml", "production.toml"])
def test_example_files_load(name):
    c = load({}, {}, str(CONFIGS / name))
    assert isinstance(c, Config)


@pytest.mark.parametrize("name", ["lan.toml", "dev.toml", "production.toml"])
def test_commented_out_examples_load_too(tmp_path, name):
    text = (CONFIGS / name).read_text()
    uncommented = re.sub(r"(?m)^# ?(?=[a-z_]+ = )", "", text)
    assert uncommented != text or name == "dev.toml"
    load({}, {}, write(tmp_path, uncommented))


def test_example_files_say_what_they_promise():
    dev = load({}, {}, str(CONFIGS / "dev.toml"))
    local = Config.local()
    assert not dev.mdns and not dev.broadcast and dev.bind == "127.0.0.1"
    assert all(getattr(dev, f) == getattr(local, f) for f in FIELDS if f.endswith("_ms"))
    prod = load({}, {}, str(CONFIGS / "production.toml"))
    assert prod.voters == 5 and prod.cluster_key_file and prod.cluster_key is None
    assert prod.cpu and prod.memory_mb and prod.gpu is not None
    assert 0 not in (prod.http_port, prod.gossip_port, prod.raft_port, prod.broadcast_port)
