"""How accurate is sparse prefill on a real model: per-head recall, next-token agreement, KL, passkey retrieval.

Sparse prefill is approximate, so graphtune measures what it costs instead of assuming it:

* :func:`capture` runs a prompt densely through the model's own layers (via the engine's
  :class:`~graphtune.runtime.engine.hf_model.ModelRunner`, one call over the whole prompt) and keeps
  every layer's post-RoPE ``q, k, v`` and the logits of the last ``keep`` positions;
* :func:`layer_stats` replays each layer's ``q, k, v`` through a PBS plan: per head, the attention
  *recall* (true attention mass on computed keys), the *density* and the output's relative error
  vs dense (:func:`graphtune.codegen.pbs_attention.stats.head_stats`);
* :func:`sparse_logits` + :func:`compare_logits`: the same prompt with sparse prefill; top-1
  agreement and ``KL(dense || sparse)`` of the next-token distributions over the last positions;
* :func:`passkey_prompt`: a number hidden at a given depth of filler text, asked for at the end.

Calibration text (:func:`calibration_text`) is Python standard-library source, which ships with
every Python: real text, no download.

Examples
--------
>>> from graphtune.models import build_model
>>> from graphtune.codegen.pbs_attention.plan import PBSConfig
>>> import torch
>>> model = build_model("llama", max_position_embeddings=1024)
>>> ids = torch.randint(3, 200, (512,))
>>> cap = capture(model, ids, keep=64)
>>> s = SparsePrefill(PBSConfig(32, 64, 1.0), min_len=256)
>>> top1, kl = compare_logits(cap.logits, sparse_logits(model, ids, s, keep=64))
>>> top1, round(kl, 6)
(1.0, 0.0)
"""
from __future__ import annotations

import contextlib
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphtune.codegen.pbs_attention.plan import plan_pbs
from graphtune.codegen.pbs_attention.stats import head_stats
from graphtune.errors import OptionError
from graphtune.ir.ops import flash_cpu
from graphtune.runtime.engine.hf_model import ModelRunner
from graphtune.runtime.sparse_prefill import SparsePrefill, run_sparse

__all__ = ["Capture", "capture", "sparse_logits", "compare_logits", "layer_stats", "calibration_text",
           "calibration_ids", "passkey_prompt", "PASSKEY_DEPTHS", "STDLIB_FILES"]

STDLIB_FILES = ("argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py")
PASSKEY_DEPTHS = tuple(i / 10 for i in range(10))  # 0.0 .. 0.9 of the filler


@dataclass
class Capture:
    """A dense pass over a prompt: per layer ``(q [1,Hq,N,D], k, v [1,Hkv,N,D])``, the last logits ``[keep, V]``
    and (``capture(..., layer_outputs=True)``) each decoder layer's output, from which :func:`sparse_logits`
    can resume."""

    qkv: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    logits: Tensor | None = None
    layer_outputs: list[Any] = field(default_factory=list)


Attend = Callable[[int, Tensor, Tensor, Tensor, float | None], Tensor]


