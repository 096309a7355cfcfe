"""The PBS family's tuning key (:class:`PBSShape`, :func:`pbs_key`, :func:`parse_pbs_shape`) and its
declaration: the family is discovered, its CPU implementation is registered, and the tuner checks
it against the declared reference on ``PBSShape.examples()`` (and rejects a wrong candidate)."""
import pytest
import torch

from graphtune.codegen.pbs_attention.key import PBS_OP, PBSShape, parse_pbs_shape, pbs_key
from graphtune.codegen.pbs_attention.plan import PBSConfig
from graphtune.codegen.tuning_key import ShapeKey
from graphtune.errors import OptionError, PlanError, ShapeError


def test_pbs_key_buckets_queries_and_keys_and_names_the_exact_part():
    k = pbs_key(3, 9, 3, 64, 600, 1000, 64, 256, torch.bfloat16)
    assert k == ShapeKey(PBS_OP, "b4_h9_kvh3_d64_blk64_seg256_bfloat16", 1024, 1024)
    assert pbs_key(1, 8, 2, 32, 129, 4096, 128, 256, "fp16") == \
        ShapeKey("pbs_attention", "b1_h8_kvh2_d32_blk128_seg256_float16", 256, 4096)
    # block and segment are part of the exact key: a plan with other tiles is another kernel problem
    assert pbs_key(1, 8, 2, 32, 512, 512, 64, 256, "float32") != pbs_key(1, 8, 2, 32, 512, 512, 64, 128, "float32")


def test_shape_defaults_m_to_n_normalizes_the_dtype_and_keys_itself():
    s = PBSShape(2, 6, 3, 16, 700, dtype="bf16")
    assert (s.m, s.dtype, s.op) == (700, "bfloat16", "pbs_attention")
    assert s.key() == pbs_key(2, 6, 3, 16, 700, 700, 128, 256, "bfloat16")
    assert s.pbs_config() == PBSConfig(128, 256, 0.9, True)
    c = PBSShape(1, 4, 2, 32, 640, 640 - 128, 64, 128, 0.5, False).pbs_config()
    assert (c.block, c.segment, c.tau, c.permute) == (64, 128, 0.5, False)
    assert s.to_dict()["m"] == 700 and PBSShape(**s.to_dict()) == s
    assert "N=700" in str(s) and "M=700" in str(s) and "b=128" in str(s)


@pytest.mark.parametrize("kw, err, match", [
    (dict(heads=0), ShapeError, "heads must be a positive int"),
    (dict(head_dim=16.0), ShapeError, "head_dim must be a positive int"),
    (dict(n=True), ShapeError, "n must be a positive int"),
    (dict(heads=6, kv_heads=4), ShapeError, "heads=6 is not a multiple of kv_heads=4"),
    (dict(dtype="int8"), ShapeError, "dtype 'int8'"),
    (dict(m=600), ShapeError, "m=600: want 1 <= m <= n=512"),
    (dict(m=-64), ShapeError, "m=-64"),
    (dict(m=512 - 100), ShapeError, "multiple of block 128"),
    (dict(m=512.0), ShapeError, "m=512.0"),
    (dict(block=0), PlanError, "block must be a positive int"),
    (dict(block=64, segment=96), PlanError, "segment 96 is not a multiple of block 64"),
    (dict(tau=0.0), PlanError, "tau must be a number > 0"),
])
def test_bad_shapes_are_refused_naming_the_field(kw, err, match):
    base = dict(batch=1, heads=4, kv_heads=2, head_dim=32, n=512)
    with pytest.raises(err, match=match):
        PBSShape(**{**base, **kw})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_make_args_shapes_dtypes_and_planted_heavy_keys(dtype):
    s = PBSShape(2, 6, 3, 16, 640, 640 - 128, 64, 128, 0.7, dtype=dtype)
    q, k, v, cfg, scale = s.make_args(3)
    assert q.shape == (2, 6, 512, 16) and k.shape == v.shape == (2, 3, 640, 16)
    assert q.dtype == k.dtype == v.dtype == getattr(torch, dtype)
    assert cfg == s.pbs_config() and scale is None
    again = s.make_args(3)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again[:3])), "make_args must be deterministic"
    assert not torch.equal(q, s.make_args(4)[0])
    # heavy keys: key 0 leans towards the queries' shared direction more than a typical key
    qbar = q.float().mean(2, keepdim=True)[:, ::2]  # one query head per kv head (group of 2)
    scores = (qbar @ k.float().transpose(-1, -2)).squeeze(2)  # [B, Hkv, N]
    assert bool((scores[..., 0] > scores.median(-1).values).all())


def test_meta_args_have_the_shapes_and_dtype_without_data():
    s = PBSShape(1, 8, 2, 64, 1024, 512, dtype="fp16")
    q, k, v, cfg, scale = s.meta_args()
    assert q.device.type == "meta" and q.shape == (1, 8, 512, 64) and q.dtype == torch.float16
    assert k.shape == v.shape == (1, 2, 1024, 64) and cfg == s.pbs_config() and scale is None
    q, *_ = s.meta_args("cpu")
    assert q.device.type == "cpu"


def test_keys_of_call_read_the_tensors_and_the_config():
    s = PBSShape(1, 4, 2, 32, 1100, 1100 - 640, 64, 128, dtype="bf16")  # queries and keys in other buckets
    args = s.make_args(0)
    assert PBSShape.keys_of_call(args) == [s.key()] and (s.key().q_bucket, s.key().kv_bucket) == (512, 2048)
    q, k, v, _, _ = args
    assert PBSShape.keys_of_call((q, k, v)) == [pbs_key(1, 4, 2, 32, 460, 1100, 128, 256, torch.bfloat16)], \
        "no config argument: the default block and segment"


