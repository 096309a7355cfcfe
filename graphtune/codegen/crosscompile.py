"""Cross-compile Triton kernels for a GPU we do not have, and model their resources.

``triton.compile`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for any
``GPUTarget`` without a driver; the cubin's register count, stack (spill) bytes and static shared
memory are read with ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel), the
dynamic shared memory Triton requests from the compiled kernel's metadata. From those,
:func:`occupancy` computes resident warps per SM and :func:`static_rank` ranks a config space:
the "static mode" of the autotuner (``graphtune tune --target sm_90`` on a machine without one).

Launch specialization (which ints are 1 or divisible by 16, pointer alignment) is taken from
Triton's own binder, so the compiled code is the code a real launch would get. Results are
cached on disk next to the tuning database, keyed by kernel source, specialization, config,
arch and Triton version.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from graphtune import flags
from graphtune.codegen.compile_spec import CompileSpec, compile_spec_builders, register_compile_spec
from graphtune.codegen.family import load_impl_modules
from graphtune.codegen.registry import KernelConfig, all_impls
from graphtune.errors import KernelError

# impl name -> fn(op_args, config) -> CompileSpec: the registry the kernel modules fill
# (they import graphtune.codegen.compile_spec, never this module)
_SPECS = compile_spec_builders()

__all__ = [
    "KernelResources",
    "CompileSpec",
    "ARCH_LIMITS",
    "register_compile_spec",
    "compile_for_target",
    "compile_many",
    "CompileJob",
    "blocks_per_sm",
    "compile_impl",
    "occupancy",
    "static_rank",
    "cuobjdump_path",
]


# ======================================================================================
# Target limits
# ======================================================================================


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one compute capability (CUDA occupancy calculator values)."""

    regs_per_sm: int
    max_regs_per_thread: int
    smem_per_sm: int  # bytes usable by blocks, after the carveout
    smem_per_block: int  # max opt-in dynamic shared memory per block
    smem_reserved_per_block: int  # the driver reserves 1 KiB per resident block (sm_80+)
    max_warps_per_sm: int
    max_blocks_per_sm: int
    num_sms: int  # of the reference part (A100 SXM / H100 SXM), for wave quantization
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256


ARCH_LIMITS: dict[int, ArchLimits] = {
    80: ArchLimits(65536, 255, 164 * 1024, 163 * 1024, 1024, 64, 32, 108),
    90: ArchLimits(65536, 255, 228 * 1024, 227 * 1024, 1024, 64, 32, 132),
}


def _limits(arch: int) -> ArchLimits:
    try:
        return ARCH_LIMITS[arch]
    except KeyError:
        raise KernelError(f"no resource model for sm_{arch}; known: {sorted(ARCH_LIMITS)}") from None


# ======================================================================================
# Resources of one compiled kernel
# ======================================================================================


@dataclass(frozen=True)
class KernelResources:
    """What one (kernel, specialization, config) needs on ``sm_<arch>``.

    ``spill_bytes`` is the cubin's stack frame plus local memory: Triton kernels declare no
    local arrays, so a nonzero value means ptxas spilled registers.
    """

    kernel: str
    arch: int
    registers: int
    spill_bytes: int
    shared_mem_bytes: int  # dynamic (Triton's request) + static
    num_warps: int
    num_stages: int
    compile_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuobjdump_path() -> str:
    """The ``cuobjdump`` binary shipped inside the triton wheel."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cubin_resources(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, static shared, local) of the single function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path],
                             capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    m = _RES_RE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise KernelError(f"cuobjdump could not read the cubin: {out.stderr.strip() or out.stdout.strip()}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return reg, stack, shared, local


class _MockPtr:
    """Stands in for a tensor argument during specialization: dtype plus a 16-byte aligned address."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


def _cache_dir() -> Path | None:
    if flags.get("CACHELEVEL") <= 0:
        return None
    return Path(flags.get("DB")).expanduser().parent / "crosscompile"


@dataclass(frozen=True)
class CompileJob:
    """One cross-compilation: a kernel, its launch arguments (tensors as dtypes), warps, stages, arch."""

    fn: Any
    args: tuple
    kwargs: dict
    num_warps: int
    num_stages: int
    arch: int
    use_cache: bool = True


