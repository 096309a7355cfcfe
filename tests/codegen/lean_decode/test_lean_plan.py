"""Lean planner: coverage, balance and reduction-map properties; PlanError on bad input; the
static GPU view and the ``lean-plan`` command."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphtune.cli_lean_plan import lean_plan_main
from graphtune.errors import PlanError
from graphtune.codegen.lean_decode.plan import (
    flashdecoding_splits,
    make_plan,
    parse_lengths,
    ranges_from_padding_mask,
    static_gpu_view,
)

lengths_st = st.lists(st.integers(1, 5000), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, hkv=st.integers(1, 4), tile=st.sampled_from([1, 3, 16, 64, 256, 1024]),
       workers=st.integers(1, 40))
def test_plan_covers_every_tile_once_balances_and_reduces_consistently(lengths, hkv, tile, workers):
    p = make_plan(lengths, hkv, tile, workers)
    # every key of every output covered exactly once, by consecutive segments in key order
    for o in range(p.num_outputs):
        b, h = divmod(o, hkv)
        segs = p.segments[p.output_segments[o]:p.output_segments[o + 1]]
        assert segs, f"output {o} has no segment"
        assert segs[0].key_lo == 0 and segs[-1].key_hi == lengths[b]
        for a, c in zip(segs, segs[1:]):
            assert a.key_hi == c.key_lo and a.worker < c.worker
        assert all(s.output == o and s.seq == b and s.head == h and s.key_lo < s.key_hi for s in segs)
        # reduction map: split iff several segments, each with its own contiguous partial slot
        if len(segs) > 1:
            assert o in p.split_outputs
            slots = [s.partial for s in segs]
            assert slots == list(range(slots[0], slots[0] + len(slots)))
        else:
            assert o not in p.split_outputs and segs[0].partial == -1
    assert sorted(s.partial for s in p.segments if s.partial >= 0) == list(range(p.num_partials))
    # tiles: total matches, worker ranges contiguous, loads differ by at most one tile
    assert p.total_tiles == sum(-(-n // tile) for n in lengths) * hkv
    loads = [p.worker_load(w) for w in range(workers)]
    assert sum(loads) == p.total_tiles and max(loads) - min(loads) <= 1
    for w in range(workers):
        mine = p.segments[p.worker_segments[w]:p.worker_segments[w + 1]]
        assert all(s.worker == w for s in mine)
        tiles = sum(-(-(s.key_hi - s.key_lo) // tile) if s.key_hi - s.key_lo else 0 for s in mine)
        assert tiles == loads[w]
    # segments are in global tile order: worker-major and output-major at once
    order = [(s.worker, s.output, s.key_lo) for s in p.segments]
    assert order == sorted(order) and [s.output for s in p.segments] == sorted(s.output for s in p.segments)


def test_plan_example_one_long_sequence_splits_over_workers():
    p = make_plan([1000, 10], num_kv_heads=1, tile=256, num_workers=2)
    assert p.total_tiles == 5 and [p.worker_load(w) for w in range(2)] == [3, 2]
    assert [(s.worker, s.seq, s.key_lo, s.key_hi, s.partial) for s in p.segments] == [
        (0, 0, 0, 768, 0), (1, 0, 768, 1000, 1), (1, 1, 0, 10, -1)]
    assert p.split_outputs == (0,)


def test_more_workers_than_tiles_leaves_idle_workers():
    p = make_plan([5], num_kv_heads=1, tile=4, num_workers=5)
    assert [p.worker_load(w) for w in range(5)] == [1, 1, 0, 0, 0] and p.num_partials == 2


@pytest.mark.parametrize("kwargs, words", [
    (dict(lengths=[], num_kv_heads=1, tile=4, num_workers=1), "empty"),
    (dict(lengths=[3, 0], num_kv_heads=1, tile=4, num_workers=1), "lengths[1] must be >= 1"),
    (dict(lengths=[3, -2], num_kv_heads=1, tile=4, num_workers=1), "lengths[1]"),
    (dict(lengths=[3], num_kv_heads=0, tile=4, num_workers=1), "num_kv_heads"),
    (dict(lengths=[3], num_kv_heads=1, tile=0, num_workers=1), "tile"),
    (dict(lengths=[3], num_kv_heads=1, tile=4, num_workers=0), "num_workers"),
    (dict(lengths=[3.5], num_kv_heads=1, tile=4, num_workers=1), "must be an int"),
    (dict(lengths=[3], num_kv_heads=1, tile=True, num_workers=1), "tile must be an int"),
])
def test_bad_plan_inputs_raise_plan_error_naming_the_input(kwargs, words):
    with pytest.raises(PlanError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make_plan(**kwargs)


def test_plan_accepts_numpy_and_torch_integers():
    p = make_plan([torch.tensor(7).item(), 3], 1, 2, 2)
    assert p.lengths == (7, 3)


def test_ranges_from_left_and_right_padded_masks():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert ranges_from_padding_mask(m) == ((2, 0, 0), (3, 5, 2))
    # padding on both sides, bool or float: the run [start, start + len) and nothing after it
    both = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    assert ranges_from_padding_mask(both.bool()) == ranges_from_padding_mask(both.float()) == ((1, 4), (2, 1))


@pytest.mark.parametrize("mask, words", [
    (torch.tensor([[1, 0, 1]]), "not one contiguous run"),
    (torch.tensor([[0, 0, 0], [1, 1, 1]]), r"rows \[0\] have no real key"),
    (torch.ones(2, 2, 2), r"\[B, S\]"),
])
def test_bad_padding_masks_raise_plan_error(mask, words):
    with pytest.raises(PlanError, match=words):
        ranges_from_padding_mask(mask)


def test_static_view_lean_balances_ragged_batch_better_than_fixed_split():
    lengths = [131072] + [1024] * 31
    for sms in (132, 108):
        v = static_gpu_view(lengths, 8, sms, tile=256, splits=(None, 4))
        assert v["lean_ratio"] < 1.05, v
        fa2 = v["fd"][0]
        assert fa2["splits"] == 1 and fa2["ratio"] > 10  # one CTA per (seq, head): the 128K heads straggle
        assert v["fd"][1]["ratio"] > 2.5


def test_flashdecoding_heuristic_splits_small_batches_only():
    assert flashdecoding_splits(256, 132, 512) == 1
    assert flashdecoding_splits(8, 132, 512) > 1


def test_parse_lengths_spec():
    assert parse_lengths("5, 2x3") == [5, 2, 2, 2]
    with pytest.raises(PlanError, match="bad length spec"):
        parse_lengths("5,ax3")


def test_lean_plan_command_prints_static_view(capsys):
    assert lean_plan_main(["--lengths", "131072,1024x31", "--kv-heads", "8", "--head-dim", "64", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "H100" in text and "A100" in text and "lean (stream-K)" in text and "FlashDecoding splits=1" in text
    assert "LeanPlan(B=32" in text
    assert lean_plan_main(["--gpus", "V100"]) == 2


def test_graphtune_cli_lean_plan_subcommand(capsys):
    from graphtune.cli import main

    assert main(["lean-plan", "--lengths", "131072,1024x31", "--head-dim", "64", "--splits", "0,16"]) == 0
    text = capsys.readouterr().out
    assert text.count("lean (stream-K)") == 2 and "FlashDecoding splits=16" in text
