"""AttentionArgs (the named attention argument record), softmax_scale, and the symbolic-size helpers."""
import dataclasses
import inspect
import math
import pickle

import pytest
import torch

from graphtune.ir import AttentionArgs
from graphtune.ir.args import softmax_scale
from graphtune.ir.sizes import shape_compat, shape_eq, size_compat, size_eq

_SCHEMA = ("q", "k", "v", "attn_mask", "is_causal", "scale", "enable_gqa")
_DEFAULTS = (None, False, None, False)


def _full_args():
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    return (q, k, k.clone(), torch.ones(3, 5, dtype=torch.bool), True, 0.5, True)


def test_fields_follow_the_op_schema():
    assert tuple(f.name for f in dataclasses.fields(AttentionArgs)) == _SCHEMA
    schema = torch.ops.graphtune.attention.default._schema
    assert tuple(a.name for a in schema.arguments) == _SCHEMA
    params = list(inspect.signature(AttentionArgs).parameters.values())
    assert [p.name for p in params] == list(_SCHEMA)
    assert tuple(p.default for p in params[3:]) == _DEFAULTS


@pytest.mark.parametrize("n", range(3, 8))
def test_of_round_trips_op_tuples_of_every_length(n):
    full = _full_args()
    a = AttentionArgs.of(full[:n])
    got = a.op_args()
    assert len(got) == 7
    assert all(x is y for x, y in zip(got[:n], full[:n]))  # the given ones, the very objects
    assert got[n:] == _DEFAULTS[n - 3:]  # the schema's defaults for the rest
    assert all(x is y for x, y in zip(AttentionArgs.of(got).op_args(), got))


def test_of_takes_keywords_a_mapping_a_list_and_a_record():
    q, k, v, m, c, s, g = _full_args()
    by_kw = AttentionArgs.of(q=q, k=k, v=v, is_causal=c)
    assert by_kw.is_causal is True and by_kw.attn_mask is None and by_kw.scale is None
    mixed = AttentionArgs.of((q, k, v), scale=s, enable_gqa=g)
    assert (mixed.scale, mixed.enable_gqa, mixed.is_causal) == (s, g, False)
    assert AttentionArgs.of({"q": q, "k": k, "v": v, "attn_mask": m}).attn_mask is m
    assert AttentionArgs.of([q, k, v, m]).attn_mask is m
    assert AttentionArgs.of(mixed) is mixed


def test_the_causal_flag_is_named_is_causal():
    a = AttentionArgs.of(_full_args())
    assert a.is_causal is True
    assert not hasattr(a, "causal")
    with pytest.raises(TypeError):
        AttentionArgs.of(_full_args()[:3], causal=True)


def test_record_is_frozen_slotted_and_picklable():
    a = AttentionArgs.of(_full_args())
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.is_causal = False  # type: ignore[misc]
    assert not hasattr(a, "__dict__")
    b = a.replace(is_causal=False, attn_mask=None)
    assert (b.is_causal, b.attn_mask, b.q) == (False, None, a.q) and a.is_causal is True
    c = pickle.loads(pickle.dumps(a))
    assert torch.equal(c.q, a.q) and torch.equal(c.attn_mask, a.attn_mask) and c.op_args()[4:] == a.op_args()[4:]
    assert "is_causal=True" in repr(a)


def test_resolved_scale_is_sdpas_default():
    q = torch.randn(2, 3, 4, 24)
    assert AttentionArgs.of((q, q, q)).resolved_scale == 1.0 / math.sqrt(24)
    assert AttentionArgs.of((q, q, q, None, False, 0.125)).resolved_scale == 0.125
    assert AttentionArgs.of((q, q, q, None, False, 0.0)).resolved_scale == 0.0  # 0 is a scale, not "unset"
    assert softmax_scale(None, 64) == 0.125 and softmax_scale(2.0, 64) == 2.0
    # the default is what SDPA applies
    k, v = torch.randn(2, 3, 5, 24), torch.randn(2, 3, 5, 24)
    a = AttentionArgs.of((q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=a.resolved_scale)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_resolved_scale_of_meta_tensors():
    q = torch.empty(1, 2, 3, 128, device="meta")
    assert AttentionArgs.of((q, q, q)).resolved_scale == 1.0 / math.sqrt(128)


def test_mask_kind():
    q = torch.randn(1, 1, 2, 4)
    assert AttentionArgs.of((q, q, q)).mask_kind == "none"
    assert AttentionArgs.of((q, q, q, torch.ones(2, 2, dtype=torch.bool))).mask_kind == "bool"
    assert AttentionArgs.of((q, q, q, torch.zeros(2, 2))).mask_kind == "additive"


def test_symbolic_size_helpers():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert size_eq(3, 3) and not size_eq(3, 4) and size_compat(3, 3) and not size_compat(3, 4)
    assert shape_eq((1, 2), (1, 2)) and not shape_eq((1, 2), (1, 2, 3)) and shape_compat((1, 2), (1, 2))
    env = ShapeEnv()
    s0 = env.create_unbacked_symint()
    s1 = env.create_unbacked_symint()
    # unknown symbols: not known equal, not known different; nothing is guarded
    assert not size_eq(s0, s1) and size_compat(s0, s1)
    assert size_eq(s0, s0) and size_compat(s0 + 1, s0 + 1) and not size_compat(s0 + 1, s0)
    assert not env.guards