def compile_for_target(fn: Any, args: tuple, kwargs: dict, config: KernelConfig | None = None,
                       arch: int = 90, *, num_warps: int | None = None, num_stages: int | None = None,
                       use_cache: bool = True) -> KernelResources:
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU and read its resources.

    Parameters
    ----------
    fn : triton.JITFunction
        The kernel (a module-level ``@triton.jit`` function).
    args, kwargs : tuple, dict
        Launch arguments as for ``fn[grid](*args, **kwargs)``, tensors replaced by their
        ``torch.dtype``; constexprs by keyword.
    config : KernelConfig, optional
        Supplies ``num_warps``/``num_stages`` (explicit keywords win).
    arch : int
        Compute capability, e.g. 80 or 90.

    Returns
    -------
    KernelResources

    Raises
    ------
    KernelError
        The compiler rejected the kernel/config, or cuobjdump could not read the cubin.

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.attention.triton_kernels import attention_compile_spec, ATTN_DEFAULT_CONFIG
    >>> from graphtune.codegen.crosscompile import compile_for_target
    >>> q = torch.empty(1, 8, 128, 64, dtype=torch.float16, device="meta")
    >>> spec = attention_compile_spec((q, q, q, None, True, None, False), ATTN_DEFAULT_CONFIG)
    >>> res = compile_for_target(spec.fn, spec.args, spec.kwargs, ATTN_DEFAULT_CONFIG, arch=90)
    >>> res.registers <= 255 and res.spill_bytes == 0
    True
    """
    nw = num_warps if num_warps is not None else (config.num_warps if config else 4)
    ns = num_stages if num_stages is not None else (config.num_stages if config else 2)
    out = compile_many([CompileJob(fn, tuple(args), dict(kwargs), nw, ns, arch, use_cache)])[0]
    if isinstance(out, KernelError):
        raise out
    return out


def compile_many(jobs: list[CompileJob]) -> list[KernelResources | KernelError]:
    """Run several cross-compilations; failures come back as :class:`KernelError` values.

    Under ``TRITON_INTERPRET=1`` Triton's own ``tl.max``/``tl.sum`` are interpreter functions
    and cannot be compiled, so the jobs then run on worker processes without that variable
    (:class:`graphtune.autotune.workers.ProcessPool`, started once and kept): one compile task
    per job, run concurrently on up to two workers; a compiler that crashes or hangs (killed
    after ``_COMPILE_TIMEOUT_S``) costs that job, not the run.
    """
    if not triton.knobs.runtime.interpret:
        return [_compile_guarded(j) for j in jobs]
    from graphtune.autotune import workers  # lazy: codegen does not import autotune at module level

    tasks = [workers.Task("compile", "graphtune.codegen.crosscompile:_compile_task",
                          (_fn_ref(j.fn), j.args, j.kwargs, j.num_warps, j.num_stages, j.arch, j.use_cache),
                          timeout=_COMPILE_TIMEOUT_S) for j in jobs]
    global _POOL
    if _POOL is None:
        _POOL = workers.ProcessPool(max(1, min(2, os.cpu_count() or 1)), env={"TRITON_INTERPRET": None})
    out: list[KernelResources | KernelError] = []
    for r in _POOL.run(tasks):
        if not r.ok:
            out.append(KernelError(f"cross-compilation worker: {r.error}"))
        else:
            out.append(r.value if isinstance(r.value, KernelResources) else KernelError(str(r.value)))
    return out


_COMPILE_TIMEOUT_S = 420.0  # one config: Triton + ptxas take 1-5 s here; a slow first import too
_POOL: Any = None  # the compile workers (graphtune.autotune.workers.ProcessPool), started on first use


def _fn_ref(fn: Any) -> tuple[str, str]:
    py = getattr(fn, "fn", fn)
    return py.__module__, py.__name__


def _compile_task(payload: tuple) -> KernelResources | str:
    # worker side of compile_many (a workers.Task): the kernel by module and name; an error as text
    import importlib

    (mod, name), args, kwargs, nw, ns, arch, use_cache = payload
    fn = getattr(importlib.import_module(mod), name)
    r = _compile_guarded(CompileJob(fn, args, kwargs, nw, ns, arch, use_cache))
    return r if isinstance(r, KernelResources) else str(r)


def _compile_guarded(job: CompileJob) -> KernelResources | KernelError:
    try:
        return _compile_here(job)
    except KernelError as e:
        return e
    except Exception as e:  # OutOfResources, PTXASError, CompilationError, bad launch args...
        name = getattr(getattr(job.fn, "fn", job.fn), "__name__", "?")
        return KernelError(f"cross-compiling {name} for sm_{job.arch} (w{job.num_warps}, s{job.num_stages}) "
                           f"failed: {type(e).__name__}: {e}")


def _compile_here(job: CompileJob) -> KernelResources:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    lim = _limits(job.arch)
    nw, ns, arch = job.num_warps, job.num_stages, job.arch
    jit_fn = job.fn
    if not isinstance(jit_fn, triton.runtime.JITFunction):
        raise KernelError(f"{jit_fn!r} is not a @triton.jit function")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    margs = tuple(_MockPtr(a) if isinstance(a, torch.dtype) else a for a in job.args)
    launch_kw = {**job.kwargs, "num_warps": nw, "num_stages": ns, "debug": False}
    # Triton's own binder decides specialization (== 1 ints, % 16 divisibility) like a real launch
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*margs, **launch_kw)
    opts, signature, constexprs, attrs = jit_fn._pack_args(backend, launch_kw, bound, specialization, options)

    key = None
    cdir = _cache_dir() if job.use_cache else None
    if cdir is not None:
        text = json.dumps([jit_fn.cache_key, str(signature), repr(sorted(constexprs.items())),
                           repr(sorted(attrs.items())), nw, ns, arch, triton.__version__], default=str)
        key = hashlib.sha256(text.encode()).hexdigest()[:32]
        try:
            return KernelResources(**json.loads((cdir / f"{key}.json").read_text()))
        except (OSError, ValueError, TypeError):
            pass  # absent or unreadable: recompile

    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    regs, stack, static_smem, local = _cubin_resources(compiled.asm["cubin"])
    res = KernelResources(
        kernel=jit_fn.__name__, arch=arch, registers=regs, spill_bytes=stack + local,
        shared_mem_bytes=int(compiled.metadata.shared) + static_smem, num_warps=nw, num_stages=ns,
        compile_s=round(time.perf_counter() - t0, 3),
    )
    assert regs <= lim.max_regs_per_thread, "ptxas never allocates more than 255 registers"
    if cdir is not None and key is not None:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            tmp = cdir / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(res.to_dict()))
            tmp.replace(cdir / f"{key}.json")  # atomic: concurrent tuners never see half a file
        except OSError:
            pass
    return res


# ======================================================================================
# Occupancy and static ranking
# ======================================================================================


def blocks_per_sm(res: KernelResources, arch: int) -> int:
    """Resident blocks per SM, limited by registers, shared memory, warps and blocks (0: cannot launch)."""
    lim = _limits(arch)
    if res.shared_mem_bytes > lim.smem_per_block or res.registers > lim.max_regs_per_thread:
        return 0
    # registers: allocated per warp in units of 256
    regs_per_warp = -(-max(res.registers, 1) * 32 // lim.reg_alloc_unit) * lim.reg_alloc_unit
    by_regs = (lim.regs_per_sm // regs_per_warp) // res.num_warps
    by_smem = lim.smem_per_sm // (res.shared_mem_bytes + lim.smem_reserved_per_block)
    by_warps = lim.max_warps_per_sm // res.num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim.max_blocks_per_sm))


def occupancy(res: KernelResources, arch: int | None = None) -> float:
    """Fraction of the SM's 64 warp slots a kernel can keep resident (0.0 .. 1.0).

    Examples
    --------
    >>> from graphtune.codegen.crosscompile import KernelResources, occupancy
    >>> occupancy(KernelResources("k", 80, registers=128, spill_bytes=0, shared_mem_bytes=32 * 1024,
    ...                           num_warps=4, num_stages=2))  # 4 blocks by registers and by smem
    0.25
    """
    a = res.arch if arch is None else arch
    return blocks_per_sm(res, a) * res.num_warps / _limits(a).max_warps_per_sm


def _score(res: KernelResources, spec: CompileSpec, arch: int) -> float:
    """Relative throughput estimate in [0, 1]: latency hiding x busy SMs x full waves x useful tiles x reuse.

    * latency hiding: attention-like kernels need ~16 resident warps per SM (25% occupancy);
      the resident blocks are limited by resources *and* by how many programs each SM gets;
    * busy SMs: a grid of fewer programs than SMs leaves SMs idle (decode with few heads);
    * full waves: the last wave of a grid larger than one wave leaves slots idle;
    * useful tiles: padded rows/keys/head-dim lanes are wasted work;
    * reuse: small tiles re-read operands from memory (attention: K/V once per BLOCK_M rows).

    Spilling or unlaunchable configs score -inf. A heuristic for ranking without the GPU: a
    measured tuning run on the GPU supersedes it.
    """
    lim = _limits(arch)
    nblk = blocks_per_sm(res, arch)
    if nblk == 0 or res.spill_bytes > 0:
        return float("-inf")
    programs = max(1, spec.programs)
    per_sm = min(nblk, -(-programs // lim.num_sms))  # blocks actually resident per SM
    latency = min(1.0, per_sm * res.num_warps / lim.max_warps_per_sm / 0.25)
    busy = min(1.0, programs / lim.num_sms)
    slots = nblk * lim.num_sms
    tail = 1.0 if programs <= slots else programs / (-(-programs // slots) * slots)
    return latency * busy * tail * spec.tile_efficiency * spec.reuse


def _ensure_specs() -> None:
    # the families' Triton modules register their specs (in compile_spec) on import; load them
    # only when cross-compiling is asked for (importing a loaded module again costs a dict lookup)
    load_impl_modules("cuda")


def compile_impl(impl_name: str, op_args_meta: tuple, config: KernelConfig, arch: int) -> KernelResources:
    """Cross-compile registered implementation ``impl_name`` for op arguments and a config."""
    _ensure_specs()
    if impl_name not in _SPECS:
        raise KernelError(f"no cross-compilation spec for {impl_name!r}; known: {sorted(_SPECS)}")
    spec = _SPECS[impl_name](op_args_meta, config)
    return compile_for_target(spec.fn, spec.args, spec.kwargs, config, arch)


def static_rank(impl_name: str, op_args_meta: tuple, configs: list[KernelConfig] | None,
                arch: int) -> list[tuple[KernelConfig, float, KernelResources | None]]:
    """Rank configs of ``impl_name`` for ``sm_<arch>`` by the cross-compiled resource model.

    Parameters
    ----------
    impl_name : str
        A registered Triton implementation (``"triton.attention_fwd"``, ``"triton.merge_states"``).
    op_args_meta : tuple
        The op's argument tuple; tensors may be meta/fake tensors (only shape and dtype are read).
    configs : list of KernelConfig or None
        Candidates; ``None`` means the implementation's pruned space for these arguments.
    arch : int
        Target compute capability (80, 90).

    Returns
    -------
    list of (config, score, resources)
        Best first. ``score`` is the roofline model's ``ideal / predicted`` time in (0, 1]
        (:mod:`graphtune.codegen.costmodel`; implementations it has no traffic formula for keep the
        resource heuristic ``_score``), comparable across configs and implementations of one problem; configs that spill,
        exceed the target's shared memory or fail to compile get ``-inf`` (resources ``None``
        when compilation failed) and sort last.

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.crosscompile import static_rank
    >>> from graphtune.codegen.attention.triton_kernels import ATTN_DEFAULT_CONFIG
    >>> q = torch.empty(8, 32, 1, 128, dtype=torch.float16, device="meta")
    >>> kv = torch.empty(8, 8, 4096, 128, dtype=torch.float16, device="meta")
    >>> ranked = static_rank("triton.attention_fwd", (q, kv, kv, None, False, None, True),
    ...                      [ATTN_DEFAULT_CONFIG], arch=90)
    >>> ranked[0][1] > 0
    True
    """
    _ensure_specs()
    if impl_name not in _SPECS:
        raise KernelError(f"no cross-compilation spec for {impl_name!r}; known: {sorted(_SPECS)}")
    if configs is None:
        impl = next((i for i in all_impls() if i.name == impl_name), None)
        if impl is None:
            raise KernelError(f"implementation {impl_name!r} is not registered")
        configs = impl.configs(op_args_meta)
    specs = [_SPECS[impl_name](op_args_meta, cfg) for cfg in configs]
    results = compile_many([CompileJob(sp.fn, sp.args, sp.kwargs, cfg.num_warps, cfg.num_stages, arch)
                            for sp, cfg in zip(specs, configs)])
    from graphtune.codegen import costmodel  # roofline: ideal / predicted time (costmodel.py; docs/kernels.md)

    out: list[tuple[KernelConfig, float, KernelResources | None]] = []
    for cfg, sp, res in zip(configs, specs, results):
        if isinstance(res, KernelResources):
            sc = costmodel.score(impl_name, op_args_meta, cfg, res, arch, blocks=blocks_per_sm(res, arch),
                                 programs=sp.programs)
            out.append((cfg, _score(res, sp, arch) if sc is None else sc, res))
        else:
            out.append((cfg, float("-inf"), None))
    # ties (common for decode) go to the config with more resident warps, then less shared memory
    out.sort(key=lambda t: (-t[1], -(occupancy(t[2], arch) if t[2] else 0.0),
                            t[2].shared_mem_bytes if t[2] else 0))
    return out
