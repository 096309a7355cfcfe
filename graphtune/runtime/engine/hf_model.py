"""How a Hugging Face causal LM's layers reach the engine's KV cache: HF's attention interface.

The engine runs the model's own modules (embeddings, RoPE, MLPs, norms) on a packed sequence of
the tokens it computes, with ``use_cache=False`` so that HF builds no cache of its own, and with
the model's attention implementation switched, for the duration of the call, to
``"graphtune_engine"``: a function registered in HF's ``ALL_ATTENTION_FUNCTIONS`` that receives
each layer's post-RoPE ``q, k, v`` and hands them to :func:`graphtune.runtime.engine.step.run_attention`.

Why this rather than a graph rewrite of the captured model or a ``Cache`` subclass: it needs no
capture (no Dynamo cost on a new batch shape: the first call is as fast as the next), it is the
extension point HF maintains across versions (4.50 and 5.x), and HF's cache object is bypassed
entirely, so nothing is concatenated or gathered. A model whose attention does not go through the
interface (checked per attention class) is not supported and generation falls back to HF's loop.

Only the rows' final hidden states go through the LM head (``get_output_embeddings``), not all
``T`` packed tokens.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from graphtune.errors import OptionError
from graphtune.runtime.engine.linear import LinearRouter

__all__ = ["ATTN_NAME", "unsupported_reason", "ModelRunner"]

ATTN_NAME = "graphtune_engine"
# model types whose attention modules take (q, k, v) through ALL_ATTENTION_FUNCTIONS and whose
# positions come from position_ids (checked again per model: see unsupported_reason)
MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox", "opt")

_active: contextvars.ContextVar[Any] = contextvars.ContextVar("graphtune_engine_step", default=None)
_lock = threading.Lock()
_registered = False
_switched: dict[int, tuple[int, str]] = {}  # id(config) -> (engine calls running, implementation to restore)


def _attention_functions() -> Any:
    from transformers import modeling_utils

    return getattr(modeling_utils, "ALL_ATTENTION_FUNCTIONS", None)


def _engine_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    step = _active.get()
    if step is None:  # a plain forward of this model from another thread while the engine runs
        fn = _attention_functions()["sdpa"]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return step(module.layer_idx, query, key, value, scaling), None


def _register() -> None:
    global _registered
    if _registered:
        return
    with _lock:
        funcs = _attention_functions()
        try:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTN_NAME, _engine_attention)
        except ImportError:  # transformers 4.50: a plain dict
            funcs[ATTN_NAME] = _engine_attention
        _registered = True


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def unsupported_reason(model: Any) -> str | None:
    """Why the engine cannot run ``model`` (None if it can). Checked once per model."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_output_embeddings") or not hasattr(model, "base_model"):
        return "not a Hugging Face PreTrainedModel"
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one the engine supports ({', '.join(MODEL_TYPES)})"
    if _attention_functions() is None:
        return "this transformers has no attention-function registry (ALL_ATTENTION_FUNCTIONS)"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output embeddings (LM head)"
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        return f"the engine's attention runs on CPU; the model is on {dev}"
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, attr, None):
            return f"config.{attr} is set"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        return f"sliding-window attention (window {window})"
    if cfg.model_type == "gpt2" and (getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
                                     or getattr(cfg, "reorder_and_upcast_attn", False)
                                     or not getattr(cfg, "scale_attn_weights", True)):
        return "GPT-2 attention scaling options (scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn) are set"
    attn = _attention_modules(model)
    if not attn:
        return "no attention modules with a layer index found"
    for m in {type(a) for a in attn}:
        try:
            src = inspect.getsource(m.forward)
        except (OSError, TypeError):
            return f"cannot inspect {m.__name__}.forward"
        if "ALL_ATTENTION_FUNCTIONS" not in src:
            return f"{m.__name__} does not call HF's attention interface in this transformers version"
    return None


