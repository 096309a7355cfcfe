"""The records graphtune ships (``tuning_db/records/*.json``): what they cover, and that a user's own
measurement for the same key wins over them."""
import json

from graphtune.autotune import db as dbmod
from graphtune.autotune.db import Record, TuningDB
from graphtune.report import record_origin, shipped_record_ids

SHIPPED = dbmod.TUNING_DB_DIR / "records"


def _shipped() -> list[dict]:
    return [r for f in sorted(SHIPPED.glob("*.json")) for r in json.loads(f.read_text())]


def test_shipped_static_records_cover_every_cli_tunable_triton_op_on_sm80_and_sm90():
    # the ops `graphtune tune --target` can tune: --shape (attention), --merge, --lean
    have = {(r["op"], r["device"]) for r in _shipped() if r["mode"] == "static"}
    want = {(op, f"cuda:{t}") for op in ("attention_with_lse", "merge_states", "lean_decode") for t in ("sm_80", "sm_90")}
    assert want <= have, f"missing static records: {sorted(want - have)}; run sh tuning_db/regenerate.sh"


def test_shipped_records_cover_the_smollm2_demo_shapes():
    keys = {(r["device"], r["shape_key"]) for r in _shipped()}
    for t in ("sm_80", "sm_90"):
        assert (f"cuda:{t}", "b8_h9_kvh3_d64_dv64_float16_none_full") in keys  # 8 samples decoding
        assert (f"cuda:{t}", "b8_h9_kvh3_d64_q1_float16") in keys  # the demo's ragged batch (6 rows), lean decode


def _user_measurement(shipped: dict, median_us: float) -> Record:
    d = dict(shipped, record_id="", created_at="", mode="measured", median_us=median_us, p20_us=median_us,
             p80_us=median_us, n_samples=10, default_us=2 * median_us, device_name="NVIDIA H100 80GB HBM3",
             config={"params": {"BLOCK_M": 128, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 3}, score=None)
    return Record.from_json(d)


def test_a_users_measurement_of_the_same_key_wins_over_the_shipped_record(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", SHIPPED)
    db = TuningDB(tmp_path / "t.db")
    shipped = _shipped()
    ids = shipped_record_ids(SHIPPED)
    assert {r.record_id for r in db.records()} == ids  # loaded by the ordinary import path
    s = next(r for r in shipped if r["device"] == "cuda:sm_90" and r["mode"] == "static")

    def pick():
        return db.lookup(s["op"], s["shape_key"], s["q_bucket"], s["kv_bucket"], s["device"], s["versions"],
                         lambda r: True, "NVIDIA H100 80GB HBM3")

    assert record_origin(pick(), ids) == "shipped"
    mine = db.put(_user_measurement(s, 12.5))
    got = pick()
    assert got.record_id == mine.record_id and record_origin(got, ids) == "local"
    # reopening (a new graphtune process) does not bring the shipped record back on top
    db.close()
    db = TuningDB(tmp_path / "t.db")
    assert pick().record_id == mine.record_id
    db.close()
