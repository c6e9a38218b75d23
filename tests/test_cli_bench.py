"""`qwen-fast bench` checks every option before anything is measured or built.

The bandwidth passes and the full-size model build take minutes, so a bad option must be
answered at once: argparse's usage and "qwen-fast bench: error: argument --OPTION: <what was
wrong, what was expected>" on stderr, exit status 2, no traceback. In process, bench.run and
the bandwidth passes are replaced by failures, so a test that reaches them fails; a few cases
also run the real command line in a subprocess, as a user would. Nothing here builds a model
or needs qwen_fast._C.
"""
import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from qwen_fast import bench
from qwen_fast.cli import main as cli_main

MAX_CONTEXT = 32767          # QwenConfig.max_context: the release's logn table


class _Reached(Exception):
    """bench.run was called: the options passed their check."""


@pytest.fixture()
def no_measuring(monkeypatch):
    """Fail the test if anything after the option check runs."""
    def fail(*a, **k):
        pytest.fail("measured or built something before reporting the bad option")
    monkeypatch.setattr(bench, "run", fail)
    monkeypatch.setattr(bench, "read_bandwidth_gbs", fail)
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", fail)


def _bench_error(capsys, *argv) -> str:
    """Run `qwen-fast bench ARGV` in process; it must exit 2 with argparse's error line."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", *argv])
    assert e.value.code == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: qwen-fast bench"), err
    lines = [x for x in err.splitlines() if x.startswith("qwen-fast bench: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("qwen-fast bench: error: "):]


BAD = [
    # (argv, the option the message must start with, words it must contain)
    (["--backend", ","], "--backend", ["empty list", "auto,reference"]),
    (["--backend", ""], "--backend", ["empty list"]),
    (["--backend", " , "], "--backend", ["empty list"]),
    (["--backend", "auto,,reference"], "--backend", ["empty item"]),
    (["--backend", "auto,"], "--backend", ["empty item"]),
    (["--backend", "auto,auto"], "--backend", ["twice"]),
    (["--backend", "fast"], "--backend", ["'fast'", "auto, native, reference"]),
    (["--backend", "auto,cuda"], "--backend", ["'cuda'"]),
    (["--device", "foo"], "--device", ["'foo'", "cpu, cuda or cuda:N"]),
    (["--device", ""], "--device", ["cpu, cuda or cuda:N"]),
    (["--device", "meta"], "--device", ["'meta'", "not supported"]),
    (["--device", "cpu:1"], "--device", ["expected cpu"]),
    (["--config", "nope"], "--config", ["'nope'", "qwen-1.8b-chat, tiny"]),
    (["--config", ""], "--config", ["qwen-1.8b-chat, tiny"]),
    (["--dtype", "int3"], "--dtype", ["'int3'", "bfloat16, float16 or float32"]),
    (["--dtype", ""], "--dtype", ["bfloat16, float16 or float32"]),
    (["--context", "32766", "--new-tokens", "5"], "--context/--new-tokens",
     ["32772", "32767", "<= 32766"]),
    (["--context", "128,32760"], "--context/--new-tokens", ["32760", "32767"]),
    (["--context", str(MAX_CONTEXT - 16)], "--context/--new-tokens", ["32767"]),  # 1 too many
    (["--new-tokens", "32700"], "--prompt-tokens/--new-tokens", ["32829", "32767"]),
    (["--config", "tiny", "--new-tokens", "40000"], "--prompt-tokens/--new-tokens",
     ["tiny's maximum context of 32767"]),
    (["--prompt-tokens", str(MAX_CONTEXT)], "--prompt-tokens", ["[1, 32766]"]),
    (["--prompt-tokens", "0"], "--prompt-tokens", ["[1, 32766]"]),
    (["--prompt-tokens", "-5"], "--prompt-tokens", ["[1, 32766]"]),
    (["--new-tokens", "0"], "--new-tokens", [">= 1"]),
    (["--new-tokens", "-1"], "--new-tokens", [">= 1"]),
    (["--repeats", "0"], "--repeats", [">= 1"]),
    (["--threads", "0"], "--threads", ["CPUs"]),
    (["--threads", str((os.cpu_count() or 1) + 1)], "--threads", ["CPUs"]),
    (["--context", ","], "--context", ["empty list"]),
    (["--context", ""], "--context", ["empty list"]),
    (["--context", "128,,2048"], "--context", ["empty item"]),
    (["--context", "128,"], "--context", ["empty item"]),
    (["--context", "128,128"], "--context", ["twice"]),
    (["--context", "x"], "--context", ["'x'", "128,2048"]),
    (["--context", "-3"], "--context", [">= 0"]),
    (["--quant", "int2"], "--quant", ["'int2'"]),
    (["--lm-head-quant", "fp8"], "--lm-head-quant", ["'fp8'"]),
    (["--prompt-tokens", "abc"], "--prompt-tokens", ["'abc'"]),
    (["--threads", "many"], "--threads", ["'many'"]),
    (["--json", ""], "--json", ["file"]),
]


@pytest.mark.parametrize("argv,option,words", BAD, ids=[" ".join(a) or "empty" for a, _, _ in BAD])
def test_bad_option_is_reported_before_anything_runs(no_measuring, capsys, argv, option, words):
    msg = _bench_error(capsys, *argv)
    assert msg.startswith(f"argument {option}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_json_path(no_measuring, capsys, tmp_path):
    """The results file is checked first too, not after minutes of measuring."""
    msg = _bench_error(capsys, "--json", str(tmp_path))
    assert msg.startswith("argument --json: ") and "is a directory" in msg
    msg = _bench_error(capsys, "--json", str(tmp_path / "missing" / "out.json"))
    assert msg.startswith("argument --json: ") and "does not exist" in msg


def test_cuda_without_a_gpu(no_measuring, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:0"):
        msg = _bench_error(capsys, "--device", device)
        assert msg.startswith("argument --device: ") and f"'{device}' was asked for" in msg
        assert "expected cpu" in msg


def test_cuda_index_beyond_the_gpus(no_measuring, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    msg = _bench_error(capsys, "--device", "cuda:2")
    assert msg.startswith("argument --device: ") and "2 CUDA GPU(s)" in msg and "cuda:1" in msg


def _plan(monkeypatch, *argv):
    """The (args, plan) bench.run receives for `qwen-fast bench ARGV`."""
    seen = {}

    def run(args, plan=None):
        seen.update(args=args, plan=plan)
        raise _Reached
    monkeypatch.setattr(bench, "run", run)
    with pytest.raises(_Reached):
        cli_main(["bench", *argv])
    return seen["args"], seen["plan"]


def test_good_options_reach_the_run(monkeypatch, tmp_path):
    args, plan = _plan(monkeypatch)                                   # the defaults
    assert plan.backends == ["auto"] and plan.contexts == [0]
    assert plan.device == torch.device("cpu") and plan.config.num_hidden_layers == 24
    args, plan = _plan(monkeypatch, "--config", "tiny", "--backend", " auto , reference ",
                       "--context", "128,2048", "--dtype", "bf16", "--device", "cpu:0",
                       "--threads", "1", "--repeats", "1", "--quant", "int4",
                       "--lm-head-quant", "int8", "--json", str(tmp_path / "out.json"))
    assert plan.backends == ["auto", "reference"] and plan.contexts == [128, 2048]
    assert plan.config.num_hidden_layers == 2
    # The longest run that fits: cached + 1 token from the prefill + new tokens = 32767.
    _, plan = _plan(monkeypatch, "--context", str(MAX_CONTEXT - 17))
    assert plan.contexts == [MAX_CONTEXT - 17]
    _plan(monkeypatch, "--prompt-tokens", str(MAX_CONTEXT - 2), "--new-tokens", "1")
    _plan(monkeypatch, "--dtype", "auto", "--backend", "native")
    if torch.cuda.is_available():
        _plan(monkeypatch, "--device", "cuda")


def test_run_from_code_checks_too(monkeypatch):
    """Callers of bench.run (benchmarks/bench_llamacpp.py) get a BenchOptionError, a
    ValueError, before any measuring."""
    monkeypatch.setattr(bench, "read_bandwidth_gbs", lambda *a, **k: pytest.fail("measured"))
    args = bench.build_parser().parse_args(["--backend", ","])
    with pytest.raises(bench.BenchOptionError, match="argument --backend: "):
        bench.run(args)
    assert issubclass(bench.BenchOptionError, ValueError)
    args = bench.build_parser().parse_args([])
    args.context = 40000                        # a plain int set from code
    with pytest.raises(bench.BenchOptionError, match="argument --context/--new-tokens: "):
        bench.run(args)
    args = argparse.Namespace(**vars(bench.build_parser().parse_args([])))
    args.repeats = "3"
    with pytest.raises(bench.BenchOptionError, match="argument --repeats: '3' is not an integer"):
        bench.check_args(args)


def test_bench_backends_are_the_models():
    """bench keeps its own copy so that checking options imports no model code."""
    from qwen_fast.model import BACKENDS
    assert sorted(bench.BACKENDS) == sorted(BACKENDS)


class _FakeEngine:
    """Just enough of an Engine for bench.measure: each decode run returns `decoded` tokens
    after the prefill's one, in `decode_s` seconds."""

    def __init__(self, decoded: int, decode_s: float = 0.01, prefill_s: float = 0.01):
        self.tokenizer = [None] * 1000
        w = torch.zeros(4, 4)
        cfg = types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, head_dim=4)
        self.model = types.SimpleNamespace(backend="reference", layers=[{"w": w}], lm_head=w,
                                           ln_f=w[0], wte=w, cfg=cfg, dtype=torch.float32)
        self.decoded, self.decode_s, self.prefill_s = decoded, decode_s, prefill_s
        self.kv_pool = types.SimpleNamespace(bytes_per_page=2 * 4 * 4 * 16, page_size=16)

    def generate(self, prompt, max_new_tokens, **kw):
        n = 1 + min(self.decoded, max_new_tokens - 1)
        return types.SimpleNamespace(prefill_s=self.prefill_s, decode_s=self.decode_s,
                                     completion_tokens=n, finish_reason="length")