def _prompt_logits(runner: ModelRunner, ids: Tensor, attend: Attend, keep: int, record: list | None = None,
                   resume: tuple[int, Sequence[Any]] | None = None) -> Tensor:
    # one forward of the whole prompt with `attend` as every layer's attention; logits of the last `keep`.
    # record: collect each decoder layer's output; resume (layer, recorded outputs): skip the layers before
    n = ids.numel()

    def step(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        return attend(layer, q, k, v, scale).transpose(1, 2)  # [1, Hq, N, D] -> [1, N, Hq, D]

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(runner.attention(step))
        if record is not None:
            stack.enter_context(runner.record_layer_outputs(record))
        if resume is not None:
            stack.enter_context(runner.resume_at(*resume))
        hidden = runner.hidden(ids.view(-1), torch.arange(n))
        return runner.logits(hidden[n - keep:]).float()


def capture(model: Any, ids: Tensor, keep: int = 512, qkv: bool = True, layer_outputs: bool = False) -> Capture:
    """Dense prefill of ``ids`` (1-D): every layer's ``q, k, v`` (if ``qkv``), the last ``keep`` logits and
    (if ``layer_outputs``) every decoder layer's output (``N x hidden`` floats each)."""
    runner = ModelRunner(model)
    cap = Capture()

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        if qkv:
            cap.qkv.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return flash_cpu(q, k, v, None, True, scale)[0]

    cap.logits = _prompt_logits(runner, ids, attend, min(keep, ids.numel()), cap.layer_outputs if layer_outputs else None)
    return cap


def sparse_logits(model: Any, ids: Tensor, settings: SparsePrefill, keep: int = 512,
                  resume: tuple[int, Capture] | None = None) -> Tensor:
    """The last ``keep`` logits of ``ids`` prefilled in one call per layer with sparse prefill ``settings``.

    ``resume=(i, cap)``: layers before ``i`` are not run; their output is ``cap``'s (a dense
    :func:`capture` of the same ``ids`` with ``layer_outputs=True``). Exact when ``settings`` keeps
    those layers dense (it is not checked which way they would run).
    """
    runner = ModelRunner(model)

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        if settings.applies(k.shape[2], q.shape[2]):
            return run_sparse(settings, layer, q, k, v, scale)[0]
        return flash_cpu(q, k, v, None, True, scale)[0]

    res = None
    if resume is not None:
        layer, cap = resume
        if layer and len(cap.layer_outputs) < layer:
            raise OptionError(f"sparse_logits: resume at layer {layer} needs a capture with layer_outputs=True "
                              f"(this one holds {len(cap.layer_outputs)})")
        res = (layer, cap.layer_outputs)
    return _prompt_logits(runner, ids, attend, min(keep, ids.numel()), resume=res)


def compare_logits(dense: Tensor, sparse: Tensor) -> tuple[float, float]:
    """``(top-1 agreement, mean KL(dense || sparse))`` of next-token distributions, ``[positions, V]`` each."""
    top1 = float((dense.argmax(-1) == sparse.argmax(-1)).float().mean())
    ld, ls = torch.log_softmax(dense.double(), -1), torch.log_softmax(sparse.double(), -1)
    kl = float((ld.exp() * (ld - ls)).sum(-1).mean().clamp_min(0.0))
    return top1, kl


def layer_stats(cap: Capture, settings: SparsePrefill, layers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per layer: mean/min recall, density, mean/max relative error (and per-head lists) of ``settings``' plans."""
    rows = []
    for i in (range(len(cap.qkv)) if layers is None else layers):
        q, k, v = cap.qkv[i]
        cfg = settings.for_layer(i)
        st = head_stats(q, k, v, plan_pbs(q, k, cfg, None, v))
        rows.append({"layer": i, **st.summary(), "recall_heads": st.recall[0].tolist(),
                     "density_heads": st.density[0].tolist(), "rel_err_heads": st.rel_err[0].tolist()})
    return rows


def calibration_text(min_chars: int = 200_000, files: Sequence[str] = STDLIB_FILES) -> str:
    """Python standard-library sources concatenated (real code and prose; ships with every Python)."""
    lib = sysconfig.get_paths()["stdlib"]
    parts, n = [], 0
    for f in files:
        path = os.path.join(lib, f)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as fh:
            parts.append(fh.read())
        n += len(parts[-1])
        if n >= min_chars:
            break
    if not parts:
        raise OptionError(f"no calibration source found under {lib} (looked for {list(files)})")
    return "".join(parts)


def calibration_ids(tokenizer: Any, length: int, offset: int = 0, text: str | None = None) -> Tensor:
    """``length`` token ids (1-D) of ``text`` (default :func:`calibration_text`) starting at token ``offset``."""
    own = text is not None
    text = calibration_text(max(200_000, (length + offset) * 6)) if text is None else text
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < length + offset:
        raise OptionError(f"{'the given' if own else 'the stdlib'} calibration text has {ids.numel()} tokens, "
                          f"fewer than {length + offset}")
    return ids[offset:offset + length]


_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> list[int]:
    """Token ids of ~``length`` tokens of filler with ``The pass key is <key>.`` at ``depth`` (0..1), then the question."""
    head = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about it.\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    tail = "\nWhat is the pass key? The pass key is"
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    h, nd, t, f = enc(head), enc(needle), enc(tail), enc(_FILLER)
    budget = length - len(h) - len(nd) - len(t)
    if budget < len(f):
        raise OptionError(f"passkey prompt: length {length} leaves no room for filler")
    filler = (f * (budget // len(f) + 1))[:budget]
    at = int(depth * budget)
    return h + filler[:at] + nd + filler[at:] + t
