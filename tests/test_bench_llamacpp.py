"""The GGUF that benchmarks/bench_llamacpp.py gives llama.cpp holds OUR model, not just a file
llama.cpp accepts: on a small random config with the real vocabulary, llama.cpp's own tools
(no Python in between) must tokenize like our tokenizer, produce the same logits as our fp32
reference backend, and greedy-decode the same tokens.

Needs the ``gguf`` package (``pip install -e '.[bench]'``) and a llama.cpp build with
llama-simple, llama-debug and llama-tokenize ($LLAMA_CPP_DIR, or the one
``python benchmarks/bench_llamacpp.py`` builds under ~/.cache/qwen_fast/llama.cpp-build).
Without them every test here skips at once; none ever builds anything.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_fast.config import QwenConfig
from qwen_fast.testing import random_state_dict, write_checkpoint
from qwen_fast.tokenizer import VOCAB_SIZE

REPO = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_llamacpp",
                                                  REPO / "benchmarks" / "bench_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_llamacpp", mod)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed "
                                          "(pip install -e '.[bench]')")

TOOLS = ("llama-simple", "llama-debug", "llama-tokenize")


@pytest.fixture(scope="module")
def tools():
    """The llama.cpp tools, or a skip (before any model is built: this must be quick)."""
    build = bench.default_build_dir()
    missing = bench.missing_tools(TOOLS, build)
    if missing:
        pytest.skip(f"llama.cpp build absent: {', '.join(missing)} not in {build} (run "
                    f"`python benchmarks/bench_llamacpp.py` once to build it, or set "
                    f"LLAMA_CPP_DIR to a build that has these targets)")
    return {t: bench.find_tool(t, build) for t in TOOLS}


def small_config() -> QwenConfig:
    """2 layers, 4 heads of 16, the real 151936-row vocabulary; seq_length 256 so that no
    prompt here reaches dynamic NTK or logn scaling, which llama.cpp does not implement."""
    return QwenConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
                      intermediate_size=192, seq_length=256, max_position_embeddings=256)


PROMPT = "The quick brown fox jumps over the lazy dog. 12345"
N_NEW = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Our fp32 reference engine and llama.cpp GGUFs (F32 and F16) of the same weights."""
    from qwen_fast import Engine

    cfg = small_config()
    # std 0.08 with a larger c_attn and non-unit norms (qwen_fast.testing): attention that is
    # far from uniform, so rope, the qkv split and the bias all show in the logits.
    sd = random_state_dict(cfg, torch.float32, seed=1)
    # Padding rows 151851.. are masked by us before argmax; zero them so they never win in
    # llama.cpp either (a zero logit is far below the max of 151851 random ones).
    sd["lm_head.weight"][VOCAB_SIZE:] = 0
    d = tmp_path_factory.mktemp("llamacpp")
    ckpt = write_checkpoint(d / "ckpt", cfg, state_dict=sd, dtype=torch.float32, shards=1)
    engine = Engine.from_pretrained(ckpt, dtype="float32", backend="reference")
    ggufs = {ft: bench.write_gguf(d / f"small-{ft}.gguf", cfg, sd, ft) for ft in ("f32", "f16")}
    return engine, ggufs, d


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120, **kw)
    assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stderr.decode(errors='replace')[-3000:]}"
    return r


