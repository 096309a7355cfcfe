"""The engine against the plain model (the oracle): greedy tokens equal HF ``generate``'s, row by row.

Every zoo family, on shared batches (a long common prefix, multi-level sharing, identical prompts,
a prompt that is entirely shared), ragged batches (very different lengths, no sharing) and mixed
ones; EOS, chunked prefill, a tight KV budget, sampling reproducibility, errors; the bytes copied
per decode step; routing of ``optimize(model).generate``; streamers.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune.errors import OptionError, PlanError  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.runtime.engine.hf_model import unsupported_reason  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox", "opt"]
PAD = 0
NEW = 8
HF_MAJOR = int(transformers.__version__.split(".")[0])

_models: dict[str, torch.nn.Module] = {}


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one intra-op thread by default: on a small shared CPU, OpenMP threads spinning against other
    # processes make these tiny forwards many times slower. Tests that need lean decode's worker
    # threads (the engine uses torch.get_num_threads() workers) ask for two with _threads(2).
    with _threads(1):
        yield


def _model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models[family] = build_model(family, "sdpa")
    return _models[family]


@pytest.fixture(params=FAMILIES)
def family(request):
    reason = unsupported_reason(_model(request.param))
    if reason is not None:
        # only OPT, and only on transformers 4.x (its attention does not call HF's interface there)
        assert request.param == "opt" and HF_MAJOR < 5, reason
        pytest.skip(f"the engine does not support {request.param} on transformers {transformers.__version__}: "
                    f"{reason}")
    return request.param


def _rand(n: int, g: torch.Generator, first: int | None = None) -> list[int]:
    toks = torch.randint(3, 512, (n,), generator=g).tolist()  # never PAD (0), BOS (1) or EOS (2)
    if first is not None:
        toks[0] = first
    return toks


def _shared_batch() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    sys_p, shot = _rand(20, g), _rand(18, g)
    a = _rand(4, g)
    return [
        sys_p + shot + a,
        sys_p + shot + _rand(6, g),
        sys_p + _rand(5, g),
        sys_p + shot + a,  # identical to row 0
        sys_p + shot,  # ends where the second-level node ends: its prompt is entirely shared
        sys_p + _rand(1, g),
    ]


def _ragged_batch() -> list[list[int]]:
    g = torch.Generator().manual_seed(12)
    return [_rand(n, g, first=f) for n, f in ((1, 3), (37, 4), (5, 5), (60, 6), (2, 7))]


def _mixed_batch() -> list[list[int]]:
    g = torch.Generator().manual_seed(13)
    pre = _rand(24, g)
    return [pre + _rand(3, g), _rand(45, g, first=8), pre + _rand(9, g), [9], pre + _rand(2, g), _rand(3, g, first=10)]


def _long_ragged_batch() -> list[list[int]]:
    # contexts past lean decode's 256-key tile: rows split across workers, partials merged
    g = torch.Generator().manual_seed(14)
    return [_rand(n, g, first=f) for n, f in ((300, 3), (7, 4), (450, 5))]


BATCHES = {"shared": _shared_batch, "ragged": _ragged_batch, "mixed": _mixed_batch, "long_ragged": _long_ragged_batch}


def _hf_row(model, prompt: list[int], new: int = NEW, **kw) -> list[int]:
    """HF generate of one row alone (no padding): the generated tokens (EOS included, nothing after it)."""
    kw = {"do_sample": False, "pad_token_id": PAD, **kw}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, **kw)
    return out[0, len(prompt):].tolist()


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


def _both_generate(model, prompts: list[list[int]], new: int = NEW, **kw) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(HF generate, optimize(model).generate, route) on the left-padded batch."""
    ids, mask = _padded(prompts)
    kw = {"do_sample": False, "pad_token_id": PAD, "max_new_tokens": new, **kw}
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
    fast = graphtune.optimize(model)
    out = fast.generate(ids, attention_mask=mask, **kw)
    return ref, out, fast.generate.last_route


# ------------------------------------------------------------------------------ greedy exactness

