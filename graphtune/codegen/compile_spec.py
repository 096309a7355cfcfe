"""Cross-compilation specs: what a Triton kernel module declares so it can be cross-compiled.

A kernel module builds a :class:`CompileSpec` from op arguments and a config and registers the
builder here with :func:`register_compile_spec`. :mod:`graphtune.codegen.crosscompile` reads
this registry; the kernel modules never import the cross-compiler (which pulls in the Triton
compiler pipeline, subprocesses and the on-disk cache), so the two never import each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from graphtune.codegen.registry import KernelConfig

__all__ = ["CompileSpec", "register_compile_spec", "compile_spec_builders"]


@dataclass(frozen=True)
class CompileSpec:
    """How to compile one implementation for given op arguments and config.

    ``args``/``kwargs`` are the kernel launch arguments with every tensor replaced by its
    ``torch.dtype`` (shapes need not exist: meta or fake tensors are fine). ``programs`` is the
    grid size, ``tile_efficiency`` the useful fraction of the padded tiles and ``reuse`` how well
    the tile shares loaded operands relative to the best tile for the problem; all three feed
    the static ranking.
    """

    fn: Any  # triton.JITFunction
    args: tuple
    kwargs: dict
    programs: int
    tile_efficiency: float = 1.0
    reuse: float = 1.0  # operand reuse vs the best tile for this problem (1: as good as it gets)


# impl name -> fn(op_args, config) -> CompileSpec; filled by the kernel modules
_SPECS: dict[str, Callable[[tuple, KernelConfig], CompileSpec]] = {}


def register_compile_spec(impl_name: str, fn: Callable[[tuple, KernelConfig], CompileSpec]) -> None:
    """Tell :func:`graphtune.codegen.crosscompile.static_rank` how to build launch arguments for ``impl_name``."""
    _SPECS[impl_name] = fn


def compile_spec_builders() -> dict[str, Callable[[tuple, KernelConfig], CompileSpec]]:
    """The registry itself (impl name -> spec builder), shared with the cross-compiler."""
    return _SPECS
