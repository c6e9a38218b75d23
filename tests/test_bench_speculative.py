"""Smoke runs of benchmarks/bench_speculative.py and bench_kv_cache.py on the test-size model
(--config tiny): their bookkeeping and tables, and the projection's arithmetic. The full-size
runs are the benchmarks themselves (README, Benchmarks)."""
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_projection_arithmetic():
    bs = _load("bench_speculative")
    rows = [{"weights": "int4", "batch": 1, "k": 0, "cost": 1.0},
            {"weights": "int4", "batch": 1, "k": 2, "cost": 1.5}]
    table = bs.projection_table(rows, rates=(0.5,))
    assert "PROJECTION" in table
    # E = 1 + 0.5 + 0.25 = 1.75 tokens a step, at 1.5x the cost: 1.17x
    assert "| int4 | 1 | 2 | 1.50x | 1.17x |" in table


def test_speculative_smoke(tmp_path):
    bs = _load("bench_speculative")
    out = tmp_path / "s.json"
    assert bs.main(["--config", "tiny", "--runs", "1", "--batches", "1", "--quants", "int4",
                    "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["k"] for r in data["verify"]] == [0, 1, 2, 4, 8, 16]
    rows = data["fixture"]["rows"]
    assert rows and all(r["identical"] for r in rows)
    assert {r["task"] for r in rows} == {"repeat", "rename", "continue"}
    assert sum(r["accepted"] for r in rows) > 0


def test_kv_cache_smoke(tmp_path):
    bk = _load("bench_kv_cache")
    out = tmp_path / "k.json"
    assert bk.main(["--config", "tiny", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert 1.7 < data["capacity"]["ratio"] < 2.0       # head_dim 32: 1 + 4/32 bytes an element
    d = data["decode"]
    assert set(d["rows"]) == {"bf16", "int8", "int8 group 32"} and d["speedup"] > 0
    assert d["rows"]["int8"]["kv_bytes_per_token"] < d["rows"]["bf16"]["kv_bytes_per_token"]