def test_gguf_layout(model):
    """Metadata as llama.cpp's converter writes it for QWenLMHeadModel; tensors renamed with
    w1 -> ffn_up, w2 -> ffn_gate (spec §3.2) and the fused c_attn kept with its bias."""
    engine, ggufs, _ = model
    r = gguf.GGUFReader(str(ggufs["f32"]))
    f = {k: v.contents() for k, v in r.fields.items()
         if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                              "tokenizer.ggml.token_type"))}
    assert f["general.architecture"] == "qwen"
    assert f["qwen.context_length"] == 256 and f["qwen.embedding_length"] == 64
    assert f["qwen.block_count"] == 2 and f["qwen.feed_forward_length"] == 192
    assert f["qwen.attention.head_count"] == 4 and f["qwen.rope.dimension_count"] == 16
    assert f["qwen.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["qwen.rope.freq_base"] == 10000.0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == 151643
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 151936 and len(r.fields["tokenizer.ggml.merges"].data) == 151643 - 256
    assert tokens.contents(198) == "Ċ" and tokens.contents(151645) == "<|im_end|>"
    assert tokens.contents(151935) == "[PAD151935]"
    types = r.fields["tokenizer.ggml.token_type"]
    assert (types.contents(0), types.contents(151644), types.contents(151900)) == (1, 3, 5)
    t = {x.name: x for x in r.tensors}
    assert len(t) == 3 + 2 * 8
    sd = {"blk.1.ffn_gate.weight": "transformer.h.1.mlp.w2.weight",
          "blk.1.ffn_up.weight": "transformer.h.1.mlp.w1.weight",
          "blk.1.ffn_down.weight": "transformer.h.1.mlp.c_proj.weight",
          "blk.0.attn_qkv.bias": "transformer.h.0.attn.c_attn.bias"}
    src = random_state_dict(small_config(), torch.float32, seed=1)
    for g, n in sd.items():
        assert list(t[g].shape) == list(reversed(src[n].shape)), g
        assert torch.equal(torch.from_numpy(t[g].data.copy()).reshape(src[n].shape), src[n]), g


TOKENIZER_CASES = [
    PROMPT,
    "12345 hello  world\n\n  x",
    'print("<|endoftext|>")',
    "Panda",
    " Panda",
    "a   b",
    "你好，世界！Qwen 的分词器。",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n",
]


def test_tokenizer_matches(tools, model, tmp_path):
    """llama-tokenize (qwen2 pre-tokenizer + our rebuilt merges) == our tiktoken encoding."""
    engine, ggufs, _ = model
    for i, text in enumerate(TOKENIZER_CASES):
        p = tmp_path / f"prompt{i}.txt"
        p.write_bytes(text.encode())
        out = _run([tools["llama-tokenize"], "-m", ggufs["f32"], "-f", p, "--no-escape",
                    "--ids", "--log-disable"]).stdout.decode()
        ids = [int(x) for x in out.strip().strip("[]").split(",") if x.strip()]
        assert ids == engine.tokenizer.encode(text), text


def _llama_logits(tools, gguf_path: Path, prompt: str, out_dir: Path, flags=()):
    _run([tools["llama-debug"], "-m", gguf_path, "-p", prompt, "--no-escape", "--save-logits",
          "--logits-output-dir", out_dir, "-t", "2", "--log-disable", *flags])
    stem = out_dir / f"llamacpp-{gguf_path.stem}"
    logits = torch.frombuffer(bytearray((stem.with_name(stem.name + ".bin")).read_bytes()),
                              dtype=torch.float32)
    ids = torch.frombuffer(bytearray(stem.with_name(stem.name + "-tokens.bin").read_bytes()),
                           dtype=torch.int32).tolist()
    return ids, logits


# llama.cpp's defaults keep the KV cache in f16 and use flash attention: ~1e-3 off an fp32
# reference. With an f32 cache and the plain attention path an F32 GGUF agrees to ~1e-6.
EXACT = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")


@pytest.mark.parametrize("ftype,flags,tol", [("f32", EXACT, 1e-5), ("f32", (), 5e-3),
                                             ("f16", (), 2e-2)],
                         ids=["f32-f32cache", "f32-defaults", "f16-defaults"])
def test_logits_match_reference(tools, model, tmp_path, ftype, flags, tol):
    """Last-position logits of llama-debug vs our fp32 reference on the same prompt ids:
    max |diff| <= tol x max |logit|, and the same argmax."""
    engine, ggufs, _ = model
    ids, theirs = _llama_logits(tools, ggufs[ftype], PROMPT, tmp_path, flags)
    assert ids == engine.tokenizer.encode(PROMPT)
    ours = engine.logits(ids)[-1]
    assert theirs.shape == ours.shape == (151936,)
    ours, theirs = ours[:VOCAB_SIZE], theirs[:VOCAB_SIZE]
    err = (ours - theirs).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{ftype} {' '.join(flags) or 'defaults'}: max |diff| {err:.3g}, max |logit| "
          f"{scale:.3g}")
    assert err <= tol * scale, f"{ftype}: max |diff| {err:.3g} vs max |logit| {scale:.3g}"
    assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_greedy_decode_matches(tools, model, ftype):
    """llama-simple (greedy, llama.cpp's default f16 KV cache) continues the prompt with the same
    N_NEW tokens as our fp32 engine: its stdout is exactly the bytes of prompt + our tokens."""
    engine, ggufs, _ = model
    out = _run([tools["llama-simple"], "-m", ggufs[ftype], "-n", str(N_NEW), PROMPT]).stdout
    prompt_ids = engine.tokenizer.encode(PROMPT)
    r = engine.generate(prompt_ids, max_new_tokens=N_NEW, temperature=0, repetition_penalty=1.0,
                        ignore_eos=True)
    assert len(r.token_ids) == N_NEW
    tb = engine.tokenizer.id_to_bytes
    want = b"".join(tb(i) for i in prompt_ids + r.token_ids) + b"\n"
    assert out == want, (f"ours {r.token_ids}: {want!r}\nllama.cpp: {out!r}")


def test_round_table_pairs_ratios_and_shares():
    """The per-round table of a run (no llama.cpp needed): each llama.cpp type is paired with
    our configuration quantized alike, the ratio is ours over theirs, and each share is the
    engine's weight bytes x tokens/s over the read pass of that round; the median round is the
    middle ratio."""
    def llama(tg):
        return [{"n_prompt": 128, "n_gen": 0, "avg_ts": 100.0, "stddev_ts": 1.0},
                {"n_prompt": 0, "n_gen": 16, "avg_ts": tg, "stddev_ts": 0.1}]

    def ours(tok_s, read, pct):
        return {"results": [{"decode_tokens_per_s": tok_s, "read_gb_s": read, "pct_of_read": pct}]}

    out = {"prompt_tokens": 128, "new_tokens": 16, "llama_bytes_per_token": {"q4_0": 10 ** 9},
           "rounds": [{"llama_cpp": {"q4_0": llama(tg)}, "ours": {"int4:int4": ours(o, 40.0, 70.0)}}
                      for tg, o in ((20.0, 30.0), (25.0, 25.0), (30.0, 24.0))]}
    rows = bench.round_table(out)
    assert [r["ratio"] for r in rows] == [1.5, 1.0, 0.8]
    assert [round(r["llama_pct_of_read"], 6) for r in rows] == [50.0, 62.5, 75.0]
    assert all(r["config"] == "int4:int4" and r["type"] == "Q4_0" for r in rows)
    text = bench.format_rounds(out)
    assert "vs Q4_0: median round ratio 1.00 (range 0.80-1.50)" in text