class ModelRunner:
    """Runs a supported model's forward over packed tokens with the engine's attention."""

    def __init__(self, model: nn.Module) -> None:
        _register()
        self.model = model
        self.cfg = model.config
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        attn = _attention_modules(model)
        self.num_layers = len(attn)
        text = getattr(self.cfg, "get_text_config", lambda: self.cfg)()
        self.num_heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.num_heads
        self.dtype = next(model.parameters()).dtype
        self.eos_default = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.linears = LinearRouter(model)  # tuned few-row linears inside engine forwards

    @contextlib.contextmanager
    def attention(self, step: Any) -> Iterator[None]:
        """Within the block, every attention layer of this model calls ``step(layer, q, k, v, scale)``."""
        cfg = self.cfg
        tok = _active.set(step)
        # the config is shared by every engine call on this model (threads): switch it once for all
        # of them and restore it when the last one leaves (a plain save/restore per call let one
        # call's exit switch another's remaining layers back to HF's attention)
        with _lock:
            n, old = _switched.get(id(cfg), (0, cfg._attn_implementation))
            _switched[id(cfg)] = (n + 1, old)
            cfg._attn_implementation = ATTN_NAME
        try:
            with self.linears.active():
                yield
        finally:
            with _lock:
                n, old = _switched.pop(id(cfg))
                if n > 1:
                    _switched[id(cfg)] = (n - 1, old)
                else:
                    cfg._attn_implementation = old
            _active.reset(tok)

    def hidden(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Final hidden states ``[T, hidden]`` of packed tokens ``ids [T]`` at ``positions [T]``."""
        out = self.base(input_ids=ids[None], position_ids=positions[None], use_cache=False, return_dict=True)
        return out.last_hidden_state[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits of hidden states ``[n, hidden]``."""
        with self.linears.active():
            return self.head(hidden).float()

    def early_exit_hidden(self, ids: Tensor, positions: Tensor, layers: int) -> Tensor:
        """Hidden states ``[T, hidden]`` after the first ``layers`` decoder layers and the model's
        final norm (a LayerSkip-style draft: the rest of the stack is not run).

        Why a forward hook that stops the forward: the model's own forward computes embeddings,
        positions (RoPE) and masks the way the full forward does, so the first layers see exactly
        what they see in the full model; the hook on layer ``layers - 1`` carries its output out.
        """
        blocks, norm = self.decoder_blocks()
        if not 1 <= layers <= len(blocks):
            raise ValueError(f"early exit after {layers} layers: the model has {len(blocks)}")
        if layers == len(blocks):
            return self.hidden(ids, positions)

        def stop(module: nn.Module, args: Any, out: Any) -> None:
            raise _EarlyExit(out[0] if isinstance(out, (tuple, list)) else out)

        handle = blocks[layers - 1].register_forward_hook(stop)
        try:
            self.base(input_ids=ids[None], position_ids=positions[None], use_cache=False, return_dict=True)
        except _EarlyExit as e:
            return norm(e.hidden)[0]
        finally:
            handle.remove()
        raise RuntimeError("early exit: the decoder layer hook did not run")  # pragma: no cover

    @contextlib.contextmanager
    def record_layer_outputs(self, into: list) -> Iterator[None]:
        """Within the block, each decoder layer's output (whatever it returns: a tensor, or a tuple in
        older transformers) is appended to ``into``, in layer order, for :meth:`resume_at`."""
        blocks, _ = self.decoder_blocks()

        def keep(module: nn.Module, args: Any, out: Any) -> None:
            into.append(out)

        handles = [b.register_forward_hook(keep) for b in blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def resume_at(self, layer: int, outputs: Sequence[Any]) -> Iterator[None]:
        """Within the block, a forward runs only decoder layers ``layer..``: the earlier ones return
        ``outputs[layer - 1]`` (recorded by :meth:`record_layer_outputs` on the same input) without
        computing. Exact when those layers would compute what was recorded; why: a measurement that
        changes only layer ``i`` (``graphtune tune --accuracy``'s per-layer sensitivity) need not
        recompute the ``i`` layers before it, which halves its cost. It patches the modules: not
        for a model other threads run meanwhile.
        """
        blocks, _ = self.decoder_blocks()
        if not 0 <= layer <= len(blocks) or (layer and len(outputs) < layer):
            raise OptionError(f"resume at layer {layer}: the model has {len(blocks)} layers, {len(outputs)} recorded")
        out = outputs[layer - 1] if layer else None
        for b in blocks[:layer]:  # an instance attribute shadows the class's forward (nn.Module.__call__ reads it)
            b.forward = lambda *a, **kw: out
        try:
            yield
        finally:
            for b in blocks[:layer]:
                del b.forward

    def decoder_blocks(self) -> tuple[nn.ModuleList, nn.Module]:
        """The decoder layers, in order, and the final norm applied to the last layer's output."""
        base = self.base
        for layers_name, norm_name, holder in (("layers", "norm", base), ("h", "ln_f", base),
                                               ("layers", "final_layer_norm", base),
                                               ("layers", "final_layer_norm", getattr(base, "decoder", None))):
            blocks = getattr(holder, layers_name, None) if holder is not None else None
            norm = getattr(holder, norm_name, None) if holder is not None else None
            if isinstance(blocks, nn.ModuleList) and isinstance(norm, nn.Module):
                return blocks, norm
        raise ValueError(f"cannot find the decoder layers and final norm of {type(base).__name__}")


class _EarlyExit(Exception):
    def __init__(self, hidden: Tensor) -> None:
        super().__init__("early exit")
        self.hidden = hidden