@pytest.mark.parametrize("batch", list(BATCHES))
def test_engine_greedy_tokens_equal_hf_generate_row_by_row(family, batch):
    model = _model(family)
    prompts = BATCHES[batch]()
    eng = graphtune.Engine(model, min_shared=4)
    with _threads(2):  # ragged rows: lean decode on two workers (split rows, merged partials)
        res = eng.generate(prompts, NEW)
    for r, p in enumerate(prompts):
        assert res.sequences[r] == _hf_row(model, p), f"{family} {batch} row {r}"
    tree = eng.last_plan
    if batch == "shared":  # the batch exercises what it says: multi-level sharing, empty leaves
        assert max(len(leaf.chain()) for leaf in tree.leaves) >= 3
        assert any(not leaf.tokens for leaf in tree.leaves)
        assert res.stats.prefilled_tokens < res.stats.prompt_tokens
    elif batch in ("ragged", "long_ragged"):
        assert not tree.shared and len({len(p) for p in prompts}) == len(prompts)
    else:
        assert len(tree.shared) == 1 and any(leaf.parent is None for leaf in tree.leaves)
    assert res.stats.generated_tokens == sum(map(len, res.sequences))


@pytest.mark.parametrize("batch", list(BATCHES))
def test_optimized_generate_equals_hf_generate_on_the_padded_batch(family, batch):
    model = _model(family)
    ref, out, route = _both_generate(model, BATCHES[batch]())
    assert route == "graphtune engine"
    assert out.shape == ref.shape and torch.equal(out, ref), f"{family} {batch}"


# ------------------------------------------------------------------------------ EOS

def _eos_mid_generation(seqs: list[list[int]]) -> tuple[int, int, int]:
    """(token, row, step): the first row's first token at a step >= 2 that the row did not produce before."""
    for r, seq in enumerate(seqs):
        for k in range(2, len(seq)):
            if seq[k] not in seq[:k]:
                return seq[k], r, k
    raise AssertionError(f"no candidate EOS token in {seqs}")


def test_engine_stops_at_eos_and_pads_like_hf(family):
    model = _model(family)
    prompts = _mixed_batch()
    free = graphtune.Engine(model, min_shared=4).generate(prompts, 10, eos_token_id=[])  # no EOS at all
    assert all(len(s) == 10 for s in free.sequences)
    eos, row, k = _eos_mid_generation(free.sequences)
    res = graphtune.Engine(model, min_shared=4).generate(prompts, 10, eos_token_id=eos)
    assert res.sequences[row] == free.sequences[row][:k + 1], "the row must stop right after its EOS"
    assert any(len(s) == 10 for s in res.sequences), "the test needs a row that does not stop"
    for r, p in enumerate(prompts):
        assert res.sequences[r] == _hf_row(model, p, 10, eos_token_id=eos), f"row {r}"
    # the padded batch: rows that stopped are padded with pad_token_id, exactly as HF does
    ref, out, route = _both_generate(model, prompts, 10, eos_token_id=eos)
    assert route == "graphtune engine" and torch.equal(out, ref)
    L = ref.shape[1] - 10
    assert out[row, L + k] == eos and (out[row, L + k + 1:] == PAD).all()
    # several EOS ids (one never produced)
    ref, out, _ = _both_generate(model, prompts, 10, eos_token_id=[511, eos])
    assert torch.equal(out, ref)
    # EOS as a row's very first token: the row ends at prefill
    first = free.sequences[1][0]
    res = graphtune.Engine(model, min_shared=4).generate(prompts, 10, eos_token_id=first)
    assert res.sequences[1] == [first]
    for r, p in enumerate(prompts):
        assert res.sequences[r] == _hf_row(model, p, 10, eos_token_id=first), f"row {r}"
    ref, out, _ = _both_generate(model, prompts, 10, eos_token_id=first)
    assert torch.equal(out, ref)


def test_engine_uses_the_generation_config_eos_by_default():
    model = _model("llama")
    eng = graphtune.Engine(model)
    assert eng._eos(None) == frozenset([model.generation_config.eos_token_id])
    assert eng._eos([]) == frozenset()


# ------------------------------------------------------------------------------ chunked prefill, KV budget

