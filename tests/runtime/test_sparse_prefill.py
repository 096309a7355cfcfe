"""Sparse prefill in the runtime: opt-in only, exact at tau=1 through every path, dense for decode/short/padded
calls, per-layer density recorded, a failing kernel falls back to dense with a warning, accuracy tuning
stored and used."""
import pytest
import torch

import graphtune
from graphtune import flags
from graphtune.codegen.pbs_attention.plan import PBSConfig
from graphtune.errors import OptionError
from graphtune.models import build_model
from graphtune.runtime import sparse_prefill as sp
from graphtune.runtime.sparse_prefill import SparsePrefill, make_sparse

EXACT = PBSConfig(32, 64, 1.0)
SPARSE = PBSConfig(32, 64, 0.5)


@pytest.fixture(scope="module")
def llama():
    return build_model("llama", "sdpa", max_position_embeddings=2048)


def _prompts(n=(600, 451), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (k,), generator=g).tolist() for k in n]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_engine_sparse_prefill_at_tau_1_is_token_identical_to_dense(family):
    m = build_model(family, "sdpa", max_position_embeddings=2048) if family != "gpt2" else build_model(
        family, "sdpa", n_positions=2048)
    p = _prompts()
    want = graphtune.Engine(m).generate(p, max_new_tokens=8).sequences
    s = SparsePrefill(EXACT, min_len=256)
    eng = graphtune.Engine(m, sparse_prefill=s)
    assert eng.generate(p, max_new_tokens=8).sequences == want
    assert s.stats.density and all(float(d.min()) == pytest.approx(1.0) for d in s.stats.density.values())


def test_engine_sparse_prefill_exact_with_chunks_and_shared_prefixes(llama):
    base = _prompts((700,))[0]
    p = [base + [5, 6, 7], base + [9, 10], _prompts((300,), 1)[0]]
    want = graphtune.Engine(llama).generate(p, max_new_tokens=6).sequences
    s = SparsePrefill(EXACT, min_len=256)
    got = graphtune.Engine(llama, max_batch_tokens=160, sparse_prefill=s).generate(p, max_new_tokens=6).sequences
    assert got == want
    assert s.stats.density, "no chunk ran sparse"


def test_engine_sparse_prefill_records_density_and_explains_it(llama):
    s = SparsePrefill(SPARSE, min_len=256)
    eng = graphtune.Engine(llama, sparse_prefill=s)
    eng.generate(_prompts(), max_new_tokens=4)
    st = eng.last_sparse
    assert sorted(st.density) == [0, 1]  # both layers
    assert all(0.0 < float(d.mean()) < 1.0 for d in st.density.values())
    text = str(eng.plan(_prompts(), 4))
    assert "sparse prefill (approximate, opt-in)" in text and "layer  0:" in text


def test_per_layer_settings_are_summarized_by_tau_and_sampled_rows():
    from dataclasses import replace

    base = PBSConfig()
    s = SparsePrefill(base, 2048, {0: replace(base, tau=1.0), 1: replace(base, tau=0.99, sample=16),
                                   2: replace(base, tau=0.99, sample=16), 3: replace(base, tau=0.9, sample=0)})
    text = s.describe()
    assert "per layer: 1 dense, 2 tau 0.99/16, 1 tau 0.9/pooled" in text, text
    assert "per layer" not in SparsePrefill(base, 2048).describe()


def test_decode_and_short_prompts_stay_dense(llama, monkeypatch):
    calls = []
    real = sp.run_sparse

    def spy(settings, layer, q, k, v, scale):
        calls.append((q.shape[2], k.shape[2]))
        return real(settings, layer, q, k, v, scale)

    monkeypatch.setattr("graphtune.runtime.engine.step.run_sparse", spy)
    s = SparsePrefill(SPARSE, min_len=500)
    graphtune.Engine(llama, sparse_prefill=s).generate(_prompts((600, 100)), max_new_tokens=5)
    assert calls and all(q == k == 600 for q, k in calls)  # the 600-token prefill only, per layer
    assert len(calls) == llama.config.num_hidden_layers


def test_kernel_failure_falls_back_to_dense_with_a_warning(llama, monkeypatch):
    p = _prompts()
    want = graphtune.Engine(llama).generate(p, max_new_tokens=4).sequences

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(sp, "pbs_attention", boom)
    s = SparsePrefill(SPARSE, min_len=256)
    with pytest.warns(RuntimeWarning, match="PBS attention failed"):
        got = graphtune.Engine(llama, sparse_prefill=s).generate(p, max_new_tokens=4).sequences
    assert got == want and s.stats.fallbacks > 0


