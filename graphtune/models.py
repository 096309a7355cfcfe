"""Small Hugging Face causal LMs built from configs with seeded random weights (no downloads).

Used by ``make demo``, the CLI's default model, tests and benchmarks. ``transformers`` is an
optional dependency: importing this module without it raises a clear error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from graphtune.errors import OptionError

if TYPE_CHECKING:  # imported on first use, by __getattr__ below
    from graphtune.models_smollm2 import smollm2

__all__ = ["FAMILIES", "ATTN_IMPLEMENTATIONS", "build_model", "demo_model", "model_config", "smollm2", "load_named"]

# family -> (config class name, model class name, config kwargs for a small model)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0)),
    # ALiBi through baddbmm on [B*H, L, D] views; HF has no SDPA path for it
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4)),
}

# attention implementations each family really has (others fall back to eager code)
ATTN_IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {fam: ("eager", "sdpa") for fam in FAMILIES}
ATTN_IMPLEMENTATIONS["bloom"] = ("eager",)

_DEMO = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test extra
        raise OptionError("graphtune.models needs `transformers` (pip install 'graphtune[test]')") from e
    return transformers


def model_config(family: str, attn_implementation: str = "eager", vocab_size: int = 512, **overrides: Any) -> Any:
    """A small config of ``family`` (one of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise OptionError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    tf = _transformers()
    cfg_name, _, kwargs = FAMILIES[family]
    kwargs = {**kwargs, "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    cfg = getattr(tf, cfg_name)(**kwargs)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(family: str, attn_implementation: str = "eager", seed: int = 0, init_std: float = 0.1,
                dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A small ``family`` causal LM with seeded random weights, in eval mode.

    ``init_std`` is larger than HF's default so that random logits are well separated and greedy
    decoding is a meaningful equality test (near-ties would flip on 1e-7 rounding differences).

    Examples
    --------
    >>> m = build_model("llama")
    >>> m.config.num_hidden_layers
    2
    """
    tf = _transformers()
    cfg = model_config(family, attn_implementation, initializer_range=init_std, **overrides)
    _, model_name, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(cfg)
    return model.to(dtype).eval()


def demo_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> torch.nn.Module:
    """graphtune's built-in default model: a 4-layer Llama (GQA 8/4 heads, head dim 32)."""
    return build_model("llama", attn_implementation, seed, **{**_DEMO, **overrides})


def __getattr__(name: str) -> Any:
    # smollm2, a real trained model, lives in graphtune.models_smollm2; imported on first use
    if name == "smollm2":
        from graphtune.models_smollm2 import smollm2

        return smollm2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_named(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` for a command-line model name: ``smollm2`` (the real model), ``demo``,
    or a family of :data:`FAMILIES` (random weights, SDPA attention, no tokenizer)."""
    if name == "smollm2":
        from graphtune.models_smollm2 import smollm2 as load_smollm2

        return load_smollm2()
    if name == "demo":
        return demo_model(attn_implementation="sdpa"), None
    return build_model(name, "sdpa"), None