@pytest.mark.parametrize("engine,words", [
    (_FakeEngine(decoded=0), "produced 0"),                  # the context was already full
    (_FakeEngine(decoded=2), "produced 2"),                  # stopped short: a rate from 2 of 5
    (_FakeEngine(decoded=5, decode_s=0.0), "measured 0.0 s"),
    (_FakeEngine(decoded=5, prefill_s=0.0), "prefill of 9 tokens measured 0.0 s"),
], ids=["no-token", "short", "zero-decode-time", "zero-prefill-time"])
def test_measure_refuses_an_empty_measurement(engine, words, monkeypatch):
    """A run that measured nothing is a BenchError that says so, never ZeroDivisionError (or
    a rate computed from fewer tokens than asked for)."""
    with pytest.raises(bench.BenchError, match=words):
        bench.measure(engine, prompt_tokens=9, new_tokens=5, contexts=[0], repeats=1,
                      read_gbs=lambda: 10.0)


def test_measure_with_every_token():
    rows = bench.measure(_FakeEngine(decoded=5, decode_s=0.05), prompt_tokens=9, new_tokens=5,
                         contexts=[0], repeats=1, read_gbs=lambda: 10.0)
    assert rows[0]["ms_per_token"] == pytest.approx(10.0)
    assert rows[0]["kv_bytes_per_token"] == 2 * 4 * 4 * 9     # the pool's bytes a position x 9


def _run_cli(*argv, env=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), **(env or {}))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qwen_fast.cli", "bench", *argv],
                       capture_output=True, text=True, env=env, timeout=30)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("argv,option,env", [
    (["--backend", ","], "--backend", None),
    (["--device", "cuda"], "--device", {"CUDA_VISIBLE_DEVICES": ""}),   # no GPU, on any machine
    (["--context", "32766", "--new-tokens", "5"], "--context/--new-tokens", None),
    (["--config", "nope", "--dtype", "bfloat16"], "--config", None),
], ids=["backend", "cuda-without-gpu", "context-too-long", "config"])
def test_command_line_answers_at_once(argv, option, env):
    """The probe's cases through the real command line: exit 2 and one error line within
    seconds (the bandwidth passes alone take longer than the limit on a full-size run), no
    traceback, nothing on stdout."""
    p, seconds = _run_cli(*argv, env=env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert f"qwen-fast bench: error: argument {option}: " in p.stderr, p.stderr
    assert "[bench]" not in p.stderr                    # no bandwidth pass began
    assert seconds < 10