def test_optimize_forward_path_runs_pbs_on_long_unpadded_prefills_only(llama):
    ids = torch.tensor([_prompts()[0]])
    with torch.no_grad():
        want = llama(ids).logits
        s = SparsePrefill(EXACT, min_len=256)
        got = graphtune.optimize(llama, sparse_prefill=s)(ids).logits
        assert torch.allclose(got, want, atol=1e-4) and s.stats.density
        s2 = SparsePrefill(SPARSE, min_len=256)
        opt = graphtune.optimize(llama, sparse_prefill=s2)
        opt(ids)
        assert sorted(s2.stats.density) == [0, 1]
        # a padded batch stays dense (no plan): its logits equal the plain model's
        s3 = SparsePrefill(SPARSE, min_len=256)
        mask = torch.ones(2, 600, dtype=torch.long)
        mask[1, :100] = 0
        x = torch.cat([ids, ids])
        out = graphtune.optimize(llama, sparse_prefill=s3)(x, attention_mask=mask).logits
        assert not s3.stats.density
        assert torch.allclose(out, llama(x, attention_mask=mask).logits, atol=1e-4)


def test_sparse_prefill_is_off_unless_asked(llama):
    eng = graphtune.Engine(llama)
    assert eng.sparse is None and eng.last_sparse is None
    assert "sparse prefill" not in str(eng.plan(_prompts(), 4))
    assert graphtune.flags.Options().sparse_prefill is None


@pytest.mark.parametrize("bad", ["dense", 3, "PBS"])
def test_unknown_sparse_prefill_values_are_refused_by_name(llama, bad):
    with pytest.raises(OptionError, match="sparse_prefill"):
        graphtune.Engine(llama, sparse_prefill=bad)
    with pytest.raises(OptionError, match="sparse_prefill"):
        graphtune.optimize(llama, sparse_prefill=bad)


def test_shorthands_follow_the_flags():
    with flags.Context(SPARSE_PREFILL_TAU=0.8, SPARSE_PREFILL_BLOCK=64, SPARSE_PREFILL_SEGMENT=512,
                       SPARSE_PREFILL_MIN_LEN=4096, SPARSE_PREFILL_PEAKS=1):
        s = make_sparse("pbs")
        assert (s.config.tau, s.config.block, s.config.segment, s.min_len, s.config.peaks) == (0.8, 64, 512, 4096, 1)
        assert make_sparse("block").config.permute is False
    with flags.Context(SPARSE_PREFILL_MIN_LEN=0), pytest.raises(OptionError, match="MIN_LEN"):
        make_sparse("pbs")


def test_accuracy_tuning_is_stored_and_used_by_pbs_shorthand(tmp_path, llama):
    from graphtune.cli import main
    from graphtune.runtime.sparse_tune import model_key, store, tune_accuracy, tuned_sparse

    with flags.Context(DB=str(tmp_path / "acc.db")):
        assert tuned_sparse(llama, 256) is None
        ids = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(3))
        res = tune_accuracy(llama, None, ids=ids, length=512, min_top1=0.05, keep=64, config=PBSConfig(32, 64),
                            max_runs=2)
        assert res.best is not None and res.best.top1 >= 0.05 and "<- chosen" in res.table()
        assert [x.layer for x in res.sensitivity] == [0, 1]  # one prefill per layer, that layer alone sparse
        assert all(0.0 < x.density <= 1.0 and x.kl >= 0.0 for x in res.sensitivity)
        rec = store(res)
        assert rec.shape_key == f"model_{model_key(llama)}"
        got = tuned_sparse(llama, 256)
        assert got is not None and got.source.startswith("tuned record")
        assert {i: c.tau for i, c in got.layers.items()} == res.best.layers
        assert {i: c.sample for i, c in got.layers.items() if c.tau < 1} == res.best.samples  # per-layer rows too
        assert got.config.sample == res.best.config.sample == PBSConfig().sample  # the estimator round-trips
        assert got.config.select_per == res.best.config.select_per == "segment"  # through the record
        assert make_sparse("pbs", llama).source == got.source  # the shorthand picks the tuned record
        opt = graphtune.optimize(llama, sparse_prefill="pbs")  # resolved once: forward path and engine share it
        assert opt.generate.sparse_prefill.source == got.source
        other = build_model("llama", "sdpa", seed=1)
        untuned = make_sparse("pbs", other)  # another model's weights: not its record
        assert untuned.source.startswith("flags; no accuracy-tuned record") and "tune --accuracy" in untuned.describe()
        # the CLI front end stores too (random-weight model: random calibration ids)
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64,128",
                     "--min-top1", "0.05", "--max-runs", "1", "--quiet"]) == 0
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "48", "--segment", "64",
                     "--quiet"]) == 2  # no segment is a multiple of the block: a usage error naming both
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64",
                     "--sample", "0", "--min-top1", "0.05", "--max-runs", "1", "--quiet"]) == 0
        assert tuned_sparse(llama, 256).config.sample == 0  # the newest record: the paper's pooled estimate
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64",
                     "--sample", "4,0", "--min-top1", "0.05", "--max-runs", "1", "--quiet"]) == 0
        assert tuned_sparse(llama, 256).config.sample in (4, 0)  # both estimators searched, the sparsest kept
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64",
                     "--peaks", "2", "--min-top1", "0.05", "--max-runs", "1", "--quiet"]) == 0
        assert tuned_sparse(llama, 256).config.peaks == 2  # the peak blocks round-trip through the record
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64",
                     "--sample", "33", "--quiet"]) == 2  # more sampled rows than a block has


