"""The pure helpers of benchmarks/bench_prefix.py part (c): the --parts option, the GGUF type
for our weights, server-sent events, each server's stream read into a turn's numbers, and the
markdown table. Nothing here starts a server or builds llama.cpp. Parts (a) and (b) run once on
the test-size model (--config tiny), a smoke test of their bookkeeping."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_prefix", REPO / "benchmarks" / "bench_prefix.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_prefix", mod)
    spec.loader.exec_module(mod)
    return mod


bp = _load()


def test_parse_parts():
    assert bp.parse_parts("a,b,c") == ["a", "b", "c"]
    assert bp.parse_parts("c") == ["c"]
    assert bp.parse_parts(" C , a ") == ["a", "c"]
    for bad in ("", "d", "a,x", ","):
        with pytest.raises(ValueError):
            bp.parse_parts(bad)


def test_gguf_type():
    assert bp.gguf_type("int4", "bfloat16") == "q4_0"
    assert bp.gguf_type("int8", "float16") == "q8_0"
    assert bp.gguf_type("none", "bfloat16") == "bf16"
    assert bp.gguf_type("none", "float16") == "f16"
    assert bp.gguf_type("none", "float32") == "f32"


def test_parse_sse_line():
    assert bp.parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert bp.parse_sse_line('data:{"a":[1,2]}') == {"a": [1, 2]}
    assert bp.parse_sse_line(b"data: [DONE]\n") is bp.DONE
    for other in (b"\n", b": keep-alive\n", b"event: x\n", ""):
        assert bp.parse_sse_line(other) is None


def test_is_subsequence():
    assert bp.is_subsequence([1, 3], [1, 2, 3])
    assert bp.is_subsequence([], [1])
    assert not bp.is_subsequence([3, 1], [1, 2, 3])
    assert not bp.is_subsequence([1, 1], [1, 2])


def test_tokens_before_text():
    pieces = {1: "", 2: "", 3: "é", 4: "x"}       # 1, 2: halves of a character
    assert bp.tokens_before_text([4, 1], pieces.get) == 1
    assert bp.tokens_before_text([1, 2, 3, 4], pieces.get) == 3
    assert bp.tokens_before_text([1, 2], pieces.get) is None


def _ours_events():
    c = lambda **k: {"object": "text_completion", "choices": [{"index": 0, "text": "", **k}]}  # noqa: E731
    return [(0.5, c(text="a")), (0.6, c(text="b")),
            (0.7, c(finish_reason="length", token_ids=[5, 6, 7])),
            (0.71, {"choices": [], "usage": {"prompt_tokens": 416, "completion_tokens": 3,
                                             "prompt_tokens_details": {"cached_tokens": 215}}})]


def test_ours_turn():
    r = bp.ours_turn(_ours_events(), 416)
    assert r["ttft_s"] == 0.5 and r["total_s"] == 0.71
    assert r["answer"] == [5, 6, 7]
    assert (r["cached"], r["computed"], r["prompt_tokens_seen"]) == (215, 201, 416)
    no_usage = bp.ours_turn(_ours_events()[:3], 416)
    assert no_usage["cached"] is None and no_usage["computed"] is None


def _llama_events(drop=None):
    ev = []
    n = 0
    for i, tok in enumerate([11, 12, 13]):
        n += 1
        if i == drop:                 # an incomplete UTF-8 character: no chunk of its own
            continue
        ev.append((0.3 + 0.1 * i, {"content": "x", "tokens": [tok], "stop": False,
                                   "tokens_predicted": n, "tokens_evaluated": 416}))
    ev.append((0.7, {"content": "", "tokens": [], "stop": True, "tokens_predicted": 3,
                     "tokens_evaluated": 416, "tokens_cached": 418,
                     "timings": {"prompt_n": 201, "cache_n": 215, "predicted_n": 3}}))
    return ev


def test_llama_turn():
    r = bp.llama_turn(_llama_events())
    assert r["ttft_s"] == 0.3 and r["total_s"] == 0.7 and r["first_chunk_tokens"] == 1
    assert r["answer"] == [11, 12, 13] and r["complete"]
    assert (r["computed"], r["cached"], r["tokens_cached"], r["prompt_tokens_seen"]) == (201, 215, 418, 416)
    held = bp.llama_turn(_llama_events(drop=0))     # the first token held back
    assert held["ttft_s"] == pytest.approx(0.4) and held["first_chunk_tokens"] == 2
    assert held["answer"] == [12, 13] and not held["complete"]
    with pytest.raises(RuntimeError):
        bp.llama_turn(_llama_events()[:-1])          # no final event


def test_split_tokens():
    ranks = {b"a": 1, b"b": 2, b"c": 3, b"ab": 4, b"bc": 5}
    assert bp.split_tokens(b"ab", 1, ranks) == [4]
    assert bp.split_tokens(b"ab", 2, ranks) == [1, 2]
    assert bp.split_tokens(b"abc", 2, ranks) is None          # a|bc and ab|c
    assert bp.split_tokens(b"abc", 3, ranks) == [1, 2, 3]
    assert bp.split_tokens(b"abd", 1, ranks) is None


def test_llama_turn_rebuilds_held_ids():
    ranks = {b"\xc3": 100, b"\xa9": 101, b"x": 102, b"\xc3\xa9": 103}
    pieces = {i: b for b, i in ranks.items()}
    # 100 (the first byte of "é") gets no chunk; 101's chunk has "é" and only its own id.
    ev = [(0.4, {"content": "é", "tokens": [101], "stop": False, "tokens_predicted": 2}),
          (0.5, {"content": "x", "tokens": [102], "stop": False, "tokens_predicted": 3}),
          (0.6, {"content": "", "tokens": [], "stop": True, "tokens_predicted": 3,
                 "timings": {"prompt_n": 200, "cache_n": 0, "predicted_n": 3}})]
    r = bp.llama_turn(ev, ranks, pieces)
    assert r["answer"] == [100, 101, 102] and r["complete"] and r["rebuilt"] == 1
    assert r["first_chunk_tokens"] == 2
    plain = bp.llama_turn(ev)                                 # no vocabulary: not rebuilt
    assert plain["answer"] == [101, 102] and not plain["complete"] and plain["rebuilt"] == 0
    # Invalid UTF-8 (a lead byte, then ASCII) reaches the client as U+FFFD: not rebuilt.
    bad = [(0.4, {"content": "\ufffdx", "tokens": [102], "stop": False, "tokens_predicted": 2}),
           (0.6, {"content": "", "tokens": [], "stop": True,
                  "timings": {"prompt_n": 200, "predicted_n": 2}})]
    r = bp.llama_turn(bad, {**ranks, "\ufffd".encode(): 104}, pieces)
    assert r["answer"] == [102] and not r["complete"] and r["rebuilt"] == 0
    # The last token held back: its bytes never come, so the answer is incomplete.
    end = ev[:2] + [(0.6, {**ev[2][1], "tokens_predicted": 4,
                           "timings": {"prompt_n": 200, "predicted_n": 4}})]
    assert not bp.llama_turn(end, ranks, pieces)["complete"]


def _result():
    ours = [{"turn": t, "prompt_tokens": p, "ttft_s": s, "cached": c, "computed": p - c,
             "first_chunk_tokens": 1} for t, p, s, c in ((1, 200, 0.8, 0), (2, 416, 0.9, 215))]
    llama = [{"turn": t, "prompt_tokens": p, "ttft_s": s, "cached": c, "computed": p - c,
              "first_chunk_tokens": f, "refetched": t == 2, "refetch_agrees": True}
             for t, p, s, c, f in ((1, 200, 1.6, 0, 1), (2, 416, 2.0, 215, 2))]
    rows = bp.compare_turns(ours, llama)
    return {"gguf": "m-q4_0.gguf", "llama_server": ["version: 1"], "llama_cpp_build": "sdist",
            "threads": 2, "ctx": 4096, "answer_tokens": 16, "turn_tokens": 200,
            "loadavg_1min_before": 0.1, "loadavg_1min_after": 0.9, "turns": rows,
            "ours": ours, "llama": llama}


def test_compare_and_markdown():
    c = _result()
    rows = c["turns"]
    assert [r["ratio"] for r in rows] == [pytest.approx(0.5), pytest.approx(0.45)]
    assert rows[1]["cached_ours"] == 215 and rows[1]["computed_llama"] == 201
    md = bp.markdown({"llama_server": c})
    assert md.startswith("## (c) against llama.cpp's llama-server")
    assert "| 2 | 416 | 0.90 | 215 | 2.00 | 201 (215) | 0.45 |" in md
    assert "ours 1.12, llama-server 1.25" in md
    assert "turn(s) 2 (2)" in md and "agree with the answer fetched" in md
    c["llama"][0]["rebuilt"] = 1
    assert "in turn(s) 1 (1 id)" in bp.markdown({"llama_server": c})
    json.dumps(c)                                   # what --json writes
    assert bp.markdown({"llama_server": None}) == ""


def test_tiny_run_of_a_and_b(tmp_path):
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    assert bp.main(["--config", "tiny", "--parts", "a,b", "--turns", "3", "--turn-tokens", "20",
                    "--answer-tokens", "3", "--repeats", "2", "--shared", "3",
                    "--system-tokens", "70", "--json", str(out), "--md", str(md)]) == 0
    res = json.loads(out.read_text())
    rows = res["multi_turn"]
    assert [r["prompt_tokens"] for r in rows] == [20, 43, 66]      # + 3 answer tokens a turn
    # every turn after the first finds all of the history but the last answer token cached
    assert [r["cached_on"] for r in rows] == [0, 22, 45]
    assert all(r["cached_off"] == 0 for r in rows)
    assert all(len(r["ttft_on_all_s"]) == 2 for r in rows)
    assert all(r["answers_equal"] for r in rows)                   # greedy: on == off, every run
    shared = res["shared"]
    assert shared["on"]["cached_tokens"] == [70] * 3 and shared["off"]["cached_tokens"] == [0] * 3
    text = md.read_text()
    assert "median of 2 runs" in text and "identical in every run, on and off" in text
