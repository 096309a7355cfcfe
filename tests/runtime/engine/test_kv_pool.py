"""The engine's KV slot pool: first-fit ranges, coalescing, errors, and a state-machine test."""
from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from graphtune.errors import PlanError
from graphtune.runtime.engine.kv_pool import KVPool


def _pool(capacity: int = 100) -> KVPool:
    return KVPool(num_layers=2, kv_heads=3, head_dim=8, capacity=capacity)


def test_kv_pool_layout_and_views_share_storage():
    pool = _pool()
    assert pool.data.shape == (2, 2, 3, 100, 8)
    assert pool.keys(1).shape == pool.values(0).shape == (3, 100, 8)
    pool.keys(1)[:, 5] = 7.0
    pool.values(0)[:, 6] = -1.0
    assert (pool.data[1, 0, :, 5] == 7.0).all() and (pool.data[0, 1, :, 6] == -1.0).all()
    assert pool.bytes_per_token == 2 * 2 * 3 * 8 * 4
    assert KVPool(1, 1, 4, 10, dtype=torch.bfloat16).bytes_per_token == 2 * 4 * 2


def test_kv_pool_alloc_first_fit_free_and_coalesce():
    pool = _pool()
    a, b = pool.alloc(40), pool.alloc(60)
    assert (a, b) == (0, 40) and pool.used == 100 and pool.peak == 100
    assert pool.alloc(1) is None and pool.largest_free() == 0
    pool.free(a, 40)
    assert pool.used == 60 and pool.largest_free() == 40
    assert pool.alloc(30) == 0 and pool.alloc(10) == 30
    pool.free(0, 30)
    pool.free(40, 60)  # [40, 100) does not touch [0, 30): two free ranges
    assert pool.largest_free() == 60 and pool.used == 10
    pool.free(30, 10)  # fills the gap: one range again
    assert pool._free == [(0, 100)] and pool.used == 0 and pool.largest_free() == 100
    assert pool.peak == 100
    # coalescing with the previous range only, then the next only
    x, y, z = pool.alloc(10), pool.alloc(10), pool.alloc(10)
    pool.free(x, 10)
    pool.free(y, 10)
    assert pool._free == [(0, 20), (30, 70)]
    pool.free(z, 10)
    assert pool._free == [(0, 100)]
    # first fit: the lowest free range that is long enough
    r = [pool.alloc(10) for _ in range(5)]
    pool.free(r[1], 10)
    pool.free(r[3], 10)
    assert pool.alloc(15) == 50 and pool.alloc(10) == 10 and pool.alloc(10) == 30


def test_kv_pool_zero_length_reservation():
    pool = _pool(10)
    assert pool.alloc(0) is not None
    assert pool.used == 0
    assert pool.alloc(10) == 0
    # a node with nothing to store (a prompt that is entirely shared, one new token) needs 0 slots:
    # it must be reservable even when the pool is full
    assert pool.alloc(0) is not None, "alloc(0) on a full pool returned None (no room)"
    pool.free(0, 0)  # a no-op
    assert pool.used == 10


@pytest.mark.parametrize("start,n", [(-1, 5), (95, 6), (100, 1), (0, 101)])
def test_kv_pool_out_of_range_free_raises(start, n):
    pool = _pool()
    pool.alloc(100)
    with pytest.raises(PlanError, match="outside the pool"):
        pool.free(start, n)


def test_kv_pool_double_free_raises():
    pool = _pool()
    a = pool.alloc(40)
    pool.alloc(20)
    pool.free(a, 40)
    with pytest.raises(PlanError, match="double free"):
        pool.free(a, 40)
    with pytest.raises(PlanError, match="double free"):
        pool.free(10, 5)  # inside a free range
    with pytest.raises(PlanError, match="double free"):
        pool.free(30, 20)  # overlaps the end of a free range
    with pytest.raises(PlanError, match="double free"):
        pool.free(50, 20)  # overlaps the start of the free tail [60, 100)
    assert pool.used == 20
    with pytest.raises(PlanError):
        pool.alloc(-1)


def test_kv_pool_rejects_empty_shapes():
    with pytest.raises(PlanError):
        KVPool(num_layers=0, kv_heads=1, head_dim=8, capacity=10)
    with pytest.raises(PlanError):
        KVPool(num_layers=1, kv_heads=1, head_dim=8, capacity=0)


CAP = 64


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/free sequences against a model of live ranges."""

    ranges = Bundle("ranges")

    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(num_layers=1, kv_heads=1, head_dim=2, capacity=CAP)
        self.live: dict[int, int] = {}  # start -> length (non-empty live ranges)
        self.peak = 0

    def _gaps(self) -> list[tuple[int, int]]:
        gaps, pos = [], 0
        for s in sorted(self.live):
            if s > pos:
                gaps.append((pos, s - pos))
            pos = s + self.live[s]
        if pos < CAP:
            gaps.append((pos, CAP - pos))
        return gaps

    @rule(target=ranges, n=st.integers(1, 24))
    def alloc(self, n):
        expect = next((s for s, length in self._gaps() if length >= n), None)  # first fit
        got = self.pool.alloc(n)
        assert got == expect
        if got is None:
            return (-1, 0)
        for s, length in self.live.items():
            assert got + n <= s or s + length <= got, "overlapping live ranges"
        assert 0 <= got and got + n <= CAP
        self.live[got] = n
        self.peak = max(self.peak, sum(self.live.values()))
        return (got, n)

    @rule(r=consumes(ranges))
    def free(self, r):
        start, n = r
        if n == 0:
            return
        self.pool.free(start, n)
        del self.live[start]

    @rule(start=st.integers(0, CAP - 1), n=st.integers(1, 24))
    def freeing_free_slots_raises(self, start, n):
        n = min(n, CAP - start)
        if not any(start < s + length and s < start + n for s, length in self._gaps()):
            return  # only live slots: the pool cannot tell a partial free from a real one
        used = self.pool.used
        with pytest.raises(PlanError, match="double free"):
            self.pool.free(start, n)
        assert self.pool.used == used

    @invariant()
    def consistent(self):
        assert self.pool.used == sum(self.live.values())
        assert self.pool.peak == self.peak
        gaps = self._gaps()
        assert self.pool._free == gaps  # sorted and coalesced: no two free ranges touch
        assert self.pool.largest_free() == max((length for _, length in gaps), default=0)


TestKVPoolStateMachine = PoolMachine.TestCase
TestKVPoolStateMachine.settings = settings(max_examples=150, stateful_step_count=40, derandomize=True,
                                           deadline=None, database=None)