def test_tune_accuracy_cli_measures_the_bound_on_the_requested_positions_and_records_them(tmp_path, llama):
    from graphtune.autotune import db as _db
    from graphtune.cli import main

    def newest() -> dict:
        recs = _db.get_db().records("op = ? AND impl = ?", ("pbs_attention", "pbs.accuracy"))
        return max(recs, key=lambda r: r.created_at).details

    base = ["tune", "--accuracy", "--model", "llama", "--length", "512", "--block", "32", "--segment", "64",
            "--min-top1", "0.05", "--max-runs", "1", "--quiet"]
    with flags.Context(DB=str(tmp_path / "acc.db")):
        assert main(base) == 0
        assert newest()["positions"] == 128  # default: min(2048, length // 4)
        assert main(base + ["--positions", "100"]) == 0
        assert newest()["positions"] == 100
        assert main(base + ["--positions", "0"]) == 2  # a usage error naming --positions
        assert main(base + ["--positions", "513"]) == 2  # more positions than the prompt has
        assert newest()["calibration"] == "random token ids"  # what the bound was measured on (no tokenizer)
        assert main(base + ["--text", str(tmp_path / "missing.txt")]) == 2  # unreadable: before the model loads
        (tmp_path / "prompts.txt").write_text("def f(x):\n    return x\n" * 200)
        assert main(base + ["--text", str(tmp_path / "prompts.txt")]) == 2  # a random-weight model has no tokenizer


class _Chars:  # a tokenizer of one token per character
    def __call__(self, text, return_tensors=None):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) for c in text]])})()


def test_tune_accuracy_cli_calibrates_on_the_users_text_and_the_record_says_so(tmp_path, llama, monkeypatch):
    import graphtune.models
    from graphtune.autotune import db as _db
    from graphtune.cli import main

    monkeypatch.setattr(graphtune.models, "load_named", lambda name: (llama, _Chars()))  # a model with a tokenizer
    text = tmp_path / "prompts.txt"
    text.write_text("".join(chr(65 + (7 * i) % 58) for i in range(700)), encoding="utf-8")
    with flags.Context(DB=str(tmp_path / "acc.db")):
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--text", str(text), "--block", "32",
                     "--segment", "64", "--positions", "64", "--min-top1", "0.05", "--max-runs", "1", "--quiet"]) == 0
        (rec,) = _db.get_db().records("op = ? AND impl = ?", ("pbs_attention", "pbs.accuracy"))
        assert rec.details["calibration"] == f"text file {text}"
        assert (rec.details["length"], rec.details["positions"]) == (512, 64)
        text.write_text("too short", encoding="utf-8")  # 9 tokens: an error naming the text, nothing stored
        assert main(["tune", "--accuracy", "--model", "llama", "--length", "512", "--text", str(text), "--quiet"]) == 2


def test_calibration_ids_take_the_users_text_and_refuse_one_too_short():
    from graphtune.runtime.sparse_accuracy import calibration_ids

    ids = calibration_ids(_Chars(), 5, offset=2, text="abcdefgh")
    assert ids.tolist() == [ord(c) for c in "cdefg"]
    with pytest.raises(OptionError, match="the given calibration text has 8 tokens, fewer than 9"):
        calibration_ids(_Chars(), 8, offset=1, text="abcdefgh")


def test_tune_accuracy_refuses_a_bound_outside_0_1(llama):
    from graphtune.runtime.sparse_tune import tune_accuracy

    with pytest.raises(OptionError, match="min-top1"):
        tune_accuracy(llama, None, ids=torch.arange(3, 515), min_top1=1.5)


