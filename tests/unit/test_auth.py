"""Passwords, tokens, roles and rate limits (galaxy/auth.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy import auth

SECRET = b"k" * 32
T0 = 1_700_000_000_000


def test_password_hash_round_trip_and_wrong_password():
    h = auth.hash_password("correct horse", b"s" * 16)
    assert h.startswith("scrypt$") and "correct" not in h
    assert auth.verify_password("correct horse", h)
    assert not auth.verify_password("wrong horse", h)
    assert not auth.verify_password("correct horse", "garbage")
    with pytest.raises(ValueError):
        auth.check_password_rules("short")
    with pytest.raises(ValueError, match="password: is not valid Unicode") as e:
        auth.check_password_rules("caf\udce9-long-enough")
    assert "caf" not in str(e.value)                                      # never the password itself
    assert not auth.verify_password("caf\udce9-long-enough", h)            # a login with one: just wrong


def test_token_round_trip_expiry_forgery_and_other_cluster():
    token, exp = auth.issue_token(SECRET, "alice", T0, b"n" * 8)
    assert exp == T0 + auth.TOKEN_TTL_MS
    claims = auth.read_token(SECRET, token, T0 + 1)
    assert (claims.sub, claims.iat_ms) == ("alice", T0)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.read_token(SECRET, token, exp)
    with pytest.raises(auth.AuthError, match="signature"):
        auth.read_token(b"x" * 32, token, T0 + 1)
    prefix, payload, mac = token.split(".")
    forged_payload = auth._b64(auth._unb64(payload).replace(b"alice", b"admin"))
    with pytest.raises(auth.AuthError, match="signature"):
        auth.read_token(SECRET, f"{prefix}.{forged_payload}.{mac}", T0 + 1)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_string_is_refused_with_401_never_a_crash(text):
    with pytest.raises(auth.AuthError) as e:
        auth.read_token(SECRET, text, T0)
    assert e.value.status == 401


def test_roles():
    auth.require_role("admin", "operator")
    with pytest.raises(auth.AuthError) as e:
        auth.require_role("user", "admin")
    assert e.value.status == 403


def test_rate_limiter_allows_a_burst_then_the_rate_and_says_how_long_to_wait():
    rl = auth.RateLimiter(rate_per_s=2.0, burst=3, buckets_max=2)
    assert [rl.take("ip1", T0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("ip1", T0)
    assert wait == pytest.approx(0.5) and auth.retry_after_header(wait) == "1"
    assert rl.take("ip1", T0 + 500) == 0.0
    assert rl.take("ip2", T0) == 0.0 and rl.take("ip3", T0) == 0.0
    assert len(rl._buckets) == 2 and rl.refused == 1


def test_rate_limiter_charges_a_batch_its_size_at_most_a_burst():
    rl = auth.RateLimiter(rate_per_s=10.0, burst=5)
    assert rl.take("ip", T0, cost=4) == 0.0
    assert rl.take("ip", T0, cost=3) == pytest.approx(0.2)          # 1 left, 3 needed
    assert rl.take("ip", T0 + 400, cost=100) == pytest.approx(0.0)   # capped at the burst: 5 available
    assert rl.take("ip", T0 + 400, cost=0) == 0.0
