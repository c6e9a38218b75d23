"""benchmarks/bench_gemv_share.py: a small run of its bookkeeping (one layer of small shapes)."""
import importlib.util
from pathlib import Path

import pytest

from qwen_fast import ops

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_gemv_share",
                                              REPO / "benchmarks" / "bench_gemv_share.py")
bg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bg)


@pytest.mark.skipif(not ops.HAVE_C, reason="needs qwen_fast._C")
def test_small_run():
    r = bg.run(4, layers=2, rounds=2, read_bytes=2**20, shapes=[(64, 256), (32, 128)])
    assert r["weight_bytes"] > 0 and len(r["rounds"]) == 2
    for x in r["rounds"]:
        assert x["share"] == pytest.approx(x["gemv_gb_s"] / x["read_gb_s"])


def test_bad_bits():
    with pytest.raises(SystemExit):
        bg.main(["--bits", "3"])