@pytest.mark.parametrize("text, want", [
    ("1,9,3,64,8192", PBSShape(1, 9, 3, 64, 8192)),
    (" 2, 4, 2, 32, 1024, 512 ", PBSShape(2, 4, 2, 32, 1024, 512)),
    ("1,4,2,32,1000,1000,64,128,bf16", PBSShape(1, 4, 2, 32, 1000, 1000, 64, 128, dtype="bfloat16")),
    ("1,4,2,32,1000,bf16", PBSShape(1, 4, 2, 32, 1000, dtype="bfloat16")),
    ("1,4,2,32,1000,744,64", PBSShape(1, 4, 2, 32, 1000, 744, 64)),
])
def test_parse_pbs_shape_reads_the_documented_forms(text, want):
    assert parse_pbs_shape(text) == want


@pytest.mark.parametrize("text, match", [
    ("1,4,2,32", "B,H,KVH,D,N"),  # too few numbers
    ("1,4,2,32,1024,1024,128,256,7", "B,H,KVH,D,N"),  # too many
    ("1,4,2,32,1024,fp16,bf16", "B,H,KVH,D,N"),  # two dtypes
    ("1,4,two,32,1024", "B,H,KVH,D,N"),
    ("1,6,4,32,1024", "heads=6 is not a multiple of kv_heads=4"),
    ("1,4,2,32,1024,2048", "m=2048"),
    ("1,4,2,32,1024,1024,64,96", "segment 96 is not a multiple of block 64"),
    ("1,4,2,32,1024,1024,0", "block must be a positive int"),
])
def test_parse_pbs_shape_refuses_bad_text_with_option_error(text, match):
    with pytest.raises(OptionError, match=match):
        parse_pbs_shape(text)


def test_examples_are_valid_small_problems_covering_gqa_batch_and_a_chunk():
    ex = PBSShape.examples()
    assert len(ex) >= 2 and all(isinstance(s, PBSShape) for s in ex)
    assert any(s.heads > s.kv_heads for s in ex) and any(s.batch > 1 for s in ex) and any(s.m < s.n for s in ex)
    assert all(s.n <= 1024 and s.pbs_config().tau < 1 for s in ex)


# ----------------------------------------------------------------------------------------- the family


def test_the_family_is_discovered_with_its_reference_shape_and_cpu_default():
    from graphtune.codegen.family import families, family, family_of_op
    from graphtune.codegen.pbs_attention.reference import pbs_attention_ref

    f = family("pbs_attention")
    assert f in families() and family_of_op("pbs_attention") is f
    assert f.ops == ("pbs_attention",) and f.default_impls["cpu"] == "cpu.gather"
    assert f.reference_fn() is pbs_attention_ref and f.shape_class() is PBSShape
    assert f.modules("cpu") == ["graphtune.codegen.pbs_attention.cpu"]


def test_the_registered_cpu_impl_supports_every_example_with_its_bucket_configs():
    from graphtune.autotune.tuner import default_candidate, load_impls
    from graphtune.codegen.pbs_attention.cpu import CPU_CONFIGS, CPU_DEFAULT_CONFIG
    from graphtune.codegen.registry import get_impl

    load_impls("cpu")
    impl = get_impl("pbs_attention", "cpu.gather")
    assert impl is not None and impl.device == "cpu"
    for s in PBSShape.examples():
        args = s.make_args(0)
        assert impl.supports(args) and impl.configs(args) == CPU_CONFIGS
        assert not impl.supports(s.meta_args())
        d = default_candidate("pbs_attention", "cpu", args)
        assert d.impl is impl and d.config == CPU_DEFAULT_CONFIG


@pytest.mark.parametrize("i", [0, 1])
def test_the_tuner_checks_every_cpu_config_against_the_reference_on_the_examples(i):
    from graphtune.autotune.search import Budget
    from graphtune.autotune.tuner import tune_shape

    shape = PBSShape.examples()[i]
    res = tune_shape(shape, "exhaustive", Budget(reps=2), device="cpu", db=None)
    assert res.op == "pbs_attention" and res.impl == "cpu.gather"
    assert res.n_tried == 4 and not res.failures, res.failures


def test_the_tuner_rejects_a_candidate_that_skips_the_selected_blocks():
    from graphtune.autotune.measure import Candidate
    from graphtune.autotune.search import Budget
    from graphtune.autotune.tuner import default_candidate, tune_shape
    from graphtune.codegen.pbs_attention.cpu import diagonal_attention
    from graphtune.codegen.registry import Impl, KernelConfig

    def diagonal_only(q, k, v, pbs=None, scale=None, *, config=None):
        return diagonal_attention(q, k, v, pbs.segment, q.shape[-1] ** -0.5)

    bad = Impl("pbs_attention", "cpu.diagonal_only", "cpu", diagonal_only, KernelConfig.make(), lambda a: [], "x")
    shape = PBSShape.examples()[0]
    good = default_candidate("pbs_attention", "cpu", shape.make_args(0))
    res = tune_shape(shape, "exhaustive", Budget(reps=2), device="cpu", db=None,
                     candidates=[good, Candidate(bad, KernelConfig.make())])
    assert res.impl == "cpu.gather"
    assert len(res.failures) == 1 and "cpu.diagonal_only" in res.failures[0] and "wrong" in res.failures[0]
