"""``graphtune report``: the HTML page from a tuning database and pytest-benchmark JSON files."""
import base64
import json
import re

import pytest

from graphtune import report as rep
from graphtune.autotune import db as dbmod
from graphtune.autotune.db import Record, TuningDB
from graphtune.autotune.tuner import load_impls
from graphtune.cli import main
from graphtune.codegen.registry import get_impl
from graphtune.errors import OptionError


def _measured(record_id, default_us, median_us, q=1, kv=512):
    load_impls()
    return Record("attention_with_lse", "cpu.gqa_fold", get_impl("attention_with_lse", "cpu.gqa_fold").source_hash,
                  "cpu:test", "test cpu", "v1", "b1_h8_kvh2_d64_dv64_float32_none_full", q, kv,
                  {"params": {"THREADS": 1}, "num_warps": 4, "num_stages": 2}, median_us, median_us * 0.9,
                  median_us * 1.1, 10, default_us, "measured",
                  {"batch": 1, "heads": 8, "kv_heads": 2, "q_len": q, "kv_len": kv, "head_dim": 64,
                   "dtype": "float32", "causal": False, "mask": "none"}, record_id=record_id)


def _static(record_id):
    load_impls()
    impl = get_impl("attention_with_lse", "triton.attention_fwd")
    return Record("attention_with_lse", impl.name, impl.source_hash, "cuda:sm_90", "static:sm_90", "v1",
                  "b8_h8_kvh4_d32_dv32_float16_none_causal", 128, 128,
                  {"params": {"BLOCK_M": 64, "BLOCK_N": 64}, "num_warps": 4, "num_stages": 2}, None, None, None, 0,
                  None, "static", {"batch": 8, "heads": 8, "kv_heads": 4, "q_len": 128, "kv_len": 128, "head_dim": 32,
                                   "dtype": "float16", "causal": True, "mask": "none"},
                  score=0.42, details={"resources": {"kernel": "_attn_fwd_kernel", "arch": 90, "registers": 128,
                                                     "spill_bytes": 0, "shared_mem_bytes": 12288, "num_warps": 4,
                                                     "num_stages": 2, "compile_s": 0.1}}, record_id=record_id)


def _bench_json(path, when, speedup, test="test_ragged"):
    path.write_text(json.dumps({"datetime": when, "benchmarks": [
        {"name": test, "fullname": f"benchmarks/bench_engine.py::{test}", "stats": {"median": 1.0},
         "extra_info": {"engine_s": 1.0, "speedup": speedup, "goal_speedup": 1.5, "rows_identical": 16,
                        "hf_over_engine": 3.25, "route": "engine"}}]}))
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # a shipped file with the static record: the report must call it "shipped", the measured one "local"
    shipped = tmp_path / "records"
    shipped.mkdir()
    (shipped / "shipped.json").write_text(json.dumps([_static("ship-1").to_json()]))
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", shipped)
    db_path = tmp_path / "t.db"
    db = TuningDB(db_path)
    db.put(_measured("mine-1", default_us=200.0, median_us=80.0))
    db.close()
    bench = _bench_json(tmp_path / "0001_run.json", "2026-11-01T00:00:00", 2.4)
    return db_path, bench


def _rows(html_text, cls):
    table = re.search(rf"<table class='{cls}'>(.*?)</table>", html_text, re.S)
    assert table, f"no {cls} table"
    return re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)[1:]