def _row_need(p: list[int], new: int) -> int:
    return len(p) + new - 1


def test_engine_chunked_prefill_and_tight_kv_budget_give_the_same_tokens(family):
    model = _model(family)
    prompts = _mixed_batch() + _shared_batch()
    ref = graphtune.Engine(model, min_shared=4).generate(prompts, NEW)
    for r in (0, 1, 3, 6):  # a few rows against HF itself (the rest are checked by the tests above)
        assert ref.sequences[r] == _hf_row(model, prompts[r])
    chunked = graphtune.Engine(model, min_shared=4, max_batch_tokens=7).generate(prompts, NEW)
    assert chunked.sequences == ref.sequences
    assert chunked.stats.forwards >= math.ceil(chunked.stats.prefilled_tokens / 7) + chunked.stats.decode_steps
    budget = max(_row_need(p, NEW) for p in prompts) + 4
    tight = graphtune.Engine(model, min_shared=4, max_kv_tokens=budget).generate(prompts, NEW)
    assert tight.stats.admissions > 1, "the budget must make rows wait"
    assert tight.stats.kv_peak_tokens <= budget
    assert tight.sequences == ref.sequences
    both = graphtune.Engine(model, min_shared=4, max_kv_tokens=budget, max_batch_tokens=5).generate(prompts, NEW)
    assert both.stats.admissions > 1 and both.sequences == ref.sequences


def test_shared_node_kept_for_waiting_rows_does_not_block_a_row_that_fits():
    # rows 0 and 2 share a 24-token node; row 1 (45 tokens) waits behind row 0 in FIFO order. Once
    # row 0 is done, the node stays resident for row 2, and row 1 alone fits the budget but not
    # next to it: the engine must still finish (it used to raise PlanError here)
    model = _model("llama")
    g = torch.Generator().manual_seed(21)
    pre = _rand(24, g)
    prompts = [pre + _rand(3, g), _rand(45, g, first=8), pre + _rand(9, g)]
    budget = _row_need(prompts[1], NEW) + 4
    res = graphtune.Engine(model, min_shared=4, max_kv_tokens=budget).generate(prompts, NEW)
    assert res.stats.admissions > 1
    for r, p in enumerate(prompts):
        assert res.sequences[r] == _hf_row(model, p), f"row {r}"


