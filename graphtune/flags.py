"""All of graphtune's flags and options, in one module.

Two kinds of settings live here:

* **Flags**: process-wide, typed, backed by ``GRAPHTUNE_<NAME>`` environment variables and
  overridable for a block of code with :class:`Context` (``with Context(SPEC=True): ...``).
  Nothing else in graphtune reads ``os.environ``.
* **Options**: per-call settings of :func:`graphtune.optimize`, the ``torch.compile``
  backend and :func:`graphtune.explain`, validated up front by :meth:`Options.from_kwargs`.
"""
from __future__ import annotations

import contextvars
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from graphtune.errors import OptionError

__all__ = ["Flag", "FLAGS", "DEPRECATED", "get", "Context", "Options", "default_db_path"]


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def default_db_path() -> str:
    """Where the tuning database lives unless ``GRAPHTUNE_DB`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "graphtune" / "tuning.db")


@dataclass(frozen=True)
class Flag:
    """A typed, environment-backed process flag."""

    name: str
    type: type
    default: Any
    doc: str
    # default computed lazily (e.g. paths depending on $HOME) from the environment variables it names
    default_fn: Callable[[], Any] | None = None
    default_env: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return _ENV_NAMES.get(self.name) or f"GRAPHTUNE_{self.name}"

    def from_env(self) -> Any:
        raw, env = os.environ.get(self.env), self.env
        if raw is None and self.name in _OLD_ENV:  # the variable of the flag's deprecated name
            env = _OLD_ENV[self.name]
            raw = os.environ.get(env)
            if raw is not None:
                warnings.warn(f"{env} is deprecated; set {self.env}", DeprecationWarning, stacklevel=4)
        if raw is None:
            return self.default_fn() if self.default_fn else self.default
        try:
            if self.type is bool:
                return _parse_bool(raw)
            return self.type(raw)
        except ValueError as e:
            raise OptionError(f"environment variable {env}={raw!r} is not a valid {self.type.__name__}") from e


FLAGS: dict[str, Flag] = {
    f.name: f
    for f in [
        Flag("DEBUG", int, 0, "verbosity: 1 logs passes and match counts, 2 prints graphs"),
        Flag("SPEC", bool, False, "run the IR verifier after capture and after every pass (always on in tests)"),
        Flag("VALIDATE", bool, False, "translation validation: run original and rewritten graphs and compare"),
        Flag("DB", str, "", "path of the SQLite tuning database", default_fn=default_db_path,
             default_env=("XDG_CACHE_HOME", "HOME")),
        Flag("MODEL_CACHE", str, "", "directory of converted models (graphtune.models.smollm2's safetensors copy)",
             default_fn=lambda: str(Path(default_db_path()).parent / "models"),
             default_env=("XDG_CACHE_HOME", "HOME")),
        Flag("CACHELEVEL", int, 1, "0 disables the tuning database (defaults only), 1 reads and writes it"),
        Flag("DISABLE_TRITON", bool, False, "never use Triton kernels, even on a GPU"),
        Flag("TUNE_TIMEOUT", float, 30.0, "seconds one tuning candidate may run before it scores infinity"),
        Flag("NUM_THREADS", int, 0, "CPU worker threads for graphtune's CPU kernels (0: torch's setting)"),
        Flag("SHARED_PREFIX_MIN_PREFIX", int, -1,
             "shared-prefix decomposition: min shared tokens (-1: measured default)"),
        Flag("SHARED_PREFIX_MIN_ROWS", int, -1, "shared-prefix decomposition: min sharing rows (-1: measured default)"),
        Flag("ENGINE_MAX_KV_TOKENS", int, 0, "engine: KV budget in tokens (0: no bound); rows beyond it wait"),
        Flag("ENGINE_MIN_SHARED", int, 16, "engine: shortest shared prompt prefix stored once"),
        Flag("ENGINE_MAX_BATCH_TOKENS", int, 2048, "engine: most tokens per prefill forward (longer prompts are chunked)"),
        Flag("ENGINE_KEEP_FREED_MEMORY", bool, True,
             "engine: keep freed heap memory in the process (glibc mallopt: no mmap/trim below 1-2 GiB), so a "
             "forward's large temporaries are reused instead of page-faulting anew (process-wide)"),
        Flag("ENGINE_TUNED_LINEAR", bool, True,
             "engine: run the model's linear layers in decode/verify steps with the tuned CPU formulation "
             "for their shape ('graphtune tune --linear'; untuned shapes run F.linear)"),
        Flag("ENGINE_LINEAR_MAX_ROWS", int, 4096,
             "engine: tokens per forward up to which linear layers are routed to their tuned formulation"),
        Flag("LINEAR_PACKED", bool, True,
             "linear family: allow the oneDNN packed-weight implementation (keeps a second, blocked copy of "
             "each weight it serves)"),
        Flag("ENGINE_SPEC_TOKENS", int, 10, "engine, speculative decoding: most draft tokens per row per step"),
        Flag("ENGINE_SPEC_MIN_ACCEPT", float, 0.1,
             "engine, speculative decoding: rows whose running per-token acceptance rate is below this "
             "are not drafted for (goodput decides the rest from measured step costs)"),
        Flag("ENGINE_SPEC_TOKEN_COST", float, -1.0,
             "engine, speculative decoding: cost of verifying one more token relative to a forward's fixed "
             "cost (-1: greedy measures it per call, sampling uses 0.15, measured for SmolLM2 on one CPU thread)"),
        Flag("SPARSE_PREFILL_MIN_LEN", int, 2048,
             "sparse prefill (opt-in): shortest prompt (keys of a prefill call) that runs block-sparse"),
        Flag("SPARSE_PREFILL_TAU", float, 0.94, "sparse prefill: fraction of each query block's attention mass its kept key "
             "blocks and own segment cover (sample > 0; over the earlier segments' blocks only when sample = 0)"),
        Flag("SPARSE_PREFILL_BLOCK", int, 128, "sparse prefill: key/query block size"),
        Flag("SPARSE_PREFILL_SEGMENT", int, 256, "sparse prefill: permutation segment size (a multiple of the block)"),
        Flag("SPARSE_PREFILL_SAMPLE", int, 8, "sparse prefill: query rows per block the block selection samples "
             "(0: the paper's pooled block means)"),
        Flag("SPARSE_PREFILL_SELECT_PER", str, "segment",
             "sparse prefill: 'segment' (a query segment's blocks share one block selection, estimated from all "
             "their sampled rows) or 'block' (each query block its own, the paper's)"),
        Flag("SPARSE_PREFILL_PEAKS", int, 0, "sparse prefill: blocks each query row adds to the selection by a "
             "Quest-style bound on its scores (its peaks the sampled rows miss; 0: off)"),
        Flag("SPARSE_PREFILL_BF16_SCORES", bool, True, "sparse prefill: the selection's sampled scores in bfloat16 "
             "where the hardware has it (a GPU, a CPU with AVX512-BF16/AMX)"),
        Flag("LEAN_MIN_SKEW", float, -1.0, "lean decode: min max/mean KV-length skew to use it (-1: measured default)"),
        Flag("LEAN_TRITON_ON_CPU", bool, False,
             "route CPU tensors through lean decode's Triton path (tests; needs TRITON_INTERPRET=1)"),
    ]
}

# Old flag name -> new name. The old names (flags and GRAPHTUNE_<OLD> variables) keep working, with
# a DeprecationWarning; the new variable wins when both are set.
DEPRECATED: dict[str, str] = {
    "HYDRAGEN_MIN_PREFIX": "SHARED_PREFIX_MIN_PREFIX",
    "HYDRAGEN_MIN_ROWS": "SHARED_PREFIX_MIN_ROWS",
}


def _current_name(name: str) -> str:
    new = DEPRECATED.get(name)
    if new is None:
        return name
    warnings.warn(f"graphtune flag {name} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
    return new

_ENV_NAMES = {name: f"GRAPHTUNE_{name}" for name in FLAGS}
_OLD_ENV = {new: f"GRAPHTUNE_{old}" for old, new in DEPRECATED.items()}  # new flag -> its old variable

# One ContextVar holding the overrides so a `Context` is visible to the whole task/thread.
_overrides: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("graphtune_flags", default={})


_parsed: dict[str, tuple[tuple[str | None, ...], Any]] = {}  # name -> (env texts read, parsed value)


def get(name: str) -> Any:
    """Current value of flag ``name``: a :class:`Context` override, else the environment, else the default.

    Read on hot paths (every attention call), so the value is cached per text of the environment
    variables it was computed from (the flag's own, plus those a computed default reads, such as
    ``$HOME`` for the DB path): changing any of them still takes effect at the next read.
    """
    ov = _overrides.get()
    if ov and name in ov:
        return ov[name]
    try:
        flag = FLAGS[name]
    except KeyError:
        if name not in DEPRECATED:
            raise OptionError(f"unknown graphtune flag {name!r}; known: {sorted(FLAGS)}") from None
        return get(_current_name(name))
    env = os.environ
    raw = env.get(flag.env)
    old = _OLD_ENV.get(name)
    inputs: tuple[str | None, ...] = (raw,) if old is None else (raw, env.get(old))
    if raw is None and flag.default_env:
        inputs += tuple(env.get(e) for e in flag.default_env)
    hit = _parsed.get(name)
    if hit is not None and hit[0] == inputs:
        return hit[1]
    value = flag.from_env()
    _parsed[name] = (inputs, value)
    return value


class Context:
    """Override flags for a block: ``with Context(DEBUG=1, SPEC=True): ...``."""

    def __init__(self, **overrides: Any) -> None:
        overrides = {_current_name(k): v for k, v in overrides.items()}
        for k, v in overrides.items():
            if k not in FLAGS:
                raise OptionError(f"unknown graphtune flag {k!r}; known: {sorted(FLAGS)}")
            want = FLAGS[k].type
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                if not (want is float and isinstance(v, int) and not isinstance(v, bool)):
                    raise OptionError(f"flag {k} must be {want.__name__}, got {type(v).__name__}")
        self.overrides = overrides
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "Context":
        self._token = _overrides.set({**_overrides.get(), **self.overrides})
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _overrides.reset(self._token)


# --------------------------------------------------------------------------------------
# Per-call options
# --------------------------------------------------------------------------------------

_CAPTURE_METHODS = ("auto", "fx", "dynamo", "export")


@dataclass(frozen=True)
class Options:
    """Validated options of :func:`graphtune.optimize`, :func:`graphtune.explain` and the backend.

    Parameters
    ----------
    capture : {"auto", "fx", "dynamo", "export"}
        How to capture the model. ``auto`` uses torch.fx symbolic tracing where it works and
        Dynamo otherwise (always Dynamo for models that ``generate`` with a KV cache).
    validate : bool or None
        Translation validation: run original and rewritten graphs on the example inputs and raise
        :class:`~graphtune.errors.TranslationValidationError` on mismatch. ``None`` follows the
        ``GRAPHTUNE_VALIDATE`` flag.
    inductor : bool
        ``torch.compile`` backend only: hand the rewritten graph to Inductor (default) or run it eagerly.
    dynamic : bool or None
        Dynamo's ``dynamic`` argument for the Dynamo capture path.
    shared_prefix, lean_decode : bool
        Enable the shared-prefix (Hydragen) and lean-decode runtime selectors. They are not graph
        rewrites: each decides per batch, from the data (which rows share a prompt, how ragged the
        KV lengths are), and declines wherever it would not be exact or would not pay.
    engine : bool
        Generation models: ``generate`` runs graphtune's engine (its own KV cache and decode
        loop) for every configuration it supports, and Hugging Face's loop otherwise.
    sparse_prefill : str, PBSConfig, SparsePrefill or None
        Opt-in approximate prefill attention for long prompts: ``"pbs"`` (permuted block-sparse,
        PBS-Attn), ``"block"`` (the same selection without the permutation), a
        :class:`~graphtune.codegen.pbs_attention.plan.PBSConfig`, a
        :class:`~graphtune.runtime.sparse_prefill.SparsePrefill` (per-layer configs, e.g. from
        ``graphtune tune --accuracy``), or None (off: every attention is exact). Decode stays dense.
    speculative : str, Drafter or None
        Speculative decoding in the engine's ``generate``: ``"ngram"`` (prompt lookup),
        ``"layerskip"`` (self-speculative early exit), ``"dytree"`` (a dynamic draft tree from
        the early exit), a
        :class:`~graphtune.runtime.engine.drafters.Drafter`, or None (off). Lossless: greedy
        output is the target model's, sampled output has the target's distribution.
    tune : bool
        Consult the tuning database for implementation and configuration choices (tuned dispatch).
        ``False`` runs every op on its default implementation.
    rtol, atol : float
        Tolerances of translation validation.
    """

    capture: str = "auto"
    validate: bool | None = None
    inductor: bool = True
    dynamic: bool | None = None
    shared_prefix: bool = True
    lean_decode: bool = True
    engine: bool = True
    speculative: object = None
    sparse_prefill: object = None
    tune: bool = True
    rtol: float = 1e-5
    atol: float = 1e-5

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Options":
        """Build options, raising :class:`OptionError` naming any unknown or ill-typed option."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in kwargs.items():
            if k not in fields:
                raise OptionError(f"unknown graphtune option {k!r}; valid options: {sorted(fields)}")
            _check_type(k, v, fields[k].type)
        opts = cls(**kwargs)
        if opts.capture not in _CAPTURE_METHODS:
            raise OptionError(f"option capture={opts.capture!r} must be one of {_CAPTURE_METHODS}")
        if opts.rtol < 0 or opts.atol < 0:
            raise OptionError("options rtol and atol must be >= 0")
        return opts

    @property
    def validating(self) -> bool:
        return get("VALIDATE") if self.validate is None else self.validate

    def key(self) -> str:
        """Stable text of every option that changes the rewritten graph (for cache keys)."""
        return ";".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    def items(self) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name)


def _check_type(name: str, value: Any, annotation: str) -> None:
    # annotations are strings under `from __future__ import annotations`
    allowed: list[type] = []
    for part in str(annotation).split("|"):
        part = part.strip()
        # "object": any value; the option's consumer validates it (e.g. speculative=Drafter(...))
        allowed.append({"str": str, "bool": bool, "int": int, "float": float, "None": type(None),
                        "object": object}[part])
    ok = any(
        isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
        or (t is float and isinstance(value, int) and not isinstance(value, bool))
        for t in allowed
    )
    if not ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise OptionError(f"option {name} must be {names}, got {type(value).__name__} ({value!r})")

