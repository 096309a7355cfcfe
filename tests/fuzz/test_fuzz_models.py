"""Model-level differential fuzzing: random request sequences on small random-weight HF models, with the
plain model as the oracle.

A session prefills one or two requests ("streams") of one batch size and then interleaves decode steps,
multi-token continuations, cache rollbacks (``crop``), row reorders (``reorder_cache``, as beam search
does), continuing a cache the plain model filled, and a final pair of decode steps run by two threads at
once on the one optimized model. Prompts
are shared (one prompt repeated), share a prefix, repeat in pairs, or are distinct; rows are left padded or
not; ``position_ids`` are absent, derived from the mask, or offset per row; the cache is passed under the
keyword the installed transformers accepts (``cache=`` from 5.x, ``past_key_values=`` before) or
positionally. Logits must match the plain model's within fp32 tolerance at every position, and greedy
tokens exactly (except at near-ties).

One ``graphtune.optimize`` per model for the whole module (Dynamo capture is the slow part); the
shared-prefix and lean-decode thresholds are lowered with ``graphtune.flags.Context`` so both fast paths
engage at these sizes, and the test fails if either never ran.
"""
from __future__ import annotations

import copy
import inspect
import threading
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune import flags  # noqa: E402
from graphtune.ir import ops as gt_ops  # noqa: E402
from graphtune.models import build_model  # noqa: E402

from fuzz_support import count_example, fuzz_settings  # noqa: E402

MODELS = (("llama", "sdpa"), ("qwen2", "eager"))  # GQA 4/2 heads; SDPA and eager attention forms
LOGIT_TOL = (1e-4, 1e-4)  # fp32 (atol, rtol): the decompositions change summation order only
NEAR_TIE = 1e-3  # greedy tokens must agree unless the oracle's top two logits are closer than this
CACHE_KEYWORDS = tuple(n for n in ("cache", "past_key_values")
                       if n in inspect.signature(transformers.LlamaForCausalLM.forward).parameters)


# --------------------------------------------------------------------------------------------
# Which fast path served each attention call
# --------------------------------------------------------------------------------------------

HITS: Counter = Counter()
_hits_lock = threading.Lock()


def _kind(fn) -> str:
    f = getattr(fn, "__wrapped__", fn)  # the runtime's re-entry guard wraps some implementations
    f = getattr(f, "func", f)  # functools.partial
    return f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}"


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    saved = {n: getattr(cfg, n) for n in ("recompile_limit", "accumulated_recompile_limit") if hasattr(cfg, n)}
    for n in saved:  # (this thread's config) every call shape the fuzzer makes must run the optimized graph
        setattr(cfg, n, 512)
    real_select = gt_ops._select

    def counting_select(name, args):
        fn = real_select(name, args)
        if fn is not None:
            with _hits_lock:
                HITS[_kind(fn)] += 1
        return fn

    gt_ops._select = counting_select
    built = {}
    for family, attn in MODELS:
        plain = build_model(family, attn)
        built[f"{family}-{attn}"] = (plain, graphtune.optimize(plain))
    try:
        yield built
    finally:
        gt_ops._select = real_select
        for n, v in saved.items():
            setattr(cfg, n, v)
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    """A request sequence; ``ops`` are ``(kind, stream, n)``: decode n steps, append n tokens, crop n tokens
    (then append one), reorder the rows, or adopt the plain model's cache (then decode one)."""

    model: str
    batch: int
    prompts: str  # shared | prefix | pairs | templated | distinct
    prompt_len: int
    padding: str  # none | left | left-equal
    positions: str  # none | mask | offset
    mask: bool  # pass attention_mask (always when padded)
    call: str  # a cache keyword, or "positional"
    streams: int
    ops: tuple[tuple[str, int, int], ...]
    threads: bool
    lean: bool  # LEAN_MIN_SKEW=0 (lean whenever it is exact) or the measured rule
    min_prefix: int
    seed: int


@st.composite
def sessions(draw, model_names) -> Session:
    streams = draw(st.integers(1, 2))
    kinds = ["decode", "decode", "append", "crop", "reorder", "adopt"]
    op = st.tuples(st.sampled_from(kinds), st.integers(0, streams - 1), st.integers(1, 3))
    padding = draw(st.sampled_from(["none", "left", "left-equal"]))
    return Session(draw(st.sampled_from(model_names)), draw(st.integers(1, 4)),
                   draw(st.sampled_from(["shared", "shared", "prefix", "pairs", "templated", "distinct"])),
                   draw(st.integers(4, 14)),
                   padding, draw(st.sampled_from(["none", "mask", "offset"])),
                   padding != "none" or draw(st.booleans()), draw(st.sampled_from([*CACHE_KEYWORDS, "positional"])),
                   streams, tuple(draw(st.lists(op, min_size=1, max_size=4))), draw(st.booleans()), draw(st.booleans()),
                   draw(st.integers(3, 6)), draw(st.integers(0, 2**16)))


