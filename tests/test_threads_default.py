"""Ranks sharing one host split its cores by default; --threads overrides (runtime/threads.py)."""

import pytest

from prism_trt.runtime import threads
from prism_trt.runtime.group import GroupConfig


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv(threads.LOCAL_WORLD_SIZE_ENV, raising=False)

    def set_cores(count: int):
        monkeypatch.setattr(threads, "usable_cores", lambda: count)

    return set_cores


def test_ranks_on_loopback_split_the_cores(cores):
    cores(8)
    assert threads.default_threads(GroupConfig(0, 2)) == 4
    assert threads.default_threads(GroupConfig(1, 3)) == 2
    cores(2)
    assert threads.default_threads(GroupConfig(0, 3)) == 1  # never fewer than one


def test_one_rank_per_board_keeps_the_backends_default(cores):
    cores(8)
    assert threads.default_threads(GroupConfig(0, 1)) is None
    assert threads.default_threads(GroupConfig(1, 2, "192.0.2.1", token="t")) is None


def test_torchrun_says_how_many_ranks_share_the_host(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv(threads.LOCAL_WORLD_SIZE_ENV, "2")
    assert threads.default_threads(GroupConfig(0, 4, "192.0.2.1", token="t")) == 4
    monkeypatch.setenv(threads.LOCAL_WORLD_SIZE_ENV, "junk")
    assert threads.default_threads(GroupConfig(0, 4)) == 2  # loopback: all four here
