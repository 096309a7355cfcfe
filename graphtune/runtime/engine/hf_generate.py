"""``optimize(model).generate(...)``: HF's signature, routed through the engine when it supports the call.

Routed: greedy decoding; sampling with temperature, top-k and top-p; ``num_return_sequences``;
padded batches (``attention_mask``); EOS and ``max_new_tokens``/``max_length``; streamers; prompt
lookup decoding (``prompt_lookup_num_tokens``: the engine's n-gram drafter, lossless). Anything
else (beam search, repetition penalties, logits processors, ``inputs_embeds``, a cache passed
in, ``return_dict_in_generate``...) runs HF's own loop, and the reason is logged (and reported
by :func:`why_not`).

The result is what HF returns: ``[rows, input_len + new]`` token ids, the (padded) prompts
followed by the generated tokens, rows that stopped early padded with ``pad_token_id``, rows in
HF's order (each prompt's ``num_return_sequences`` samples together).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch
from torch import Tensor

from graphtune.runtime.engine.engine import Engine
from graphtune.runtime.engine.hf_model import unsupported_reason

__all__ = ["EngineGenerate", "why_not"]

log = logging.getLogger("graphtune.engine")

# GenerationConfig fields the engine implements; any other field that differs from HF's default
# (a penalty, a processor, beam search, an output option...) sends the call to HF's loop
_HANDLED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "num_return_sequences",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "transformers_version",
    "_from_model_config", "_commit_hash", "_original_object_hash", "cache_implementation", "return_legacy_cache",
    "compile_config", "disable_compile",
    # HF's prompt lookup decoding: the engine's n-gram drafter (lossless, at any batch size)
    "prompt_lookup_num_tokens", "max_matching_ngram_size",
}
_MODEL_KWARGS = {"attention_mask", "streamer", "generation_config", "use_cache"}


def _generation_config(model: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    base = kwargs.pop("generation_config", None) or model.generation_config
    gc = copy.deepcopy(base)
    rest = gc.update(**kwargs)  # HF: returns the kwargs that are not generation-config fields
    return _with_defaults(gc), rest


def _with_defaults(gc: Any) -> Any:
    # transformers >= 5 leaves unset fields None and applies global defaults inside generate
    # (top_k=50, num_return_sequences=1...): apply them here the same way
    fill = getattr(type(gc), "_get_default_generation_params", None)
    if fill is not None:
        for k, v in fill().items():
            if getattr(gc, k, None) is None:
                setattr(gc, k, v)
    return gc


def why_not(model: Any, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why this ``generate`` call is not routed through the engine (None: it is)."""
    reason = unsupported_reason(model)
    if reason:
        return reason
    kwargs = dict(kwargs)
    if len(args) > 1:
        return "positional arguments beyond input_ids"
    if kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds (the engine takes token ids)"
    ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        return "input_ids must be a [batch, length] integer tensor"
    streamer = kwargs.pop("streamer", None)
    mask = kwargs.pop("attention_mask", None)
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != ids.shape):
        return "attention_mask must be a 0/1 tensor shaped like input_ids"
    try:
        gc, rest = _generation_config(model, kwargs)
    except Exception as e:  # noqa: BLE001 - HF validates; its own loop will raise the same error
        return f"generation config rejected ({e})"
    extra = sorted(k for k, v in rest.items() if k not in _MODEL_KWARGS and v is not None)
    if extra:
        return f"model inputs the engine does not take: {extra}"
    from transformers import GenerationConfig

    default = _with_defaults(GenerationConfig())
    for k, v in vars(gc).items():
        if k in _HANDLED or k.startswith("_"):
            continue
        d = getattr(default, k, None)
        if d != v and not (v in (None, False) and d in (None, False)):  # versions differ on unset flags
            return f"generation option {k}={v!r} is not implemented by the engine"
    if gc.num_return_sequences > 1 and not gc.do_sample:
        return "num_return_sequences > 1 with greedy decoding (HF rejects it)"
    if streamer is not None and not hasattr(streamer, "put"):
        return "streamer without put()"
    return None


