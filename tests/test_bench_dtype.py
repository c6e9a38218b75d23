"""benchmarks/bench_dtype.py on the test-size model: a smoke test of its bookkeeping."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_dtype", REPO / "benchmarks" / "bench_dtype.py")
bd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bd)


def test_tiny_run(tmp_path):
    out, md = tmp_path / "o.json", tmp_path / "o.md"
    assert bd.main(["--config", "tiny", "--prompt-tokens", "40", "--new-tokens", "3",
                    "--rounds", "2", "--json", str(out), "--md", str(md)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rounds"]) == 2
    for r in res["rounds"]:
        assert r["ttft_ratio"] == pytest.approx(r["ttft_float16_s"] / r["ttft_bfloat16_s"])
        assert r["decode_float16_tok_s"] > 0 and r["decode_bfloat16_tok_s"] > 0
    assert "| 2 |" in md.read_text() and "Medians:" in md.read_text()


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bd.main(["--rounds", "0"])
