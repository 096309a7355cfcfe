"""The linear op family: ``y = x @ W^T + b`` for the few-row products of decoding, tuned per CPU.

A decode step multiplies 1..a few dozen token rows by every weight matrix of the model, and on a
CPU the BLAS path ATen picks for such skinny products is far from the best one: on a 2-core Zen 4,
SmolLM2's LM head (``49152 x 576``) takes 15 ms for 2 rows through ``F.linear`` but 2.4 ms as
``W @ x^T``, and a single row runs on one core unless it is padded to a small matrix. Which
formulation wins depends on the shape, the row count and the thread count, so it is measured
(``graphtune tune --linear``) and kept in the tuning database like any kernel config.

Implementations in :mod:`.cpu` (``cpu.aten``, the untuned default, and ``cpu.wt``, weight-major
with a row-padding knob), pure-torch fp64 reference in :mod:`.reference`, tuning key in
:mod:`.key`. No Triton kernel: on a GPU cuBLAS serves these shapes well and the engine does not
route GPU linears. The engine routes a model's ``nn.Linear`` calls through the tuned choice
(:mod:`graphtune.runtime.engine.linear`). Exact up to floating-point summation order. See
``docs/ops/linear.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="linear",
    summary="few-row linear layers of decode/verify steps: the fastest CPU BLAS formulation per shape",
    ops=("linear",),
    impl_modules={"cpu": ("cpu",)},
    default_impls={"cpu": "cpu.aten"},
    reference="graphtune.codegen.linear.reference:linear_ref",
    shape="graphtune.codegen.linear.key:LinearShape",
    flags=("ENGINE_TUNED_LINEAR", "ENGINE_LINEAR_MAX_ROWS", "LINEAR_PACKED"),
    doc="docs/ops/linear.md",
)
