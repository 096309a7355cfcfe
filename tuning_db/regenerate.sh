#!/bin/sh
# Regenerate tuning_db/records/shipped.json: static sm_80/sm_90 records (cross-compiled, no GPU needed)
# for the default shapes of every family the CLI can tune with Triton configs.
#
#   sh tuning_db/regenerate.sh            # from the repository root, with .venv built (make test)
#
# Shapes: the small random-weight demo model (B=8, H=8/4, D=32: prefill 128, decode 160) and
# SmolLM2-135M (H=9/3, D=64) as `make demo` and benchmarks/bench_engine.py run it: the shared
# 768-token prompt's prefill, 8 and 16 samples decoding, a merge of two partials, and the ragged
# batches (1x1280 + 5x128 keys; 1x4096 + 15x256 keys) for lean decode. About a minute on 2 cores
# when the compiles are cached ($GRAPHTUNE_SHIP_DIR/crosscompile), a few minutes cold.
# The database starts empty; the records already shipped are left out of the export.
set -eu
PY=${PYTHON:-.venv/bin/python}
WORK=${GRAPHTUNE_SHIP_DIR:-${TMPDIR:-/tmp}/graphtune-ship}   # crosscompile/ cache kept between runs
mkdir -p "$WORK"
DB="$WORK/ship.db"
rm -f "$DB" "$DB-wal" "$DB-shm"
GT="$PY -m graphtune.cli --db $DB"
for t in sm_90 sm_80; do
  $GT tune --target $t --budget 120s,10c --quiet \
    --shape 8,8,4,128,128,32,float16,causal --shape 8,8,4,1,160,32,float16 \
    --shape 8,8,4,128,128,32,bfloat16,causal --shape 8,8,4,1,160,32,bfloat16 \
    --shape 1,9,3,768,768,64,float16,causal --shape 8,9,3,1,768,64,float16 --shape 16,9,3,1,1536,64,float16
  $GT tune --target $t --budget 30s,10c --quiet --merge 2,8,9,1,64,float16
  $GT tune --target $t --budget 60s,10c --quiet --lean 1280+128x5,9,3,64,float16 --lean 4096+256x15,9,3,64,float16
done
# CPU: lean decode's tile/workers for the engine's ragged batches, measured on this machine. A CPU
# record is keyed by the machine's fingerprint (ISA, cores, model name): it serves only that class.
# Tuned dispatch ignores lean records for HF-driven forwards (runtime.dispatch.may_serve counts only
# the ops it serves), so these change nothing but the lean plans of ragged decode steps.
$GT tune --device cpu --budget 90s --quiet --lean 1280+128x5,9,3,64 --lean 4096+256x15,9,3,64
"$PY" - "$DB" <<'EOF'
import json, sys
from pathlib import Path
from graphtune.autotune.db import TUNING_DB_DIR, TuningDB

out = TUNING_DB_DIR / "records" / "shipped.json"
old = {r["record_id"] for f in (TUNING_DB_DIR / "records").glob("*.json") for r in json.loads(f.read_text())}
recs = [r for r in TuningDB(sys.argv[1], import_shipped=False).export() if r["record_id"] not in old]
out.write_text(json.dumps(recs, indent=1, sort_keys=True) + "\n")
print(f"wrote {len(recs)} records to {out}")
EOF
