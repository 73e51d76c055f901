"""The ledger CLI (galaxy/cli_ledger.py) against a real HTTP server: make_app over the stand-in
ledger service (tests/unit/ledger_fake.py), in a thread.  Also the token file (path, mode,
keying by address, atomic replace) and that every client command sends the token.
"""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from galaxy import cli, cli_ledger
from galaxy.messages import Mint
from tests.unit.ledger_fake import ADMIN_PASSWORD, LedgerNode
from tests.unit.test_cli import served

ALICE_PW = "alice-secret-pw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("GALAXY_") or key == "NO_COLOR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "galaxy" / "token.json"


@pytest.fixture
def node() -> Iterator[tuple[LedgerNode, str]]:
    n = LedgerNode(login_burst=1000, login_addr_burst=1000)
    with served(n) as url:
        yield n, url


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str,
        stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sign_in(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], addr: str, name: str,
            password: str) -> None:
    code, out, err = run(monkeypatch, capsys, "login", name, "--addr", addr, "--password-stdin",
                         stdin=password + "\n")
    assert code == 0, err
    assert password not in out + err


def test_token_path_follows_xdg_then_home() -> None:
    assert cli_ledger.token_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/galaxy/token.json")
    assert cli_ledger.token_path({"HOME": "/home/u"}) == Path("/home/u/.config/galaxy/token.json")


