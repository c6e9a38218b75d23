"""benchmarks/bench_quality.py on the micro fixture, our rows only (llama.cpp's need its build):
every row scores the same tokens, the base against itself has no divergence, the quantized rows
have some, and the targets are judged from the rows."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from qwen_fast import fixture as FX

REPO = Path(__file__).resolve().parent.parent


def _load(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "micro"
    s = FX.Settings(micro=True)
    cfg, p, vocab = FX.fit(s, log=lambda m: None)
    FX.export(cfg, p, vocab, d, s)
    return d


def test_quality_table_on_the_micro_fixture(micro, tmp_path, capsys):
    bq = _load("bench_quality")
    assert bq.main(["--model", str(micro), "--chunks", "2", "--context", "64", "--samples", "8",
                    "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
                    "--no-llama"]) == 0
    out = capsys.readouterr().out
    assert "| qwen_fast | int4 GPTQ |" in out
    (res,) = (tmp_path / "res").glob("quality-*.json")
    rows = {r["row"]: r for r in json.loads(res.read_text())["rows"]}
    assert len(rows) == len(bq.OURS)
    assert {r["scored_tokens"] for r in rows.values()} == {2 * (64 - 1 - 32)}
    base = rows["bf16"]
    assert base["kl_mean"] == 0 and base["top1_agreement"] == 1.0
    for label in ("int8 RTN", "int4 RTN", "int4 GPTQ", "int4 GPTQ + int4 lm_head"):
        r = rows[label]
        assert r["kl_mean"] > 0 and r["kl_p99"] >= r["kl_mean"] * 0.5
        assert r["kl_top32_bound"] <= r["kl_mean"] + 1e-9        # a lower bound
    # int4 layers and an int4 lm_head diverge more than int8 layers alone
    assert rows["int4 RTN + int4 lm_head"]["kl_mean"] > rows["int8 RTN"]["kl_mean"]


def test_targets_are_judged_from_the_rows():
    bq = _load("bench_quality")
    rows = [{"engine": "qwen_fast", "row": "int8 RTN", "kl_mean": 0.002, "perplexity": 10.1},
            {"engine": "qwen_fast", "row": "int8 GPTQ", "kl_mean": 0.001, "perplexity": 10.0},
            {"engine": "qwen_fast", "row": "int4 RTN", "kl_mean": 0.05, "perplexity": 11.0},
            {"engine": "qwen_fast", "row": "int4 GPTQ", "kl_mean": 0.03, "perplexity": 10.6},
            {"engine": "llama.cpp", "row": "Q8_0", "kl_mean": 0.0015, "perplexity": 10.0},
            {"engine": "llama.cpp", "row": "Q4_0", "kl_mean": 0.04, "perplexity": 10.5}]
    got = bq.targets(rows)
    assert "met" in got[0] and "NOT" not in got[0]             # 0.001 <= 0.0015
    assert got[1].endswith(": met")                            # 10.6 < 11.0
    assert got[2].endswith("NOT met")                          # 10.6 > 10.5
