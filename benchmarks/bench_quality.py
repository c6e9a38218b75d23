"""Same-run quality table on the trained fixture (qwen_fast/fixture.py): every row scores the
same held-out standard-library text, the same tokens, with the same chunks.

- Ours: bf16 (the base), int8 and int4 round-to-nearest, int8 and int4 GPTQ (calibrated on
  training text; int4 also with act-order), each with a bf16 lm_head and the int4 rows also
  with an int8 and an int4 one (lm_head quantized at load, round-to-nearest).
- llama.cpp: llama-perplexity (built from the same sdist as bench_llamacpp.py) on GGUF
  conversions of the same weights: F16 (its base), Q8_0, Q4_0 and Q4_K_M.

Each row: perplexity, and KL divergence from its own engine's base (ours: bf16, llama.cpp:
F16): mean, 99th percentile, and top-1 agreement. Ours is exact over the whole vocabulary (the
base's log-probabilities are held window by window); the "top-32 bound" column is what
``qwen-fast perplexity --kl-base`` reports from its bounded saved logits, for comparison.
llama.cpp's KL is its own (--kl-divergence against its base's saved log-probabilities).

Tokens: llama-perplexity's chunks (``qwen-fast perplexity --chunks``: non-overlapping chunks of
--context tokens, the second half of each scored); llama-tokenize's ids of the text are checked
equal to ours before anything is compared.

    python benchmarks/bench_quality.py [--model DIR] [--chunks 24] [--context 512]

Without --model the default fixture is trained first (about 18 minutes on 2 cores) or taken
from the cache.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_llamacpp as B  # noqa: E402
from harness import RESULTS, machine  # noqa: E402

from qwen_fast import Engine  # noqa: E402
from qwen_fast import fixture as FX  # noqa: E402
from qwen_fast import perplexity as P  # noqa: E402
from qwen_fast.quant import quantize_checkpoint  # noqa: E402

LLAMA_TYPES = ("q8_0", "q4_0", "q4_k_m")
#: Our rows: (label, checkpoint key, lm_head quant[, dtype, backend]); the last two show where
#: the int8 rows' divergence comes from: the bf16 base's own rounding (fp32 against it), and the
#: int8 kernels' activation rounding (the reference backend multiplies by the dequantized weights).
OURS = [("bf16", "dense", None), ("fp32", "dense", None, "float32"),
        ("bf16 + int8 lm_head", "dense", "int8"),
        ("int8 RTN", "int8-rtn", None), ("int8 GPTQ", "int8-gptq", None),
        ("int8 GPTQ + int8 lm_head", "int8-gptq", "int8"),
        ("int4 RTN", "int4-rtn", None), ("int4 GPTQ", "int4-gptq", None),
        ("int4 GPTQ act-order", "int4-gptq-act", None),
        ("int4 RTN + int4 lm_head", "int4-rtn", "int4"),
        ("int4 GPTQ + int8 lm_head", "int4-gptq", "int8"),
        ("int4 GPTQ + int4 lm_head", "int4-gptq", "int4"),
        ("int8 RTN, reference backend (bf16 activations)", "int8-rtn", None, "bfloat16", "reference")]


def _row(spec):
    return tuple(spec) + ("bfloat16", "auto")[len(spec) - 3:]


def progress(msg: str) -> None:
    print(f"[bench-quality] {msg}", file=sys.stderr, flush=True)


def held_out_text(tok, tokens: int) -> str:
    """Held-out files (the fixture's rule), in path order, until ``tokens`` tokens."""
    parts, n = [], 0
    for rel, p in FX.stdlib_files():
        if not FX.held_out(rel):
            continue
        t = p.read_text(encoding="utf-8", errors="replace")
        if "<|" in t:                       # keep special-token text out of both tokenizers
            continue
        parts.append(t)
        n += len(tok.encode(t, allowed_special=set()))
        if n >= tokens:
            break
    return "\n\n".join(parts)


def held_out_ids(tok, tokens: int, text_file: Path) -> List[int]:
    """The first `tokens` ids of the held-out text, which is written to text_file (the file
    llama.cpp's tools read, so both sides score the same text)."""
    text_file.write_text(held_out_text(tok, tokens + 64))
    return tok.encode(text_file.read_text(), allowed_special=set())[:tokens]


def calibration_text(every: int = 10) -> str:
    """Every ``every``-th training file: calibration from the text the model was trained on."""
    files = [p for rel, p in FX.stdlib_files() if not FX.held_out(rel)]
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files[::every])