def test_login_keeps_a_private_token_per_address(node: tuple[LedgerNode, str], clean_env: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    code, out, err = run(monkeypatch, capsys, "login", "admin", "--addr", addr + "/", "--password-stdin",
                         stdin=ADMIN_PASSWORD + "\r\n")
    assert code == 0, err
    assert f"as admin (admin)" in out and str(clean_env) in out
    assert stat.S_IMODE(clean_env.stat().st_mode) == 0o600
    assert stat.S_IMODE(clean_env.parent.stat().st_mode) == 0o700
    entry = json.loads(clean_env.read_text())["tokens"][addr]       # keyed by the normalized address
    assert entry["account"] == "admin" and entry["token"].startswith("gt1.")
    assert entry["token"] not in out + err and ADMIN_PASSWORD not in out + err
    assert n.ledger.authenticate(entry["token"]) == ("admin", "admin")
    # every client command sends it: _client() of any command's args carries it
    args = cli.build_parser().parse_args(["status", "--addr", addr.replace("http://", "")])
    assert cli._client(args).token == entry["token"]
    args = cli.build_parser().parse_args(["tasks", "--addr", "127.0.0.1:1"])
    assert cli._client(args).token is None
    # a second sign-in elsewhere keeps the first
    cli_ledger.save_token("http://10.1.2.3:8000", "gt1.other.x", "bob", 1)
    assert set(cli_ledger.load_tokens()) == {addr, "http://10.1.2.3:8000"}
    assert stat.S_IMODE(clean_env.stat().st_mode) == 0o600


def test_galaxy_token_env_overrides_the_file(node: tuple[LedgerNode, str], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, addr = node
    sign_in(monkeypatch, capsys, addr, "admin", ADMIN_PASSWORD)
    monkeypatch.setenv("GALAXY_API_TOKEN", "gt1.from.env")
    assert cli._client(cli.build_parser().parse_args(["members", "--addr", addr])).token == "gt1.from.env"
    code, _, err = run(monkeypatch, capsys, "balance", "admin", "--addr", addr)
    assert code == 1 and "HTTP 401" in err and "galaxy login" in err


def test_a_wrong_password_stores_nothing(node: tuple[LedgerNode, str], clean_env: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _, addr = node
    code, out, err = run(monkeypatch, capsys, "login", "admin", "--addr", addr, "--password-stdin",
                         stdin="nope-nope-nope\n")
    assert code == 1 and "wrong name or password" in err and "nope-nope-nope" not in out + err
    assert not clean_env.exists()
    code, _, err = run(monkeypatch, capsys, "login", "admin", "--addr", addr, "--password-stdin", stdin="")
    assert code == 2 and "no password" in err


def test_a_user_session_from_account_create_to_logout(node: tuple[LedgerNode, str], clean_env: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    sign_in(monkeypatch, capsys, addr, "admin", ADMIN_PASSWORD)
    for name in ("alice", "bob"):
        code, out, err = run(monkeypatch, capsys, "account", "create", name, "--addr", addr, "--password-stdin",
                             stdin=ALICE_PW + "\n")
        assert code == 0 and f"account {name} created (role user)" in out, err
    code, out, err = run(monkeypatch, capsys, "mint", "alice", "50", "--addr", addr)
    assert code == 0 and "balance now 50" in out, err

    sign_in(monkeypatch, capsys, addr, "alice", ALICE_PW)          # replaces admin's token for this address
    code, out, err = run(monkeypatch, capsys, "balance", "--addr", addr)
    assert code == 0 and "account alice (user)" in out and "50" in out, err

    code, out, err = run(monkeypatch, capsys, "transfer", "alice", "bob", "20", "--addr", addr)
    assert code == 0 and "settled: 20 from alice to bob" in out, err
    key = err.split()[2]
    assert err.startswith("idempotency key cli-") and f"--key {key}" in err
    code, out, err = run(monkeypatch, capsys, "transfer", "alice", "bob", "20", "--addr", addr, "--key", key,
                         "--wait")
    assert code == 0 and err == ""
    assert n.ledger.account("alice")["balance"] == 30 and n.ledger.account("bob")["balance"] == 20

    code, out, err = run(monkeypatch, capsys, "transfer", "alice", "bob", "31", "--addr", addr, "--json")
    assert code == 1 and json.loads(out)["state"] == "rejected"
    code, _, err = run(monkeypatch, capsys, "transfer", "bob", "alice", "1", "--addr", addr)
    assert code == 1 and "HTTP 403" in err
    code, _, err = run(monkeypatch, capsys, "mint", "alice", "1", "--addr", addr)
    assert code == 1 and "needs role admin" in err
    code, _, err = run(monkeypatch, capsys, "transfer", "alice", "bob", "0", "--addr", addr)
    assert code == 2 and "must be at least 1" in err

    code, out, err = run(monkeypatch, capsys, "history", "--addr", addr)
    assert code == 0 and "history of alice" in out and "-20" in out and "+50" in out, err
    code, out, _ = run(monkeypatch, capsys, "history", "--addr", addr, "--limit", "1", "--json")
    assert [h["amount"] for h in json.loads(out)["history"]] == [-20]

    old = cli_ledger.stored_entry(addr)["token"]
    code, out, err = run(monkeypatch, capsys, "logout", "--all", "--addr", addr)
    assert code == 0 and "revoked" in out, err
    assert cli_ledger.stored_entry(addr) is None
    with pytest.raises(Exception, match="revoked"):
        n.ledger.authenticate(old)
    code, out, _ = run(monkeypatch, capsys, "logout", "--addr", addr)
    assert code == 0 and "was not signed in" in out
    code, _, err = run(monkeypatch, capsys, "balance", "--addr", addr)
    assert code == 2 and "galaxy login" in err


def test_passwords_are_prompted_twice_for_a_new_account(node: tuple[LedgerNode, str],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    sign_in(monkeypatch, capsys, addr, "admin", ADMIN_PASSWORD)
    answers = iter(["carol-pw-1234", "carol-pw-9999"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _, err = run(monkeypatch, capsys, "account", "create", "carol", "--addr", addr)
    assert code == 2 and "differ" in err and n.ledger.account("carol") is None
    prompts: list[str] = []
    answers = iter(["carol-pw-1234", "carol-pw-1234"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": prompts.append(prompt) or next(answers))
    code, out, err = run(monkeypatch, capsys, "account", "create", "carol", "--role", "operator", "--addr", addr)
    assert code == 0 and "role operator" in out and len(prompts) == 2, err
    assert n.ledger.account("carol")["role"] == "operator"
    code, _, err = run(monkeypatch, capsys, "account", "create", "dan", "--addr", addr, "--password-stdin",
                       stdin="short\n")
    assert code == 1 and "password:" in err and "short\n" not in err


def test_a_broken_or_loose_token_file_is_replaced_private(clean_env: Path) -> None:
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text("{not json")
    os.chmod(clean_env, 0o644)
    assert cli_ledger.load_tokens() == {}
    cli_ledger.save_token("127.0.0.1:9", "gt1.a.b", "alice", 5)
    assert stat.S_IMODE(clean_env.stat().st_mode) == 0o600
    assert cli_ledger.load_tokens()["http://127.0.0.1:9"]["token"] == "gt1.a.b"
    assert [p.name for p in clean_env.parent.iterdir()] == ["token.json"]       # no temp file left
    assert cli_ledger.forget_token("http://127.0.0.1:9") and not cli_ledger.forget_token("http://127.0.0.1:9")
    assert cli_ledger.token_account("gt1.eyJzdWIiOiJib2IifQ.x") == "bob"
    assert cli_ledger.token_account("garbage") is None and cli_ledger.token_account(None) is None


# ---------------------------------------------------------------- galaxy transfer --file

PAYOUTS_CSV = """from,to,amount,idempotency_key
# march payouts
alice,bob,10
alice,carol,5,

alice,bob,10,march-bob-bonus
"""


def _people(n: LedgerNode) -> None:
    for name in ("alice", "bob", "carol"):
        n.ledger.add_account(name)
    n.ledger._apply(Mint("m", "alice", 30, "admin", 1))


def test_a_payout_file_is_sent_as_batches_and_sending_it_again_pays_nothing_twice(
        node: tuple[LedgerNode, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    _people(n)
    monkeypatch.setenv("GALAXY_API_TOKEN", n.ledger.token("alice"))
    path = tmp_path / "payouts.csv"
    path.write_text(PAYOUTS_CSV)
    code, out, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr, "--wait")
    assert code == 0, err
    assert "3 of 3 transfers sent" in out and "settled" in out and "not settled" not in out
    assert "2 idempotency key(s) derived from the file" in err
    balances = {k: n.ledger.account(k)["balance"] for k in ("alice", "bob", "carol")}
    assert balances == {"alice": 5, "bob": 20, "carol": 5}
    batches = [c for c in n.ledger.calls if c[0] == "transfer_batch"]
    assert len(batches) == 1 and batches[0][3] is True            # one request, ?wait=1
    keys = [t[3] for t in batches[0][1]]
    assert keys[2] == "march-bob-bonus" and keys[0].startswith("file-") and keys[0].endswith("-3")
    # the same file again: the same keys, nothing moves; JSON lists each line's answer
    code, out, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr, "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert [t["line"] for t in answer["transfers"]] == [3, 4, 6] and answer["unsent"] == 0
    assert {k: n.ledger.account(k)["balance"] for k in balances} == balances
    assert [t[3] for t in [c for c in n.ledger.calls if c[0] == "transfer_batch"][-1][1]] == keys
    # a changed file is another payout: new derived keys (the explicit one stays)
    path.write_text(PAYOUTS_CSV + "alice,carol,1\n")
    assert cli_ledger.read_transfers(str(path))[0][1]["idempotency_key"] != keys[0]


def test_rejections_are_listed_with_their_reasons_and_fail_the_command(
        node: tuple[LedgerNode, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    _people(n)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("GALAXY_API_TOKEN", n.ledger.token("alice"))
    monkeypatch.setattr(cli_ledger, "FILE_BATCH_MAX", 2)          # 3 lines: two requests
    path = tmp_path / "pay.jsonl"
    path.write_text('{"from": "alice", "to": "bob", "amount": 20}\n\n'
                    '{"from": "alice", "to": "carol", "amount": 20, "idempotency_key": "c-1"}\n'
                    '{"from": "alice", "to": "carol", "amount": 10}\n')
    code, out, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr)
    assert code == 1, (out, err)
    assert len([c for c in n.ledger.calls if c[0] == "transfer_batch"]) == 2
    assert "rejected" in out and "not settled" in out and "needs 20" in out
    detail = out[out.index("not settled"):]
    assert " 3 " in detail and "carol" in detail                 # the file's line 3
    assert n.ledger.account("bob")["balance"] == 20 and n.ledger.account("carol")["balance"] == 10


@pytest.mark.parametrize("text, needle", [
    ("alice,bob\n", "pay.csv:1: expected from,to,amount"),
    ("alice,bob,10\nalice,Bob,1\n", "pay.csv:2: to: an account name"),
    ("alice,bob,1.5\n", "pay.csv:1: amount"),
    ("alice,bob,0\n", "pay.csv:1: amount"),
    ("alice,bob,-3\n", "pay.csv:1: amount"),
    ("alice,bob,1," + "k" * 129 + "\n", "pay.csv:1: idempotency_key"),
    ("# nothing\n\n", "pay.csv: no transfers"),
])
def test_a_bad_file_is_refused_before_anything_is_sent(node: tuple[LedgerNode, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], text: str,
                                                       needle: str) -> None:
    n, addr = node
    monkeypatch.setenv("GALAXY_API_TOKEN", n.ledger.token("admin"))
    path = tmp_path / "pay.csv"
    path.write_text(text)
    code, _, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr)
    assert code == 2 and needle in err, err
    assert not [c for c in n.ledger.calls if c[0].startswith("transfer")]


def test_jsonl_errors_and_usage(node: tuple[LedgerNode, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _, addr = node
    cases = {'{"from": "alice", "to": "bob", "amount": true}\n': "pay.jsonl:1: amount",
             '{"from": "alice", "to": "bob"}\n': "missing field(s): amount",
             '{"from": "alice", "to": "bob", "amount": 1, "memo": "x"}\n': "unknown field(s) 'memo'",
             '[1]\n': "pay.jsonl:1: a JSON object", '{"from":\n': "pay.jsonl:1: not JSON"}
    for text, needle in cases.items():
        (tmp_path / "pay.jsonl").write_text(text)
        code, _, err = run(monkeypatch, capsys, "transfer", "--file", str(tmp_path / "pay.jsonl"), "--addr", addr)
        assert code == 2 and needle in err, (text, err)
    code, _, err = run(monkeypatch, capsys, "transfer", "--file", str(tmp_path / "pay.txt"), "--addr", addr)
    assert code == 2 and ".csv or .jsonl" in err
    code, _, err = run(monkeypatch, capsys, "transfer", "alice", "bob", "1", "--file", str(tmp_path / "p.csv"),
                       "--addr", addr)
    assert code == 2 and "--file takes the transfers from the file" in err
    code, _, err = run(monkeypatch, capsys, "transfer", "alice", "--addr", addr)
    assert code == 2 and "galaxy transfer FROM TO AMOUNT" in err


def test_a_batch_refused_for_load_is_sent_again_and_a_forbidden_line_is_named(
        node: tuple[LedgerNode, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    n, addr = node
    _people(n)
    monkeypatch.setenv("GALAXY_API_TOKEN", n.ledger.token("alice"))
    path = tmp_path / "pay.csv"
    path.write_text("alice,bob,1\nalice,bob,2\n")
    n.ledger.overloaded = True
    sleeps: list[float] = []
    monkeypatch.setattr(cli_ledger.time, "sleep", lambda s: (sleeps.append(s), setattr(n.ledger, "overloaded", False)))
    code, out, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr)
    assert code == 0 and sleeps == [0.5] and n.ledger.account("bob")["balance"] == 3, err
    path.write_text("alice,bob,1,x1\n\nbob,alice,1,x2\n")
    code, out, err = run(monkeypatch, capsys, "transfer", "--file", str(path), "--addr", addr)
    assert code == 1 and "line 3.from" in err and "HTTP 403" in err and "not sent" in err, err