def test_report_tabulates_measured_speedup_static_pick_and_benchmark_ratios(setup):
    db_path, bench = setup
    r = rep.build_report(str(db_path), [bench], plots=False)
    [measured] = _rows(r.html, "measured")
    assert "B=1 H=8/2 L=1 S=512 D=64 float32" in measured and ">2.50<" in measured and ">local<" in measured
    [static] = _rows(r.html, "static")
    assert "sm_90" in static and "BLOCK_M=64,BLOCK_N=64;w4;s2" in static and ">shipped<" in static
    assert ">0.25<" in static  # occupancy: 4 blocks of 4 warps at 128 registers = 16 of 64 warp slots
    assert re.search(r"<td>\d+\.\d</td><td>(memory|compute)</td>", static)  # the roofline's predicted µs and bound
    bench_rows = _rows(r.html, "bench")
    assert any(">speedup<" in b and ">2.40<" in b and ">1.5<" in b for b in bench_rows)
    assert any(">hf_over_engine<" in b and ">3.25<" in b for b in bench_rows)
    assert not any("engine_s" in b or "rows_identical" in b for b in bench_rows)  # times and counts are not ratios
    assert (r.n_records, r.n_ratios, r.n_plots) == (2, 2, 0) and "<img" not in r.html


def test_report_embeds_one_png_per_plot(setup):
    pytest.importorskip("matplotlib")
    db_path, bench = setup
    r = rep.build_report(str(db_path), [bench])
    imgs = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([^']+)'/>", r.html)
    assert [alt for alt, _ in imgs] == ["tuned vs default", "bench_engine"] and r.n_plots == 2
    for _, b64 in imgs:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_without_matplotlib_warns_and_keeps_the_tables(setup, monkeypatch):
    db_path, bench = setup
    monkeypatch.setattr(rep, "have_matplotlib", lambda: False)
    with pytest.warns(rep.ReportWarning, match="matplotlib is not installed"):
        r = rep.build_report(str(db_path), [bench])
    assert "<img" not in r.html and _rows(r.html, "measured") and _rows(r.html, "bench")
    assert "matplotlib is not installed" in r.html


def test_newest_benchmark_run_of_a_test_wins(tmp_path):
    _bench_json(tmp_path / "a.json", "2026-11-01T00:00:00", 1.1)
    _bench_json(tmp_path / "b.json", "2026-11-02T00:00:00", 2.2)
    ratios, problems = rep.load_benchmarks([tmp_path])
    assert problems == []
    assert [(r.key, r.value) for r in ratios] == [("speedup", 2.2), ("hf_over_engine", 3.25)]


def test_unreadable_benchmark_file_is_reported_and_missing_path_is_an_error(tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    ratios, problems = rep.load_benchmarks([tmp_path])
    assert ratios == [] and len(problems) == 1 and "junk.json" in problems[0]
    with pytest.raises(OptionError, match="do not exist"):
        rep.load_benchmarks([tmp_path / "nope.json"])


def test_cli_report_writes_the_page_and_prints_its_path(setup, tmp_path, capsys):
    db_path, bench = setup
    out = tmp_path / "out" / "r.html"
    assert main(["--db", str(db_path), "report", str(bench), "-o", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert "<h2>Tuned vs default</h2>" in out.read_text()


def test_static_candidates_table_ranks_every_config_and_marks_the_stored_winner(setup, monkeypatch):
    from graphtune.codegen import crosscompile
    from graphtune.codegen.crosscompile import KernelResources
    from graphtune.codegen.registry import KernelConfig

    db_path, _ = setup
    won = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=64)
    other = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=64)
    res = KernelResources("_attn_fwd_kernel", 90, 128, 0, 12288, 4, 2)
    calls = []

    def fake_rank(impl, meta, configs, arch):  # no cross-compilation in this test
        calls.append((impl, arch, configs))
        return [(won, 0.9, res), (other, 0.4, res), (other, float("-inf"), None)]

    monkeypatch.setattr(crosscompile, "static_rank", fake_rank)
    r = rep.build_report(str(db_path), [], plots=False, static_candidates=1)
    assert calls == [("triton.attention_fwd", 90, None)]  # the implementation's whole config space
    rows = _rows(r.html, "candidates")
    assert len(rows) == 3
    assert "<td>1</td><td>BLOCK_M=64,BLOCK_N=64;w4;s2</td>" in rows[0] and rows[0].endswith("<td>winner</td>")
    assert "-inf" in rows[2] and rows[2].count("<td>-</td>") == 2  # did not compile: no prediction, no rank
