"""How long calibrated GPTQ takes on the full-size model (Qwen-1.8B-Chat's shapes, random bf16
weights), measured on its first --layers blocks and projected to all 24, split into the
calibration forward (scales with the calibration tokens) and the solver (does not).

    python benchmarks/bench_gptq.py [--layers 2] [--samples 16] [--seq-len 512] [--bits 4]

The calibration forward is qwen_fast/calibrate.py's (fp32, true-sequential: each Linear's
inputs come from the block with the earlier ones already quantized); the solver is
gptq_solver.quantize_gptq. Round-to-nearest of the same blocks is timed for comparison. The
projection to 24 blocks and to other sample counts is arithmetic on the measured parts, and
printed as such. Each quantized Linear's output error on its calibration inputs (the GPTQ
objective, tr(dW H dW^T) / tr(W H W^T) with H from real-token activations) is reported for GPTQ
and for round-to-nearest of the same weight.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import RESULTS, machine  # noqa: E402

from qwen_fast import calibrate as C  # noqa: E402
from qwen_fast import fixture as FX  # noqa: E402
from qwen_fast.config import builtin_config  # noqa: E402
from qwen_fast.gptq import QUANTIZED_LINEARS, dequantize_gptq, quantize_rtn  # noqa: E402
from qwen_fast.loader import dummy_state_dict  # noqa: E402
from qwen_fast.tokenizer import QwenTokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="blocks measured (of 24)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    full = builtin_config("qwen-1.8b-chat")
    cfg = dataclasses.replace(full, num_hidden_layers=a.layers)
    sd = dummy_state_dict(cfg, torch.bfloat16, seed=0)
    tok = QwenTokenizer.default()
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace")
                       for rel, p in FX.stdlib_files()[:200] if not FX.held_out(rel))
    ids = C.calibration_ids(tok, text, a.samples, a.seq_len, seed=0)

    solve_s, extra_s = [0.0], [0.0]      # the solver; this benchmark's error measurement
    real_solver = C.quantize_gptq
    errors = []         # per Linear: relative output error of GPTQ and of RTN on its inputs

    def timed_solver(w, h, bits, group_size, sym, damp, act_order):
        t = time.perf_counter()
        packed = real_solver(w, h, bits, group_size, sym, damp, act_order)
        solve_s[0] += time.perf_counter() - t
        t = time.perf_counter()
        # tr(dW H dW^T) / tr(W H W^T): the output error on the calibration inputs (H ~ X^T X)
        W = w.double()
        rtn = quantize_rtn(w, bits, group_size, sym)

        def rel(q):
            d = dequantize_gptq(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], bits).double() - W
            return float(((d @ h) * d).sum() / ((W @ h) * W).sum())
        errors.append({"linear": len(errors), "shape": list(w.shape), "gptq": rel(packed),
                       "rtn": rel(rtn)})
        extra_s[0] += time.perf_counter() - t
        return packed
    C.quantize_gptq = timed_solver
    blocks = []
    t_prev = [time.perf_counter()]

    def progress(done, total):
        now = time.perf_counter()
        blocks.append(now - t_prev[0])
        t_prev[0] = now
        print(f"block {done}/{total}: {blocks[-1]:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        C.gptq_checkpoint(cfg, lambda n: sd[n], ids, a.bits, a.group_size,
                          act_order=a.act_order, progress=progress)
    finally:
        C.quantize_gptq = real_solver
    total = time.perf_counter() - t0 - extra_s[0]
    solver = solve_s[0]
    forward = total - solver
    t0 = time.perf_counter()
    for li in range(a.layers):
        for lin in QUANTIZED_LINEARS:
            quantize_rtn(sd[f"transformer.h.{li}.{lin}.weight"], a.bits, a.group_size)
    rtn = time.perf_counter() - t0
    per_fwd, per_solve = forward / a.layers, solver / a.layers
    L = full.num_hidden_layers
    tokens = a.samples * a.seq_len
    proj = {s: L * (per_fwd * s / a.samples + per_solve) for s in (a.samples, 128)}
    lines = [
        f"GPTQ int{a.bits} g{a.group_size}{' act-order' if a.act_order else ''}, full-size shapes, "
        f"{a.samples} x {a.seq_len} = {tokens} calibration tokens, {torch.get_num_threads()} threads",
        f"measured on {a.layers} block(s): {total:.1f} s = calibration forward {forward:.1f} s "
        f"+ solver {solver:.1f} s (per block {per_fwd:.1f} + {per_solve:.1f} s); "
        f"round-to-nearest of the same blocks {rtn:.2f} s",
        f"projection to {L} blocks (arithmetic on the measured per-block parts, forward scaled "
        f"by tokens): {a.samples} samples {proj[a.samples] / 60:.1f} min, 128 samples "
        f"{proj[128] / 60:.1f} min; round-to-nearest {L * rtn / a.layers:.1f} s"]
    names = [f"{li}.{lin}" for li in range(a.layers) for step in C.STEPS for lin in step]
    for e, name in zip(errors, names):
        e["linear"] = name
    lines.append("relative output error on the calibration inputs, tr(dW H dW^T) / tr(W H W^T), "
                 "GPTQ vs round-to-nearest:")
    lines += [f"  {e['linear']:<18} {e['gptq']:.3e} vs {e['rtn']:.3e} ({e['rtn'] / e['gptq']:.2f}x)"
              for e in errors]
    print("\n".join(lines))
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    out = {"args": {k: v for k, v in vars(a).items() if k != "results"}, "blocks_s": blocks, "total_s": total, "forward_s": forward,
           "errors": errors,
           "solver_s": solver, "rtn_s": rtn, "projection_min": {str(k): v / 60 for k, v in proj.items()},
           "summary": lines, "machine": machine()}
    path = res / f"gptq-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
