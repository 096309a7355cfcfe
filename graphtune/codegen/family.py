"""Op families: each op graphtune computes is declared once, and every list is derived from the declarations.

An *op family* is one folder ``graphtune/codegen/<family>/`` holding the family's kernels (CPU and
Triton), host-side plan and tuning key, and an ``__init__.py`` that declares ``FAMILY =
OpFamily(...)``. Nothing else lists the family: the tuner (which implementations exist, which is
the untuned default, how a shape is keyed), the cross-compiler (which Triton modules declare
compile specs), the runtime (which selectors to install, in which priority order) and ``explain``
all iterate :func:`families`, which finds the folders.

The declaration names modules and objects by dotted path (``"graphtune.ir.reference:attention_ref"``)
instead of importing them. Why: the declaration is imported by every layer, so it must be cheap and
import nothing above :mod:`graphtune.codegen` (a family's runtime selector lives in
``graphtune/runtime/`` because it reads the runtime's request state; naming it here is not an
import, and the runtime resolves it). Loading a Triton module is left to the caller that needs it.

Examples
--------
>>> from graphtune.codegen.family import families, family_of_op
>>> [f.name for f in families()][:4]
['attention', 'lean_decode', 'linear', 'merge_states']
>>> "spec_accept" in [f.name for f in families()]
True
>>> family_of_op("merge_states").default_impls["cpu"]
'cpu.torch'
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from graphtune.errors import KernelError

__all__ = ["OpFamily", "families", "family", "family_of_op", "resolve", "load_impl_modules", "tolerance"]

# (atol, rtol) an implementation must meet against the family's reference, per dtype, unless the
# family declares its own (outputs compared in fp32; LSEs are compared with the same tolerances)
DEFAULT_TOLERANCES: Mapping[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


@dataclass(frozen=True)
class OpFamily:
    """The declaration of one op family (everything the tuner, cross-compiler, runtime and ``explain`` need).

    Parameters
    ----------
    name : str
        The folder name under ``graphtune/codegen/``.
    summary : str
        One line for ``explain`` and the docs.
    ops : tuple of str
        The op names the family's implementations register under (``Impl.op``); tuning records are
        keyed by them.
    graph_ops : tuple of str
        ``torch.ops.graphtune`` ops (defined in :mod:`graphtune.ir.ops`) that the runtime's tuned
        dispatch serves per call with the tuned implementation of ``ops[0]`` (an op returning
        only ``out`` takes the first output).
    impl_modules : dict
        Device type (``"cpu"``, ``"cuda"``) -> modules of the folder (relative names) whose import
        registers implementations (:func:`graphtune.codegen.registry.register_impl`) and, for
        Triton modules, cross-compile specs.
    default_impls : dict
        Device type -> the implementation each op of the family runs untuned: the baseline every
        tuning run measures first and the fallback of every failure.
    reference : str
        ``"module:function"``: the pure-torch reference ``fn(*op_args) -> (out, lse)`` every
        implementation is checked against (tuner, tests).
    shape : str or None
        ``"module:Class"``: the tuning-key class (``make_args``, ``meta_args``, ``key()``, ``op``);
        ``None`` if the family is not tuned by shape.
    selector : str or None
        Module of the runtime selector (``install()``, ``uninstall()``, ``describe(...)``), if the
        family has one: a per-batch, data-dependent choice (not a graph rewrite).
    priority : int
        The selector's priority: higher is asked first.
    option : str or None
        The :class:`graphtune.flags.Options` field that turns the selector on and off.
    flags : tuple of str
        :mod:`graphtune.flags` names that tune the family.
    tolerances : dict
        Per-dtype ``(atol, rtol)`` against the reference.
    doc : str
        The family's page under ``docs/``.
    """

    name: str
    summary: str
    ops: tuple[str, ...]
    impl_modules: Mapping[str, tuple[str, ...]]
    default_impls: Mapping[str, str]
    reference: str
    shape: str | None = None
    graph_ops: tuple[str, ...] = ()
    selector: str | None = None
    priority: int = 0
    option: str | None = None
    flags: tuple[str, ...] = ()
    tolerances: Mapping[torch.dtype, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    doc: str = ""

    def modules(self, device_type: str | None = None) -> list[str]:
        """Absolute names of the implementation modules, for one device type or all."""
        devs = [device_type] if device_type else sorted(self.impl_modules)
        return [f"graphtune.codegen.{self.name}.{m}" for d in devs for m in self.impl_modules.get(d, ())]

    def reference_fn(self) -> Any:
        return resolve(self.reference)

    def shape_class(self) -> type | None:
        return None if self.shape is None else resolve(self.shape)

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.tolerances.get(dtype, (1e-2, 1e-2))


def resolve(path: str) -> Any:
    """``"package.module:attr"`` -> the object (imports the module)."""
    mod, _, attr = path.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, attr) if attr else obj


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[OpFamily, ...]:
    import graphtune.codegen as pkg

    found = []
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.ispkg:
            continue
        mod = importlib.import_module(f"graphtune.codegen.{m.name}")
        fam = getattr(mod, "FAMILY", None)
        if not isinstance(fam, OpFamily):
            raise KernelError(f"graphtune/codegen/{m.name}/ is a package but declares no FAMILY = OpFamily(...)")
        if fam.name != m.name:
            raise KernelError(f"graphtune/codegen/{m.name}/ declares FAMILY named {fam.name!r}; it must be {m.name!r}")
        found.append(fam)
    ops = [op for f in found for op in f.ops]
    dup = sorted({op for op in ops if ops.count(op) > 1})
    if dup:
        raise KernelError(f"ops declared by more than one family: {dup}")
    return tuple(sorted(found, key=lambda f: f.name))


def families() -> tuple[OpFamily, ...]:
    """Every declared op family, by name (found from the folders of :mod:`graphtune.codegen`)."""
    return _discover()


def family(name: str) -> OpFamily:
    """The family called ``name``; :class:`KernelError` naming the known ones otherwise."""
    for f in families():
        if f.name == name:
            return f
    raise KernelError(f"no op family {name!r}; declared: {[f.name for f in families()]}")


def family_of_op(op: str) -> OpFamily:
    """The family whose implementations register under op ``op``."""
    for f in families():
        if op in f.ops:
            return f
    raise KernelError(f"op {op!r} belongs to no declared op family; declared ops: "
                      f"{sorted(o for f in families() for o in f.ops)}")


def load_impl_modules(device_type: str | None = None) -> None:
    """Import every family's implementation modules (one device type's, or all), registering them.

    A Triton module whose ``triton`` import fails (no Triton installed) is skipped; any other
    import error is a real error and propagates.
    """
    for f in families():
        for mod in f.modules(device_type):
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name not in ("triton", mod):
                    raise


def tolerance(op: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) an implementation of ``op`` must meet against its family's reference."""
    return family_of_op(op).tolerance(dtype)
