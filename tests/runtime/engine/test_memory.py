"""The engine's host-memory policy: freed heap memory reused, not page-faulted anew (glibc)."""
from __future__ import annotations

import resource

import pytest
import torch

from graphtune.runtime.engine import memory


def _faults_of_fresh_tensor(nbytes: int) -> int:
    # minor page faults of allocating and touching an nbytes tensor (after one was freed)
    x = torch.empty(nbytes // 4)
    x.fill_(1.0)
    del x
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(nbytes // 4)
    y.fill_(2.0)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del y
    return r1 - r0


@pytest.mark.skipif(memory._glibc() is None, reason="the policy is glibc's mallopt")
def test_keep_freed_memory_reuses_a_freed_64mb_block_without_page_faults():
    assert memory.keep_freed_memory() is True
    # 64 MB is 16384 pages: with glibc's defaults it is mmap'd per allocation and faults every page
    # (the best of 3: the heap's first growth past another mapping can land a block on new pages once)
    faults = min(_faults_of_fresh_tensor(64 << 20) for _ in range(3))
    assert faults < 1000, f"{faults} page faults re-allocating a freed 64 MB tensor"


def test_keep_freed_memory_is_off_with_the_flag_and_never_calls_mallopt(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("GRAPHTUNE_ENGINE_KEEP_FREED_MEMORY", "0")
    calls = []
    monkeypatch.setattr(memory, "_glibc", lambda: calls.append(1))
    assert memory.keep_freed_memory() is False
    assert calls == []


def test_keep_freed_memory_reports_false_off_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.keep_freed_memory() is False


def test_keep_freed_memory_reports_false_when_glibc_refuses_a_setting(monkeypatch):
    class Refusing:
        def mallopt(self, param: int, value: int) -> int:
            return 0 if param == memory.M_TRIM_THRESHOLD else 1

    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_glibc", lambda: Refusing())
    assert memory.keep_freed_memory() is False


def test_building_an_engine_applies_the_policy(monkeypatch):
    import graphtune
    from graphtune.models import build_model

    calls = []
    monkeypatch.setattr("graphtune.runtime.engine.engine.keep_freed_memory", lambda: calls.append(1) or True)
    graphtune.Engine(build_model("llama", "sdpa"))
    assert calls == [1]
