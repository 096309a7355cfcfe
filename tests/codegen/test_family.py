"""Op families: every list (tuner, cross-compiler, runtime, explain) is derived from the declarations,
every registered implementation is tunable and every Triton one cross-compilable, and a new family
is one new folder with one declaration."""
from __future__ import annotations

import dataclasses
import importlib
import textwrap
from pathlib import Path

import pytest
import torch

import graphtune.codegen
from graphtune import flags
from graphtune.autotune.tuner import load_impls, tune_shape
from graphtune.codegen import family as fam_mod
from graphtune.codegen.compile_spec import compile_spec_builders
from graphtune.codegen.family import OpFamily, families, family_of_op
from graphtune.codegen.registry import all_impls, get_impl
from graphtune.errors import KernelError

ROOT = Path(__file__).resolve().parents[2]
CODEGEN = ROOT / "graphtune" / "codegen"


def _family_folders() -> list[str]:
    return sorted(p.name for p in CODEGEN.iterdir() if (p / "__init__.py").exists())


def test_every_codegen_package_declares_one_family_named_after_its_folder():
    assert [f.name for f in families()] == _family_folders()
    assert {"attention", "merge_states", "shared_prefix", "lean_decode"} <= set(_family_folders())


def test_every_declared_module_exists_and_registers_an_implementation_of_the_familys_ops():
    for f in families():
        for mod in f.modules():
            if mod.endswith("triton_kernels"):
                pytest.importorskip("triton")
            importlib.import_module(mod)
            mine = [i for i in all_impls() if i.op in f.ops and getattr(i.fn, "__module__", None) == mod]
            assert mine, f"{mod} (declared by family {f.name}) registers no implementation of {f.ops}"


def test_every_registered_implementation_belongs_to_a_family_that_declares_its_module():
    load_impls()
    for impl in all_impls():
        f = family_of_op(impl.op)  # raises if no family owns the op
        assert impl.device in f.impl_modules, f"{impl.name}: family {f.name} declares no {impl.device} modules"


def test_every_registered_implementation_is_tunable():
    """The family's shape class makes args the implementation supports, with a non-empty config space."""
    load_impls()
    for impl in all_impls():
        f = family_of_op(impl.op)
        cls = f.shape_class()
        assert cls is not None, f"{impl.name}: family {f.name} declares no tuning shape"
        assert cls.op == impl.op
        for attr in ("make_args", "meta_args", "key", "to_dict", "examples"):
            assert callable(getattr(cls, attr, None)), f"{cls.__name__} lacks {attr}"
        supported = []
        for shape in cls.examples():
            args = shape.meta_args() if impl.device == "cuda" else shape.make_args(0)
            if impl.device == "cuda" or impl.supports(args):  # Triton's supports() needs a GPU or the interpreter
                supported.append(shape)
                assert impl.configs(args), f"{impl.name} has an empty config space for {shape}"
        assert supported, f"{impl.name} supports none of {cls.__name__}.examples(): the tuner can never try it"


def test_every_triton_implementation_has_a_cross_compile_spec():
    pytest.importorskip("triton")
    load_impls()
    specs = compile_spec_builders()
    triton = [i.name for i in all_impls() if i.device == "cuda"]
    assert triton
    assert not [n for n in triton if n not in specs]


def test_default_implementations_are_registered_on_their_device():
    load_impls()
    for f in families():
        for dev, name in f.default_impls.items():
            for op in f.ops:
                impl = get_impl(op, name)
                assert impl is not None and impl.device == dev, f"{f.name}: default {name} for {dev}"


def test_selectors_options_flags_docs_and_tests_named_by_families_exist():
    from graphtune.flags import Options

    option_fields = {fl.name for fl in dataclasses.fields(Options)}
    for f in families():
        if f.selector:
            mod = importlib.import_module(f.selector)
            for fn in ("install", "uninstall", "describe"):
                assert callable(getattr(mod, fn, None)), f"{f.selector}.{fn}"
        if f.option:
            assert f.option in option_fields
        for name in f.flags:
            flags.get(name)  # raises for an unknown flag
        assert (ROOT / f.doc).is_file(), f"{f.name}: doc page {f.doc} missing"
        assert (ROOT / "tests" / "codegen" / f.name).is_dir(), f"{f.name}: tests/codegen/{f.name}/ missing"
        f.reference_fn()


def test_runtime_features_follow_the_declared_priorities():
    from graphtune import runtime
    from graphtune.runtime import context

    feats = runtime.features()
    declared = sorted(((f.selector, f.priority) for f in families() if f.selector), key=lambda t: -t[1])
    assert feats[:-1] == declared and feats[-1] == (runtime.DISPATCH, 0)
    runtime.install()
    names = context.registered_features()
    assert names.index("tuned") == len(names) - 1