def our_checkpoints(model: Path, work: Path, calib: Path, samples: int, seq_len: int) -> Dict[str, Path]:
    out = {"dense": model}
    plans = {"int8-rtn": dict(bits=8), "int4-rtn": dict(bits=4),
             "int8-gptq": dict(bits=8, method="gptq"), "int4-gptq": dict(bits=4, method="gptq"),
             "int4-gptq-act": dict(bits=4, method="gptq", act_order=True)}
    for key, kw in plans.items():
        d = work / key
        if not (d / "config.json").is_file():
            t0 = time.perf_counter()
            if kw.get("method") == "gptq":
                kw = dict(kw, calibration=str(calib), samples=samples, seq_len=seq_len)
            quantize_checkpoint(model, d, progress=False, **kw)
            progress(f"quantized {key} in {time.perf_counter() - t0:.1f} s")
        out[key] = d
    return out


def run_ours(ckpts: Dict[str, Path], ids: List[int], context: int, threads: int) -> List[dict]:
    """Every row of OURS over the same chunks; KL exact against the bf16 base, window by window."""
    torch.set_num_threads(threads)
    engines = {}
    rows_spec = [_row(r) for r in OURS]
    for label, key, head, dtype, backend in rows_spec:
        engines[label] = Engine.from_pretrained(ckpts[key], dtype=dtype, lm_head_quant=head,
                                                backend=backend, progress=False)
    wins = P.chunk_windows(len(ids), context)
    acc = {r[0]: {"nll": [], "kl": [], "kl_top": [], "agree": []} for r in rows_spec}
    t0 = time.perf_counter()
    for w in range(len(wins)):
        base = None
        for label in acc:
            lp, target = next(P.scored_logprobs(engines[label], ids, wins[w:w + 1], None))
            if base is None:
                base = lp
                i, v, rest = P.top_and_rest(base)
            a = acc[label]
            a["nll"].append(-lp.gather(1, target[:, None])[:, 0])
            a["kl"].append(P.kl_full(base, lp))
            a["kl_top"].append(P.kl_coarse(i, v, rest, lp))
            a["agree"].append(lp.argmax(-1) == base.argmax(-1))
        progress(f"ours: chunk {w + 1}/{len(wins)} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for label, key, head, dtype, backend in rows_spec:
        a = {k: torch.cat(v) for k, v in acc[label].items()}
        rows.append({"engine": "qwen_fast", "row": label, "checkpoint": key, "lm_head": head or "bf16",
                     "dtype": dtype, "backend": backend,
                     "perplexity": math.exp(float(a["nll"].double().mean())),
                     "kl_mean": float(a["kl"].mean()), "kl_p99": float(torch.quantile(a["kl"], 0.99)),
                     "kl_top32_bound": float(a["kl_top"].mean()),
                     "top1_agreement": float(a["agree"].float().mean()),
                     "scored_tokens": int(a["nll"].numel())})
    return rows


def _num(pattern: str, text: str) -> Optional[float]:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def fixture_f16_gguf(model: Path, cfg, work: Path) -> Path:
    """The fixture's weights as an F16 GGUF in `work` (written once), llama.cpp's base file."""
    import safetensors.torch as st
    f16 = work / "fixture-f16.gguf"
    if not f16.is_file():
        sd = {}
        for p in sorted(model.glob("*.safetensors")):
            sd.update(st.load_file(str(p)))
        B.write_gguf(f16, cfg, sd, "f16", name=f"qwen_fast fixture {model.name}")
    return f16


def llama_kl_numbers(stdout: str) -> dict:
    """Perplexity, KL mean and p99, top-1 agreement of a llama-perplexity --kl-divergence run."""
    same = _num(r"Same top p:\s+([\d.]+)", stdout)
    return {"perplexity": _num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", stdout),
            "kl_mean": _num(r"Mean\s+KLD:\s+([-\d.]+)", stdout),
            "kl_p99": _num(r"99\.0%\s+KLD:\s+([-\d.]+)", stdout),
            "top1_agreement": same / 100 if same is not None else None}


def run_llama(build: Path, model: Path, cfg, text_file: Path, work: Path, chunks: int,
              context: int, threads: int, our_ids: List[int]) -> List[dict]:
    f16 = fixture_f16_gguf(model, cfg, work)
    tok_out = subprocess.run([str(B.find_tool("llama-tokenize", build)), "-m", str(f16), "-f",
                              str(text_file), "--no-escape", "--ids", "--log-disable"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True).stdout.decode()
    llama_ids = [int(x) for x in tok_out.strip().strip("[]").split(",") if x.strip()]
    n = chunks * context
    if llama_ids[:n] != our_ids[:n]:
        bad = next(i for i, (a, b) in enumerate(zip(llama_ids, our_ids)) if a != b)
        raise SystemExit(f"llama-tokenize and our tokenizer differ at token {bad}: the rows "
                         "would not score the same tokens")
    ggufs = {"f16": f16}
    for t in LLAMA_TYPES:
        q = work / f"fixture-{t}.gguf"
        if not q.is_file():
            r = subprocess.run([str(B.find_tool("llama-quantize", build)), str(f16), str(q),
                                t.upper()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                progress(f"llama-quantize {t.upper()} failed; row left out:\n{r.stdout[-800:]}")
                continue
        ggufs[t] = q
    tool = str(B.find_tool("llama-perplexity", build))
    kld = work / "f16.kld"
    common = ["-c", str(context), "-t", str(threads), "--chunks", str(chunks)]
    t0 = time.perf_counter()
    r = subprocess.run([tool, "-m", str(f16), "-f", str(text_file), *common,
                        "--kl-divergence-base", str(kld)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-perplexity (F16 base) failed:\n{r.stdout[-2000:]}")
    rows = [{"engine": "llama.cpp", "row": "F16", "perplexity": _num(r"Final estimate: PPL = ([\d.]+)", r.stdout),
             "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0,
             "seconds": round(time.perf_counter() - t0, 1)}]
    for t, path in ggufs.items():
        if t == "f16":
            continue
        t0 = time.perf_counter()
        r = subprocess.run([tool, "-m", str(path), *common, "--kl-divergence-base", str(kld),
                            "--kl-divergence"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-perplexity ({t}) failed:\n{r.stdout[-2000:]}")
        rows.append({"engine": "llama.cpp", "row": t.upper(), **llama_kl_numbers(r.stdout),
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def format_table(rows: List[dict]) -> str:
    lines = ["| engine | row | perplexity | KL mean | KL p99 | top-32 bound | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(k, fmt):
            return fmt.format(r[k]) if r.get(k) is not None else "-"
        lines.append(f"| {r['engine']} | {r['row']} | {f('perplexity', '{:.3f}')} | "
                     f"{f('kl_mean', '{:.5f}')} | {f('kl_p99', '{:.4f}')} | "
                     f"{f('kl_top32_bound', '{:.5f}')} | {f('top1_agreement', '{:.2%}')} |")
    return "\n".join(lines)


def targets(rows: List[dict]) -> List[str]:
    by = {(r["engine"], r["row"]): r for r in rows}
    out = []
    ours8, q8 = by.get(("qwen_fast", "int8 RTN")), by.get(("llama.cpp", "Q8_0"))
    g4, r4, q4 = (by.get(("qwen_fast", "int4 GPTQ")), by.get(("qwen_fast", "int4 RTN")),
                  by.get(("llama.cpp", "Q4_0")))
    if ours8 and q8:
        best8 = min(ours8["kl_mean"], by[("qwen_fast", "int8 GPTQ")]["kl_mean"])
        out.append(f"int8 KL vs bf16 {best8:.5f} (RTN {ours8['kl_mean']:.5f}) <= Q8_0's KL vs "
                   f"F16 {q8['kl_mean']:.5f}: {'met' if best8 <= q8['kl_mean'] else 'NOT met'}")
    if g4 and r4:
        out.append(f"int4 GPTQ perplexity {g4['perplexity']:.3f} < int4 RTN's "
                   f"{r4['perplexity']:.3f}: {'met' if g4['perplexity'] < r4['perplexity'] else 'NOT met'}")
    if g4 and q4:
        out.append(f"int4 GPTQ perplexity {g4['perplexity']:.3f} <= Q4_0's {q4['perplexity']:.3f}: "
                   f"{'met' if g4['perplexity'] <= q4['perplexity'] else 'NOT met'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="fixture checkpoint (default: the default fixture, trained "
                                    "on first use)")
    ap.add_argument("--chunks", type=int, default=24, help="chunks of --context tokens scored")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128, help="GPTQ calibration windows")
    ap.add_argument("--work", help="where the quantized checkpoints, GGUFs and text go "
                                   "(default: <cache>/quality/<model name>)")
    ap.add_argument("--no-llama", action="store_true", help="our rows only")
    ap.add_argument("--no-build", action="store_true", help="never build llama.cpp")
    ap.add_argument("--sdist", help="llama-cpp-python sdist (see bench_llamacpp.py)")
    ap.add_argument("--llama-cpp-dir", help="an existing llama.cpp build")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    model = Path(a.model) if a.model else FX.train(FX.Settings(), log=progress)
    work = Path(a.work) if a.work else FX.cache_dir() / "quality" / model.name
    work.mkdir(parents=True, exist_ok=True)
    from qwen_fast.loader import load_config
    from qwen_fast.tokenizer import QwenTokenizer
    cfg = load_config(model)
    if a.context > cfg.seq_length:
        raise SystemExit(f"--context {a.context} is above the model's seq_length {cfg.seq_length}")
    tok = QwenTokenizer.default()
    text_file = work / "heldout.txt"
    ids = held_out_ids(tok, a.chunks * a.context, text_file)
    if len(ids) < a.chunks * a.context:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than {a.chunks} chunks")
    calib = work / "calibration.txt"
    if not calib.is_file():
        calib.write_text(calibration_text())
    ckpts = our_checkpoints(model, work, calib, a.samples, cfg.seq_length)
    t0 = time.perf_counter()
    rows = run_ours(ckpts, ids, a.context, a.threads)
    progress(f"our rows in {time.perf_counter() - t0:.0f} s")
    if not a.no_llama:
        opts = argparse.Namespace(llama_cpp_dir=a.llama_cpp_dir, cache_dir=None, build=False,
                                  no_build=a.no_build, sdist=a.sdist, jobs=a.jobs)
        try:
            build = B.ensure_tools(["llama-perplexity", "llama-quantize", "llama-tokenize"], opts)
            rows += run_llama(build, model, cfg, text_file, work, a.chunks, a.context, a.threads, ids)
        except B.Missing as m:
            print(f"llama.cpp rows skipped: {m.what}. To get it: {m.how}")
    table = format_table(rows)
    checks = targets(rows)
    print(f"fixture {model.name}: {a.chunks} chunks of {a.context} tokens of held-out text, "
          f"{rows[0]['scored_tokens']} tokens scored per row")
    print(table)
    print("\n".join(checks))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    out = {"model": model.name, "fixture": json.loads((model / "fixture.json").read_text())
           if (model / "fixture.json").is_file() else None,
           "chunks": a.chunks, "context": a.context, "gptq_samples": a.samples, "rows": rows,
           "targets": checks, "machine": machine(), "command": " ".join(sys.argv)}
    (res / f"quality-{stamp}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {res / f'quality-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