def test_accuracy_harness_agrees_with_dense_at_tau_1_and_passkey_prompt_holds_the_key(llama):
    from graphtune.runtime.sparse_accuracy import capture, compare_logits, passkey_prompt, sparse_logits

    ids = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(1))
    cap = capture(llama, ids, keep=64)
    assert len(cap.qkv) == 2 and cap.logits.shape[0] == 64
    top1, kl = compare_logits(cap.logits, sparse_logits(llama, ids, SparsePrefill(EXACT, 256), keep=64))
    assert top1 == 1.0 and kl < 1e-8
    top1, kl = compare_logits(cap.logits, sparse_logits(llama, ids, SparsePrefill(PBSConfig(32, 64, 0.2), 256), keep=64))
    assert kl > 0.0

    class Tok:  # characters as tokens
        def __call__(self, s, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in s]})()

    ids = passkey_prompt(Tok(), 2000, 0.5, 12345)
    text = "".join(map(chr, ids))
    assert len(ids) == 2000 and "pass key is 12345" in text and text.endswith("The pass key is")
    assert 800 < text.index("12345") < 1200


def test_accuracy_tuning_keeps_the_most_sensitive_layer_dense_under_a_strict_bound(llama):
    from graphtune.runtime.sparse_tune import tune_accuracy

    ids = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(3))
    loose = tune_accuracy(llama, None, ids=ids, min_top1=0.05, keep=64, config=PBSConfig(32, 64, 0.5), max_runs=3,
                          ladder=(0.5,))
    assert loose.best is not None and all(t == 0.5 for t in loose.best.layers.values())  # every layer sparse
    worst = max(loose.sensitivity, key=lambda x: x.kl)
    both = loose.candidates[0]
    # a bound between "all sparse" and "the least sensitive layer alone": the worst layer stays dense
    alone = [x for x in loose.sensitivity if x is not worst][0]
    if not both.top1 < alone.top1:
        pytest.skip("this model's layers do not separate at this size")
    strict = tune_accuracy(llama, None, ids=ids, min_top1=alone.top1, keep=64, config=PBSConfig(32, 64, 0.5),
                           max_runs=3, ladder=(0.5,))
    assert strict.best is not None and strict.best.layers[worst.layer] == 1.0


def test_ladder_gives_each_layer_the_sparsest_tau_its_predicted_kl_allows():
    from graphtune.runtime.sparse_tune import LayerSensitivity, assign, predicted_kl, rung_sample

    sens = [LayerSensitivity(0, 0.3, 0.99, 1e-2), LayerSensitivity(1, 0.3, 1.0, 1e-5), LayerSensitivity(2, 0.3, 1.0, 0.0)]
    ladder = (0.9, 0.95, 0.99)
    # KL scales as (1 - tau) ** 1.5 from the measured tau: 0.99 is 5x less missed mass than 0.95
    assert predicted_kl(sens[0], 0.95, 0.99) == pytest.approx(1e-2 * 0.2 ** 1.5)
    assert predicted_kl(sens[0], 0.95, 0.9) == pytest.approx(1e-2 * 2 ** 1.5)
    assert assign(sens, 0.95, ladder, 1.0) == {0: 0.9, 1: 0.9, 2: 0.9}  # a loose budget: the sparsest rung
    assert assign(sens, 0.95, ladder, 1e-2) == {0: 0.95, 1: 0.9, 2: 0.9}
    assert assign(sens, 0.95, ladder, 1e-3) == {0: 0.99, 1: 0.9, 2: 0.9}
    assert assign(sens, 0.95, ladder, 1e-4) == {0: 1.0, 1: 0.9, 2: 0.9}  # nothing fits: dense
    assert assign(sens, 0.95, ladder, 0.0) == {0: 1.0, 1: 1.0, 2: 0.9}  # a layer that costs nothing stays sparse
    for beta in (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1.0):  # a larger budget is sparser on every layer
        a, b = assign(sens, 0.95, ladder, beta), assign(sens, 0.95, ladder, beta * 10 + 1e-9)
        assert all(b[i] <= a[i] for i in a)
    assert rung_sample(PBSConfig(), 0.95) == 8 and rung_sample(PBSConfig(), 0.99) == 16
    assert rung_sample(PBSConfig(32, 64, sample=24), 0.995) == 32 and rung_sample(PBSConfig(sample=0), 0.998) == 0


