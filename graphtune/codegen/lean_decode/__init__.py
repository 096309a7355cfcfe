"""The lean-decode op family: stream-K decode attention over a ragged batch.

Every worker gets an equal, contiguous slice of all KV tiles of the batch (crossing head and row
boundaries); split outputs are merged exactly. Host plan in :mod:`.plan`, CPU implementation in
:mod:`.cpu`, Triton kernels in :mod:`.triton_kernels`; the per-batch selector (a runtime choice:
it depends on how ragged the real lengths are) in :mod:`graphtune.runtime.lean_decode`. See
``docs/ops/lean_decode.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="lean_decode",
    summary="stream-K decode attention: equal slices of all KV tiles of a ragged batch per worker",
    ops=("lean_decode",),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.lean", "cuda": "triton.lean_decode"},
    reference="graphtune.ir.reference:attention_ref",
    shape="graphtune.codegen.lean_decode.key:LeanShape",
    selector="graphtune.runtime.lean_decode",
    priority=5,
    option="lean_decode",
    flags=("LEAN_MIN_SKEW", "LEAN_TRITON_ON_CPU"),
    doc="docs/ops/lean_decode.md",
)
