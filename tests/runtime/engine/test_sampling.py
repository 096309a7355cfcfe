"""The engine's sampling: HF's warpers exactly, and the sampled distribution is the warped softmax."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import graphtune  # noqa: E402
from graphtune.errors import OptionError  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.runtime.engine.sampling import Sampling, warp  # noqa: E402


def _hf_warp(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    # the warpers HF generate builds for do_sample=True (generation/utils.py, _get_logits_processor)
    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    return procs(ids, logits.clone())


def _logits(kind: str, n: int, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, V, generator=g) * 3
    if kind == "ties":  # few distinct values: ties at the k-th logit and inside the nucleus
        return torch.randint(-3, 3, (n, V), generator=g).float()
    if kind == "extreme":  # huge gaps (one-hot softmax), huge magnitudes, -inf already masked
        x = torch.randn(n, V, generator=g) * 1e4
        x[:, 0] = 1e30
        x[:, 1] = -1e30
        x[:, 2] = float("-inf")
        x[0] = torch.randn(V, generator=g) * 1e-6  # nearly flat
        return x
    if kind == "peaked":  # one dominant token: top_p keeps a single token
        x = torch.randn(n, V, generator=g)
        x[:, V // 2] = 40.0
        return x
    raise AssertionError(kind)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(kind=st.sampled_from(["normal", "ties", "extreme", "peaked"]), n=st.integers(1, 4), V=st.integers(3, 70),
       seed=st.integers(0, 10_000), temperature=st.sampled_from([0.05, 0.3, 0.8, 1.0, 1.6]),
       top_k=st.sampled_from([None, 0, 1, 2, 5, 20, 69, 1000]),
       top_p=st.sampled_from([None, 1e-6, 0.1, 0.5, 0.9, 0.999, 1.0]))
def test_warp_equals_hf_temperature_topk_topp_warpers(kind, n, V, seed, temperature, top_k, top_p):
    logits = _logits(kind, n, V, seed)
    ours = warp(logits.clone(), Sampling(True, temperature, top_k, top_p))
    ref = _hf_warp(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), "the masked (-inf) tokens differ from HF's"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(ours))
    torch.testing.assert_close(ours[fin], ref[fin], rtol=1e-6, atol=0)
    assert (~torch.isneginf(ours)).any(-1).all(), "every row keeps at least one token"


def test_warp_topk_keeps_ties_of_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    out = warp(logits, Sampling(True, 1.0, 2, None))
    assert torch.isneginf(out).tolist() == [[False, True, False, False, False, True]]


def test_sampling_rejects_bad_options():
    for kw in (dict(temperature=0.0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(OptionError):
            Sampling(True, **{"temperature": 1.0, **kw})
    Sampling(False, temperature=0.0)  # greedy ignores the sampling options


# ---------------------------------------------------------------------------- statistical test

def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of ``counts`` to ``probs`` (p-value; 0 if a count hits probability 0)."""
    n = int(counts.sum())
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = probs.double() * n
    big = expected >= 5
    obs = [counts[big].double()]
    exp = [expected[big]]
    small = (~big) & (probs > 0)
    if small.any():  # pool the rare tokens into one bin
        obs.append(counts[small].double().sum()[None])
        exp.append(expected[small].sum()[None])
    o, e = torch.cat(obs), torch.cat(exp)
    if e.numel() > 1 and e[-1] < 5:  # a pooled bin that is still too small joins the smallest big bin
        j = int(torch.argmin(e[:-1]))
        o[j] += o[-1]
        e[j] += e[-1]
        o, e = o[:-1], e[:-1]
    df = e.numel() - 1
    if df == 0:
        return 1.0
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_chi2_helper_accepts_the_right_distribution_and_rejects_a_wrong_one():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=g) * 2, 0)
    draws = torch.multinomial(p, 3000, replacement=True, generator=g)
    counts = torch.bincount(draws, minlength=50)
    assert _chi2_pvalue(counts, p) > 1e-4
    assert _chi2_pvalue(counts, torch.softmax(torch.log(p) / 1.3, 0)) < 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: avoid OpenMP threads spinning on a small shared CPU
    yield
    torch.set_num_threads(n)


TEMP, TOP_K, TOP_P = 0.8, 20, 0.9
DRAWS_PER_SEED, SEEDS = 1000, (0, 1, 2)


@pytest.fixture(scope="module")
def sampled_first_tokens():
    model = build_model("llama", "sdpa", seed=3)
    prompt = [5, 17, 99, 3, 250, 41, 8, 77]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    eng = graphtune.Engine(model, min_shared=4)
    counts = torch.zeros(logits.numel(), dtype=torch.long)
    for seed in SEEDS:  # every row (sample) draws from its own generator seeded by (seed, row)
        res = eng.generate([prompt], max_new_tokens=1, num_return_sequences=DRAWS_PER_SEED, do_sample=True,
                           temperature=TEMP, top_k=TOP_K, top_p=TOP_P, seed=seed, eos_token_id=[])
        counts += torch.bincount(torch.tensor([s[0] for s in res.sequences]), minlength=logits.numel())
    return logits, counts


def test_engine_sampling_matches_the_warped_softmax_of_the_plain_model(sampled_first_tokens):
    logits, counts = sampled_first_tokens
    probs = torch.softmax(_hf_warp(logits[None], TEMP, TOP_K, TOP_P)[0], -1)
    kept = int((probs > 0).sum())
    assert 5 <= kept <= TOP_K, f"the test needs several tokens in play, got {kept}"
    assert counts.sum() == DRAWS_PER_SEED * len(SEEDS)
    assert _chi2_pvalue(counts, probs) > 1e-4


@pytest.mark.parametrize("wrong", [dict(temperature=1.6), dict(temperature=0.4), dict(top_k=8), dict(top_p=None)])
def test_engine_sampling_test_rejects_a_wrong_distribution(sampled_first_tokens, wrong):
    # the same draws against a deliberately wrong distribution: the chi-square test must fail
    logits, counts = sampled_first_tokens
    opts = {"temperature": TEMP, "top_k": TOP_K, "top_p": TOP_P, **wrong}
    probs = torch.softmax(_hf_warp(logits[None], **opts)[0], -1)
    assert _chi2_pvalue(counts, probs) < 1e-4