def test_accuracy_tuning_assigns_ladder_taus_per_layer_and_keeps_the_sparsest_setting_that_met_the_bound(llama):
    from graphtune.runtime.sparse_tune import tune_accuracy

    ids = torch.randint(3, 200, (512,), generator=torch.Generator().manual_seed(3))
    res = tune_accuracy(llama, None, ids=ids, min_top1=0.05, keep=64, config=PBSConfig(32, 64, 0.5), max_runs=3,
                        ladder=(0.5, 0.995))
    assert res.candidates and all(set(c.layers.values()) <= {0.5, 0.995, 1.0} for c in res.candidates)
    for c in res.candidates:  # the high rung samples twice the rows
        assert all(c.samples[i] == (16 if t >= 0.99 else 8) for i, t in c.layers.items() if t < 1)
    met = [c for c in res.candidates if c.top1 is not None and c.top1 >= 0.05]
    assert res.best is not None and res.best.density == min(c.density for c in met)
    with pytest.raises(OptionError, match="ladder"):
        tune_accuracy(llama, None, ids=ids, min_top1=0.05, ladder=(0.5, 1.0))


def test_layers_tuned_dense_run_exact_flash_attention_on_chunks(llama, monkeypatch):
    # a chunk (queries at the end of longer keys) of a layer tuned dense: exact, and never the fp32 reference
    import graphtune.codegen.pbs_attention.reference as ref

    def no_reference(*a, **k):
        raise AssertionError("the slow reference ran")

    monkeypatch.setattr(ref, "dense_causal_ref", no_reference)
    p = _prompts((700,))
    want = graphtune.Engine(llama).generate(p, max_new_tokens=4).sequences
    s = SparsePrefill(SPARSE, min_len=256, layers={0: PBSConfig(32, 64, 1.0)})
    got = graphtune.Engine(llama, max_batch_tokens=192, sparse_prefill=s).generate(p, max_new_tokens=4)
    assert float(s.stats.density[0].min()) == 1.0 and float(s.stats.density[1].mean()) < 1.0
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 320, 16), torch.randn(1, 2, 320, 16)
    out, lse = sp._dense(q, k, v, None)
    monkeypatch.undo()
    w, wl = ref.dense_causal_ref(q, k, v)
    assert torch.allclose(out, w, atol=1e-5) and torch.allclose(lse, wl, atol=1e-5)
    assert got.sequences[0][:1] == want[0][:1]  # the sparse layer may change later tokens; the run completes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparse_logits_resumed_at_a_layer_equal_a_full_run_and_skip_the_layers_before(family):
    # tune --accuracy's per-layer sensitivity starts layer i's run at layer i from the dense capture's
    # recorded outputs: the same logits, bit for bit, as running the dense layers before it
    from graphtune.runtime.sparse_accuracy import capture, sparse_logits

    kw = {"n_positions": 2048} if family == "gpt2" else {"max_position_embeddings": 2048}
    m = build_model(family, "sdpa", num_hidden_layers=3, seed=2, **kw)
    ids = torch.randint(3, 200, (640,), generator=torch.Generator().manual_seed(5))
    cap = capture(m, ids, keep=32, qkv=False, layer_outputs=True)
    assert len(cap.layer_outputs) == 3
    cfg, dense = PBSConfig(32, 64, 0.5), PBSConfig(32, 64, 1.0)
    for i in range(3):
        s = SparsePrefill(cfg, 256, {j: (cfg if j == i else dense) for j in range(3)})
        seen: list[int] = []
        run_sparse = sp.run_sparse

        def spy(settings, layer, *a, **k):
            seen.append(layer)
            return run_sparse(settings, layer, *a, **k)

        full = sparse_logits(m, ids, s, keep=32)
        with pytest.MonkeyPatch.context() as mp:
            import graphtune.runtime.sparse_accuracy as sa

            mp.setattr(sa, "run_sparse", spy)
            resumed = sparse_logits(m, ids, s, keep=32, resume=(i, cap))
        assert seen == list(range(i, 3)), "the layers before the resume point must not run"
        assert torch.equal(resumed, full), f"resumed at layer {i}"
    assert not torch.equal(full, cap.logits)  # the sparse layer changed the logits: the check can fail
    assert torch.equal(sparse_logits(m, ids, SparsePrefill(dense, 256, {j: dense for j in range(3)}), keep=32),
                       cap.logits)  # no forward is left patched
    with pytest.raises(OptionError, match="layer_outputs=True"):
        sparse_logits(m, ids, s, keep=32, resume=(2, capture(m, ids, keep=32, qkv=False)))
    from graphtune.runtime.engine.hf_model import ModelRunner

    with pytest.raises(OptionError, match="resume at layer 4: the model has 3 layers"):
        with ModelRunner(m).resume_at(4, cap.layer_outputs):
            pass