def test_every_budget_that_fits_the_largest_row_gives_the_same_tokens():
    model = _model("llama")
    prompts = _mixed_batch() + _shared_batch()
    ref = graphtune.Engine(model, min_shared=4).generate(prompts, 4)
    total = ref.stats.kv_peak_tokens
    smallest = max(_row_need(p, 4) for p in prompts)
    for budget in sorted({smallest, smallest + 1, smallest + 7, (smallest + total) // 2, total - 1, total}):
        res = graphtune.Engine(model, min_shared=4, max_kv_tokens=budget).generate(prompts, 4)
        assert res.sequences == ref.sequences, f"budget {budget}"
        assert res.stats.kv_peak_tokens <= budget


def test_engine_budget_too_small_for_one_row_names_the_sizes():
    model = _model("llama")
    p = _ragged_batch()[1]  # 37 tokens
    eng = graphtune.Engine(model, max_kv_tokens=20)
    with pytest.raises(PlanError) as e:
        eng.generate([p], NEW)
    msg = str(e.value)
    assert str(_row_need(p, NEW)) in msg and "max_kv_tokens=20" in msg, msg


# ------------------------------------------------------------------------------ sampling

def test_sampled_num_return_sequences_are_reproducible_per_seed(family):
    model = _model(family)
    prompts = _mixed_batch()[:3]
    ids, mask = _padded(prompts)
    fast = graphtune.optimize(model)
    kw = dict(attention_mask=mask, do_sample=True, num_return_sequences=3, max_new_tokens=6, temperature=0.8,
              top_k=20, pad_token_id=PAD, eos_token_id=[])

    def run(seed):
        torch.manual_seed(seed)
        out = fast.generate(ids, **kw)
        assert fast.generate.last_route == "graphtune engine"
        return out

    a, b, c = run(123), run(123), run(124)
    assert a.shape == (9, ids.shape[1] + 6)
    assert torch.equal(a[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))
    assert torch.equal(a, b), "same torch.manual_seed, different samples"
    assert not torch.equal(a, c), "different seeds, same samples"
    assert len({tuple(r) for r in a[:, ids.shape[1]:].tolist()}) > 1, "the samples of a prompt are all equal"


def test_sampled_row_does_not_depend_on_its_batch_or_the_budget():
    model = _model("llama")
    g = torch.Generator().manual_seed(5)
    A, B, C = _rand(30, g), _rand(12, g), _rand(3, g)
    kw = dict(do_sample=True, temperature=1.0, top_k=50, seed=7, eos_token_id=[])
    one = graphtune.Engine(model).generate([A, B], NEW, **kw)
    two = graphtune.Engine(model).generate([A, C], NEW, **kw)
    tight = graphtune.Engine(model, max_kv_tokens=len(A) + NEW).generate([A, C], NEW, **kw)
    assert tight.stats.admissions > 1
    assert one.sequences[0] == two.sequences[0] == tight.sequences[0]
    assert two.sequences == tight.sequences


def test_identical_prompts_with_one_new_token():
    # every row's prompt is entirely shared: its private range holds 0 slots (it used to fail to
    # reserve them on a full pool and raise PlanError)
    model = _model("llama")
    p = _mixed_batch()[1]
    res = graphtune.Engine(model, min_shared=4).generate([p, p, p], 1)
    assert res.sequences == [_hf_row(model, p, 1)] * 3
    fast = graphtune.optimize(model)
    torch.manual_seed(0)
    out = fast.generate(torch.tensor([p]), max_new_tokens=1, do_sample=True, num_return_sequences=4, pad_token_id=PAD)
    assert fast.generate.last_route == "graphtune engine" and out.shape == (4, len(p) + 1)


def test_engine_runs_under_inference_mode():
    # lean decode (ragged rows) runs on worker threads, outside the caller's inference mode
    model = _model("llama")
    prompts = _ragged_batch()
    with _threads(2):  # at least two lean workers
        ref = graphtune.Engine(model).generate(prompts, 4)
        with torch.inference_mode():
            res = graphtune.Engine(model).generate(prompts, 4)
            out = graphtune.optimize(model).generate(*_padded(prompts[:2])[:1], max_new_tokens=3, pad_token_id=PAD)
    assert res.sequences == ref.sequences
    assert out.shape[1] == len(prompts[1]) + 3


# ------------------------------------------------------------------------------ threads

def _in_threads(*fns):
    import threading

    out, errs = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(i,), name=f"engine-test-{i}") for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errs, errs
    return out


def test_overlapping_engine_calls_on_one_model_keep_their_attention(monkeypatch):
    # call A is inside its forwards when call B starts; A finishes while B is still running. A's
    # exit must not switch B's remaining layers back to HF's attention, and the model's attention
    # implementation is restored once both are done
    import threading

    import graphtune.runtime.engine.engine as E

    model = _model("llama")
    pa, pb = _ragged_batch(), _mixed_batch()
    ref_a, ref_b = (graphtune.Engine(model, min_shared=4).generate(p, NEW).sequences for p in (pa, pb))
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    real = E.run_attention
    calls = {"engine-test-0": 0, "engine-test-1": 0}

    def paced(*args, **kwargs):
        me = threading.current_thread().name
        if me in calls:
            calls[me] += 1
            if me == "engine-test-0" and calls[me] == 1:
                a_inside.set()
                assert b_inside.wait(30)
            if me == "engine-test-1" and calls[me] == 1:
                b_inside.set()
                assert a_done.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "run_attention", paced)

    def call_a():
        try:
            return graphtune.Engine(model, min_shared=4).generate(pa, NEW).sequences
        finally:
            a_done.set()

    def call_b():
        assert a_inside.wait(30)
        return graphtune.Engine(model, min_shared=4).generate(pb, NEW).sequences

    out_a, out_b = _in_threads(call_a, call_b)
    assert out_a == ref_a and out_b == ref_b
    assert model.config._attn_implementation == "sdpa"


