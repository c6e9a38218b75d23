"""qwen-fast perplexity (qwen_fast/perplexity.py): the windows, the numbers against the engine's
own log-probabilities, saved logits and KL divergence against a base run, and bad options."""
import json
import math

import numpy as np
import pytest

from qwen_fast import perplexity as P
from qwen_fast.cli import main
from qwen_fast.errors import RequestError

TEXT = ("The quick brown fox jumps over the lazy dog. " * 6
        + "Perplexity counts how surprised a model is by each token of a text. " * 4)


@pytest.mark.parametrize("n", [2, 3, 17, 64, 100])
@pytest.mark.parametrize("context, stride", [(2, 1), (8, 4), (8, 7), (16, 1), (32, 16), (200, 100)])
def test_windows_score_every_token_once(n, context, stride):
    scored = []
    for start, end, first in P.windows(n, context, stride):
        assert 0 <= start < first <= end <= n and end - start <= context
        scored += list(range(first, end))
    assert scored == list(range(1, n))


def test_windows_refuse_a_text_of_one_token():
    with pytest.raises(RequestError, match="at least 2"):
        P.windows(1, 8, 4)


@pytest.mark.parametrize("n, context", [(8, 8), (17, 8), (64, 16), (100, 7)])
def test_chunks_are_llama_perplexity_s(n, context):
    # llama-perplexity: n // context chunks, logits first = context // 2 .. context - 2 of each
    # predict the tokens after them (context - 1 - first of them).
    got = P.chunk_windows(n, context)
    assert len(got) == n // context
    for c, (start, end, first) in enumerate(got):
        assert (start, end) == (c * context, (c + 1) * context)
        assert end - first == context - 1 - context // 2 and first - start == context // 2 + 1
    with pytest.raises(RequestError, match="need at least 8"):
        P.chunk_windows(7, 8)


def test_chunked_run_scores_each_chunk_s_second_half(tiny_engine_fp32):
    eng = tiny_engine_fp32
    ids = eng.tokenizer.encode(TEXT)
    run = P.evaluate(eng, ids, context=16, chunks=True)
    assert run["chunks"] and run["stride"] == 16 and len(run["nll"]) == (len(ids) // 16) * 7
    lps = eng.prompt_logprobs(ids[16:32])                 # the second chunk, on its own
    assert np.allclose(run["nll"][7:14], [-lp.logprob for lp in lps[9:16]], atol=1e-5)
    with pytest.raises(RequestError, match="no stride"):
        P.evaluate(eng, ids, context=16, stride=8, chunks=True)


def test_perplexity_is_the_engine_log_probabilities(tiny_engine_fp32):
    eng = tiny_engine_fp32
    ids = eng.tokenizer.encode(TEXT)
    lps = eng.prompt_logprobs(ids)
    want = -np.mean([lp.logprob for lp in lps[1:]])
    run = P.evaluate(eng, ids, context=len(ids) + 1, stride=1)        # one window
    assert len(run["nll"]) == len(ids) - 1
    assert math.isclose(float(np.mean(run["nll"])), want, rel_tol=1e-6)
    # Several windows: each token scored once, with less context, so a different number.
    small = P.evaluate(eng, ids, context=16, stride=8)
    assert len(small["nll"]) == len(ids) - 1 and small["top_ids"].shape == (len(ids) - 1, P.TOP_K)
    assert float(np.mean(small["nll"])) != pytest.approx(want, rel=1e-9)
    # The saved form: the top ids are the most likely, and with the rest they sum to 1.
    total = np.exp(small["top_logprobs"]).sum(-1) + np.exp(small["rest_logprob"])
    assert np.allclose(total, 1.0, atol=1e-5)


def test_cli_base_then_kl(tiny_ckpt, tmp_path, capsys):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    base, out = tmp_path / "base.npz", tmp_path / "base.json"
    common = ["--model", str(tiny_ckpt), "--file", str(f), "--context", "32", "--backend", "reference"]
    assert main(["perplexity", *common, "--dtype", "float32", "--save-logits", str(base),
                 "--json", str(out)]) == 0
    b = json.loads(out.read_text())
    assert b["perplexity"] > 1 and b["kl_mean"] is None and b["stride"] == 16
    assert "perplexity" in capsys.readouterr().out
    # The same model against itself: no divergence.
    same = tmp_path / "same.json"
    assert main(["perplexity", *common, "--dtype", "float32", "--kl-base", str(base),
                 "--json", str(same)]) == 0
    s = json.loads(same.read_text())
    assert s["kl_mean"] == pytest.approx(0, abs=1e-9) and s["top1_agreement"] == 1.0
    assert s["perplexity_ratio"] == pytest.approx(1.0, rel=1e-9)
    # int4 layers: a divergence, reported.
    q = tmp_path / "q.json"
    assert main(["perplexity", *common, "--dtype", "float32", "--quant", "int4",
                 "--kl-base", str(base), "--json", str(q)]) == 0
    r = json.loads(q.read_text())
    assert r["kl_mean"] > 1e-6 and r["kl_p99"] >= r["kl_mean"]
    assert r["perplexity_ratio"] != pytest.approx(1.0, rel=1e-6)
    assert "KL divergence vs base" in capsys.readouterr().out
    # Another text, or another context, against that base: refused by name.
    g = tmp_path / "other.txt"
    g.write_text(TEXT + " More.")
    assert main(["perplexity", *common[:2], "--file", str(g), "--context", "32", "--backend",
                 "reference", "--kl-base", str(base)]) == 2
    assert "other tokens" in capsys.readouterr().err
    assert main(["perplexity", *common[:4], "--context", "64", "--kl-base", str(base)]) == 2
    assert "--context 32 --stride 16" in capsys.readouterr().err
    assert main(["perplexity", *common, "--chunks", "--kl-base", str(base)]) == 2
    assert "--context 32 --stride 16" in capsys.readouterr().err
    # A chunked base and run.
    cb, cj = tmp_path / "chunks.npz", tmp_path / "chunks.json"
    assert main(["perplexity", *common, "--chunks", "--save-logits", str(cb)]) == 0
    assert main(["perplexity", *common, "--chunks", "--kl-base", str(cb), "--json", str(cj)]) == 0
    c = json.loads(cj.read_text())
    assert c["chunks"] and c["kl_mean"] == pytest.approx(0, abs=1e-9)
    assert "llama-perplexity chunks" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--context", "1"], "--context must be >= 2"),
    (["--stride", "32"], "--stride must be in [1, --context - 1 = 31]"),
    (["--save-logits", "a.npz", "--kl-base", "b.npz"], "separate runs"),
    (["--chunks", "--stride", "8"], "--chunks and --stride"),
])
def test_cli_refuses_bad_options_before_loading(tmp_path, capsys, extra, message):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    assert main(["perplexity", "--model", str(tmp_path / "no-model"), "--file", str(f),
                 "--context", "32", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err


def test_cli_refuses_bad_files(tmp_path, capsys):
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert main(["perplexity", "--model", "x", "--file", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["perplexity", "--model", "x", "--file", str(tmp_path / "missing.txt")]) == 2
    assert "not a readable file" in capsys.readouterr().err
    notnpz = tmp_path / "n.npz"
    notnpz.write_bytes(b"nope")
    good = tmp_path / "g.txt"
    good.write_text(TEXT)
    assert main(["perplexity", "--model", "x", "--file", str(good), "--kl-base", str(notnpz)]) == 2
    assert "not a logits file" in capsys.readouterr().err
