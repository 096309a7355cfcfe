-- graphtune tuning database: the schema after all migrations (version 1).
-- Reference only: databases are created and upgraded by applying tuning_db/migrations/NNNN_*.sql
-- in order; tests/autotune/test_db.py checks that the two agree.
-- schema_version holds one row (app = 'graphtune-tuning', version = latest migration number).
CREATE TABLE IF NOT EXISTS schema_version (
    app TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    record_id TEXT NOT NULL UNIQUE,      -- uuid: identity across export/import
    op TEXT NOT NULL,                    -- "attention_with_lse", "merge_states"
    impl TEXT NOT NULL,                  -- winner implementation, e.g. "cpu.gqa_fold"
    source_hash TEXT NOT NULL,           -- the winner's source hash when tuned
    device TEXT NOT NULL,                -- fingerprint key: "cpu:<ISA>:<cores>c:<model>" or "cuda:sm_90"
    device_name TEXT NOT NULL,
    versions TEXT NOT NULL,              -- "torch=..;triton=..;graphtune=.."
    shape_key TEXT NOT NULL,             -- exact part of the shape key
    q_bucket INTEGER NOT NULL,           -- pow2 bucket of q_len
    kv_bucket INTEGER NOT NULL,          -- pow2 bucket of kv_len
    config TEXT NOT NULL,                -- KernelConfig.to_dict() as JSON
    median_us REAL,                      -- measured: median time (microseconds); static: NULL
    p20_us REAL,
    p80_us REAL,
    n_samples INTEGER NOT NULL DEFAULT 0,
    default_us REAL,                     -- the default config's median in the same run
    score REAL,                          -- static: the resource model's score (higher is better)
    details TEXT NOT NULL DEFAULT '{}',  -- JSON: static: resources of the winner; measured: candidates tried
    mode TEXT NOT NULL CHECK (mode IN ('measured', 'static')),
    shape TEXT NOT NULL,                 -- the exact shape tuned (JSON)
    created_at TEXT NOT NULL             -- ISO-8601 UTC
);
CREATE INDEX IF NOT EXISTS records_lookup ON records (op, device, versions, shape_key);
CREATE TABLE IF NOT EXISTS shipped_imports (
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    n_records INTEGER NOT NULL,
    imported_at TEXT NOT NULL,
    PRIMARY KEY (name, sha256)
);