def test_one_engine_shared_by_overlapping_calls(monkeypatch):
    # optimize(model).generate keeps one Engine for all calls: per-call state must not live on it.
    # Call A (identical prompts: entirely shared, their first token comes from the shared node)
    # plans, then call B (no sharing) plans, then A prefills.
    import threading

    import graphtune.runtime.engine.engine as E

    model = _model("llama")
    p = _mixed_batch()[1]
    pb = _ragged_batch()
    eng = graphtune.Engine(model, min_shared=4)
    ref_a, ref_b = eng.generate([p, p], NEW).sequences, eng.generate(pb, NEW).sequences
    b_planned = threading.Event()
    real_pool = E.KVPool

    def pool(*args, **kwargs):  # made right after the call's plan
        me = threading.current_thread().name
        if me == "engine-test-1":
            b_planned.set()
        elif me == "engine-test-0":
            assert b_planned.wait(30)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(E, "KVPool", pool)
    out_a, out_b = _in_threads(lambda: eng.generate([p, p], NEW).sequences, lambda: eng.generate(pb, NEW).sequences)
    assert out_a == ref_a and out_b == ref_b


# ------------------------------------------------------------------------------ errors, support

def test_string_prompts_need_a_tokenizer_and_ids_must_be_in_the_vocabulary():
    eng = graphtune.Engine(_model("llama"))
    with pytest.raises(OptionError, match="tokenizer"):
        eng.generate(["hello"], 2)
    with pytest.raises(OptionError, match="vocabulary"):
        eng.generate([[5, 512]], 2)
    with pytest.raises(OptionError, match="vocabulary"):
        eng.generate([[5, 6], [-1, 4]], 2)
    with pytest.raises(OptionError):
        eng.generate([[]], 2)
    with pytest.raises(OptionError):
        eng.generate([[5]], 0)
    with pytest.raises(OptionError):
        graphtune.Engine(_model("llama"), max_batch_tokens=0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_engine_supports_every_zoo_family_except_opt_on_transformers_4(fam):
    model = _model(fam)
    reason = unsupported_reason(model)
    if fam == "opt" and HF_MAJOR < 5:
        assert reason is not None and "attention interface" in reason, reason
        with pytest.raises(OptionError, match="cannot run this model"):
            graphtune.Engine(model)
    else:
        assert reason is None, reason
        graphtune.Engine(model)


def test_opt_on_transformers_4_falls_back_to_hf_generate():
    model = _model("opt")
    if unsupported_reason(model) is None:
        pytest.skip("the engine supports OPT on this transformers")
    ref, out, route = _both_generate(model, _mixed_batch()[:2], 4)
    assert route.startswith("HF generate:") and "attention interface" in route, route
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------ copies per decode step

_COPY_OPS = {
    "aten::copy_", "aten::index_copy_", "aten::index_copy", "aten::cat", "aten::stack", "aten::index_select",
    "aten::gather", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::clone", "aten::_to_copy",
    "aten::contiguous", "aten::scatter", "aten::scatter_", "aten::masked_scatter_", "aten::take", "aten::repeat",
    "aten::flip", "aten::roll", "aten::slice_scatter", "aten::select_scatter", "aten::as_strided_scatter",
    "aten::masked_select", "aten::narrow_copy", "aten::_unsafe_index", "aten::repeat_interleave", "aten::pad",
    "aten::constant_pad_nd", "aten::expand_copy", "aten::permute_copy", "aten::view_copy",
}
_DTYPE_BYTES = {"float": 4, "double": 8, "long int": 8, "int": 4, "c10::Half": 2, "c10::BFloat16": 2, "bool": 1,
                "unsigned char": 1, "signed char": 1, "short int": 2}


def _event_bytes(e) -> int:
    shapes = e.structured_input_shapes if getattr(e, "structured_input_shapes", None) else e.input_shapes
    dts = list(e.input_dtypes) + [""] * len(shapes)

    def tensor_bytes(i: int) -> int:
        return math.prod(shapes[i]) * _DTYPE_BYTES.get(dts[i], 4)

    name = e.name
    if name in ("aten::cat", "aten::stack"):
        return sum(math.prod(s) for s in shapes[0]) * 4
    if name in ("aten::index_copy_", "aten::index_copy"):
        return tensor_bytes(3)  # the source
    if name == "aten::index_select":
        s, dim = shapes[0], int(e.concrete_inputs[1])
        return math.prod(s) // max(1, s[dim]) * math.prod(shapes[2]) * _DTYPE_BYTES.get(dts[0], 4)
    if name == "aten::gather":
        return math.prod(shapes[2]) * _DTYPE_BYTES.get(dts[0], 4)
    if name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous"):
        return tensor_bytes(0)
    # anything else: the largest tensor argument (an upper bound)
    sizes = [math.prod(s) * _DTYPE_BYTES.get(dt, 4) for s, dt in zip(shapes, dts)
             if isinstance(s, list) and s and not isinstance(s[0], list)]
    return max(sizes, default=0)


def _bytes_copied(fn) -> dict[str, int]:
    """Bytes written by copy-like ATen ops while ``fn`` runs, on every thread (lean decode's workers too).

    Every op the profiler sees is considered; an op nested in another copy-like op (``clone`` ->
    ``copy_``) is counted once, at the outermost."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        fn()
    out: dict[str, int] = {}
    for e in prof.events():
        if e.name not in _COPY_OPS:
            continue
        a = e.cpu_parent
        while a is not None and a.name not in _COPY_OPS:
            a = a.cpu_parent
        if a is None:
            out[e.name] = out.get(e.name, 0) + _event_bytes(e)
    return out


def _per_decode_step(run, steps: int) -> tuple[float, dict[str, float]]:
    # (max_new = 1 + steps) minus (max_new = 1): the prefill cancels, `steps` decode steps remain
    a, b = _bytes_copied(lambda: run(1)), _bytes_copied(lambda: run(1 + steps))
    by = {k: (b.get(k, 0) - a.get(k, 0)) / steps for k in set(a) | set(b)}
    return sum(by.values()), by


def _context_batch(kind: str, ctx: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(ctx)
    if kind == "shared":  # fold over the shared node + strided tails
        pre = _rand(ctx, g)
        return [pre + _rand(3, g) for _ in range(3)]
    return [_rand(n, g, first=3 + i) for i, n in enumerate((ctx, ctx // 3 + 1, 2 * ctx // 3 + 2))]  # lean decode


@pytest.mark.parametrize("kind", ["shared", "ragged"])
def test_bytes_copied_per_decode_step_do_not_grow_with_the_context(kind):
    model = _model("llama")
    steps = 4
    eng = graphtune.Engine(model, min_shared=4)
    figures, hf_figures = {}, {}
    for ctx in (16, 400):
        prompts = _context_batch(kind, ctx)
        with _threads(2):  # lean decode's worker threads are profiled too
            figures[ctx] = _per_decode_step(lambda n: eng.generate(prompts, n, eos_token_id=[]), steps)
        ids, mask = _padded(prompts)

        def hf(n):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=PAD)
            assert out.shape[1] == ids.shape[1] + n

        hf_figures[ctx] = _per_decode_step(hf, steps)
    (short, by_short), (long, by_long) = figures[16], figures[400]
    # the measurement sees the engine's own KV writes (and so can see any copy it makes)
    assert by_short.get("aten::index_copy_", 0) > 0
    assert long <= short * 1.05 + 512, f"per-step copies grow with the context: {by_short} -> {by_long}"
    # sanity: the same measurement does grow for HF generate (its cache is concatenated every step)
    hf_short, hf_long = hf_figures[16][0], hf_figures[400][0]
    assert hf_long > 4 * hf_short, (hf_figures[16], hf_figures[400])
    assert long < hf_long / 10


# ------------------------------------------------------------------------------ routing

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("option,reason", [
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(num_beams=2), "num_beams"),
    (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    (dict(logits_processor=None, min_new_tokens=3), "min_new_tokens"),
])
def test_unsupported_generate_options_fall_back_to_hf_with_the_reason(fresh_dynamo, option, reason):
    model = _model("llama")
    prompts = _mixed_batch()[:2]
    ids, mask = _padded(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD, **option)
    fast = graphtune.optimize(model)
    out = fast.generate(ids, **kw)
    route = fast.generate.last_route
    assert route.startswith("HF generate:") and reason in route, route
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    if isinstance(ref, torch.Tensor):
        assert torch.equal(out, ref)
    else:
        assert torch.equal(out.sequences, ref.sequences)


def test_inputs_embeds_falls_back_to_hf_naming_inputs_embeds(fresh_dynamo):
    model = _model("llama")
    ids, mask = _padded(_mixed_batch()[:2])
    emb = model.get_input_embeddings()(ids).detach()
    kw = dict(inputs_embeds=emb, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    fast = graphtune.optimize(model)
    out = fast.generate(**kw)
    route = fast.generate.last_route
    with torch.no_grad():
        ref = model.generate(**kw)
    assert torch.equal(out, ref)
    assert route.startswith("HF generate:") and "inputs_embeds" in route, route


def test_supported_generate_call_reports_the_engine():
    model = _model("llama")
    fast = graphtune.optimize(model)
    ids = torch.tensor([_mixed_batch()[1]])
    out = fast.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert fast.generate.last_route == "graphtune engine"
    assert out[0, ids.shape[1]:].tolist() == _hf_row(model, ids[0].tolist(), 3)
    # no length at all: HF's default is 20 new tokens (not max_length=20 in total), also past 20 prompt tokens
    for p in (_mixed_batch()[0], _mixed_batch()[1][:9]):
        ids1 = torch.tensor([p])
        out = fast.generate(ids1, do_sample=False, pad_token_id=PAD)
        assert fast.generate.last_route == "graphtune engine"
        with torch.no_grad():
            assert torch.equal(out, model.generate(ids1, do_sample=False, pad_token_id=PAD))
    # max_length instead of max_new_tokens
    out = fast.generate(ids, max_length=ids.shape[1] + 2, do_sample=False, pad_token_id=PAD)
    assert fast.generate.last_route == "graphtune engine" and out.shape[1] == ids.shape[1] + 2


@pytest.mark.parametrize("pad", [PAD, 2])
def test_padded_input_ids_without_attention_mask_like_hf(pad):
    # no attention_mask: HF infers it from pad_token_id when it occurs and is not an EOS id (pad 0);
    # when pad_token_id is the EOS id (2), the pads are ordinary prompt tokens for HF too
    model = _model("llama")
    prompts = _ragged_batch()[:3]
    ids, mask = _padded(prompts)
    ids = ids.masked_fill(mask == 0, pad)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad)
    fast = graphtune.optimize(model)
    out = fast.generate(ids, **kw)
    assert fast.generate.last_route == "graphtune engine"
    with torch.no_grad():
        assert torch.equal(out, model.generate(ids, **kw))


# ------------------------------------------------------------------------------ streamers

class _Recorder:
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.detach().clone())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("eos", [None, "mid"])
def test_streamer_sees_the_same_puts_as_with_hf_generate(eos):
    model = _model("llama")
    prompt = _mixed_batch()[1]
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    if eos == "mid":
        free = graphtune.Engine(model).generate([prompt], NEW, eos_token_id=[])
        kw["eos_token_id"] = _eos_mid_generation(free.sequences)[0]  # stops mid-generation
    ids = torch.tensor([prompt])
    ref_s, our_s = _Recorder(), _Recorder()
    with torch.no_grad():
        ref = model.generate(ids, streamer=ref_s, **kw)
    fast = graphtune.optimize(model)
    out = fast.generate(ids, streamer=our_s, **kw)
    assert fast.generate.last_route == "graphtune engine"
    assert torch.equal(out, ref)
    assert our_s.ends == ref_s.ends == 1
    assert len(our_s.puts) == len(ref_s.puts) == 1 + (ref.shape[1] - ids.shape[1])
    for i, (a, b) in enumerate(zip(our_s.puts, ref_s.puts)):
        assert a.shape == b.shape and torch.equal(a, b), f"put {i}: {a} vs HF's {b}"