class Stream:
    """One request: its ids, mask and positions so far, and the plain and optimized models' caches."""

    def __init__(self, s: Session, g: torch.Generator, cache_cls, prompts: str):
        B, P = s.batch, s.prompt_len
        tok = lambda *shape: torch.randint(3, 500, shape, generator=g)  # noqa: E731
        if prompts == "shared":
            ids = tok(1, P).expand(B, P).clone()
        elif prompts == "prefix":
            ids = torch.cat([tok(1, P - 2).expand(B, -1), tok(B, 2)], 1)
        elif prompts == "pairs":
            ids = tok((B + 1) // 2, P).repeat_interleave(2, 0)[:B]
        elif prompts == "templated":  # pairs of prompts that differ but end alike (a chat template's tail)
            n = (B + 1) // 2
            ids = torch.cat([tok(n, P - 2), tok(1, 2).expand(n, 2)], 1).repeat_interleave(2, 0)[:B]
        else:
            ids = tok(B, P)
        pads = torch.zeros(B, dtype=torch.long)
        if s.padding == "left":
            pads = torch.randint(0, P - 1, (B,), generator=g)
        elif s.padding == "left-equal":
            pads = torch.full((B,), int(torch.randint(1, P - 1, (1,), generator=g)))
        j = torch.arange(P)
        self.mask = (j[None, :] >= pads[:, None]).long()
        ids = torch.where(self.mask.bool(), ids, 0)
        self.ids = ids  # the tokens of this forward
        if s.positions == "none":
            self.all_pos = None
        else:
            pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
            if s.positions == "offset":  # e.g. a continued conversation: rows start at different positions
                pos = pos + torch.randint(0, 4, (B, 1), generator=g)
            self.all_pos = pos  # [B, tokens so far]
        self.pos = self.all_pos  # positions of this forward's tokens
        self.caches = (cache_cls(), cache_cls())  # plain, optimized

    def grow(self, new_ids: torch.Tensor) -> None:
        """Next forward: ``new_ids [B, n]`` appended after everything so far."""
        n = new_ids.shape[1]
        self.ids = new_ids
        self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], n, dtype=torch.long)], 1)
        if self.all_pos is not None:
            self.pos = self.all_pos[:, -1:] + 1 + torch.arange(n)[None, :]
            self.all_pos = torch.cat([self.all_pos, self.pos], 1)

    def crop(self, keep: int) -> None:
        for c in self.caches:
            c.crop(keep - self.mask.shape[1])  # negative: drop tokens (every transformers version)
        self.mask = self.mask[:, :keep]
        if self.all_pos is not None:
            self.all_pos = self.all_pos[:, :keep]

    def reorder(self, perm: torch.Tensor) -> None:
        for c in self.caches:
            c.reorder_cache(perm)
        self.mask = self.mask[perm]
        if self.all_pos is not None:
            self.all_pos = self.all_pos[perm]


def _forward(model, s: Session, st_: Stream, cache):
    kw = dict(use_cache=True)
    mask = st_.mask if s.mask else None
    if s.call == "positional":
        return model(st_.ids, mask, st_.pos, cache, **kw).logits
    return model(input_ids=st_.ids, attention_mask=mask, position_ids=st_.pos, **{s.call: cache}, **kw).logits


def _compare(want: torch.Tensor, got: torch.Tensor, what: str) -> None:
    atol, rtol = LOGIT_TOL
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (f"{what}: logits off at {bad.nonzero()[0].tolist()} (max err {err.max().item():.3g}; "
                                 f"{int(bad.sum())} of {bad.numel()})")
    top2 = want[:, -1].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > NEAR_TIE
    a, b = want[:, -1].argmax(-1), got[:, -1].argmax(-1)
    assert torch.equal(a[clear], b[clear]), f"{what}: greedy tokens {b.tolist()} != oracle's {a.tolist()}"


def _step(plain, fast, s: Session, st_: Stream, what: str) -> torch.Tensor:
    with torch.no_grad():
        want = _forward(plain, s, st_, st_.caches[0])
        got = _forward(fast, s, st_, st_.caches[1])
    _compare(want, got, what)
    return want


