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
    assert e._last[0].completion_tokens <= 2
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
    for line, msg in [(":conf top_p=7", "top_p must be in (0, 1]"), (":conf nope=1", "unknown generation"),
                      (":conf top_p", "use :conf key=value"), (":seed x", "non-negative integer"),
                      (":frobnicate", "unknown command")]:
        assert repl.handle(line) is True
        assert msg in _out(repl)


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


def test_cli_errors(tiny_ckpt, tmp_path):
    p = _run_cli("generate", "--model", str(tmp_path), "hi")
    assert p.returncode == 2 and "has no config.json" in p.stderr
    assert main(["generate", "--model", str(tiny_ckpt), "--top-p", "3", "hi"]) == 2
