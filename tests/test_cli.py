"""CLI: the chat REPL's commands really take effect; generate prints text or JSON."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_fast.cli import ChatREPL, main


@pytest.fixture()
def repl(tiny_engine):
    return ChatREPL(tiny_engine, seed=7, out=io.StringIO())


def _out(repl):
    text = repl.out.getvalue()
    repl.out.seek(0)
    repl.out.truncate()
    return text


def test_conf_takes_effect(repl):
    e = repl.engine
    repl.handle(":conf max_new_tokens=2")
    assert "max_new_tokens = 2" in _out(repl)
    repl.handle("hello")
    assert repl.params.max_new_tokens == 2
    assert repl.history[-1][1] == e.chat("hello", params=repl.params, seed=7)[0]
    repl.handle(":conf temperature=0")
    repl.handle(":conf repetition_penalty=1.0")
    repl.handle(":seed 1")
    repl.handle("same")
    a = repl.history[-1][1]
    repl.handle(":seed 2")
    repl.history.pop()                     # same prompt, same (empty-but-one) history
    repl.handle("same")
    assert repl.history[-1][1] == a          # greedy: the seed no longer matters
    repl.handle(":reset-conf")
    assert repl.params == e.default_params
    _out(repl)
    repl.handle(":conf")
    assert "top_p = 0.8" in _out(repl)


def test_conf_errors_are_reported_not_raised(repl):
    for line, msg in [(":conf top_p=7", "top_p must be a number in (0, 1]"), (":conf nope=1", "unknown generation"),
                      (":conf top_p", "use :conf key=value"), (":seed x", "integer in [0, 2**32 - 1]"),
                      (":frobnicate", "unknown command")]:
        assert repl.handle(line) is True
        assert msg in _out(repl)


def test_accepted_settings_work_and_bad_ones_are_refused(repl):
    """Settings the REPL accepts must not end the session later; ones it cannot use are
    refused when given, and the history survives all of it."""
    repl.handle(":conf max_new_tokens=2")
    repl.handle("first")
    assert len(repl.history) == 1
    for line, msg in [(":conf stop_token_ids=[1000000000000]", "outside the vocabulary"),
                      (":seed 99999999999999999999999", "integer in [0, 2**32 - 1]"),
                      (":seed -3", "integer in [0, 2**32 - 1]"),
                      (":conf temperature=float('nan')", "error"),
                      (":conf seed=3", "use :seed N")]:
        assert repl.handle(line) is True
        assert "error" in (out := _out(repl)) and msg in out, (line, out)
    for line in (":conf temperature=1e-300", ":conf repetition_penalty=1e-45", ":seed 4294967295"):
        assert repl.handle(line) is True and "error" not in _out(repl)
        assert repl.handle("next turn") is True
        assert "error" not in _out(repl)
    assert len(repl.history) == 4 and repl.history[0][0] == "first"


def test_failed_turn_and_ctrl_c_keep_the_session(repl, monkeypatch):
    repl.handle(":conf max_new_tokens=2")
    repl.handle("kept")

    def broken(*a, **k):
        raise RuntimeError("simulated failure inside generation")
    monkeypatch.setattr(repl.engine, "chat_stream", broken)
    assert repl.handle("this turn fails") is True
    assert "error: RuntimeError: simulated failure" in _out(repl)
    assert [q for q, _ in repl.history] == ["kept"]
    monkeypatch.undo()

    class Keys:
        """stdin that delivers a Ctrl-C at the prompt, then a line, then :exit."""
        def __init__(self):
            self.items = [KeyboardInterrupt, ":his\n", ":exit\n"]

        def isatty(self):
            return False

        def readline(self):
            item = self.items.pop(0)
            if item is KeyboardInterrupt:
                raise KeyboardInterrupt
            return item
    repl.run(Keys())
    out = _out(repl)
    assert "interrupted" in out and "[0] User: kept" in out


def test_history_seed_and_exit(repl):
    repl.handle(":conf max_new_tokens=3")
    repl.handle("first question")
    _out(repl)
    repl.handle(":history")
    assert "[0] User: first question" in _out(repl)
    repl.handle(":clh")
    repl.handle(":his")
    assert "(no history)" in _out(repl)
    repl.handle(":seed")
    assert "seed = 7" in _out(repl)
    repl.handle(":help")
    assert ":reset-conf" in _out(repl)
    assert repl.handle(":q") is False and repl.handle(":exit") is False


def _run_cli(*args, stdin=""):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "qwen_fast.cli", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_generate_json_and_chat_over_pipes(tiny_ckpt):
    p = _run_cli("generate", "--model", str(tiny_ckpt), "--json", "--temperature", "0",
                 "--max-new-tokens", "3", "--ignore-eos", "Hello")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    p = _run_cli("chat", "--model", str(tiny_ckpt), stdin=":conf max_new_tokens=2\nhi\n:his\n:exit\n")
    assert p.returncode == 0, p.stderr
    assert "[0] User: hi" in p.stdout


def test_generate_with_a_quantized_lm_head(tiny_ckpt, capsys):
    """--lm-head-quant reaches Engine.from_pretrained: same greedy call, int8 lm_head."""
    assert main(["generate", "--model", str(tiny_ckpt), "--lm-head-quant", "int8", "--json",
                 "--temperature", "0", "--max-new-tokens", "3", "--ignore-eos", "Hello"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["usage"]["completion_tokens"] == 3
    with pytest.raises(SystemExit) as exc:         # argparse refuses the choice
        main(["generate", "--model", str(tiny_ckpt), "--lm-head-quant", "int2", "hi"])
    assert exc.value.code == 2


def test_cli_errors(tiny_ckpt, tmp_path):
    p = _run_cli("generate", "--model", str(tmp_path), "hi")
    assert p.returncode == 2 and "has no config.json" in p.stderr
    assert main(["generate", "--model", str(tiny_ckpt), "--top-p", "3", "hi"]) == 2
    p = _run_cli("generate", "--model", str(tiny_ckpt), "--device", "bogus", "hi")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "device must be 'cpu', 'cuda' or 'cuda:N', got 'bogus'" in p.stderr
    p = _run_cli("chat", "--model", str(tiny_ckpt), "--device", "bogus")
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_bench_writes_every_number(tmp_path):
    """qwen-fast bench end to end on the tiny config (the numbers themselves are not judged
    here: a benchmark is read, not asserted)."""
    out = tmp_path / "bench.json"
    p = _run_cli("bench", "--config", "tiny", "--backend", "auto,reference", "--prompt-tokens", "9",
                 "--new-tokens", "3", "--repeats", "1", "--threads", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "[bench] measuring memory bandwidth" in p.stderr and "| auto |" in p.stdout
    r = json.loads(out.read_text())
    assert r["read_gb_s"] > 0 and r["copy_gb_s"] > 0 and r["peak_rss_mb"] > 0
    assert [x["backend"] for x in r["results"]] == ["auto", "reference"]
    for x in r["results"]:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "ms_per_token",
                    "weight_bytes_per_token", "weights_gb_s", "pct_of_read"):
            assert x[key] > 0, key
    assert _run_cli("bench", "--config", "tiny", "--new-tokens", "0").returncode == 2


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_server_extra(monkeypatch, capsys, missing):
    """Without fastapi/uvicorn, `qwen-fast serve` says how to install them and fails, before
    loading any model."""
    monkeypatch.setitem(sys.modules, missing, None)      # makes `import <missing>` fail
    monkeypatch.setattr("qwen_fast.cli._load", lambda args: pytest.fail("loaded a model"))
    rc = main(["serve", "--load-format", "dummy"])
    err = capsys.readouterr().err
    assert rc != 0
    assert missing in err and 'pip install "qwen_fast[server]"' in err