def test_reentering_feature_is_skipped_while_its_own_implementation_runs():
    from graphtune.runtime import context

    calls = []

    def inner(q, k, v, *rest):
        calls.append("inner")
        return torch.ops.graphtune.attention_with_lse(q, k, v)  # re-enters the op

    def select(op, args, ctx):
        calls.append(("asked", op))
        return inner

    context.register_feature(context.Feature("test_reenter", select, priority=99, reenters=True))
    try:
        q = torch.randn(1, 1, 2, 8)
        torch.ops.graphtune.attention_with_lse(q, q, q)
    finally:
        context.unregister_feature("test_reenter")
    # asked once for the outer call, never for the inner one (which the default path served)
    assert calls == [("asked", "attention_with_lse"), "inner"]


def test_a_folder_that_declares_no_family_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "__init__.py").write_text("X = 1\n")
    monkeypatch.setattr(graphtune.codegen, "__path__", [*graphtune.codegen.__path__, str(tmp_path)])
    fam_mod._discover.cache_clear()
    try:
        with pytest.raises(KernelError, match="declares no FAMILY"):
            families()
    finally:
        monkeypatch.undo()
        fam_mod._discover.cache_clear()


TOY_INIT = '''
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="toy_softmax",
    summary="row softmax with its log-sum-exp (a test family)",
    ops=("toy_softmax",),
    impl_modules={"cpu": ("cpu",)},
    default_impls={"cpu": "cpu.toy_softmax"},
    reference="graphtune.codegen.toy_softmax.cpu:softmax_ref",
    shape="graphtune.codegen.toy_softmax.cpu:ToyShape",
    doc="docs/ops/toy_softmax.md",
)
'''

TOY_CPU = '''
from dataclasses import asdict, dataclass

import torch

from graphtune.autotune.shapes import ShapeKey, pow2_bucket
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash


def softmax_ref(x):
    lse = torch.logsumexp(x.double(), -1)
    return (x.double() - lse[..., None]).exp().to(x.dtype), lse.float()


def toy_softmax(x, *, config=KernelConfig.make(CHUNK=0)):
    chunk = config["CHUNK"] or x.shape[0]
    outs, lses = zip(*(softmax_ref(c) for c in x.split(chunk)))
    return torch.cat(outs), torch.cat(lses)


@dataclass(frozen=True)
class ToyShape:
    rows: int
    cols: int
    op = "toy_softmax"

    def key(self):
        return ShapeKey(self.op, f"c{self.cols}", pow2_bucket(self.rows), 0)

    def make_args(self, seed=0):
        return (torch.randn(self.rows, self.cols, generator=torch.Generator().manual_seed(seed)),)

    def meta_args(self, device="meta"):
        return (torch.empty(self.rows, self.cols, device=device),)

    def to_dict(self):
        return asdict(self)


register_impl(Impl("toy_softmax", "cpu.toy_softmax", "cpu", toy_softmax, KernelConfig.make(CHUNK=0),
                   lambda args: [KernelConfig.make(CHUNK=c) for c in (0, 16, 64)], source_hash(toy_softmax)))
'''


def test_a_new_family_is_one_folder_with_one_declaration(tmp_path, monkeypatch):
    """Drop a folder in: the tuner tunes it, explain lists it, nothing else is edited."""
    pkg = tmp_path / "toy_softmax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(TOY_INIT))
    (pkg / "cpu.py").write_text(textwrap.dedent(TOY_CPU))
    monkeypatch.setattr(graphtune.codegen, "__path__", [*graphtune.codegen.__path__, str(tmp_path)])
    fam_mod._discover.cache_clear()
    try:
        assert "toy_softmax" in [f.name for f in families()]
        load_impls("cpu")
        assert get_impl("toy_softmax", "cpu.toy_softmax") is not None
        shape = importlib.import_module("graphtune.codegen.toy_softmax.cpu").ToyShape(100, 32)
        res = tune_shape(shape, "exhaustive", device="cpu", db=None)
        assert res.op == "toy_softmax" and res.n_tried == 3 and not res.failures
        from graphtune.api import _family_lines
        from graphtune.flags import Options

        assert "toy_softmax" in _family_lines(Options())
    finally:
        monkeypatch.undo()
        fam_mod._discover.cache_clear()


def test_unknown_op_or_family_names_the_declared_ones():
    with pytest.raises(KernelError, match="attention_with_lse"):
        family_of_op("no_such_op")
    with pytest.raises(KernelError, match="merge_states"):
        fam_mod.family("no_such_family")


def test_family_declarations_are_plain_data():
    # the declaration is imported by every layer: it must not pull in kernels or Triton
    for f in families():
        assert isinstance(f, OpFamily)
        assert all(isinstance(v, tuple) for v in f.impl_modules.values())


def test_the_shared_prefix_suffix_merge_is_tuned_on_the_cpu_against_its_reference():
    from graphtune.codegen.shared_prefix.key import SuffixMergeShape

    for causal in (False, True):
        res = tune_shape(SuffixMergeShape(4, 4, 2, 2, 96, 32, causal=causal), "exhaustive", device="cpu", db=None)
        assert res.impl == "cpu.suffix_merge" and res.n_tried == 2 and not res.failures, res