def run_session(plain, fast, s: Session) -> None:
    g = torch.Generator().manual_seed(s.seed)
    cache_cls = transformers.DynamicCache
    # a second stream gets other prompts: sharing found at its prefill must not leak into the first one's decode
    other = "distinct" if s.prompts == "shared" else "shared"
    streams = [Stream(s, g, cache_cls, s.prompts if i == 0 else other) for i in range(s.streams)]
    last = []
    for i, st_ in enumerate(streams):  # prefill every stream first: a later stream must not reuse an older plan
        last.append(_step(plain, fast, s, st_, f"prefill of stream {i}"))
    for n_op, (kind, i, n) in enumerate(s.ops):
        st_ = streams[i]
        what = f"op {n_op} ({kind} {n}) on stream {i}"
        if kind == "decode":
            for t in range(n):
                st_.grow(last[i][:, -1:].argmax(-1))
                last[i] = _step(plain, fast, s, st_, f"{what}, step {t}")
        elif kind == "append":
            st_.grow(torch.randint(3, 500, (s.batch, n), generator=g))
            last[i] = _step(plain, fast, s, st_, what)
        elif kind == "crop":
            # roll back n tokens (speculative decoding), possibly into the prompt, then append one
            st_.crop(max(1, st_.mask.shape[1] - n))
            st_.grow(torch.randint(3, 500, (s.batch, 1), generator=g))
            last[i] = _step(plain, fast, s, st_, what)
        elif kind == "adopt":
            # the optimized model continues a cache it did not build (filled by the plain model), then decodes
            st_.caches = (st_.caches[0], copy.deepcopy(st_.caches[0]))
            st_.grow(last[i][:, -1:].argmax(-1))
            last[i] = _step(plain, fast, s, st_, what)
        elif kind == "reorder":  # beam search reorders the cache rows
            perm = torch.randperm(s.batch, generator=g)
            st_.reorder(perm)
            last[i] = last[i][perm]
            st_.grow(last[i][:, -1:].argmax(-1))
            last[i] = _step(plain, fast, s, st_, what)
    if s.threads:
        # one decode step per stream, the optimized model's steps run by two threads at once
        work = []
        for i, st_ in enumerate(streams):
            st_.grow(last[i][:, -1:].argmax(-1))
            with torch.no_grad():
                work.append(_forward(plain, s, st_, st_.caches[0]))
        got, errors = [None] * len(streams), []
        overrides = _flags(s)

        def run(i):
            try:
                # flags and Dynamo's config are per thread: without the raised recompile limit a thread would
                # fall back to eager (and mark the forward to skip) once it has many compiled variants
                with flags.Context(**overrides), torch.no_grad(), torch._dynamo.config.patch(recompile_limit=512):
                    got[i] = _forward(fast, s, streams[i], streams[i].caches[1])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
        for i, (want, g_) in enumerate(zip(work, got)):
            _compare(want, g_, f"threaded decode of stream {i}")


def _flags(s: Session) -> dict:
    return dict(SHARED_PREFIX_MIN_PREFIX=s.min_prefix, SHARED_PREFIX_MIN_ROWS=2, LEAN_MIN_SKEW=0.0 if s.lean else -1.0)


def _expects_shared_prefix(s: Session) -> bool:
    """Sessions whose first stream must take the shared-prefix decode path: one prompt for every row, the same
    positions, and a decode step before any reorder or crop."""
    if (s.batch < 2 or s.prompts != "shared" or s.padding == "left" or s.positions == "offset"
            or s.prompt_len < s.min_prefix):
        return False
    for kind, i, _ in s.ops:
        if i == 0:
            return kind == "decode"
    return False


def _session(**kw) -> Session:
    base = dict(model="llama-sdpa", batch=3, prompts="shared", prompt_len=8, padding="none", positions="none",
                mask=True, call=CACHE_KEYWORDS[0], streams=1, ops=(("decode", 0, 2),), threads=False, lean=False,
                min_prefix=3, seed=1)
    return Session(**{**base, **kw})


# Sessions that run in every profile besides the drawn ones: each once found a wrong answer or a
# silently skipped fast path (issue 8 and tests/fuzz findings).
EXAMPLES = (
    _session(call="positional"),  # the cache passed positionally: shared-prefix decode must still engage
    _session(positions="offset"),  # identical ids at different positions must not share K/V
    _session(streams=2, prompts="distinct"),  # a plan from another request's prefill must not be used
    _session(prompts="templated", batch=4, ops=(("reorder", 0, 1), ("decode", 0, 1)), seed=2),  # rows moved
    _session(ops=(("crop", 0, 6), ("decode", 0, 2))),  # rollback into the prompt
    _session(model="qwen2-eager", padding="left", lean=True, prompts="pairs", batch=4),  # fully masked pad rows
    _session(streams=2, threads=True, lean=True, padding="left-equal", ops=(("adopt", 1, 1),)),
)


def test_random_request_sequences_match_the_plain_model(models):
    names = tuple(models)
    HITS.clear()

    @fuzz_settings(8)
    @given(s=sessions(names))
    def fuzz(s):
        count_example("model sessions (prefill, continue, decode, crop, reorder, threads)")
        plain, fast = models[s.model]
        before = HITS.copy()
        with flags.Context(**_flags(s)):
            run_session(plain, fast, s)
        new = HITS - before
        note(f"fast paths: {dict(new)}")
        if _expects_shared_prefix(s):
            assert new["shared_prefix._impl"] > 0, f"shared prompts never took the shared-prefix decode: {dict(new)}"

    for ex in EXAMPLES:
        fuzz = example(s=ex)(fuzz)
    fuzz()
    assert HITS["shared_prefix._impl"] > 0, f"shared-prefix decode never ran: {dict(HITS)}"
    assert HITS["shared_prefix._dedup_impl"] > 0, f"shared-prefix prefill dedup never ran: {dict(HITS)}"
    assert any(k.startswith("lean_decode.") for k in HITS), f"lean decode never ran: {dict(HITS)}"