class EngineGenerate:
    """Replaces ``generate`` on an optimized model: the engine where it applies, HF's loop otherwise."""

    def __init__(self, model: Any, hf_generate: Callable[..., Any], speculative: Any = None,
                 sparse_prefill: Any = None) -> None:
        self.model = model
        self.hf_generate = hf_generate
        self.speculative = speculative  # optimize(model, speculative=...): the engine's drafter
        self.sparse_prefill = sparse_prefill  # optimize(model, sparse_prefill=...): opt-in PBS prefill
        self._engine: Engine | None = None
        self._lookup_engines: dict[tuple[int, int], Engine] = {}  # prompt_lookup_num_tokens calls
        self.last_route: str = ""
        self.last_speculation: Any = None  # per-row speculation counters of the last engine call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = why_not(self.model, args, kwargs)
        if reason is not None:
            self.last_route = f"HF generate: {reason}"
            log.info("graphtune: generate runs Hugging Face's loop: %s", reason)
            return self.hf_generate(*args, **kwargs)
        self.last_route = "graphtune engine"
        return self._run(args, dict(kwargs))

    def _run(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
        mask = kwargs.pop("attention_mask", None)
        streamer = kwargs.pop("streamer", None)
        from transformers import GenerationConfig

        # HF: no max_length set anywhere (4.x: the default 20; 5.x: None) means 20 *new* tokens,
        # within the model's positions (GenerationMixin._prepare_generated_length)
        base = kwargs.get("generation_config") or self.model.generation_config
        default_length = kwargs.get("max_length") is None and base.max_length == GenerationConfig().max_length
        gc, _ = _generation_config(self.model, kwargs)
        B, L = ids.shape
        if gc.max_new_tokens is not None:
            new = gc.max_new_tokens
        elif default_length:
            max_pos = getattr(self.model.config, "max_position_embeddings", None)
            new = (min(gc.max_length + L, max_pos) if max_pos is not None else gc.max_length + L) - L
        else:
            new = gc.max_length - L
        if new < 1:
            raise ValueError(f"max_length {gc.max_length} leaves no room to generate after {L} input tokens")
        if mask is None and gc.pad_token_id is not None:
            # HF infers the mask from padding when pad_token_id occurs and is not an EOS id
            # (GenerationMixin._prepare_attention_mask_for_generation)
            eos_ids = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
            if gc.pad_token_id not in eos_ids and bool((ids == gc.pad_token_id).any()):
                mask = ids.ne(gc.pad_token_id)
        prompts = [ids[b][mask[b].bool()].tolist() if mask is not None else ids[b].tolist() for b in range(B)]
        n = gc.num_return_sequences
        pad = gc.pad_token_id
        if pad is None:
            eos = gc.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        if self._engine is None:
            self._engine = Engine(self.model, speculative=self.speculative, sparse_prefill=self.sparse_prefill)
        engine = self._engine
        lookup = getattr(gc, "prompt_lookup_num_tokens", None)
        if lookup:  # HF's prompt lookup decoding, served by the engine's n-gram drafter
            from graphtune.runtime.engine.drafters import NGramDrafter

            key = (gc.max_matching_ngram_size or 2, int(lookup))
            engine = self._lookup_engines.get(key)
            if engine is None:  # one per setting: an Engine checks the model once when built
                engine = self._lookup_engines[key] = Engine(
                    self.model, speculative=NGramDrafter(max_ngram=key[0]), spec_tokens=key[1],
                    sparse_prefill=self.sparse_prefill)
        rows = B * n
        on_tokens = None
        if streamer is not None:
            streamer.put(ids.cpu())

            def on_tokens(rws: list[int], toks: list[int]) -> None:
                step = torch.full((rows,), pad if pad is not None else 0, dtype=ids.dtype)
                step[rws] = torch.tensor(toks, dtype=ids.dtype)
                streamer.put(step)

        do_sample = bool(gc.do_sample)
        seed = int(torch.randint(0, 2**62, ()).item()) if do_sample else None  # from torch's global RNG
        res = engine.generate(
            prompts, new, num_return_sequences=n, do_sample=do_sample, temperature=gc.temperature or 1.0,
            top_k=gc.top_k if do_sample else None, top_p=gc.top_p if do_sample else None, seed=seed,
            eos_token_id=gc.eos_token_id, on_tokens=on_tokens)
        if streamer is not None:
            streamer.end()
        width = max(len(s) for s in res.sequences)
        out = torch.full((rows, L + width), pad if pad is not None else 0, dtype=ids.dtype)
        out[:, :L] = ids.repeat_interleave(n, dim=0)
        for r, seq in enumerate(res.sequences):
            out[r, L:L + len(seq)] = torch.tensor(seq, dtype=ids.dtype)
        self.last_stats = res.stats
        self.last_speculation = res.speculation
        return out
