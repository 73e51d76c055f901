"""Fixtures for multi-host tests in network namespaces (see tests/netlab.py).

Without root or iproute2 these tests are skipped — unless CI=true, where they must run,
so the missing prerequisite fails the run with a message saying what to install.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests import netlab as netlab_mod
from tests.netlab import NetLab


def _require_lab() -> None:
    reason = netlab_mod.available()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so the netns tests must run "
                    "(run as root with iproute2, nftables and iptables installed)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def netlab() -> Iterator[Callable[..., NetLab]]:
    """Factory: ``lab = netlab(3)`` builds a 3-host lab, torn down after the test."""
    _require_lab()
    labs: list[NetLab] = []

    def make(n: int, subnet: int | None = None) -> NetLab:
        lab = NetLab(n, subnet=subnet)
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(labs):
            try:
                lab.close()
            except BaseException as exc:        # close the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]
