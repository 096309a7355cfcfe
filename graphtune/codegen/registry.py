"""Implementations of graphtune ops and their configuration spaces.

An op (``"attention_with_lse"``, ``"merge_states"``, ...) has several implementations per
device: Triton kernels on a GPU, CPU kernels with real knobs on a CPU. Each implementation
declares its config space (already pruned for the given arguments), its default config (the
mandatory fallback, used when nothing is tuned), and a hash of its source (tuning records made
with other source are stale). The autotuner searches (implementation, config) pairs; the
runtime calls the winner.

Every callback receives the op's argument tuple as the op was called: ``fn(*op_args, config=)``,
``supports(op_args)``, ``configs(op_args)``, ``default_for(op_args)``. For the attention ops that
is ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``, read by name after one
``AttentionArgs.of(op_args)`` (:mod:`graphtune.ir.args`); ops of attention-like families put their
own tensors after ``q, k, v`` and keep ``attn_mask, is_causal, scale, enable_gqa`` in that order;
``merge_states`` takes ``(outs, lses)``.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["KernelConfig", "Impl", "register_impl", "impls_for", "get_impl", "source_hash", "all_impls",
           "register_record_kind", "record_kind_hash"]


@dataclass(frozen=True)
class KernelConfig:
    """A hashable, stably printed kernel configuration.

    ``params`` are the kernel's meta-parameters (``BLOCK_M``, ``SPLITS``, ``THREADS``...), kept
    sorted so equal configs compare, hash and print equal. ``num_warps``/``num_stages`` only
    matter to Triton kernels.
    """

    params: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def make(cls, num_warps: int = 4, num_stages: int = 2, **params: int) -> "KernelConfig":
        return cls(tuple(sorted(params.items())), num_warps, num_stages)

    def __getitem__(self, key: str) -> int:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        return {"params": dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KernelConfig":
        return cls.make(d.get("num_warps", 4), d.get("num_stages", 2), **d.get("params", {}))

    def __str__(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{p};w{self.num_warps};s{self.num_stages}"


def source_hash(*objs: Any) -> str:
    """Short hash of the source code of functions/modules (what invalidates tuning records)."""
    h = hashlib.sha256()
    for o in objs:
        fn = getattr(o, "fn", o)  # triton JITFunction keeps the python function in .fn
        try:
            src = getattr(o, "src", None) or inspect.getsource(fn)
        except (OSError, TypeError):
            src = repr(o)
        h.update(src.encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Impl:
    """One implementation of an op on one device type.

    ``fn(*op_args, config=KernelConfig)`` computes the op. ``configs(op_args)`` lists the config
    space for these arguments (pruned); ``supports(op_args)`` says whether it can run them at all.
    ``default`` is the fallback config; ``default_for(op_args)``, when given, picks a better
    per-problem default (e.g. a Triton tile that does not spill at this head dim and dtype).
    """

    op: str
    name: str
    device: str  # "cpu" | "cuda"
    fn: Callable[..., Any]
    default: KernelConfig
    configs: Callable[[tuple], list[KernelConfig]]
    source_hash: str
    supports: Callable[[tuple], bool] = field(default=lambda args: True)
    default_for: Callable[[tuple], KernelConfig] | None = None

    def default_config(self, op_args: tuple | None) -> KernelConfig:
        """The default config for these arguments (``default_for``) or the fixed ``default``."""
        if self.default_for is not None and op_args is not None:
            return self.default_for(op_args)
        return self.default


_REGISTRY: dict[tuple[str, str], Impl] = {}  # (op, name) -> Impl


def register_impl(impl: Impl) -> Impl:
    """Register (or replace, on module reload) an implementation."""
    _REGISTRY[(impl.op, impl.name)] = impl
    return impl


def impls_for(op: str, device: str) -> list[Impl]:
    """Implementations of ``op`` for a device type, in registration order."""
    return [i for (o, _), i in _REGISTRY.items() if o == op and i.device == device]


def get_impl(op: str, name: str) -> Impl | None:
    return _REGISTRY.get((op, name))


def all_impls() -> Iterable[Impl]:
    return list(_REGISTRY.values())


_RECORD_KINDS: dict[tuple[str, str], str] = {}  # (op, name) -> source hash of records that are not kernels


def register_record_kind(op: str, name: str, hash_: str) -> None:
    """Declare tuning records of ``(op, name)`` that hold a non-kernel result (e.g. accuracy-tuned sparsity).

    They are valid while the code they depend on hashes to ``hash_``; no tuner or dispatch runs them.
    """
    _RECORD_KINDS[(op, name)] = hash_


def record_kind_hash(op: str, name: str) -> str | None:
    """The source hash a non-kernel record kind must carry to be valid, or None if no such kind."""
    return _RECORD_KINDS.get((op, name))
